"""Issue 4 end to end through `finetune train` itself: a real trainer process (the tiny Llama,
LoRA) against a real moto_server over HTTP, killed the ways pods die, and restarted the way a
new pod starts: the same config and an EMPTY output directory, so everything it resumes from
comes out of object storage.

What is in storage is read with plain boto3 (not the code under test). A resumed run must train
the steps after its checkpoint exactly as the killed run did (same losses): that is what proves
model, optimizer, scheduler, RNG and data position were all restored.

The torchrun variants (DDP, DeepSpeed ZeRO-3) are in test_checkpoint_resume_torchrun.py and
reuse the helpers here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest
import yaml
from s3_server import AWS_ENV, TcpGate, make_bucket

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PAIRS = [("Say the first word.", "apple"), ("Say the second word.", "banana"),
         ("Say the third word.", "cherry"), ("Say the fourth word.", "date")]
# An adapter on lm_head as well: the tiny random Llama's loss moves within a few steps.
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "lm_head"]}
CHECKPOINT_FILES = {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}


# ------------------------------------------------------------------ the run's config and process


def write_config(tmp_path: Path, model_dir: Path, storage_uri: str, *, max_steps: int, save_steps: int,
                 save_total_limit: int | None = 2, micro_batch_size: int = 4, **sections) -> Path:
    """One config for every attempt of the job (the operator renders it once)."""
    data = tmp_path / "train.jsonl"
    rows = [{"instruction": q, "output": a} for q, a in PAIRS] * 8
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "model": {"base_model": str(model_dir), "trust_remote_code": False},
        "fine_tuning": {"method": "lora", "lora": LORA},
        "training": {"max_steps": max_steps, "micro_batch_size": micro_batch_size, "learning_rate": 1e-2,
                     "lr_scheduler_type": "cosine", "warmup_ratio": 0.0, "mixed_precision": "no",
                     "max_seq_length": 64},
        "dataset": {"format": "alpaca", "train_path": str(data)},
        "output": {"output_dir": str(tmp_path / "out"), "storage_uri": storage_uri, "logging_steps": 1,
                   "save_steps": save_steps, "save_total_limit": save_total_limit},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def output_dir(config: Path) -> Path:
    return Path(yaml.safe_load(config.read_text())["output"]["output_dir"])


def trainer_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


STARTED: list[subprocess.Popen] = []  # every pod a test starts; none outlives its test


def start_pod(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    STARTED.append(proc)
    return proc


def start_train(config: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`finetune train` as a pod runs it."""
    return start_pod([sys.executable, "-m", "finetune_trainer.cli", "train", "--config", str(config)], log,
                     env or trainer_env())


def pod_processes(proc: subprocess.Popen) -> list:
    import psutil

    try:
        return [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal_all(processes: list, signum: int) -> None:
    import psutil

    for p in processes:
        try:
            p.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def kill_pod(proc: subprocess.Popen) -> int:
    """SIGKILL to every process of the pod at once (torchrun starts each rank in its own
    session, so a process-group kill would miss them): OOM kill, node loss, grace period over.
    Returns how many processes it killed."""
    import psutil

    everyone = pod_processes(proc)
    _signal_all(everyone, signal.SIGKILL)
    psutil.wait_procs(everyone, timeout=60)
    proc.wait(timeout=60)
    return len(everyone)


def kill_pod_when(predicate, proc: subprocess.Popen, log: Path, what: str, timeout: float = 180.0) -> int:
    """SIGKILL the pod in a state where `predicate` holds, judged while every process of it is
    stopped (SIGSTOP), so the trainer cannot move on between the look and the kill (CI saw a newer
    checkpoint complete in that gap, so the killed run had trained nothing past the one resumed).
    Returns how many processes it killed."""
    killed = 0

    def frozen_and_holding() -> bool:
        nonlocal killed
        if not predicate():
            return False
        everyone = pod_processes(proc)
        _signal_all(everyone, signal.SIGSTOP)
        holds = False
        try:
            holds = predicate()
        finally:
            if not holds:
                _signal_all(everyone, signal.SIGCONT)
        if holds:
            killed = kill_pod(proc)
        return holds

    wait_until(frozen_and_holding, proc, log, what, timeout)
    return killed


@pytest.fixture(autouse=True)
def no_pod_outlives_its_test():
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            kill_pod(proc)


def new_pod_disk(config: Path) -> Path:
    """A restarted pod starts with an empty disk: move the dead pod's output directory away
    (kept for comparison) so the restart finds nothing locally."""
    out = output_dir(config)
    dead = out.with_name(out.name + "-killed")
    shutil.rmtree(dead, ignore_errors=True)
    out.rename(dead)
    return dead


def run_to_end(config: Path, log: Path, env: dict[str, str] | None = None, timeout: float = 240) -> dict:
    proc = start_train(config, log, env)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_pod(proc)
        raise AssertionError(f"trainer still running after {timeout}s:\n{tail(log)}") from None
    assert code == 0, tail(log)
    return json.loads((output_dir(config) / "train_results.json").read_text())


def tail(log: Path, chars: int = 5000) -> str:
    return log.read_text(errors="replace")[-chars:]


def wait_until(predicate, proc: subprocess.Popen, log: Path, what: str, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited {proc.returncode} before {what}:\n{tail(log)}")
        time.sleep(0.05)
    kill_pod(proc)
    raise AssertionError(f"timed out waiting for {what}:\n{tail(log)}")


def loss_rows(out: Path) -> list[tuple[int, float]]:
    """(step, training loss) per line of the run's metrics.jsonl, in file order."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]


def losses(out: Path) -> dict[int, float]:
    return dict(loss_rows(out))


def local_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit())


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ storage, read with plain boto3


class Bucket:
    """The run's prefix in S3 as plain boto3 sees it."""

    def __init__(self, endpoint: str, bucket: str, prefix: str):
        self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                               aws_access_key_id="testing", aws_secret_access_key="testing")
        self.bucket, self.prefix = bucket, prefix

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def objects(self) -> dict[str, int]:
        """relative key -> size."""
        found = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + "/"):
            found |= {o["Key"][len(self.prefix) + 1:]: o["Size"] for o in page.get("Contents", [])}
        return found

    def steps(self, objects: dict[str, int] | None = None) -> dict[int, set[str]]:
        """checkpoint step -> the files stored under it (complete or not)."""
        found: dict[int, set[str]] = {}
        for key in objects if objects is not None else self.objects():
            if m := re.match(r"^checkpoints/checkpoint-(\d+)/(.+)$", key):
                found.setdefault(int(m.group(1)), set()).add(m.group(2))
        return found

    def complete(self) -> list[int]:
        return sorted(step for step, files in self.steps().items() if "manifest.json" in files)

    def read(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")["Body"].read()

    def manifest(self, step: int) -> dict:
        return json.loads(self.read(f"checkpoints/checkpoint-{step}/manifest.json"))

    def assert_complete(self, step: int, local: Path | None = None) -> dict:
        """The manifest lists every stored file of the checkpoint with the right size and
        sha256 (downloaded here); with `local`, exactly the files the trainer wrote there."""
        manifest = self.manifest(step)
        assert manifest["step"] == step
        stored = {k: v for k, v in self.objects().items() if k.startswith(f"checkpoints/checkpoint-{step}/")}
        listed = {f["path"] for f in manifest["files"]}
        assert {k.split("/", 2)[2] for k in stored} - {"manifest.json"} == listed, "stored files != manifest"
        for entry in manifest["files"]:
            body = self.read(f"checkpoints/checkpoint-{step}/{entry['path']}")
            assert len(body) == entry["size"] and hashlib.sha256(body).hexdigest() == entry["sha256"], entry["path"]
        if local is not None:
            written = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()} - {"manifest.json"}
            assert written == listed, f"local files {sorted(written)} != manifest {sorted(listed)}"
            for entry in manifest["files"]:
                assert sha256_file(local / entry["path"]) == entry["sha256"], entry["path"]
        return manifest


# ------------------------------------------------------------------ a proxy that holds one request


class HoldingGate(TcpGate):
    """A TCP forwarder in front of moto that never forwards the HTTP request whose request
    line matches `hold` (it hangs, as an upload does when the pod is killed mid-transfer) and
    sets `held`. Everything else passes. `release()` stops holding (for the restart)."""

    def __init__(self, target_port: int, hold: str):
        super().__init__(target_port)
        self.hold: re.Pattern[bytes] | None = re.compile(hold.encode())
        self.held = threading.Event()
        self.held_request: bytes | None = None
        self._closing = threading.Event()

    def release(self) -> None:
        self.hold = None

    def down(self) -> None:
        self._closing.set()
        super().down()

    def _pump(self, src, dst) -> None:
        if src.getsockname()[1] != self.port or self.hold is None:  # moto -> client, or not holding
            return super()._pump(src, dst)
        tail = b""
        try:
            while data := src.recv(1 << 16):
                window = tail + data
                if (pattern := self.hold) is not None and (m := pattern.search(window)):
                    self.held_request = m.group(0)
                    self.held.set()
                    self._closing.wait()  # never forwarded
                    break
                dst.sendall(data)
                tail = window[-1024:]
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.close()
            except OSError:
                pass


@pytest.fixture
def holding_gate(moto_server, s3_endpoint):
    """(gate factory, bucket): `make(pattern)` starts a HoldingGate in front of the session moto."""
    gates = []

    def make(pattern: str) -> HoldingGate:
        gate = HoldingGate(moto_server.port, pattern)
        gate.up()
        gates.append(gate)
        return gate

    yield make
    for gate in gates:
        gate.down()


def through(gate: TcpGate) -> dict[str, str]:
    """The trainer's environment pointed at `gate` instead of moto."""
    return trainer_env(**AWS_ENV, AWS_ENDPOINT_URL=gate.endpoint)


# ------------------------------------------------------------------ shared assertions


def trained_past_second_checkpoint(bucket: Bucket, out: Path) -> bool:
    """Kill here: two complete checkpoints in storage, and the run two steps past the newest
    (so the restart re-trains at least one step that needs the restored optimizer state)."""
    complete = bucket.complete()
    return len(complete) >= 2 and max(losses(out), default=0) >= complete[-1] + 2


def assert_resumed_exactly(killed: Path, restarted: Path, resumed_step: int, max_steps: int) -> None:
    """The restart trained each step after `resumed_step` once, to the end, and the steps the
    killed run had already trained past that checkpoint came out the same (state restored)."""
    before, restarted_rows = losses(killed), loss_rows(restarted)
    # metrics.jsonl: the history up to the checkpoint (fetched from storage: the disk was
    # empty), then every step after it once
    assert [step for step, _ in restarted_rows] == list(range(1, max_steps + 1)), restarted_rows
    assert all(before[step] == loss for step, loss in restarted_rows if step <= resumed_step)
    after = {step: loss for step, loss in restarted_rows if step > resumed_step}
    overlap = sorted(set(before) & set(after))
    assert overlap, f"killed run logged {sorted(before)}; nothing after checkpoint-{resumed_step} to compare"
    for step in overlap:
        assert after[step] == pytest.approx(before[step], rel=1e-4, abs=1e-5), (step, before[step], after[step])
    # the Trainer's own record continues the restored one: every step once, in order
    state = json.loads((restarted / f"checkpoint-{max_steps}" / "trainer_state.json").read_text())
    assert state["global_step"] == max_steps
    logged = [h["step"] for h in state["log_history"] if "loss" in h]
    assert logged == list(range(1, max_steps + 1)), logged


def assert_final_artifacts(bucket: Bucket, out: Path, max_steps: int,
                           weights: tuple[str, ...] = ("adapter_model.safetensors", "adapter_config.json")) -> None:
    """final/ (weights or adapter, tokenizer, config, results) with its manifest, and the whole
    run's metrics.jsonl: every step once, the steps before the restart included."""
    final = json.loads(bucket.read("final/manifest.json"))
    names = {f["path"] for f in final["files"]}
    assert {*weights, "tokenizer.json", "config.yaml", "train_results.json"} <= names, names
    for entry in final["files"]:
        assert hashlib.sha256(bucket.read(f"final/{entry['path']}")).hexdigest() == entry["sha256"]
        assert sha256_file(out / entry["path"]) == entry["sha256"], entry["path"]
    rows = [json.loads(line) for line in bucket.read("metrics.jsonl").decode().splitlines() if line.strip()]
    steps = [r["step"] for r in rows if r.get("loss") is not None]
    assert steps == list(range(1, max_steps + 1)), steps


# ------------------------------------------------------------------ (a) a run in storage


def test_a_checkpoints_with_manifests_retention_and_final_artifacts(tmp_path, tiny_model_dir, s3_bucket, s3_endpoint):
    bucket = Bucket(s3_endpoint, s3_bucket, "team-a/job-a")
    config = write_config(tmp_path, tiny_model_dir, bucket.uri, max_steps=12, save_steps=2, save_total_limit=2)
    run_to_end(config, tmp_path / "run.log")
    out = output_dir(config)

    # save_total_limit 2 in storage as on disk: two complete checkpoints, the newest among them,
    # nothing left of the others. Which older one storage keeps depends on upload speed: a save
    # made while an upload runs supersedes one still waiting (the uploader says so), so storage
    # may hold [8, 12] while the disk holds [10, 12]; the newest always gets there.
    assert local_steps(out) == [10, 12]
    stored = bucket.complete()
    assert len(stored) == 2 and stored[-1] == 12 and set(stored) <= set(range(2, 13, 2)), stored
    assert sorted(bucket.steps()) == stored
    if 10 not in stored:
        assert "checkpoint-10 superseded by checkpoint-12 before its upload began" in tail(tmp_path / "run.log", 10**7)
    for step in stored:
        local = out / f"checkpoint-{step}"
        manifest = bucket.assert_complete(step, local if local.exists() else None)
        assert CHECKPOINT_FILES <= {f["path"] for f in manifest["files"]}
        assert manifest["epoch"] == pytest.approx(step * 4 / 32) and manifest["timestamp"]
    assert_final_artifacts(bucket, out, 12)
    assert bucket.read("metrics.jsonl") == (out / "metrics.jsonl").read_bytes()


# ------------------------------------------------------------------ (b) SIGKILL, new pod


def assert_kept_two_after(bucket: Bucket, resumed: int, *, final: int) -> None:
    """save_total_limit 2 after a resume: two complete checkpoints, the final one among them, none
    older than the resume point, nothing else left. Which saves in between reached storage depends
    on the pace: a newer save supersedes an upload still waiting."""
    stored = bucket.complete()
    assert len(stored) == 2 and stored[-1] == final and stored[0] >= resumed, stored
    assert sorted(bucket.steps()) == stored, bucket.steps()


def kill_after_the_second_checkpoint_and_resume(tmp_path: Path, config: Path, bucket: Bucket):
    """SIGKILL once the second checkpoint is complete in storage and the run trained past it;
    a new pod (empty disk) resumes from it and runs to step 24, the same losses as the killed run."""
    out = output_dir(config)
    proc = start_train(config, tmp_path / "1.log")
    kill_pod_when(lambda: trained_past_second_checkpoint(bucket, out), proc, tmp_path / "1.log",
                  "a second complete checkpoint")
    newest = bucket.complete()[-1]
    assert newest >= 8
    bucket.assert_complete(newest)

    killed = new_pod_disk(config)
    results = run_to_end(config, tmp_path / "2.log")
    assert results["resumed_from"] == str(out / f"checkpoint-{newest}")
    assert f"resuming from {out}/checkpoint-{newest} (downloaded from {bucket.uri}" in tail(tmp_path / "2.log", 10**6)
    assert results["global_step"] == 24
    assert_resumed_exactly(killed, out, newest, 24)
    return out, newest, killed


def test_b_sigkill_after_the_second_checkpoint_new_pod_resumes_from_storage(
        tmp_path, tiny_model_dir, s3_bucket, s3_endpoint):
    bucket = Bucket(s3_endpoint, s3_bucket, "team-a/job-b")
    config = write_config(tmp_path, tiny_model_dir, bucket.uri, max_steps=24, save_steps=4)
    out, newest, killed = kill_after_the_second_checkpoint_and_resume(tmp_path, config, bucket)
    assert_kept_two_after(bucket, newest, final=24)
    assert_final_artifacts(bucket, out, 24)


# ------------------------------------------------------------------ (b2) the same, with sample packing


PACKED_SAMPLES, PACKED_SEQ, PACKED_BATCH = 150, 128, 2  # 150 distinct samples of 35-45 tokens -> 50 rows of 3


def write_packed_data(path: Path) -> Path:
    """Distinct samples whose answers run 1-6 words, so rows hold several samples of unequal length."""
    words = ["apple", "banana", "cherry", "date"]
    rows = [{"instruction": f"Say word {i}.", "output": " ".join([words[i % 4]] * (1 + i * 7 % 6))}
            for i in range(PACKED_SAMPLES)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("data")]


def packing_line(log: Path) -> str:
    found = re.findall(r"train: .*; packed into \d+ rows \(\d+% of their capacity is real tokens\)", tail(log, 10**7))
    assert len(found) == 1, found
    return found[0]


def test_b2_sample_packing_sigkill_new_pod_resumes_at_the_same_packed_row(
        tmp_path, tiny_model_dir, s3_bucket, s3_endpoint):
    """Packing runs before the Trainer's sampler, so an exact resume needs the restart to pack
    the very same rows in the same order; there are more packed rows than the 24 steps consume
    (no epoch ends), so a restart that packed differently or lost its data position would
    train other rows and log other losses. Compared with an uninterrupted run, step by step."""
    data = write_packed_data(tmp_path / "packed.jsonl")
    sections = {"training": {"sample_packing": True, "max_seq_length": PACKED_SEQ},
                "dataset": {"train_path": str(data)}}
    (tmp_path / "reference").mkdir()
    reference_config = write_config(tmp_path / "reference", tiny_model_dir,
                                    Bucket(s3_endpoint, s3_bucket, "team-a/job-b2-reference").uri,
                                    max_steps=24, save_steps=4, micro_batch_size=PACKED_BATCH, **sections)
    run_to_end(reference_config, tmp_path / "reference.log")
    reference = output_dir(reference_config)
    packed = data_records(reference)[0]["data"]["train"]
    assert packed["samples"] == PACKED_SAMPLES and packed["packed_rows"] > 24 * PACKED_BATCH, packed
    assert packed["samples"] / packed["packed_rows"] >= 2.5, packed  # several samples a row
    assert 0.5 < packed["packing_efficiency"] < 1

    bucket = Bucket(s3_endpoint, s3_bucket, "team-a/job-b2")
    config = write_config(tmp_path, tiny_model_dir, bucket.uri, max_steps=24, save_steps=4,
                          micro_batch_size=PACKED_BATCH, **sections)
    out, newest, killed = kill_after_the_second_checkpoint_and_resume(tmp_path, config, bucket)
    # every step after the checkpoint (not only those the killed run reached) as uninterrupted
    expected, resumed = losses(reference), losses(out)
    assert sorted(expected) == sorted(resumed) == list(range(1, 25))
    for step in range(newest + 1, 25):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), (step, expected[step], resumed[step])
    # the restart packed the same rows: its own data record (at the resume step) and log line
    records = data_records(out)
    assert [r["step"] for r in records] == [0, newest], records  # the killed run's, then the restart's
    for record in (*records, data_records(killed)[0]):
        assert record["data"]["train"] == packed, record
    lines = {packing_line(tmp_path / name) for name in ("reference.log", "1.log", "2.log")}
    assert len(lines) == 1, lines
    assert_kept_two_after(bucket, newest, final=24)
    assert_final_artifacts(bucket, out, 24)


# ------------------------------------------------------------------ (c) SIGKILL mid-upload


@pytest.mark.parametrize("held_file", ["optimizer.pt", "manifest.json"])
def test_c_kill_during_an_upload_leaves_no_manifest_restart_uses_the_previous(
        tmp_path, tiny_model_dir, s3_bucket, s3_endpoint, holding_gate, held_file):
    """The upload of checkpoint-8 hangs on one request (a data file, or the manifest after
    every data file is stored) when the pod is killed."""
    bucket = Bucket(s3_endpoint, s3_bucket, f"team-a/job-c-{held_file.split('.')[0]}")
    gate = holding_gate(rf"PUT /{s3_bucket}/{bucket.prefix}/checkpoints/checkpoint-8/{re.escape(held_file)}[ ?]")
    config = write_config(tmp_path, tiny_model_dir, bucket.uri, max_steps=16, save_steps=4)
    out = output_dir(config)
    proc = start_train(config, tmp_path / "1.log", through(gate))
    # Held, and (observably) some other file of checkpoint-8 already stored: the small files
    # travel beside the held big one, and a kill before any of them landed (a slow machine)
    # would leave nothing of checkpoint-8 to find.
    wait_until(lambda: gate.held.is_set() and 8 in bucket.steps(), proc, tmp_path / "1.log",
               f"the upload of checkpoint-8/{held_file}, another file of it stored")
    kill_pod(proc)

    stored = bucket.steps()
    assert bucket.complete() == [4]
    assert 8 in stored and "manifest.json" not in stored[8]  # half-written: files, no manifest
    if held_file == "manifest.json":  # every data file made it; only the manifest is missing
        assert stored[8] == {p.relative_to(out / "checkpoint-8").as_posix()
                             for p in (out / "checkpoint-8").rglob("*") if p.is_file()} - {"manifest.json"}

    killed = new_pod_disk(config)
    gate.release()
    results = run_to_end(config, tmp_path / "2.log", through(gate))
    assert results["resumed_from"] == str(out / "checkpoint-4")
    assert_resumed_exactly(killed, out, 4, 16)
    assert_kept_two_after(bucket, 8, final=16)  # the leftover is gone (8's complete re-upload may stay)
    bucket.assert_complete(16, out / "checkpoint-16")
    assert_final_artifacts(bucket, out, 16)


# ------------------------------------------------------------------ (c2) SIGTERM: preemption


def test_c2_sigterm_saves_the_current_step_exits_143_restart_resumes_there(
        tmp_path, tiny_model_dir, s3_bucket, s3_endpoint):
    bucket = Bucket(s3_endpoint, s3_bucket, "team-a/job-c2")
    config = write_config(tmp_path, tiny_model_dir, bucket.uri, max_steps=60, save_steps=30)
    out = output_dir(config)
    log = tmp_path / "1.log"
    proc = start_train(config, log)
    # between checkpoints: checkpoint-30 is stored, the run is a few steps past it (steps are fast:
    # the gap to the next save must outlast the time from seeing step 32 to the signal's effect)
    wait_until(lambda: bucket.complete() == [30] and max(losses(out), default=0) >= 32, proc, log, "step 32")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, tail(log)
    stopped = max(losses(out))
    assert 32 <= stopped < 60, stopped  # the next step boundary, not the next save_steps
    assert bucket.complete() == [30, stopped]
    manifest = bucket.assert_complete(stopped, out / f"checkpoint-{stopped}")
    state = json.loads(bucket.read(f"checkpoints/checkpoint-{stopped}/trainer_state.json"))
    assert state["global_step"] == stopped and manifest["step"] == stopped
    text = tail(log, 10**6)
    assert "SIGTERM received" in text and f"training stopped at step {stopped}; exiting 143" in text
    assert "Training done" not in text  # preempted: no final evaluation and save

    new_pod_disk(config)
    results = run_to_end(config, tmp_path / "2.log")
    assert results["resumed_from"] == str(out / f"checkpoint-{stopped}")
    assert [step for step, _ in loss_rows(out)] == list(range(1, 61))  # no step lost, none trained twice
    assert_final_artifacts(bucket, out, 60)


# ------------------------------------------------------------------ (d) a 20 s outage


def test_d_storage_outage_mid_training_loses_nothing(tmp_path, tiny_model_dir, s3_outage):
    """Storage goes down after the first checkpoint and stays down until the trainer has said so
    and saved two more checkpoints (an outage past the store's whole retry budget)."""
    bucket = Bucket(s3_outage.server.endpoint, s3_outage.bucket, "team-a/job-d")  # read around the gate
    # long enough (~90 s here) to outlast the outage: detecting it takes the store's retry budget
    # twice (retention's listing, then the history before the next checkpoint): 8 s in one run
    # here, but each budget is jittered backoff (ours and botocore's) that can reach ~30 s
    max_steps = 2000
    config = write_config(tmp_path, tiny_model_dir, bucket.uri, max_steps=max_steps, save_steps=40,
                          save_total_limit=None)
    out = output_dir(config)
    log = tmp_path / "run.log"
    proc = start_train(config, log)
    wait_until(bucket.complete, proc, log, "the first checkpoint")
    s3_outage.down()
    before = set(local_steps(out))
    wait_until(lambda: "checkpoint upload degraded" in tail(log, 10**7) and len(set(local_steps(out)) - before) >= 2,
               proc, log, "the outage reported, two checkpoints saved during it")
    saved_during = local_steps(out)
    s3_outage.up()
    assert proc.wait(timeout=240) == 0, tail(log)
    text = tail(log, 10**7)

    # the outage was seen, reported, and survived
    assert len(saved_during) >= 2, "no checkpoint was saved during the outage: it tested nothing"
    assert re.search(r"checkpoint upload degraded: checkpoint-\d+ not uploaded", text), text[-5000:]
    assert re.search(r"checkpoint uploads recovered with checkpoint-\d+", text), text[-5000:]
    # every checkpoint saved after the outage is complete, unless a newer one superseded it before
    # its upload began (and the final one always); uploads recovered while training went on
    after = [s for s in local_steps(out) if s > max(saved_during)]
    complete = bucket.complete()
    assert max_steps in complete
    assert any(s in complete for s in after if s < max_steps), f"training ended before storage was back: {complete}"
    for step in after:
        if step in complete:
            bucket.assert_complete(step, out / f"checkpoint-{step}")
        else:
            assert f"checkpoint-{step} superseded by checkpoint-" in text, f"checkpoint-{step} lost: {complete}"
    assert_final_artifacts(bucket, out, max_steps)
    # training went on during the outage: no step waited for the store's retry budget
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    gaps = [b["elapsed_seconds"] - a["elapsed_seconds"] for a, b in zip(rows, rows[1:])]
    assert max(gaps) < 8, f"a step waited {max(gaps):.1f}s: uploads stalled training"


def test_d2_an_outage_over_the_end_of_training_is_waited_out(tmp_path, tiny_model_dir, s3_outage):
    """The pod's disk is gone once it exits: the last checkpoint and final/ are uploaded
    before the run ends, even when storage is down as training finishes."""
    bucket = Bucket(s3_outage.server.endpoint, s3_outage.bucket, "team-a/job-d2")
    config = write_config(tmp_path, tiny_model_dir, bucket.uri, max_steps=24, save_steps=8, save_total_limit=None)
    out = output_dir(config)
    log = tmp_path / "run.log"
    proc = start_train(config, log)
    wait_until(bucket.complete, proc, log, "the first checkpoint")
    s3_outage.down()
    wait_until(lambda: "still failing at the end of training" in tail(log, 10**7), proc, log,
               "the end of training, waiting for storage")
    assert max(losses(out)) == 24 and proc.poll() is None  # trained, and not gone without its checkpoint
    assert 24 not in bucket.complete()
    s3_outage.up()
    assert proc.wait(timeout=240) == 0, tail(log)
    bucket.assert_complete(24, out / "checkpoint-24")
    assert_final_artifacts(bucket, out, 24)
