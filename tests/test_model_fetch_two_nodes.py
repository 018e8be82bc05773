"""A two-node `finetune run` (two local processes as the job's two pods, two ranks in each)
training from an s3:// base model: the model's bytes are fetched once per job with a shared
cache (spec.model_cache), once per node without one, never once per rank, counted from the
S3 server's own request log."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_model_fetch import upload

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DATA = Path(__file__).resolve().parent / "fixtures" / "data" / "alpaca.jsonl"
NODES, RANKS_PER_NODE = 2, 2


def job(model_uri: str, data: Path, *, shared_cache: bool) -> dict:
    spec = {
        "model": {"base_model": model_uri, "trust_remote_code": False},
        "fine_tuning": {"method": "lora", "lora": {"r": 4, "alpha": 8}},
        "training": {"max_steps": 2, "micro_batch_size": 1, "learning_rate": 1.0e-3, "max_seq_length": 64,
                     "mixed_precision": "no", "warmup_ratio": 0.0},
        "dataset": {"format": "alpaca", "train_path": str(data)},
        "output": {"logging_steps": 1, "save_steps": 2, "save_total_limit": 1},
        "nodes": NODES,
        "gpus_per_node": RANKS_PER_NODE,  # on CPU: torchrun starts two ranks in each "pod"
    }
    if shared_cache:
        spec["model_cache"] = {"claim_name": "job-cache"}
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "fetch-once"},
            "spec": spec}


@pytest.mark.parametrize("shared_cache,fetches", [(True, 1), (False, NODES)], ids=["shared-cache", "pod-caches"])
def test_the_model_is_fetched_once_per_job_or_once_per_node(tmp_path, tiny_model_dir, moto_server, s3_bucket,
                                                             shared_cache, fetches):
    uri = upload(tiny_model_dir, s3_bucket, "models/tiny")
    files = sorted(p.relative_to(tiny_model_dir).as_posix() for p in tiny_model_dir.rglob("*") if p.is_file())
    before = collections.Counter(moto_server.requests("GET", f"/{s3_bucket}/models/tiny/"))
    data = tmp_path / "train.jsonl"
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    manifest = tmp_path / "finetune.yaml"
    manifest.write_text(yaml.safe_dump(job(uri, data, shared_cache=shared_cache)))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run([sys.executable, "-m", "finetune_trainer.cli", "run", "-f", str(manifest), "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=800, cwd=tmp_path, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]

    served = collections.Counter(moto_server.requests("GET", f"/{s3_bucket}/models/tiny/")) - before
    per_file = {f: served[f"GET /{s3_bucket}/models/tiny/{f}"] for f in files}
    # Each file is small enough for one ranged GET; every file fetched exactly `fetches` times.
    assert set(per_file.values()) == {fetches}, per_file
    assert sum(per_file.values()) < len(files) * NODES * RANKS_PER_NODE  # never once per rank
    caches = sorted((tmp_path / "run").rglob("model-manifest.json"))
    assert len(caches) == fetches, caches
