"""metrics.jsonl records, progress updates, the NaN guard and the loss plot, without training."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from finetune_trainer.training.callbacks import (
    MetricsCallback,
    NonFiniteLossError,
    NonFiniteLossGuard,
    json_line,
    metrics_record,
    non_finite,
    perplexity,
    progress_update,
)
from finetune_trainer.training.plots import loss_series, plot_loss, read_metrics
from finetune_trainer.train import prepare_metrics_file, prompt_ids


def test_train_log_becomes_a_record():
    logs = {"loss": 2.5, "grad_norm": 1.25, "learning_rate": 1e-4, "epoch": 0.5}
    rec = metrics_record(logs, step=10, epoch=0.5, now=1000.0, elapsed=12.5, tokens_per_second=321.0)
    assert rec == {
        "step": 10, "epoch": 0.5, "loss": 2.5, "eval_loss": None, "eval_perplexity": None,
        "learning_rate": 1e-4, "grad_norm": 1.25, "tokens_per_second": 321.0, "time": 1000.0, "elapsed_seconds": 12.5,
    }


def test_eval_log_carries_perplexity():
    rec = metrics_record({"eval_loss": math.log(8.0)}, step=4, epoch=1.0, now=1.0, elapsed=1.0, tokens_per_second=None)
    assert rec["eval_perplexity"] == pytest.approx(8.0)
    assert rec["loss"] is None


def test_perplexity_overflow_is_inf():
    assert perplexity(1e6) == math.inf and perplexity(None) is None


@pytest.mark.parametrize(
    "step,start,elapsed,total,eta",
    [(10, 0, 20.0, 100, 180.0), (15, 10, 10.0, 20, 10.0), (0, 0, 5.0, 10, None), (20, 0, 40.0, 20, 0.0)],
)
def test_progress_eta_from_this_sessions_pace(step, start, elapsed, total, eta):
    rec = metrics_record({"loss": 1.0}, step=step, epoch=0.1, now=0, elapsed=elapsed, tokens_per_second=50.0)
    update = progress_update(rec, total_steps=total, start_step=start, elapsed=elapsed)
    assert update["eta_seconds"] == eta
    assert set(update) == {
        "step", "total_steps", "epoch", "loss", "eval_loss", "learning_rate", "tokens_per_second", "eta_seconds"
    }


@pytest.mark.parametrize(
    "logs,bad",
    [({"loss": float("nan")}, "loss"), ({"eval_loss": float("inf")}, "eval_loss"), ({"loss": 1.0}, None), ({}, None)],
)
def test_non_finite_detection(logs, bad):
    assert non_finite(logs) == bad


def test_guard_raises_a_clear_error():
    state = SimpleNamespace(global_step=7)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 7.*training.learning_rate"):
        NonFiniteLossGuard().on_log(None, state, None, logs={"loss": float("nan")})


def test_json_line_stays_valid_json_on_nan():
    line = json_line({"step": 1, "loss": float("nan"), "eval_loss": None})
    assert json.loads(line) == {"step": 1, "loss": "nan", "eval_loss": None}


def _state(step, tokens, main=True, max_steps=10):
    return SimpleNamespace(
        global_step=step, num_input_tokens_seen=tokens, is_world_process_zero=main, epoch=step / 10, max_steps=max_steps
    )


def test_metrics_callback_writes_on_main_only_and_reports(tmp_path):
    updates = []
    cb = MetricsCallback(tmp_path / "m.jsonl", reporters=[updates.append])
    cb.on_train_begin(None, _state(0, 0), None)
    cb.on_log(None, _state(1, 100), None, logs={"loss": 3.0, "learning_rate": 1e-3})
    cb.on_log(None, _state(1, 100, main=False), None, logs={"loss": 3.0})
    cb.on_log(None, _state(2, 200), None, logs={"eval_loss": 2.0})
    cb.on_log(None, _state(2, 200), None, logs={"train_runtime": 5.0})  # end-of-train summary: skipped
    rows = read_metrics(tmp_path / "m.jsonl")
    assert [(r["step"], r["loss"], r["eval_loss"]) for r in rows] == [(1, 3.0, None), (2, None, 2.0)]
    assert rows[0]["tokens_per_second"] > 0 and rows[1]["eval_perplexity"] == pytest.approx(math.exp(2.0))
    assert [u["step"] for u in updates] == [1, 2] and updates[0]["total_steps"] == 10


def test_plot_from_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": 3.0 - s * 0.1, "eval_loss": None} for s in range(1, 6)]
    lines.append({"step": 5, "loss": None, "eval_loss": 2.7})
    lines.append({"step": 6, "loss": "nan", "eval_loss": None})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert loss_series(read_metrics(path), "loss")[0] == [1, 2, 3, 4, 5]  # the NaN point is left out
    png = plot_loss(path, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_loss(tmp_path / "empty.jsonl", tmp_path / "none.png") is None


def test_resume_without_storage_uses_the_same_rule_the_newest_checkpoint_whose_manifest_verifies(tmp_path):
    """No object storage: a checkpoint is complete once its local manifest is written and
    its files verify, exactly as in storage (one finder: storage.checkpoints)."""
    from finetune_trainer.storage.checkpoints import find_resume_checkpoint, write_local_manifest

    assert find_resume_checkpoint(None, tmp_path / "absent") is None
    for step, manifest in ((5, True), (10, True), (15, False)):  # 15: killed before its manifest
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "trainer_state.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"w" * step)
        if manifest:
            write_local_manifest(d, step, None, config={"training": {"learning_rate": 0.1}})
    assert find_resume_checkpoint(None, tmp_path) == tmp_path / "checkpoint-10"
    (tmp_path / "checkpoint-10" / "model.safetensors").write_bytes(b"torn")  # a file that no longer verifies
    assert find_resume_checkpoint(None, tmp_path) == tmp_path / "checkpoint-5"


def test_metrics_file_trimmed_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 5, 10, 12)))
    prepare_metrics_file(path, resume_step=10)
    assert [r["step"] for r in read_metrics(path)] == [1, 5, 10]
    prepare_metrics_file(path, resume_step=None)
    assert path.read_text() == ""


def test_prompt_is_what_precedes_the_first_learned_token():
    row = {"input_ids": [1, 2, 3, 4, 5, 6], "labels": [-100, -100, -100, 4, 5, 6]}
    assert prompt_ids(row) == [1, 2, 3]
    assert prompt_ids({"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}) == [1, 2]  # train_on_inputs

