"""Time to the first training step of a two-node job (`finetune run`: two local processes as
the job's two pods), its base model in S3, the job's shared model cache (spec.model_cache) cold
vs warm, in the same run; and the same job with the model on a mounted path (no fetch at all)
as the floor.

The model is the built-in SmolLM2-135M-Instruct as `save_pretrained` writes it (538 MB), in a
moto_server on loopback that this script starts. Each variant starts from a fresh run directory
(no checkpoint to resume); only the model cache carries over from cold to warm. The time is from
starting `finetune run` to the wall time of the first logged loss (metrics.jsonl of master-0).
Also prints the model's GETs that moto_server logged in each run.

    .venv/bin/python benchmarks/first_step.py [--rounds 1]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from s3_server import AWS_ENV, MotoServer, make_bucket  # noqa: E402

DATA = REPO / "tests" / "fixtures" / "data" / "alpaca.jsonl"
PREFIX = "models/smollm2"


def job(base_model: str, data: Path, *, cache_claim: str | None, volume_claim: str | None) -> dict:
    spec = {
        "model": {"base_model": base_model, "trust_remote_code": False},
        "fine_tuning": {"method": "lora", "lora": {"r": 8, "alpha": 16}},
        "training": {"max_steps": 1, "micro_batch_size": 1, "max_seq_length": 64, "mixed_precision": "no",
                     "warmup_ratio": 0.0},
        "dataset": {"format": "alpaca", "train_path": str(data)},
        "output": {"logging_steps": 1, "save_steps": 100},
        "nodes": 2,
        "gpus_per_node": 0,
    }
    if cache_claim:
        spec["model_cache"] = {"claim_name": cache_claim}
    if volume_claim:
        spec["model_volume"] = {"claim_name": volume_claim, "mount_path": "/models"}
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "first-step"},
            "spec": spec}


def first_step_seconds(work: Path, name: str, manifest: dict, volumes: list[str]) -> float:
    run_dir = work / f"run-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "finetune_trainer.cli", "run", "-f", str(path), "--run-dir",
                           str(run_dir), *[a for v in volumes for a in ("--volume", v)]],
                          capture_output=True, text=True, cwd=work, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: finetune run exited {proc.returncode}\n{(proc.stdout + proc.stderr)[-4000:]}")
    records = [json.loads(line) for line in (run_dir / "master-0" / "output" / "metrics.jsonl").read_text().splitlines()]
    return min(r["time"] for r in records if r.get("loss") is not None) - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    opts = parser.parse_args()

    import boto3

    from finetune_trainer.model import builtin
    from finetune_trainer.storage.stores import MiB

    model = builtin.model_dir()
    files = sorted(p for p in model.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    work = Path(tempfile.mkdtemp(prefix="first-step-"))
    try:
        data = work / "train.jsonl"
        shutil.copy(DATA, data)
        with MotoServer() as server:
            os.environ.update({**AWS_ENV, "AWS_ENDPOINT_URL": server.endpoint, "HF_HUB_OFFLINE": "1"})
            bucket = make_bucket(server.endpoint, "bench")
            client = boto3.client("s3")
            for path in files:
                client.upload_file(str(path), bucket, f"{PREFIX}/{path.relative_to(model).as_posix()}")
            uri = f"s3://{bucket}/{PREFIX}/"
            print(f"model: {len(files)} files, {total / MiB:.0f} MiB in {uri}; 2 nodes x 1 rank; "
                  f"{os.cpu_count()} CPUs", flush=True)
            times: dict[str, list[float]] = collections.defaultdict(list)

            def run(name: str, manifest: dict, volumes: list[str]) -> None:
                before = len(server.requests("GET", f"/{bucket}/{PREFIX}/"))
                seconds = first_step_seconds(work, name, manifest, volumes)
                gets = len(server.requests("GET", f"/{bucket}/{PREFIX}/")) - before
                times[name].append(seconds)
                print(f"  {name:<22} first step after {seconds:6.1f} s   model GETs {gets}", flush=True)

            for r in range(opts.rounds):
                print(f"round {r + 1}", flush=True)
                cache = work / "job-cache"
                shutil.rmtree(cache, ignore_errors=True)
                cache.mkdir()
                shared = job(uri, data, cache_claim="job-cache", volume_claim=None)
                run("mounted path (floor)", job(f"/models/{model.name}", data, cache_claim=None, volume_claim="models"),
                    [f"models={model.parent}"])
                run("s3, cache cold", shared, [f"job-cache={cache}"])
                run("s3, cache warm", shared, [f"job-cache={cache}"])
                run("s3, pod caches (cold)", job(uri, data, cache_claim=None, volume_claim=None), [])
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"time to first step: cold {med['s3, cache cold']:.1f} s, warm {med['s3, cache warm']:.1f} s "
              f"(cold/warm {med['s3, cache cold'] / med['s3, cache warm']:.2f}), mounted path "
              f"{med['mounted path (floor)']:.1f} s (warm/mounted {med['s3, cache warm'] / med['mounted path (floor)']:.2f}), "
              f"pod caches cold {med['s3, pod caches (cold)']:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
