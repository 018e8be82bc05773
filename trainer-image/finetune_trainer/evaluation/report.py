"""Benchmark results -> evaluation.json, the printed before -> after table, and the
FineTuneJob's `status.evaluation`. Pure functions, except `write_report`.

A stage's results (what `run_benchmarks` returns) map each benchmark to
`{"metrics": {name: number}, "details": {...}, "seconds": s}` or `{"error": message, ...}`.
The change is after minus before for each metric both stages have; for perplexities and
losses lower is better, which `improved` accounts for.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..contract import EVALUATION_FILE

FORMAT_VERSION = 1
STATUS_MAX_METRICS = 20  # status objects stay small; evaluation.json has everything
LOWER_IS_BETTER = ("perplexity", "reference_loss", "bits_per_byte", "loss")

Stage = dict[str, dict[str, Any]]


def lower_is_better(metric: str) -> bool:
    base = metric.rsplit("/", 1)[-1].split("[", 1)[0]
    return base.endswith(LOWER_IS_BETTER)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_deltas(before: Stage | None, after: Stage | None) -> dict[str, dict[str, float]]:
    """after - before, per benchmark and metric, where both stages have a finite number."""
    if not before or not after:
        return {}
    deltas: dict[str, dict[str, float]] = {}
    for name, result in after.items():
        earlier = (before.get(name) or {}).get("metrics") or {}
        later = result.get("metrics") or {}
        common = {m: later[m] - earlier[m] for m in later if m in earlier and _finite(later[m]) and _finite(earlier[m])}
        if common:
            deltas[name] = common
    return deltas


def evaluation_report(after: Stage | None, before: Stage | None = None) -> dict[str, Any]:
    """The content of evaluation.json."""
    names = list(dict.fromkeys([*(before or {}), *(after or {})]))
    return {
        "format_version": FORMAT_VERSION,
        "benchmarks": names,
        "before": before,
        "after": after,
        "delta": metric_deltas(before, after),
    }


def metric_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (benchmark, metric): before, after, delta, improved (None when unknown)."""
    before, after, deltas = report.get("before") or {}, report.get("after") or {}, report.get("delta") or {}
    rows = []
    for name in report.get("benchmarks", []):
        b, a = (before.get(name) or {}).get("metrics") or {}, (after.get(name) or {}).get("metrics") or {}
        for metric in dict.fromkeys([*b, *a]):
            delta = deltas.get(name, {}).get(metric)
            improved = None if delta is None or delta == 0 else (delta < 0) == lower_is_better(metric)
            rows.append({"benchmark": name, "metric": metric, "before": b.get(metric), "after": a.get(metric),
                         "delta": delta, "improved": improved})
    return rows


def errors(report: dict[str, Any]) -> list[dict[str, str]]:
    return [
        {"benchmark": name, "stage": stage, "message": str(result["error"])}
        for stage in ("before", "after")
        for name, result in (report.get(stage) or {}).items()
        if result.get("error")
    ]


def _number(value: Any, signed: bool = False) -> str:
    if not _finite(value):
        return "-" if value is None else str(value)
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def results_table(report: dict[str, Any]) -> str:
    """The table printed at the end of a run (before -> after)."""
    header = ("Benchmark", "Metric", "Before", "After", "Change", "")
    lines = [
        (r["benchmark"], r["metric"], _number(r["before"]), _number(r["after"]), _number(r["delta"], signed=True),
         {True: "better", False: "worse", None: ""}[r["improved"]])
        for r in metric_rows(report)
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    out = ["Evaluation (before -> after):" if report.get("before") else "Evaluation:"]
    for row in [header, *lines]:
        cells = [cell.rjust(w) if 2 <= i <= 4 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        out.append("  ".join(cells).rstrip())
    for err in errors(report):
        out.append(f"{err['benchmark']} ({err['stage']}): error: {err['message']}")
    return "\n".join(out)


def _status_number(value: Any) -> float | None:
    return round(float(value), 6) if _finite(value) else None


def evaluation_status(report: dict[str, Any], *, results_uri: str | None = None) -> dict[str, Any]:
    """`status.evaluation` of the FineTuneJob: headline numbers, at most STATUS_MAX_METRICS
    rows (evaluation.json has all), errors, and a one-line summary. JSON-safe (no NaN)."""
    rows = metric_rows(report)
    metrics = []
    for row in rows[:STATUS_MAX_METRICS]:
        entry = {"benchmark": row["benchmark"], "metric": row["metric"]}
        for key in ("before", "after", "delta"):
            if (value := _status_number(row[key])) is not None:
                entry[key] = value
        if row["improved"] is not None:
            entry["improved"] = row["improved"]
        metrics.append(entry)
    status: dict[str, Any] = {
        "stages": [s for s in ("before", "after") if report.get(s) is not None],
        "metrics": metrics,
        "summary": summary_line(rows),
    }
    if len(rows) > STATUS_MAX_METRICS:
        status["metricsOmitted"] = len(rows) - STATUS_MAX_METRICS
    if errs := errors(report):
        status["errors"] = [{**e, "message": e["message"][:500]} for e in errs]
    if results_uri:
        status["resultsUri"] = results_uri
    return status


def summary_line(rows: list[dict[str, Any]]) -> str:
    """The first metric of each benchmark, e.g. 'human-eval pass@1 0.0000 -> 0.2000'."""
    first: dict[str, dict[str, Any]] = {}
    for row in rows:
        first.setdefault(row["benchmark"], row)
    parts = []
    for name, row in first.items():
        after = _number(row["after"])
        text = f"{name} {row['metric']} {after}" if row["before"] is None else f"{name} {row['metric']} {_number(row['before'])} -> {after}"
        parts.append(text)
    return "; ".join(parts)


def write_report(report: dict[str, Any], output_dir: str | Path) -> Path:
    """evaluation.json in the output folder (storage's `final/` gets a copy with the model).
    NaN and infinities become null: JSON has neither."""
    path = Path(output_dir) / EVALUATION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    return path


def read_report(output_dir: str | Path) -> dict[str, Any] | None:
    path = Path(output_dir) / EVALUATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
