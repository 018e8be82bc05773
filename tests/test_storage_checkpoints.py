"""Checkpoints in object storage, against moto_server over HTTP and file:// alike:
manifest last, verification, resume choice, retention, a killed upload, two nodes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from finetune_trainer.storage import (
    ChecksumMismatch,
    Manifest,
    RetryPolicy,
    StorageError,
    apply_retention,
    download_checkpoint,
    find_resume_checkpoint,
    list_checkpoints,
    list_complete,
    open_store,
    upload_checkpoint,
    upload_file_artifact,
    verify,
)
from finetune_trainer.storage.checkpoints import RemoteCheckpoint, retention_plan

FAST = RetryPolicy(attempts=2, base_delay=0.05, max_delay=0.1, botocore_attempts=1, connect_timeout=1, read_timeout=5)


@pytest.fixture
def store(storage_uri):
    return open_store(storage_uri, retry=FAST)


def make_checkpoint(root: Path, step: int, *, big: int = 0, extra: dict[str, bytes] | None = None) -> Path:
    """A folder shaped like the Trainer's, with distinct bytes per step."""
    folder = root / f"checkpoint-{step}"
    files = {
        "model.safetensors": os.urandom(big or 4096 + step),
        "optimizer.pt": os.urandom(2048),
        "trainer_state.json": json.dumps({"global_step": step}).encode(),
        "rng_state.pth": os.urandom(100),
        f"global_step{step}/zero_pp_rank_0_mp_rank_00_optim_states.pt": os.urandom(512),
        **(extra or {}),
    }
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_upload_writes_files_then_a_manifest_with_sizes_and_sha256(store, tmp_path):
    folder = make_checkpoint(tmp_path / "out", 7)
    manifest = upload_checkpoint(store, folder, 7, 1.5)
    rels = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert [f.path for f in manifest.files] == rels
    for entry in manifest.files:
        assert entry.size == (folder / entry.path).stat().st_size
        assert entry.sha256 == sha(folder / entry.path)
        assert store.get_bytes(f"checkpoints/checkpoint-7/{entry.path}") == (folder / entry.path).read_bytes()
    stored = json.loads(store.get_bytes("checkpoints/checkpoint-7/manifest.json"))
    assert stored["step"] == 7 and stored["epoch"] == 1.5 and stored["format_version"] == 1 and stored["timestamp"]
    assert Manifest.from_json((folder / "manifest.json").read_bytes()) == manifest  # the local copy is a candidate too
    assert list_complete(store) == [manifest]
    assert verify(store, manifest) == []


def test_list_complete_is_newest_first_and_ignores_folders_without_a_manifest(store, tmp_path):
    for step in (3, 12, 5):
        upload_checkpoint(store, make_checkpoint(tmp_path, step), step, None)
    store.put_bytes(b"half", "checkpoints/checkpoint-20/model.safetensors")  # an upload that never finished
    store.put_bytes(b"{not json", "checkpoints/checkpoint-30/manifest.json")  # garbage is not complete either
    assert [m.step for m in list_complete(store)] == [12, 5, 3]


def test_corrupted_file_fails_verification_and_resume_takes_the_previous_checkpoint(store, tmp_path, caplog):
    upload_checkpoint(store, make_checkpoint(tmp_path / "run", 10), 10, 1.0)
    second = upload_checkpoint(store, make_checkpoint(tmp_path / "run", 20), 20, 2.0)
    # same size, different bytes: only the sha256 can tell
    store.put_bytes(os.urandom(4096 + 20), "checkpoints/checkpoint-20/model.safetensors")
    assert verify(store, second) == []
    with pytest.raises(ChecksumMismatch, match="model.safetensors"):
        download_checkpoint(store, second, tmp_path / "direct")
    assert not (tmp_path / "direct").exists()

    resume_root = tmp_path / "fresh-pod"
    with caplog.at_level(logging.WARNING):
        chosen = find_resume_checkpoint(store, resume_root)
    assert chosen == resume_root / "checkpoint-10"
    assert "skipping" in caplog.text and "checkpoint-20" in caplog.text
    assert sorted(p.name for p in resume_root.iterdir()) == ["checkpoint-10"]  # no half downloads left
    original = tmp_path / "run" / "checkpoint-10"
    for path in original.rglob("*"):
        if path.is_file() and path.name != "manifest.json":
            assert (chosen / path.relative_to(original)).read_bytes() == path.read_bytes()


def test_a_file_of_the_wrong_size_is_caught_from_the_listing(store, tmp_path):
    manifest = upload_checkpoint(store, make_checkpoint(tmp_path, 4), 4, None)
    store.put_bytes(b"short", "checkpoints/checkpoint-4/optimizer.pt")
    store.delete(["checkpoints/checkpoint-4/rng_state.pth"])
    assert sorted(verify(store, manifest)) == ["optimizer.pt: 5 bytes, manifest says 2048", "rng_state.pth: missing"]
    assert find_resume_checkpoint(store, tmp_path / "pod") is None


def test_resume_reuses_a_local_copy_that_matches_and_falls_back_to_local_folders(store, tmp_path):
    upload_checkpoint(store, make_checkpoint(tmp_path / "up", 5), 5, None)
    pod = tmp_path / "pod"
    first = find_resume_checkpoint(store, pod)
    inode = (first / "model.safetensors").stat().st_ino
    assert find_resume_checkpoint(store, pod) == first
    assert (first / "model.safetensors").stat().st_ino == inode  # not downloaded again

    # a newer local checkpoint that verified when it was saved (its upload did not finish)
    newer = make_checkpoint(pod, 8)
    upload_checkpoint(open_store((tmp_path / "elsewhere").as_uri()), newer, 8, None)  # writes its local manifest
    assert find_resume_checkpoint(store, pod) == newer
    make_checkpoint(pod, 9)  # saved locally, never verified: no manifest, never chosen
    assert find_resume_checkpoint(store, pod) == newer
    (newer / "optimizer.pt").write_bytes(b"torn")
    assert find_resume_checkpoint(store, pod) == first
    assert find_resume_checkpoint(None, pod) == first
    assert find_resume_checkpoint(None, tmp_path / "nothing-here") is None


def test_retention_keeps_the_newest_n_complete_and_clears_leftovers(store, tmp_path):
    for step in (1, 2, 3, 4, 5):
        upload_checkpoint(store, make_checkpoint(tmp_path, step), step, None)
    store.put_bytes(b"x", "checkpoints/checkpoint-0/model.safetensors")  # killed upload, older than complete ones
    store.put_bytes(b"x", "checkpoints/checkpoint-9/model.safetensors")  # an upload in flight
    assert apply_retention(store, 2) == [0, 1, 2, 3]
    assert [m.step for m in list_complete(store)] == [5, 4]
    assert sorted(list_checkpoints(store)) == [4, 5, 9]
    assert apply_retention(store, 1) == [4]
    assert sorted(list_checkpoints(store)) == [5, 9]  # the newest complete one stays while 9 uploads


@pytest.mark.parametrize(
    "complete, incomplete, limit, deleted",
    [
        ([], [1, 2], 1, []),  # nothing complete: keep everything, it may be all there is
        ([1, 2, 3], [], 5, []),
        ([1, 2, 3], [], 1, [1, 2]),
        ([1, 2, 3], [], 0, [1, 2]),  # never the newest complete
        ([1, 2, 3], [], None, []),
        ([3], [1, 2, 4], 1, [1, 2]),
        ([2, 4], [1, 3, 5], 2, [1, 3]),
    ],
)
def test_retention_plan(complete, incomplete, limit, deleted):
    listing = {s: RemoteCheckpoint(s, {"manifest.json": 1, "a": 1}) for s in complete}
    listing |= {s: RemoteCheckpoint(s, {"a": 1}) for s in incomplete}
    assert retention_plan(listing, limit) == deleted


KILLED_UPLOAD = """
import sys
from finetune_trainer.storage import TransferSettings, open_store, upload_checkpoint
store = open_store(sys.argv[1], transfer=TransferSettings(file_concurrency=1))
upload_checkpoint(store, sys.argv[2], int(sys.argv[3]), None)
"""


def test_an_upload_killed_midway_leaves_no_manifest_and_resume_ignores_it(store, storage_uri, tmp_path):
    upload_checkpoint(store, make_checkpoint(tmp_path / "run", 1), 1, None)
    folder = make_checkpoint(tmp_path / "run", 2, big=3 * 1024 * 1024)
    # A named pipe no one writes: the uploader blocks on it after the real files, so the
    # kill below always lands mid-upload, never after the manifest.
    os.mkfifo(folder / "zz-still-being-written")
    child = subprocess.Popen([sys.executable, "-c", KILLED_UPLOAD, storage_uri, str(folder), "2"])
    try:
        deadline = time.monotonic() + 60
        while not store.list("checkpoints/checkpoint-2/"):
            assert child.poll() is None, "the upload process died on its own"
            assert time.monotonic() < deadline, "no file of checkpoint-2 landed"
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    landed = {o.key.rsplit("/", 1)[-1] for o in store.list("checkpoints/checkpoint-2/")}
    assert "model.safetensors" in landed and "manifest.json" not in landed
    assert [m.step for m in list_complete(store)] == [1]
    assert find_resume_checkpoint(store, tmp_path / "pod") == tmp_path / "pod" / "checkpoint-1"
    assert apply_retention(store, 5) == []  # newer than the newest complete: maybe still uploading

    # the restarted run saves and uploads again; the killed leftover is then older: removed
    upload_checkpoint(store, make_checkpoint(tmp_path / "run2", 3), 3, None)
    assert apply_retention(store, 5) == [2]
    assert [m.step for m in list_complete(store)] == [3, 1]


def test_two_nodes_upload_their_own_files_and_node_0_writes_the_manifest(store, tmp_path):
    node0 = make_checkpoint(tmp_path / "node0", 6, extra={"config.json": b"{}"})
    node1 = tmp_path / "node1" / "checkpoint-6"
    for rel in ("global_step6/zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_state_1.pth", "config.json"):
        (node1 / rel).parent.mkdir(parents=True, exist_ok=True)
        (node1 / rel).write_bytes(b"{}" if rel == "config.json" else os.urandom(300))
    # a part list left by a killed earlier attempt at the same step must not count
    store.put_bytes(json.dumps({"node_rank": 1, "attempt": "old", "files": []}).encode(),
                    "checkpoints/checkpoint-6/parts/1.json")
    results, errors = {}, []

    def node(rank: int, folder: Path, delay: float) -> None:
        time.sleep(delay)
        try:
            results[rank] = upload_checkpoint(store, folder, 6, 2.0, node_rank=rank, num_nodes=2,
                                              attempt="run-b", parts_timeout=30, poll_interval=0.05)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(0, node0, 0)), threading.Thread(target=node, args=(1, node1, 0.5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results[1] is None
    manifest = results[0]
    paths = {f.path for f in manifest.files}
    assert {"model.safetensors", "global_step6/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "global_step6/zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_state_1.pth", "config.json"} <= paths
    assert manifest.nodes == 2 and list_complete(store) == [manifest] and verify(store, manifest) == []
    chosen = find_resume_checkpoint(store, tmp_path / "pod")  # every node restores every shard
    assert (chosen / "rng_state_1.pth").read_bytes() == (node1 / "rng_state_1.pth").read_bytes()


def test_node_0_gives_up_without_a_manifest_when_a_node_never_reports(store, tmp_path):
    with pytest.raises(StorageError, match=r"nodes \[1\] did not report their files within 0s"):
        upload_checkpoint(store, make_checkpoint(tmp_path, 3), 3, None, num_nodes=2, attempt="a",
                          parts_timeout=0.3, poll_interval=0.05)
    assert list_complete(store) == []


def test_nodes_disagreeing_on_a_shared_file_is_an_error(store, tmp_path):
    bad = {"node_rank": 1, "attempt": "a", "files": [{"path": "config.json", "size": 2, "sha256": "0" * 64}]}
    store.put_bytes(json.dumps(bad).encode(), "checkpoints/checkpoint-3/parts/1.json")
    with pytest.raises(StorageError, match="different contents to config.json"):
        upload_checkpoint(store, make_checkpoint(tmp_path, 3, extra={"config.json": b"{}"}), 3, None,
                          num_nodes=2, attempt="a", parts_timeout=5, poll_interval=0.05)
    assert list_complete(store) == []


def test_run_artifacts_metrics_file_and_final_folder(store, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n')
    assert upload_file_artifact(store, metrics, "metrics.jsonl") == ["metrics.jsonl"]
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    upload_file_artifact(store, metrics, "metrics.jsonl")
    assert store.get_bytes("metrics.jsonl") == metrics.read_bytes()

    final = tmp_path / "final"
    (final / "tokenizer").mkdir(parents=True)
    (final / "adapter_model.safetensors").write_bytes(os.urandom(1000))
    (final / "tokenizer" / "tokenizer.json").write_text("{}")
    keys = upload_file_artifact(store, final, "final")
    assert keys[-1] == "final/manifest.json"
    manifest = json.loads(store.get_bytes("final/manifest.json"))
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == {
        "adapter_model.safetensors": sha(final / "adapter_model.safetensors"),
        "tokenizer/tokenizer.json": sha(final / "tokenizer" / "tokenizer.json"),
    }
    with pytest.raises(FileNotFoundError):
        upload_file_artifact(store, tmp_path / "absent", "x")
