"""Before -> after: run_benchmarks on a model that really changes, evaluation.json, the
printed table, and the FineTuneJob's status.evaluation summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from finetune_trainer.config import validate_data
from finetune_trainer.evaluation import (
    BENCHMARKS,
    evaluation_report,
    evaluation_status,
    finish_evaluation,
    read_report,
    results_table,
    run_benchmarks,
)
from finetune_trainer.evaluation.report import STATUS_MAX_METRICS

REPO = Path(__file__).resolve().parent.parent
EVAL = REPO / "examples" / "eval"
FIXTURES = REPO / "tests" / "fixtures" / "eval"

BEFORE = {
    "domain-specific-eval": {"metrics": {"exact_match": 0.0, "token_f1": 0.25, "perplexity": 40.0}, "seconds": 1.0},
    "human-eval": {"metrics": {"pass@1": 0.2}, "seconds": 2.0},
    "lm-evaluation-harness": {"error": "evaluation.lm_eval.tasks: unknown lm_eval task(s) 'x'"},
}
AFTER = {
    "domain-specific-eval": {"metrics": {"exact_match": 0.5, "token_f1": 0.75, "perplexity": 4.0}, "seconds": 1.0},
    "human-eval": {"metrics": {"pass@1": 0.0}, "seconds": 2.0},
    "lm-evaluation-harness": {"metrics": {"local_qa/acc": 0.6, "local_qa/acc_norm": float("nan")}, "seconds": 3.0},
}


def test_report_has_before_after_and_delta():
    report = evaluation_report(AFTER, BEFORE)
    assert report["benchmarks"] == ["domain-specific-eval", "human-eval", "lm-evaluation-harness"]
    assert report["delta"] == {
        "domain-specific-eval": {"exact_match": 0.5, "token_f1": 0.5, "perplexity": -36.0},
        "human-eval": {"pass@1": -0.2},
    }
    assert evaluation_report(AFTER)["delta"] == {} and evaluation_report(AFTER)["before"] is None


def test_table_reads_before_to_after():
    table = results_table(evaluation_report(AFTER, BEFORE)).splitlines()
    assert table[0] == "Evaluation (before -> after):"
    assert table[1].split() == ["Benchmark", "Metric", "Before", "After", "Change"]
    assert table[2].split() == ["domain-specific-eval", "exact_match", "0.0000", "0.5000", "+0.5000", "better"]
    assert table[4].split() == ["domain-specific-eval", "perplexity", "40.0000", "4.0000", "-36.0000", "better"]
    assert table[5].split() == ["human-eval", "pass@1", "0.2000", "0.0000", "-0.2000", "worse"]
    assert table[6].split() == ["lm-evaluation-harness", "local_qa/acc", "-", "0.6000", "-"]
    assert table[-1].startswith("lm-evaluation-harness (before): error: evaluation.lm_eval.tasks")
    assert results_table(evaluation_report(AFTER)).splitlines()[0] == "Evaluation:"


def test_status_summary_is_small_and_json_safe():
    status = evaluation_status(evaluation_report(AFTER, BEFORE), results_uri="s3://b/ns/job/final/evaluation.json")
    json.dumps(status, allow_nan=False)  # the API server refuses NaN
    assert status["stages"] == ["before", "after"]
    assert status["metrics"][0] == {"benchmark": "domain-specific-eval", "metric": "exact_match",
                                    "before": 0.0, "after": 0.5, "delta": 0.5, "improved": True}
    assert status["metrics"][2]["improved"] is True  # perplexity fell
    assert status["metrics"][-1] == {"benchmark": "lm-evaluation-harness", "metric": "local_qa/acc_norm"}
    assert status["errors"] == [{"benchmark": "lm-evaluation-harness", "stage": "before",
                                 "message": "evaluation.lm_eval.tasks: unknown lm_eval task(s) 'x'"}]
    assert status["summary"] == (
        "domain-specific-eval exact_match 0.0000 -> 0.5000; human-eval pass@1 0.2000 -> 0.0000; "
        "lm-evaluation-harness local_qa/acc 0.6000"
    )
    assert status["resultsUri"].endswith("final/evaluation.json")


def test_status_keeps_at_most_a_screenful_of_metrics():
    many = {"lm-evaluation-harness": {"metrics": {f"t{i}/acc": 0.5 for i in range(50)}}}
    status = evaluation_status(evaluation_report(many))
    assert len(status["metrics"]) == STATUS_MAX_METRICS and status["metricsOmitted"] == 50 - STATUS_MAX_METRICS
    assert status["stages"] == ["after"]


def test_every_seed_benchmark_has_an_implementation():
    from typing import get_args

    from finetune_trainer.config.schema import Benchmark

    assert set(BENCHMARKS) == set(get_args(Benchmark))


def _cfg(model_dir, output_dir, **evaluation):
    return validate_data({
        "model": {"base_model": str(model_dir), "use_flash_attention": False},
        "dataset": {"train_path": "unused.jsonl"},
        "output": {"output_dir": str(output_dir)},
        "evaluation": {
            "benchmarks": ["lm-evaluation-harness", "domain-specific-eval", "human-eval"],
            "evaluate_base_model": True,
            "eval_batch_size": 4,
            "domain_eval_path": str(FIXTURES / "domain.jsonl"),
            "domain_eval_max_new_tokens": 6,
            "lm_eval": {"tasks": ["local_qa"], "include_path": str(EVAL / "lm_eval_tasks"), "limit": 4},
            "human_eval": {"problems_path": str(EVAL / "humaneval_tiny.jsonl"), "max_new_tokens": 8, "limit": 2},
            **evaluation,
        },
    }).config


def test_before_and_after_a_real_change(tiny_model_dir, tmp_path, capsys):
    """All three benchmarks on the tiny model, before and after its weights change (a
    stand-in for training); the report, the file and the table show the change."""
    import torch

    from finetune_trainer.model.loading import load_model, load_tokenizer

    cfg = _cfg(tiny_model_dir, tmp_path / "out")
    model, tokenizer = load_model(cfg), load_tokenizer(cfg)
    model.train()
    before = run_benchmarks(model, tokenizer, cfg, stage="before")
    assert model.training  # restored for the Trainer
    with torch.no_grad():  # "training": scale the output head, which changes every likelihood
        model.get_output_embeddings().weight.mul_(3.0)
    after = run_benchmarks(model, tokenizer, cfg, stage="after")

    for stage in (before, after):
        assert list(stage) == ["lm-evaluation-harness", "domain-specific-eval", "human-eval"]
        assert all("error" not in r and r["seconds"] >= 0 and "config" in r for r in stage.values()), stage
    assert before["human-eval"]["config"]["problems_path"].endswith("humaneval_tiny.jsonl")

    report = finish_evaluation(cfg.output.output_dir, after, before)
    saved = read_report(cfg.output.output_dir)
    assert saved == json.loads(json.dumps(report, default=str).replace("NaN", "null"))
    loss_change = saved["delta"]["domain-specific-eval"]["reference_loss"]
    assert math.isfinite(loss_change) and loss_change != 0.0
    assert set(saved["delta"]) >= {"domain-specific-eval", "human-eval"}
    printed = capsys.readouterr().out
    assert "Evaluation (before -> after):" in printed and "reference_loss" in printed
    assert f"Evaluation results: {Path(cfg.output.output_dir) / 'evaluation.json'}" in printed
    status = evaluation_status(report)
    assert status["stages"] == ["before", "after"] and "errors" not in status


def test_a_benchmark_that_cannot_run_is_recorded_and_the_others_run(tiny_model_dir, tmp_path):
    from finetune_trainer.model.loading import load_model, load_tokenizer

    cfg = _cfg(tiny_model_dir, tmp_path, benchmarks=["domain-specific-eval", "human-eval"],
               domain_eval_path=str(FIXTURES / "domain_bad.jsonl"))
    model, tokenizer = load_model(cfg), load_tokenizer(cfg)
    results = run_benchmarks(model, tokenizer, cfg, stage="after")
    assert "row 2: field 'reference'" in results["domain-specific-eval"]["error"]
    assert results["human-eval"]["metrics"] == {"pass@1": 0.0}
    with pytest.raises(ValueError, match="stage"):
        run_benchmarks(model, tokenizer, cfg, stage="during")  # type: ignore[arg-type]
