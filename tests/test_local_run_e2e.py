"""`finetune run` end to end: a FineTuneJob with nodes: 2 becomes two local processes that train
the tiny Llama together over gloo on loopback, exactly as two pods would (same config file,
same env, same command), and leave checkpoints and the final model in the job's file://
storage. Once per backend (`--backend`), so each env contract reaches the launcher: the
PyTorchJob's Master and Worker (the training operator's RANK, MASTER_*, PET_*); a JobSet's two
Indexed pods (PET_* rendered by the operator, the node rank from the Job completion index
annotation through the downward API); a TrainJob's two nodes (the torch plug-in's PET_*)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune_trainer.contract import ENV_DUMP_STACKS_AFTER

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "fixtures" / "data" / "alpaca.jsonl"


def manifest(model_dir: Path, data: Path) -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "two-nodes"},
        "spec": {
            "model": {"base_model": str(model_dir), "trust_remote_code": False},
            "fine_tuning": {"method": "lora", "lora": {"r": 4, "alpha": 8}},
            "training": {"max_steps": 2, "micro_batch_size": 1, "learning_rate": 1.0e-3, "max_seq_length": 64,
                         "mixed_precision": "no", "warmup_ratio": 0.0},
            "dataset": {"format": "alpaca", "train_path": str(data)},
            "output": {"logging_steps": 1, "save_steps": 1, "save_total_limit": 2},
            "nodes": 2,
            "gpus_per_node": 0,
        },
    }


PODS = {"pytorchjob": ("master-0", "worker-0"), "jobset": ("node-0", "node-1"), "trainjob": ("node-0", "node-1")}


@pytest.fixture(scope="module", params=list(PODS))
def two_node_run(request, tmp_path_factory, tiny_model_dir):
    """One `finetune run --backend <each>` of the two-node job, shared by the tests below."""
    backend = request.param
    tmp_path = tmp_path_factory.mktemp(f"two-nodes-{backend}")
    data = tmp_path / "train.jsonl"
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    job = tmp_path / "finetune.yaml"
    job.write_text(yaml.safe_dump(manifest(tiny_model_dir, data)))
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # `finetune run` divides the CPUs
    env[ENV_DUMP_STACKS_AFTER] = "240"  # a run that hangs (seen once in CI) prints where each replica is
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune_trainer.cli", "run", "-f", str(job), "--run-dir", str(run_dir),
         "--backend", backend],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env,
    )
    try:
        output, _ = proc.communicate(timeout=540)
    except subprocess.TimeoutExpired:
        # `finetune run` forwards SIGTERM to its replicas and kills them on a second one: none is orphaned
        for _ in range(2):
            proc.send_signal(signal.SIGTERM)
            try:
                output, _ = proc.communicate(timeout=30)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            proc.kill()
            output, _ = proc.communicate()
        raise AssertionError(f"`finetune run --backend {backend}` did not end in 540 s; its output:\n{output[-20000:]}")
    return proc.returncode, output, run_dir, PODS[backend]


def test_two_local_nodes_train_as_one_world(two_node_run):
    code, output, run_dir, (first, second) = two_node_run
    assert code == 0, output[-6000:]
    assert f"[{first}]" in output and f"[{second}]" in output
    assert f"{first} exited 0, {second} exited 0" in output
    assert "intra-op threads per process:" in output and "2 process(es) sharing it" in output
    # One world of two ranks, not two runs of one: each optimizer step consumed a micro-batch
    # on both, so an epoch of N samples took N / 2 steps.
    results = json.loads((run_dir / first / "output" / "train_results.json").read_text())
    samples = results["data"]["train"]["samples"]
    assert results["global_step"] == 2
    assert results["epoch"] == pytest.approx(results["global_step"] * 2 / samples)
    # Both replicas ran the same resolved config, each with its own output directory.
    configs = [yaml.safe_load((run_dir / r / "config.yaml").read_text()) for r in (first, second)]
    assert configs[0]["output"]["storage_uri"] == configs[1]["output"]["storage_uri"]
    assert configs[0]["output"]["output_dir"] != configs[1]["output"]["output_dir"]


def test_checkpoints_and_final_model_land_in_storage(two_node_run):
    code, output, run_dir, (first, _) = two_node_run
    assert code == 0, output[-3000:]
    storage = run_dir / "storage" / "default" / "two-nodes"
    config = yaml.safe_load((run_dir / first / "config.yaml").read_text())
    assert config["output"]["storage_uri"] == f"file://{storage.resolve()}"
    checkpoints = sorted((storage / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, f"no checkpoints under {storage}: {sorted(p.name for p in storage.rglob('*'))[:20]}"
    assert all(any(c.glob("*manifest*")) for c in checkpoints)  # complete checkpoints carry their manifest
    newest = checkpoints[-1]
    # Each node's local rank 0 uploaded what its ranks wrote; the manifest holds both.
    manifest = json.loads((newest / "manifest.json").read_text())
    names = {f["path"] for f in manifest["files"]}
    assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors", "optimizer.pt"} <= names
    assert len(checkpoints) <= 2  # save_total_limit holds in storage too
    final = storage / "final"
    assert (final / "manifest.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert (final / "config.yaml").is_file() and (final / "train_results.json").is_file()
    assert (storage / "metrics.jsonl").read_text().strip()
