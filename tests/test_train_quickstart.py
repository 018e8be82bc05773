"""The shipped quickstart (what `make demo` runs) on the real built-in SmolLM2-135M, cut to a
few steps: the manifest, the demo data and the whole pipeline, with the sample answer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from finetune_trainer.cli import main
from finetune_trainer.config import load_config

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "examples" / "quickstart.yaml"


def test_quickstart_is_a_cpu_lora_job_on_the_builtin_model():
    doc = yaml.safe_load(QUICKSTART.read_text())
    assert (doc["apiVersion"], doc["kind"], doc["metadata"]["name"]) == ("finetune.dev/v1alpha1", "FineTuneJob", "quickstart")
    spec = doc["spec"]
    assert spec["model"]["base_model"] == "builtin:SmolLM2-135M-Instruct"
    assert spec["fine_tuning"]["method"] == "lora" and spec["gpus_per_node"] == 0 and spec["nodes"] == 1
    assert spec["output"]["output_dir"] == "runs/quickstart"
    for key in ("train_path", "eval_path"):
        assert (REPO / spec["dataset"][key]).is_file()
    assert "finetune train --config examples/quickstart.yaml" in (REPO / "Makefile").read_text()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quickstart_runs_end_to_end(tmp_path, monkeypatch, capsys):
    from finetune_trainer.model import builtin

    try:
        builtin.gguf_path()
    except FileNotFoundError as exc:  # make venv installs it; a bare pip install may not
        pytest.skip(f"the built-in model is not installed: {exc}")
    shutil.copytree(REPO / "examples", tmp_path / "examples")  # paths in the manifest are relative
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "--config", "examples/quickstart.yaml", "--training.max_steps", "3", "--output.logging_steps", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    out = tmp_path / "runs" / "quickstart"
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 3 and results["method"] == "lora"
    assert results["eval_before"]["eval_loss"] > 0 and results["eval_after"]["eval_loss"] > 0
    for line in ("Eval loss before:", "Eval loss after:", "Sample answer:"):
        assert line in captured.out
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    assert load_config(out / "config.yaml", mode="train").config.model.base_model == "builtin:SmolLM2-135M-Instruct"
