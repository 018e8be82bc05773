"""`finetune status`: every FineTuneJob in a namespace (or one, or all) for a terminal, from the
cluster's own status: phase, a progress bar, step, loss with a sparkline of the latest losses
(status.progress.lossHistory), tokens/s and ETA. `--watch` redraws every `--interval` seconds.

`status_lines` is pure (jobs in, lines out); `show` does the reading and the printing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

SPARKS = "▁▂▃▄▅▆▇█"
BAR = 20
HEADER = ("NAMESPACE", "NAME", "PHASE", "PROGRESS", "STEP", "LOSS", "LOSS HISTORY", "TOKENS/S", "ETA")


def sparkline(values: Sequence[float]) -> str:
    """Each value as one of 8 block heights between the series' min and max."""
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low
    return "".join(SPARKS[int((v - low) / span * (len(SPARKS) - 1)) if span else 0] for v in values)


def progress_bar(step: Any, total: Any, *, width: int = BAR) -> str:
    if not isinstance(step, int) or not isinstance(total, int) or total <= 0:
        return "[" + " " * width + "]    -"
    done = min(step, total) / total
    filled = int(done * width + 0.5)
    return "[" + "#" * filled + "-" * (width - filled) + f"] {done * 100:3.0f}%"


def _number(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def job_row(job: Mapping[str, Any]) -> tuple[str, ...]:
    meta, status = job.get("metadata") or {}, job.get("status") or {}
    progress = status.get("progress") or {}
    step, total = progress.get("step"), progress.get("totalSteps")
    return (
        str(meta.get("namespace") or ""),
        str(meta.get("name") or ""),
        str(status.get("phase") or "Pending"),
        progress_bar(step, total),
        f"{step}/{total}" if isinstance(step, int) and isinstance(total, int) else _number(step, "d"),
        _number(progress.get("loss"), ".4f"),
        sparkline([v for v in progress.get("lossHistory") or [] if isinstance(v, (int, float))]),
        _number(progress.get("tokensPerSecond"), ".1f"),
        str(progress.get("eta") or "-"),
    )


def status_lines(jobs: Iterable[Mapping[str, Any]]) -> list[str]:
    ordered = sorted(jobs, key=lambda j: (j["metadata"].get("namespace", ""), j["metadata"].get("name", "")))
    if not ordered:
        return ["No FineTuneJobs found."]
    rows = [HEADER] + [job_row(j) for j in ordered]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return table + [line for job in ordered for line in warnings(job)]


# status.progress flags the trainer raises while training goes on without something
DEGRADED = (("storageDegraded", "storageError", "checkpoint uploads failing"),
            ("trackerDegraded", "trackerError", "experiment tracker not reachable"))


def warnings(job: Mapping[str, Any]) -> list[str]:
    """One line under the table per degraded part of a job (uploads, trackers)."""
    meta, progress = job.get("metadata") or {}, (job.get("status") or {}).get("progress") or {}
    where = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
    return [f"! {where}: {what}: {progress.get(detail) or 'no detail'}"
            for flag, detail, what in DEGRADED if progress.get(flag) is True]


def read_jobs(kube: Any, namespace: str | None, name: str | None) -> list[dict[str, Any]]:
    from .spec import API_VERSION, KIND

    if name:
        job = kube.get(API_VERSION, KIND, namespace or "default", name)
        return [job] if job else []
    return kube.list(API_VERSION, KIND, namespace)


def show(kube: Any, *, namespace: str | None, name: str | None, watch: bool, interval: float,
         out: TextIO = sys.stdout, rounds: int | None = None) -> int:
    """Print the table once, or (watch) redraw it until interrupted (`rounds`: for tests)."""
    from .kube import ApiError

    drawn = 0
    while True:
        try:
            lines = status_lines(read_jobs(kube, namespace, name))
        except ApiError as err:
            print(f"error: could not read FineTuneJobs: {err}", file=sys.stderr)
            return 1
        if name and lines == ["No FineTuneJobs found."]:
            print(f"error: FineTuneJob {namespace or 'default'}/{name} not found", file=sys.stderr)
            return 1
        if watch and drawn:
            out.write("\x1b[H\x1b[2J")  # home and clear: a redraw in place, as `watch` does
        out.write("\n".join(lines) + "\n")
        out.flush()
        drawn += 1
        if not watch or (rounds is not None and drawn >= rounds):
            return 0
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return 0
