"""Benchmarks after training (and, with `evaluation.evaluate_base_model`, before it).

    before = run_benchmarks(model, tokenizer, cfg, stage="before")   # base model / untrained adapter
    ... train ...
    after = run_benchmarks(model, tokenizer, cfg, stage="after")
    report = finish_evaluation(output_dir, after, before)             # evaluation.json + printed table
    status["evaluation"] = evaluation_status(report)                  # FineTuneJob status summary

Benchmarks (`evaluation.benchmarks`), each a `Benchmark` (name, the config it reads, run):
- lm-evaluation-harness (lm_harness.py): lm_eval tasks on the loaded model;
- domain-specific-eval (domain.py): the user's prompt/reference JSONL; exact match, token F1,
  reference perplexity;
- human-eval (human_eval.py): code completions run in a sandbox (sandbox.py); pass@1.

Call on the main process only: generation under ZeRO-3 needs every rank and is not done.
A benchmark that cannot run (unknown task, missing data, no hub) is recorded with its error
in the results, and the others still run; bugs are raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import BenchmarkError
from .report import (
    EVALUATION_FILE,
    evaluation_report,
    evaluation_status,
    metric_deltas,
    read_report,
    results_table,
    write_report,
)

if TYPE_CHECKING:
    from ..config.schema import FineTuneConfig

log = logging.getLogger(__name__)

Stage = Literal["before", "after"]


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: its name in `evaluation.benchmarks`, the config it reads (recorded next to
    its results), and `run(model, tokenizer, cfg) -> {"metrics": {...}, "details": {...}}`."""

    name: str
    config: Callable[[FineTuneConfig], dict[str, Any]]
    run: Callable[[Any, Any, FineTuneConfig], dict[str, Any]]


def _lm_eval(model: Any, tokenizer: Any, cfg: FineTuneConfig) -> dict[str, Any]:
    from . import lm_harness

    return lm_harness.run(model, tokenizer, cfg)


def _domain(model: Any, tokenizer: Any, cfg: FineTuneConfig) -> dict[str, Any]:
    from . import domain

    return domain.run(model, tokenizer, cfg)


def _human_eval(model: Any, tokenizer: Any, cfg: FineTuneConfig) -> dict[str, Any]:
    from . import human_eval

    return human_eval.run(model, tokenizer, cfg)


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("lm-evaluation-harness", lambda cfg: cfg.evaluation.lm_eval.model_dump(), _lm_eval),
        Benchmark(
            "domain-specific-eval",
            lambda cfg: {"domain_eval_path": cfg.evaluation.domain_eval_path,
                         "max_new_tokens": cfg.evaluation.domain_eval_max_new_tokens},
            _domain,
        ),
        Benchmark("human-eval", lambda cfg: cfg.evaluation.human_eval.model_dump(), _human_eval),
    )
}


def _recoverable() -> tuple[type[BaseException], ...]:
    from ..data import DataError

    return (BenchmarkError, DataError, ConnectionError)


def run_benchmark(benchmark: Benchmark, model: Any, tokenizer: Any, cfg: FineTuneConfig) -> dict[str, Any]:
    """One benchmark's result, with its config and duration; an error a user can fix is
    recorded as {"error": message} instead of raised."""
    start = time.monotonic()
    try:
        result = dict(benchmark.run(model, tokenizer, cfg))
    except _recoverable() as exc:
        log.error("%s: %s", benchmark.name, exc)
        result = {"error": str(exc)}
    result["config"] = benchmark.config(cfg)
    result["seconds"] = round(time.monotonic() - start, 2)
    return result


def run_benchmarks(model: Any, tokenizer: Any, cfg: FineTuneConfig, *, stage: Stage) -> dict[str, dict[str, Any]]:
    """Every benchmark of `evaluation.benchmarks` on `model` as it is now, in eval mode; the
    model's train/eval mode is restored afterwards."""
    if stage not in ("before", "after"):
        raise ValueError(f"stage must be 'before' or 'after', not {stage!r}")
    was_training = bool(getattr(model, "training", False))
    results: dict[str, dict[str, Any]] = {}
    try:
        for name in cfg.evaluation.benchmarks:
            log.info("evaluation (%s training): %s", stage, name)
            results[name] = run_benchmark(BENCHMARKS[name], model, tokenizer, cfg)
            if "error" not in results[name]:
                log.info("evaluation (%s training): %s %s in %.1fs", stage, name, results[name]["metrics"], results[name]["seconds"])
    finally:
        model.train(was_training)
    return results


def finish_evaluation(
    output_dir: str | Path,
    after: dict[str, dict[str, Any]] | None,
    before: dict[str, dict[str, Any]] | None = None,
    *,
    echo: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Build the report, write `<output_dir>/evaluation.json`, print the before -> after table;
    return the report (for `evaluation_status`)."""
    report = evaluation_report(after, before)
    path = write_report(report, output_dir)
    if echo is not None:
        echo(results_table(report) + f"\nEvaluation results: {path}")
    return report


__all__ = [
    "BENCHMARKS",
    "EVALUATION_FILE",
    "Benchmark",
    "BenchmarkError",
    "Stage",
    "evaluation_report",
    "evaluation_status",
    "finish_evaluation",
    "metric_deltas",
    "read_report",
    "results_table",
    "run_benchmark",
    "run_benchmarks",
    "write_report",
]
