"""The loss curve, drawn from metrics.jsonl (so it can be redrawn from a downloaded run)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; "nan"/"inf" strings (a diverged run) become floats."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            records.append({k: float(v) if v in ("nan", "inf", "-inf") else v for k, v in row.items()})
    return records


def loss_series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one loss, finite values only."""
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def plot_loss(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Training (and evaluation) loss against the optimizer step, as a PNG; None if nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a pod
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train, evals = loss_series(records, "loss"), loss_series(records, "eval_loss")
    if not train[0] and not evals[0]:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train[0]:
        ax.plot(*train, label="training loss", color="tab:blue")
    if evals[0]:
        ax.plot(*evals, label="eval loss", color="tab:orange", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out)
    plt.close(fig)
    return out
