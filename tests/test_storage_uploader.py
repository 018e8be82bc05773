"""The background uploader and the Trainer callback: uploads off the training thread,
newest pending only, an S3 outage (degraded, then recovered, nothing lost), SIGTERM
preemption through a real transformers Trainer, and a second signal mid-upload."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from finetune_trainer.storage import (
    BackgroundUploader,
    RetryPolicy,
    find_resume_checkpoint,
    list_checkpoints,
    list_complete,
    node_topology,
    open_store,
)
from finetune_trainer.storage.stores import FileStore

FAST = RetryPolicy(attempts=2, base_delay=0.05, max_delay=0.1, botocore_attempts=1, connect_timeout=1, read_timeout=5)


def make_checkpoint(root: Path, step: int, size: int = 4096) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(size))
    (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    return folder


def other_node_checkpoint(root: Path, step: int) -> Path:
    """The files node 1's ranks wrote (each node has its own, none shared with node 0's)."""
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "rng_state_1.pth").write_bytes(os.urandom(512))
    return folder


def taken_and_held(uploader: BackgroundUploader, step: int) -> None:
    """Wait until the uploader's thread has taken `step` (and is held in its hook)."""
    deadline = time.monotonic() + 60
    while uploader.status.uploading_step != step and time.monotonic() < deadline:
        time.sleep(0.01)
    assert uploader.status.uploading_step == step, uploader.status


def test_uploads_in_the_background_and_applies_retention(storage_uri, tmp_path):
    store = open_store(storage_uri, retry=FAST)
    uploaded = []
    uploader = BackgroundUploader(store, save_total_limit=2, on_uploaded=uploaded.append)
    try:
        for step in (1, 2, 3):
            uploader.submit(make_checkpoint(tmp_path, step), step, step / 3)
            assert uploader.wait(60)
        assert [m.step for m in list_complete(store)] == [3, 2]
        assert sorted(list_checkpoints(store)) == [2, 3]
        assert [m.step for m in uploaded] == [1, 2, 3]
        status = uploader.status
        assert not status.degraded and status.last_uploaded_step == 3 and status.pending_step is None
        assert status.last_uploaded_uri == storage_uri.rstrip("/") + "/checkpoints/checkpoint-3"
    finally:
        uploader.close()


class WatchedFileStore(FileStore):
    """A real FileStore that records whether one key was ever written twice at once, and
    holds uploads at a gate so the test decides when an upload in flight may finish."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.in_flight: set[str] = set()
        self.overlaps: list[str] = []
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()

    def put_file(self, local, key):
        with self.lock:
            if key in self.in_flight:
                self.overlaps.append(key)
            self.in_flight.add(key)
        try:
            assert self.gate.wait(60), "the test never opened the gate"
            super().put_file(local, key)
        finally:
            with self.lock:
                self.in_flight.discard(key)


def test_a_newer_checkpoint_supersedes_the_pending_one(tmp_path, caplog):
    caplog.set_level("INFO", logger="finetune_trainer.storage")
    store = WatchedFileStore(tmp_path / "store")
    folders = {step: make_checkpoint(tmp_path / "out", step) for step in (1, 2, 3)}
    uploader = BackgroundUploader(store)
    try:
        store.gate.clear()  # checkpoint-1 stays in flight until the gate opens
        uploader.submit(folders[1], 1)
        deadline = time.monotonic() + 30
        while uploader.status.uploading_step != 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        uploader.submit(folders[2], 2)
        uploader.submit(folders[3], 3)
        uploader.submit(make_checkpoint(tmp_path / "older", 2), 2)  # older than the newest submitted: ignored
        status = uploader.status
        assert (status.uploading_step, status.pending_step) == (1, 3)
        store.gate.set()
        assert uploader.wait(60)
        uploader.submit(make_checkpoint(tmp_path / "late", 2), 2)  # even after 3 is uploaded
        assert uploader.wait(60)
    finally:
        store.gate.set()
        uploader.close()
    assert sorted(list_checkpoints(store)) == [1, 3]
    assert "checkpoint-2 superseded by checkpoint-3" in caplog.text
    assert "checkpoint-2 submitted after checkpoint-3; ignored" in caplog.text


def test_the_same_checkpoint_is_never_uploaded_twice_at_once(tmp_path):
    store = WatchedFileStore(tmp_path / "store")
    uploader = BackgroundUploader(store)
    folder = make_checkpoint(tmp_path, 5, size=20 * 1024 * 1024)
    try:
        for _ in range(4):  # e.g. a preemption save at the step of a regular save
            uploader.submit(folder, 5)
        assert uploader.wait(60)
    finally:
        uploader.close()
    assert store.overlaps == [] and [m.step for m in list_complete(store)] == [5]


def test_an_outage_degrades_then_the_upload_resumes_and_nothing_is_lost(s3_outage, tmp_path):
    # a few attempts: after the outage, pooled connections that the gate cut may fail once each
    store = open_store(f"s3://{s3_outage.bucket}/ns/job", retry=RetryPolicy(attempts=4, base_delay=0.05, max_delay=0.2,
                                                                           botocore_attempts=1, connect_timeout=1))
    uploader = BackgroundUploader(store, save_total_limit=3)
    try:
        uploader.submit(make_checkpoint(tmp_path, 1), 1)
        assert uploader.wait(60)

        s3_outage.down()
        uploader.submit(make_checkpoint(tmp_path, 2), 2)
        assert not uploader.wait(60)  # returns instead of raising into training
        status = uploader.status
        assert status.degraded and "checkpoint-2" in status.last_error and status.pending_step == 2

        s3_outage.up()
        assert uploader.wait(60)  # wait() (end of training) retries what is pending
        assert not uploader.degraded and [m.step for m in list_complete(store)] == [2, 1]

        s3_outage.down()
        uploader.submit(make_checkpoint(tmp_path, 3), 3)
        assert not uploader.wait(60) and uploader.degraded
        s3_outage.up()
        uploader.submit(make_checkpoint(tmp_path, 4), 4)  # the next save retries, newest first
        assert uploader.wait(60)
        assert not uploader.degraded and [m.step for m in list_complete(store)] == [4, 2, 1]
    finally:
        uploader.close()


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, (0, 1)),
        ({"GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2"}, (1, 2)),
        ({"GROUP_RANK": "2", "WORLD_SIZE": "12", "LOCAL_WORLD_SIZE": "4"}, (2, 3)),
        ({"PET_NODE_RANK": "1", "PET_NNODES": "4"}, (1, 4)),
    ],
)
def test_node_topology(env, expected):
    assert node_topology(env) == expected


# ---------------------------------------------------------------- signals

SIGNALLED_UPLOAD = """
import sys
from finetune_trainer.storage import TransferSettings, install_preemption_handler, open_store, upload_checkpoint
flag = install_preemption_handler()
store = open_store(sys.argv[1], transfer=TransferSettings(file_concurrency=1))
upload_checkpoint(store, sys.argv[2], 2, None)
"""


def test_a_second_sigterm_mid_upload_kills_without_a_visible_checkpoint(storage_uri, tmp_path):
    store = open_store(storage_uri, retry=FAST)
    folder = make_checkpoint(tmp_path, 2, size=2 * 1024 * 1024)
    os.mkfifo(folder / "zz-still-being-written")  # holds the upload open after the real files
    child = subprocess.Popen([sys.executable, "-c", SIGNALLED_UPLOAD, storage_uri, str(folder)])
    try:
        deadline = time.monotonic() + 60
        while not store.list("checkpoints/checkpoint-2/"):
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        child.send_signal(signal.SIGTERM)  # first: only a flag, the process goes on
        time.sleep(0.5)
        assert child.poll() is None
        # second: gone at once. Two signals sent close together can arrive as one (standard
        # signals do not queue, and the first may still be pending on a busy machine), so
        # signal again until the process is gone; it must die of SIGTERM, within 30 s.
        deadline = time.monotonic() + 30
        while child.poll() is None and time.monotonic() < deadline:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(1)
            except subprocess.TimeoutExpired:
                pass
        assert child.wait(1) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert store.list("checkpoints/checkpoint-2/") and list_complete(store) == []


@pytest.fixture
def tiny_trainer_parts():
    """A 1-layer random Llama and 64 fixed samples: a real Trainer run in about a second."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))

    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (64, 12), generator=g).tolist()]
    return model, data


def run_trainer(model, data, output_dir: Path, callbacks, resume=None):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    steps: list[int] = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    args = TrainingArguments(output_dir=str(output_dir), max_steps=6, save_steps=2, save_total_limit=2,
                             per_device_train_batch_size=4, report_to=[], use_cpu=True, logging_steps=100,
                             disable_tqdm=True, save_only_model=False)
    trainer = Trainer(model=model(), args=args, train_dataset=data, callbacks=[Steps(), *callbacks])
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer, steps


def test_sigterm_saves_at_the_next_step_uploads_and_the_restart_resumes_there(storage_uri, tmp_path, tiny_trainer_parts):
    from transformers import TrainerCallback

    from finetune_trainer.storage.callback import CheckpointSyncCallback, install_preemption_handler

    class SigtermAtStep3(TrainerCallback):  # Kubernetes' notice, delivered mid-training
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    model, data = tiny_trainer_parts
    store = open_store(storage_uri, retry=FAST)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        flag = install_preemption_handler()
        uploader = BackgroundUploader(store, save_total_limit=2)
        trainer, steps = run_trainer(model, data, tmp_path / "pod-1",
                                     [SigtermAtStep3(), CheckpointSyncCallback(uploader, preemption=flag)])
        uploader.close()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert flag.is_set() and flag.exit_code == 143
    assert steps == [1, 2, 3] and trainer.state.global_step == 3
    assert [m.step for m in list_complete(store)] == [3, 2]  # on_train_end waited for the upload

    # a new pod with an empty disk
    resume = find_resume_checkpoint(store, tmp_path / "pod-2")
    assert resume == tmp_path / "pod-2" / "checkpoint-3"
    uploader = BackgroundUploader(store, save_total_limit=2)
    trainer, steps = run_trainer(model, data, tmp_path / "pod-2", [CheckpointSyncCallback(uploader)], resume=resume)
    uploader.close()
    assert steps == [4, 5, 6]  # no step trained twice
    assert [m.step for m in list_complete(store)] == [6, 4]
    assert sorted(list_checkpoints(store)) == [4, 6]


def test_the_hook_before_an_upload_runs_before_its_manifest(tmp_path):
    """What must be in storage once a checkpoint is complete (the metrics history up to it) goes
    up before the checkpoint's manifest: a pod killed as the manifest lands loses none of it."""
    store = open_store((tmp_path / "store").as_uri(), retry=FAST)
    seen = []
    uploader = BackgroundUploader(store, before_upload=lambda step: seen.append((step, sorted(list_checkpoints(store)))))
    try:
        for step in (1, 2):
            uploader.submit(make_checkpoint(tmp_path, step), step, step / 2)
            assert uploader.wait(60)
        assert seen == [(1, []), (2, [1])]  # each call came before its own checkpoint existed in storage
    finally:
        uploader.close()


def test_a_storage_failure_of_that_hook_is_the_checkpoints_own(tmp_path, caplog):
    """Storage refusing the history up to a checkpoint fails that checkpoint's upload (degraded,
    kept pending, no manifest stored ahead of its history): CI saw a whole outage pass where only
    this write failed and nothing said storage was down."""
    from finetune_trainer.storage.stores import StorageUnavailable

    store = open_store((tmp_path / "store").as_uri(), retry=FAST)
    outage = threading.Event()
    outage.set()

    def publish_history(step):
        if outage.is_set():
            raise StorageUnavailable(f"write metrics.jsonl before checkpoint-{step}: connection refused")

    uploader = BackgroundUploader(store, before_upload=publish_history)
    try:
        uploader.submit(make_checkpoint(tmp_path, 1), 1, 0.5)
        assert not uploader.wait(60)
        status = uploader.status
        assert status.degraded and "connection refused" in status.last_error and status.pending_step == 1
        assert list_checkpoints(store) == {}
        assert "checkpoint upload degraded: checkpoint-1 not uploaded" in caplog.text
        outage.clear()
        assert uploader.wait(60)  # the pending checkpoint's next try
        assert not uploader.degraded and [m.step for m in list_complete(store)] == [1]
        assert "checkpoint uploads recovered with checkpoint-1" in caplog.text
    finally:
        uploader.close()


def test_any_other_failure_of_that_hook_never_stops_the_uploads(tmp_path, caplog):
    store = open_store((tmp_path / "store").as_uri(), retry=FAST)
    uploader = BackgroundUploader(store, before_upload=lambda step: 1 / 0)
    try:
        uploader.submit(make_checkpoint(tmp_path, 1), 1, 0.5)
        assert uploader.wait(60) and [m.step for m in list_complete(store)] == [1]
        assert "before_upload hook failed for checkpoint-1" in caplog.text
    finally:
        uploader.close()


def test_a_checkpoint_another_node_skipped_never_holds_node_0(tmp_path, caplog):
    """Node 1's uploader is busy while two saves come, so it drops the older one (newest pending
    only); node 0, uploading that one, hears so and moves on at once instead of waiting out its
    parts timeout (CI saw a two-node run stall there), and the newest checkpoint completes."""
    store = open_store((tmp_path / "store").as_uri(), retry=FAST)
    hold = threading.Event()
    node0 = BackgroundUploader(store, node_rank=0, num_nodes=2, attempt="a", parts_timeout=600)
    node1 = BackgroundUploader(store, node_rank=1, num_nodes=2, attempt="a", parts_timeout=600,
                               before_upload=lambda step: hold.wait(60) if step == 1 else None)
    roots = {rank: tmp_path / f"node-{rank}" for rank in (0, 1)}
    try:
        node1.submit(other_node_checkpoint(roots[1], 1), 1, 0.25)
        taken_and_held(node1, 1)
        for step in (2, 3):  # 2 waits, then 3 supersedes it on node 1 only
            node1.submit(other_node_checkpoint(roots[1], step), step, step / 4)
        for step in (1, 2):
            node0.submit(make_checkpoint(roots[0], step), step, step / 4)
            if step == 1:
                hold.set()
            assert node0.wait(120), f"node 0 still waiting for node 1's part of checkpoint-{step}"
        assert node1.wait(120)
        node0.submit(make_checkpoint(roots[0], 3), 3, 0.75)
        assert node0.wait(120)
        assert [m.step for m in list_complete(store)] == [3, 1]
        assert not node0.degraded and not node1.degraded
        assert "checkpoint-2: node(s) [1] skipped it for a newer save" in caplog.text
    finally:
        hold.set()
        node0.close(5)
        node1.close(5)


def test_a_failed_upload_a_newer_save_replaced_never_holds_node_0(tmp_path, caplog):
    """Node 1's upload of checkpoint-1 fails while checkpoint-2 waits: node 1 goes on with 2,
    and says it dropped 1, so node 0 (waiting for node 1's part of 1) moves on at once."""
    from finetune_trainer.storage.stores import StorageUnavailable

    store = open_store((tmp_path / "store").as_uri(), retry=FAST)
    fail = threading.Event()

    def node1_hook(step):
        if step == 1:
            fail.wait(60)
            raise StorageUnavailable("write metrics.jsonl before checkpoint-1: connection reset")

    node0 = BackgroundUploader(store, node_rank=0, num_nodes=2, attempt="a", parts_timeout=600)
    node1 = BackgroundUploader(store, node_rank=1, num_nodes=2, attempt="a", parts_timeout=600, before_upload=node1_hook)
    roots = {rank: tmp_path / f"node-{rank}" for rank in (0, 1)}
    try:
        node1.submit(other_node_checkpoint(roots[1], 1), 1, 0.5)
        taken_and_held(node1, 1)
        node1.submit(other_node_checkpoint(roots[1], 2), 2, 1.0)  # waits behind the failing one
        node0.submit(make_checkpoint(roots[0], 1), 1, 0.5)
        fail.set()
        assert node0.wait(120), "node 0 still waiting for node 1's part of checkpoint-1"
        assert "checkpoint-1: node(s) [1] skipped it" in caplog.text and not node0.degraded
        assert node1.wait(120) and not node1.degraded
        node0.submit(make_checkpoint(roots[0], 2), 2, 1.0)
        assert node0.wait(120) and [m.step for m in list_complete(store)] == [2]
    finally:
        fail.set()
        node0.close(5)
        node1.close(5)


def test_a_checkpoint_that_vanished_on_another_node_never_holds_node_0(tmp_path, caplog):
    """The trainer's rotation removed node 1's folder before its upload: node 1 says it skipped
    that checkpoint, so node 0 moves on at once rather than waiting out its parts timeout."""
    import shutil

    store = open_store((tmp_path / "store").as_uri(), retry=FAST)
    node0 = BackgroundUploader(store, node_rank=0, num_nodes=2, attempt="a", parts_timeout=600)
    node1 = BackgroundUploader(store, node_rank=1, num_nodes=2, attempt="a", parts_timeout=600,
                               before_upload=lambda step: shutil.rmtree(tmp_path / "node-1" / f"checkpoint-{step}"))
    try:
        node1.submit(other_node_checkpoint(tmp_path / "node-1", 1), 1, 0.5)
        assert node1.wait(60) and "vanished locally" in caplog.text
        node0.submit(make_checkpoint(tmp_path / "node-0", 1), 1, 0.5)
        assert node0.wait(120), "node 0 still waiting for node 1's part of checkpoint-1"
        assert list_complete(store) == [] and not node0.degraded
        assert "checkpoint-1: node(s) [1] skipped it" in caplog.text
    finally:
        node0.close(5)
        node1.close(5)
