"""Issue 4 end to end: a real `finetune train` process against a real moto_server over HTTP.

Each test plays a pod's life: train, get killed (SIGKILL: OOM or node loss; SIGTERM:
preemption), then a NEW pod with an EMPTY disk restarts with the same config and must resume
from the newest complete checkpoint in storage, never from a half-written one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DATA = Path(__file__).resolve().parent / "fixtures" / "data" / "alpaca.jsonl"


def write_config(tmp_path: Path, model_dir: Path, storage_uri: str, *, steps: int, save_steps: int, attempt: str) -> Path:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    data = tmp_path / "train.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in rows * 8))
    config = tmp_path / f"config-{attempt}.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"base_model": str(model_dir), "trust_remote_code": False},
        "fine_tuning": {"method": "lora", "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "training": {"max_steps": steps, "learning_rate": 1e-3, "max_seq_length": 64, "mixed_precision": "no",
                     "warmup_ratio": 0.0},
        "dataset": {"train_path": str(data)},
        # a new pod: an empty output directory each attempt
        "output": {"output_dir": str(tmp_path / f"out-{attempt}"), "storage_uri": storage_uri, "logging_steps": 1,
                   "save_steps": save_steps, "save_total_limit": 2},
    }))
    return config


def start(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "finetune_trainer.cli", "train", "--config", str(config)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


class Bucket:
    """What is in storage, read with plain boto3 (not our code)."""

    def __init__(self, endpoint: str, bucket: str, prefix: str):
        self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        self.bucket, self.prefix = bucket, prefix

    def keys(self) -> list[str]:
        keys, token = [], None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": self.prefix + "/"}
            if token:
                kwargs["ContinuationToken"] = token
            page = self.s3.list_objects_v2(**kwargs)
            keys += [o["Key"][len(self.prefix) + 1:] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            token = page["NextContinuationToken"]

    def complete_steps(self) -> list[int]:
        return sorted(int(k.split("/")[1].split("-")[1]) for k in self.keys()
                      if k.startswith("checkpoints/checkpoint-") and k.endswith("/manifest.json"))

    def all_steps(self) -> list[int]:
        return sorted({int(k.split("/")[1].split("-")[1]) for k in self.keys() if k.startswith("checkpoints/checkpoint-")})

    def manifest(self, step: int) -> dict:
        body = self.s3.get_object(Bucket=self.bucket, Key=f"{self.prefix}/checkpoints/checkpoint-{step}/manifest.json")
        return json.loads(body["Body"].read())


def wait_until(predicate, proc: subprocess.Popen, log: Path, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited {proc.returncode} too early:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")


def bring_up(outage) -> None:
    """Storage back: retried briefly, the killed trainer's sockets may still hold the port."""
    deadline = time.monotonic() + 30
    while True:
        try:
            outage.up()
            return
        except OSError:
            if time.monotonic() > deadline:
                port = outage.endpoint.rsplit(":", 1)[1]
                ss = subprocess.run(["ss", "-tanp"], capture_output=True, text=True).stdout
                raise AssertionError("\n".join(line for line in ss.splitlines() if f":{port}" in line)) from None
            time.sleep(0.5)


def finish(config: Path, log: Path) -> dict:
    proc = start(config, log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    out = Path(yaml.safe_load(config.read_text())["output"]["output_dir"])
    return json.loads((out / "train_results.json").read_text())


def logged_steps(config: Path) -> list[int]:
    out = Path(yaml.safe_load(config.read_text())["output"]["output_dir"])
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if line.strip() and "loss" in json.loads(line)]


def test_sigkill_then_a_new_pod_resumes_from_storage(tmp_path, tiny_model_dir, s3_bucket, s3_endpoint):
    """(a) checkpoints with manifests, save_total_limit in storage; (b) SIGKILL after the second
    checkpoint, restart on an empty disk: resume at the newest complete one, finish, final/."""
    uri, bucket = f"s3://{s3_bucket}/team-a/job-1", Bucket(s3_endpoint, s3_bucket, "team-a/job-1")
    first = write_config(tmp_path, tiny_model_dir, uri, steps=40, save_steps=2, attempt="1")
    proc = start(first, tmp_path / "1.log")
    wait_until(lambda: len(bucket.complete_steps()) >= 2 and bucket.complete_steps()[-1] >= 4, proc, tmp_path / "1.log")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    complete = bucket.complete_steps()
    assert len(complete) <= 2, complete  # save_total_limit: 2, remotely too
    newest = complete[-1]
    manifest = bucket.manifest(newest)
    assert manifest["step"] == newest
    names = {f["path"] for f in manifest["files"]}
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"} <= names

    second = write_config(tmp_path, tiny_model_dir, uri, steps=40, save_steps=2, attempt="2")
    results = finish(second, tmp_path / "2.log")
    assert results["resumed_from"].endswith(f"checkpoint-{newest}")
    assert results["global_step"] == 40
    steps = logged_steps(second)
    # nothing trained twice: each step logged once, in order; everything after the checkpoint retrained
    assert steps == sorted(set(steps)) and [s for s in steps if s > newest] == list(range(newest + 1, 41))
    keys = bucket.keys()
    assert "final/manifest.json" in keys and "final/adapter_model.safetensors" in keys and "metrics.jsonl" in keys
    assert len(bucket.complete_steps()) <= 2 and bucket.complete_steps()[-1] == 40


def test_sigterm_saves_at_the_current_step_exits_143_and_resumes_there(tmp_path, tiny_model_dir, s3_bucket, s3_endpoint):
    """(c2) preemption: SIGTERM between checkpoints -> a checkpoint at the step it stopped at,
    complete in storage, exit 143 (retried by restartPolicy: ExitCode); the restart resumes there."""
    uri, bucket = f"s3://{s3_bucket}/team-a/job-2", Bucket(s3_endpoint, s3_bucket, "team-a/job-2")
    first = write_config(tmp_path, tiny_model_dir, uri, steps=400, save_steps=100, attempt="1")
    proc = start(first, tmp_path / "1.log")
    out = tmp_path / "out-1"
    # between checkpoints: a few steps logged, none saved yet
    wait_until(lambda: (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3,
               proc, tmp_path / "1.log")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, (tmp_path / "1.log").read_text()[-3000:]
    complete = bucket.complete_steps()
    assert len(complete) == 1 and complete[0] % 100 != 0, complete  # saved where it stopped, not at save_steps
    stopped = complete[0]
    assert (out / f"checkpoint-{stopped}").is_dir()

    second = write_config(tmp_path, tiny_model_dir, uri, steps=stopped + 3, save_steps=100, attempt="2")
    results = finish(second, tmp_path / "2.log")
    assert results["resumed_from"].endswith(f"checkpoint-{stopped}")
    steps = logged_steps(second)
    assert steps == sorted(set(steps)) and [s for s in steps if s > stopped] == list(range(stopped + 1, stopped + 4))


def test_kill_during_an_upload_leaves_no_manifest_and_the_restart_uses_the_previous(
        tmp_path, tiny_model_dir, s3_outage):
    """(c) a checkpoint whose upload cannot finish (storage unreachable) when the pod is killed
    has no manifest; the restart resumes from the previous complete one."""
    uri = f"s3://{s3_outage.bucket}/job-3"
    bucket = Bucket(s3_outage.endpoint, s3_outage.bucket, "job-3")
    first = write_config(tmp_path, tiny_model_dir, uri, steps=400, save_steps=4, attempt="1")
    proc = start(first, tmp_path / "1.log")
    wait_until(lambda: bucket.complete_steps(), proc, tmp_path / "1.log")
    s3_outage.down()
    out = tmp_path / "out-1"
    wait_until(lambda: len(list(out.glob("checkpoint-*"))) >= 2, proc, tmp_path / "1.log")  # a newer one saved locally
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    bring_up(s3_outage)
    complete, everything = bucket.complete_steps(), bucket.all_steps()
    previous = complete[-1]
    local_newest = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert local_newest > previous  # the newer checkpoint never became complete in storage
    assert local_newest not in complete and all(s in everything for s in complete)

    second = write_config(tmp_path, tiny_model_dir, uri, steps=previous + 2, save_steps=4, attempt="2")
    results = finish(second, tmp_path / "2.log")
    assert results["resumed_from"].endswith(f"checkpoint-{previous}")


def test_storage_outage_mid_training_loses_nothing(tmp_path, tiny_model_dir, s3_outage):
    """(d) S3 down for 20 s mid-training: the run goes on (degraded), finishes, and every
    checkpoint saved after the outage is complete in storage."""
    uri = f"s3://{s3_outage.bucket}/job-4"
    bucket = Bucket(s3_outage.endpoint, s3_outage.bucket, "job-4")
    config = write_config(tmp_path, tiny_model_dir, uri, steps=120, save_steps=10, attempt="1")
    log = tmp_path / "1.log"
    proc = start(config, log)
    wait_until(lambda: bucket.complete_steps(), proc, log)
    s3_outage.down()
    down_at = time.monotonic()
    out = tmp_path / "out-1"
    seen_during = {p.name for p in out.glob("checkpoint-*")}
    while time.monotonic() - down_at < 20 and proc.poll() is None:
        seen_during |= {p.name for p in out.glob("checkpoint-*")}
        time.sleep(0.2)
    bring_up(s3_outage)
    assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "degraded" in text.lower() or "StorageUnavailable" in text or "cannot reach" in text.lower(), text[-3000:]
    complete = bucket.complete_steps()
    # retention keeps the newest 2; both are from after the outage and complete, the last is the final step
    assert complete[-1] == 120 and len(complete) <= 2
    for step in complete:
        manifest = bucket.manifest(step)
        listed = set(bucket.keys())
        assert all(f"checkpoints/checkpoint-{step}/{f['path']}" in listed for f in manifest["files"])
    assert "final/manifest.json" in bucket.keys()
