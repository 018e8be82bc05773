"""Issue 4 (b) through torchrun: 2 processes (`finetune launch`, what a 2-GPU pod runs), once
with DDP and once with DeepSpeed ZeRO-3. The pod is SIGKILLed (the whole process group) after
its second complete checkpoint in storage; a new pod with an empty disk resumes from storage.
Every rank's files (RNG states; ZeRO-3's per-rank optimizer/parameter shards) must be in the
manifest and come back on resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_storage_trainer_e2e import Bucket, logged_steps, wait_until

from finetune_trainer.model import builtin

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DATA = Path(__file__).resolve().parent / "fixtures" / "data" / "alpaca.jsonl"


def config(tmp_path: Path, model_dir: Path, uri: str, attempt: str, zero3: bool) -> Path:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 8))
    cfg = {
        "model": {"base_model": str(model_dir), "trust_remote_code": False},
        "fine_tuning": {"method": "full" if zero3 else "lora", "lora": {"r": 4, "alpha": 8}},
        "training": {"max_steps": 30, "learning_rate": 1e-3, "max_seq_length": 64, "mixed_precision": "no",
                     "warmup_ratio": 0.0},
        "dataset": {"train_path": str(data)},
        "output": {"output_dir": str(tmp_path / f"out-{attempt}"), "storage_uri": uri, "logging_steps": 1,
                   "save_steps": 2, "save_total_limit": 2},
    }
    if zero3:
        cfg["distributed"] = {"use_deepspeed": True, "zero_stage": 3}
    path = tmp_path / f"config-{attempt}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(path: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(builtin.cache_root() / "torch_extensions")),
           "PET_NPROC_PER_NODE": "2", "PET_NNODES": "1", "PET_STANDALONE": "1"}
    return subprocess.Popen([sys.executable, "-m", "finetune_trainer.cli", "launch", "--config", str(path)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    import psutil

    everyone = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in everyone:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(everyone, timeout=30)
    proc.wait(timeout=30)


@pytest.mark.parametrize("zero3", [False, True], ids=["ddp", "zero3"])
def test_two_process_run_killed_then_resumed_from_storage(tmp_path, tiny_model_dir, s3_bucket, s3_endpoint, zero3):
    prefix = f"job-{'zero3' if zero3 else 'ddp'}"
    uri, bucket = f"s3://{s3_bucket}/{prefix}", Bucket(s3_endpoint, s3_bucket, prefix)
    first = config(tmp_path, tiny_model_dir, uri, "1", zero3)
    proc = launch(first, tmp_path / "1.log")
    wait_until(lambda: len(bucket.complete_steps()) >= 2 and bucket.complete_steps()[-1] >= 4, proc,
               tmp_path / "1.log", timeout=600)
    kill_tree(proc)  # the pod is gone: launcher, torchrun and both ranks (torchrun puts ranks in their own sessions)
    newest = bucket.complete_steps()[-1]
    names = {f["path"] for f in bucket.manifest(newest)["files"]}
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= names, sorted(names)
    if zero3:  # each rank's shard of the optimizer and parameter states
        shards = {n.split("/")[-1] for n in names if n.startswith(f"global_step{newest}/")}
        assert any("rank_0" in s or "rank0" in s for s in shards) and any("rank_1" in s or "rank1" in s for s in shards), shards

    second = config(tmp_path, tiny_model_dir, uri, "2", zero3)
    log = tmp_path / "2.log"
    proc = launch(second, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-5000:]
    out = tmp_path / "out-2"
    results = json.loads((out / "train_results.json").read_text())
    assert results["resumed_from"].endswith(f"checkpoint-{newest}") and results["global_step"] == 30
    steps = logged_steps(second)  # each step once, in order; everything after the checkpoint retrained
    assert steps == sorted(set(steps)) and [s for s in steps if s > newest] == list(range(newest + 1, 31))
    # every rank found its own RNG state in the downloaded checkpoint (the Trainer warns otherwise)
    text = log.read_text()
    assert "resuming from" in text and "Didn't find an RNG file" not in text, text[-3000:]
    assert "final/manifest.json" in bucket.keys()
