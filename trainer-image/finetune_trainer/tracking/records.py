"""What the trackers are told, as pure functions: the run's params, tags and name, and a
metrics.jsonl record as each tracker names its figures."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..contract import ENV_JOB_NAME, ENV_JOB_NAMESPACE, ENV_JOB_UID

TAG_PREFIX = "finetune.dev/"
JOB_UID_TAG = f"{TAG_PREFIX}job-uid"  # finds the run of a job whose checkpoint predates its id
# metrics.jsonl key -> the name under TensorBoard and W&B (transformers' rewrite_logs: train/..., eval/...)
SECTIONED = {
    "loss": "train/loss",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "tokens_per_second": "train/tokens_per_second",
    "epoch": "train/epoch",
    "eval_loss": "eval/loss",
    "eval_perplexity": "eval/perplexity",
}


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"training": {"seed": 42}} -> {"training.seed": "42"}: MLflow params are flat strings;
    lists (target_modules) are one JSON value."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return out


def job_tags(environ: Mapping[str, str]) -> dict[str, str]:
    """The FineTuneJob a run belongs to (the operator sets these env vars in every pod)."""
    names = {"job-name": ENV_JOB_NAME, "job-namespace": ENV_JOB_NAMESPACE, "job-uid": ENV_JOB_UID}
    return {f"{TAG_PREFIX}{tag}": environ[var] for tag, var in names.items() if environ.get(var)}


def run_name(configured: str | None, environ: Mapping[str, str], output_dir: str | Path) -> str:
    """output.run_name, else the FineTuneJob's name, else the output directory's name."""
    return configured or environ.get(ENV_JOB_NAME) or Path(output_dir).resolve().name


def figures(record: Mapping[str, Any], *, sectioned: bool) -> dict[str, float]:
    """The finite numbers of a metrics.jsonl record, named for a tracker (the step and times aside)."""
    out = {}
    for key, name in SECTIONED.items():
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name if sectioned else key] = float(value)
    return out


def evaluation_markdown(rows: list[dict[str, Any]]) -> str:
    """The before -> after table as Markdown (TensorBoard's text tab renders it)."""
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))

    lines = ["| benchmark | metric | before | after | change |", "|---|---|---|---|---|"]
    lines += [f"| {r['benchmark']} | {r['metric']} | {cell(r['before'])} | {cell(r['after'])} | {cell(r['delta'])} |"
              for r in rows]
    return "\n".join(lines)
