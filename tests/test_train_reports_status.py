"""A real `finetune train`, as a pod runs it, reports progress into its FineTuneJob's status:
rank 0 PATCHes /status over HTTP (the API emulator here), including the newest checkpoint
that is complete in object storage (file:// here) and the benchmarks before -> after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune_operator.testing.kube_emulator import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DATA = Path(__file__).resolve().parent / "fixtures" / "data" / "alpaca.jsonl"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_training_progress_and_checkpoint_reach_the_status(tmp_path, tiny_model_dir, cluster, emulator):
    cluster.apply_job("demo", {"model": {"base_model": "x"}})
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    storage = tmp_path / "storage"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"base_model": str(tiny_model_dir), "trust_remote_code": False},
        "training": {"max_steps": 4, "learning_rate": 1e-3, "max_seq_length": 64, "mixed_precision": "no"},
        "dataset": {"train_path": str(data)},
        "output": {"output_dir": str(tmp_path / "out"), "storage_uri": f"file://{storage}", "logging_steps": 1,
                   "save_steps": 2},
        "evaluation": {"benchmarks": ["domain-specific-eval", "human-eval"], "evaluate_base_model": True,
                       "domain_eval_path": str(EXAMPLES / "eval" / "domain_demo.jsonl"), "domain_eval_max_new_tokens": 4,
                       "human_eval": {"problems_path": str(EXAMPLES / "eval" / "humaneval_tiny.jsonl"),
                                      "max_new_tokens": 8}},
    }))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "FINETUNE_STATUS_URL": f"{emulator.url}/apis/finetune.dev/v1alpha1/namespaces/default/finetunejobs/demo/status"}
    proc = subprocess.run([sys.executable, "-m", "finetune_trainer.cli", "train", "--config", str(config)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    progress = wait_for(lambda: ((cluster.job("demo") or {}).get("status") or {}).get("progress"),
                        what="status.progress")
    # the last report is sent at the end, whatever the throttle says
    assert progress["step"] == 4 and progress["totalSteps"] == 4 and progress["progressPercentage"] == 100.0
    assert progress["loss"] > 0 and "lastUpdatedTime" in progress
    assert progress["checkpointUri"].startswith(f"file://{storage}") and "checkpoint-" in progress["checkpointUri"]
    assert progress["storageDegraded"] is False
    # self-describing checkpoints: the manifest carries the run's resolved config
    manifest = json.loads((storage / "checkpoints" / "checkpoint-4" / "manifest.json").read_text())
    assert manifest["config"]["training"]["max_steps"] == 4 and manifest["config"]["dataset"]["train_path"] == str(data)
    # benchmarks before -> after: the table, evaluation.json (with final/), status.evaluation
    assert "before" in proc.stdout and "human-eval" in proc.stdout
    report = json.loads((storage / "final" / "evaluation.json").read_text())
    assert set(report["after"]) == {"domain-specific-eval", "human-eval"} and report["before"]
    evaluation = wait_for(lambda: cluster.job("demo")["status"].get("evaluation"), what="status.evaluation")
    assert evaluation["stages"] == ["before", "after"]
    assert evaluation["resultsUri"] == f"file://{storage}/final/evaluation.json"
    assert {m["benchmark"] for m in evaluation["metrics"]} == {"domain-specific-eval", "human-eval"}


def test_skipped_bad_rows_are_counted_in_the_log_metrics_and_status(tmp_path, tiny_model_dir, cluster, emulator):
    """dataset.skip_bad_rows: the bad rows are skipped, and the count reaches the log,
    metrics.jsonl's data line and status.progress.skippedRows; one more bad row than the
    bound fails the run listing them all."""
    cluster.apply_job("demo", {"model": {"base_model": "x"}})
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()] * 3
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"instruction": "no output"}\n[1, 2]\n')
    config = tmp_path / "config.yaml"
    cfg = {
        "model": {"base_model": str(tiny_model_dir)},
        "training": {"max_steps": 2, "max_seq_length": 64, "mixed_precision": "no"},
        "dataset": {"train_path": str(data), "skip_bad_rows": 2},
        "output": {"output_dir": str(tmp_path / "out"), "logging_steps": 1},
    }
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "FINETUNE_STATUS_URL": f"{emulator.url}/apis/finetune.dev/v1alpha1/namespaces/default/finetunejobs/demo/status"}
    command = [sys.executable, "-m", "finetune_trainer.cli", "train", "--config", str(config)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    bad = len(rows) + 1
    assert f"row {bad}: missing field 'output'" in proc.stderr and f"row {bad + 1}: expected a JSON object" in proc.stderr
    assert "skipped (dataset.skip_bad_rows: 2)" in proc.stderr
    first = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["data"]["train"]["skipped"] == 2 and first["data"]["train"]["samples"] == len(rows)
    progress = wait_for(lambda: ((cluster.job("demo") or {}).get("status") or {}).get("progress"), what="status.progress")
    assert progress["skippedRows"] == 2 and progress["samples"] == len(rows)

    cfg["dataset"]["skip_bad_rows"] = 1
    config.write_text(yaml.safe_dump(cfg))
    failed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert failed.returncode == 1
    assert "2 bad rows is more than dataset.skip_bad_rows (1)" in failed.stderr
