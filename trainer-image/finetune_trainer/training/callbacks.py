"""What the run tells the outside world while it trains: metrics.jsonl, progress, a NaN guard.

The record and progress builders are pure functions of the Trainer's log dict and state,
so they are tested without training; the TrainerCallback classes only call them and write.
Callbacks run on every rank; only the world's main process writes or reports.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

ProgressReporter = Callable[[dict[str, Any]], None]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: the run cannot recover by retrying (exit 1)."""


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def perplexity(eval_loss: float | None) -> float | None:
    """exp(loss), inf when it overflows; None without a loss."""
    if eval_loss is None:
        return None
    try:
        return math.exp(eval_loss)
    except OverflowError:
        return math.inf


def metrics_record(
    logs: dict[str, Any],
    *,
    step: int,
    epoch: float | None,
    now: float,
    elapsed: float,
    tokens_per_second: float | None,
) -> dict[str, Any]:
    """One metrics.jsonl line from a Trainer log dict; absent values are null, never guessed."""
    eval_loss = _number(logs.get("eval_loss"))
    return {
        "step": step,
        "epoch": _number(logs.get("epoch", epoch)),
        "loss": _number(logs.get("loss")),
        "eval_loss": eval_loss,
        "eval_perplexity": perplexity(eval_loss),
        "learning_rate": _number(logs.get("learning_rate")),
        "grad_norm": _number(logs.get("grad_norm")),
        "tokens_per_second": tokens_per_second,
        "time": round(now, 3),
        "elapsed_seconds": round(elapsed, 3),
    }


def data_record(stats: dict[str, dict[str, int]], *, step: int, now: float) -> dict[str, Any]:
    """The metrics.jsonl line saying what the data stage did (rows, samples, skipped bad
    rows, tokens per split); the usual keys are there, null, so readers of losses skip it."""
    return {**metrics_record({}, step=step, epoch=None, now=now, elapsed=0.0, tokens_per_second=None), "data": stats}


class DataFields:
    """Adds the data counts to every progress update (status.progress.samples, skippedRows,
    and with training.sample_packing packedRows and packingEfficiency)."""

    def __init__(self, stats: dict[str, Any]):
        train = stats["train"]
        self.fields = {"samples": train.samples, "skipped_rows": sum(s.skipped for s in stats.values())}
        if getattr(train, "packed_rows", 0):
            self.fields.update(packed_rows=train.packed_rows, packing_efficiency=train.packing_efficiency)

    def progress_fields(self) -> dict[str, int | float]:
        return dict(self.fields)


def progress_update(record: dict[str, Any], *, total_steps: int, start_step: int, elapsed: float) -> dict[str, Any]:
    """What a progress reporter gets: the record's figures plus total steps and an ETA
    from this session's pace (steps done before a resume do not count towards it)."""
    step = record["step"]
    done = step - start_step
    remaining = max(total_steps - step, 0)
    eta = remaining * elapsed / done if done > 0 and elapsed > 0 else None
    return {
        "step": step,
        "total_steps": total_steps,
        "epoch": record["epoch"],
        "loss": record["loss"],
        "eval_loss": record["eval_loss"],
        "learning_rate": record["learning_rate"],
        "tokens_per_second": record["tokens_per_second"],
        "eta_seconds": round(eta, 1) if eta is not None else None,
    }


def non_finite(logs: dict[str, Any]) -> str | None:
    """The name of the first loss in `logs` that is NaN or infinite, if any."""
    for key in ("loss", "eval_loss"):
        value = _number(logs.get(key))
        if value is not None and not math.isfinite(value):
            return key
    return None


def json_line(record: dict[str, Any]) -> str:
    """A JSON line; NaN/inf (a diverged run) become strings so every JSON parser reads it."""
    clean = {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(clean, allow_nan=False)


class MetricsCallback(TrainerCallback):
    """Appends one JSON line per log (training and evaluation) to metrics.jsonl, hands the
    record to the sinks and the figures to the progress reporters. tokens/s is measured between consecutive logs."""

    def __init__(self, path: str | Path, reporters: list[ProgressReporter] | None = None,
                 sinks: list[Callable[[dict[str, Any]], None]] | None = None):
        self.path = Path(path)
        self.reporters = list(reporters or [])
        self.sinks = list(sinks or [])  # get each record as written (the experiment trackers)
        self._start = self._last_time = time.monotonic()  # intervals: never backwards with the clock
        self._start_step = 0
        self._last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = self._last_time = time.monotonic()
        self._start_step = state.global_step
        self._last_tokens = state.num_input_tokens_seen

    def _tokens_per_second(self, state, now: float) -> float | None:
        tokens = state.num_input_tokens_seen
        if not tokens or now <= self._last_time or tokens == self._last_tokens:
            return None
        rate = (tokens - self._last_tokens) / (now - self._last_time)
        self._last_time, self._last_tokens = now, tokens
        return round(rate, 2)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # Time spent evaluating is not training time: keep it out of the tokens/s window.
        self._last_time += float((metrics or {}).get("eval_runtime", 0.0))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" not in logs and "eval_loss" not in logs:
            return  # the end-of-training summary (train_runtime, ...) goes to train_results.json
        now = time.monotonic()
        record = metrics_record(
            logs,
            step=state.global_step,
            epoch=state.epoch,
            now=time.time(),  # the record's wall-clock stamp
            elapsed=now - self._start,
            tokens_per_second=self._tokens_per_second(state, now) if "loss" in logs else None,
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json_line(record) + "\n")
        for sink in self.sinks:
            sink(record)
        update = progress_update(
            record, total_steps=state.max_steps, start_step=self._start_step, elapsed=now - self._start
        )
        for report in self.reporters:
            report(update)


class NonFiniteLossGuard(TrainerCallback):
    """Stops the run on a NaN/inf loss. The logged loss is averaged over all ranks, so every
    rank raises at the same step and none is left waiting in a collective."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        key = non_finite(logs or {})
        if key:
            raise NonFiniteLossError(
                f"{key} is {logs[key]} at step {state.global_step}: training diverged. Lower "
                "training.learning_rate, lower training.max_grad_norm, or use mixed_precision bf16 instead of fp16"
            )


class SessionRecorder(TrainerCallback):
    """What this session (one `train()` call, perhaps resumed) did, for train_results.json:
    where it started, its evaluations (the first is 'eval loss before training') and the
    time spent evaluating inside `train()`, which is not training time."""

    def __init__(self) -> None:
        self.start_step = 0
        self.start_tokens = 0
        self.evals: list[tuple[int, dict[str, float]]] = []
        self.eval_seconds_in_training = 0.0
        self._training = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step, self.start_tokens, self._training = state.global_step, state.num_input_tokens_seen, True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics:
            self.evals.append((state.global_step, dict(metrics)))
            if self._training:
                self.eval_seconds_in_training += float(metrics.get("eval_runtime", 0.0))

    def on_train_end(self, args, state, control, **kwargs):
        self._training = False
