"""Experiment trackers (output.report_to: tensorboard, mlflow, wandb), reported to by the
world's main process; every other rank gets a Tracking that does nothing.

train.py calls, in this order:
    tracking = open_tracking(cfg, out, resume=resume, store=storage.store)  # checks packages
    Trainer(callbacks=[..., tracking, storage])   # before storage: tracking.json is in each checkpoint
    MetricsCallback(..., sinks=[tracking.record]) # the very records metrics.jsonl gets
    tracking.log_evaluation(report)               # the before -> after benchmark table
    tracking.finish(ok)                           # bounded by FINETUNE_TRACKER_FLUSH_SECONDS
Each tracker has its own thread and queue (worker.py): one that is down or slow never fails
or stalls training; the progress report says so (status.progress.trackerDegraded).
A resumed run continues the same tracker runs: their ids are saved in every checkpoint
(tracking.json) and read back from the one the run resumes from. W&B's id is ours, chosen before
its run starts, so even the first checkpoint has it; MLflow's comes from the server, so a
checkpoint saved before the run existed has none, and the resumed attempt finds the run by the
FineTuneJob's uid tag.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..config import ConfigError, ConfigIssue, FineTuneConfig
from ..contract import ENV_TRACKER_FLUSH_SECONDS, TRACKER_FLUSH_SECONDS, TRACKING_STATE_FILE, world
from ..storage.checkpoints import checkpoint_step
from .records import figures, flatten, job_tags, run_name
from .worker import TrackerWorker

log = logging.getLogger("finetune_trainer.tracking")

TENSORBOARD_DIR = "tensorboard"  # under output_dir
WANDB_DIR = "wandb-runs"  # under output_dir: wandb writes its wandb/ folder there
# output.report_to name -> the package it needs (import name, pip name)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny"),
            "wandb": ("wandb", "wandb")}


class Tracking(TrainerCallback):
    """The trackers of one run; see the module docstring."""

    def __init__(self, workers: list[TrackerWorker], *, params: dict[str, str], config: dict[str, Any],
                 resume_state: Mapping[str, Any] | None, flush_seconds: float = TRACKER_FLUSH_SECONDS,
                 history: list[Mapping[str, Any]] = ()):
        self.workers = workers
        self.flush_seconds = flush_seconds
        self._final: dict[str, Any] = {}
        for worker in workers:
            saved = (resume_state or {}).get(worker.name)
            if hasattr(type(worker.tracker), "plan"):  # an id of ours (W&B): in the very first checkpoint
                worker.state = worker.tracker.plan(saved)
            worker.submit("start", saved)
            worker.submit("log_params", params, config)  # MLflow and W&B skip it on a resumed run
            if history and getattr(worker.tracker, "replays_history", False):
                # A SIGKILLed attempt may not have delivered its last figures before the checkpoint;
                # metrics.jsonl has them. MLflow keeps identical points once, so a replay only fills
                # gaps; TensorBoard's new event file purges the earlier ones from the first replayed step.
                worker.submit("log_history", [(numbers, int(r["step"]), float(r["time"])) for r in history
                                              if (numbers := named_figures(worker, r))])

    @property
    def names(self) -> list[str]:
        return [w.name for w in self.workers]

    # ------------------------------------------------------------------ train.py

    def record(self, record: Mapping[str, Any]) -> None:
        """A metrics.jsonl record (MetricsCallback sink): to every tracker, without waiting."""
        for worker in self.workers:
            if numbers := named_figures(worker, record):
                worker.submit("log_metrics", numbers, int(record["step"]), float(record["time"]))

    def log_evaluation(self, rows: list[dict[str, Any]]) -> None:
        for worker in self.workers:
            worker.submit("log_evaluation", rows)

    def finish(self, ok: bool) -> None:
        """End every tracker's run; waits at most flush_seconds in all (the workers drain in parallel)."""
        for worker in self.workers:
            worker.submit("finish", ok)
        deadline = time.monotonic() + self.flush_seconds
        statuses = [worker.close(max(deadline - time.monotonic(), 0.0)) for worker in self.workers]
        lost = [s for s in statuses if s.degraded or s.pending or s.dropped]
        self._final = {"tracker_degraded": bool(lost)} if statuses else {}
        if lost:
            self._final["tracker_error"] = "; ".join(
                f"{s.name}: {s.pending + s.dropped} calls not delivered ({s.last_error or 'no answer in time'})"
                for s in lost)[:300]
        self.workers = []

    def report_end(self, reporters) -> None:
        """After finish: a tracker that lost data says so in the last progress report too."""
        if self._final.get("tracker_degraded"):
            for report in reporters:
                report(dict(self._final))

    @contextmanager
    def ended_on_failure(self) -> Iterator[Tracking]:
        """A run that raises ends its tracker runs too (MLflow: KILLED), within flush_seconds."""
        try:
            yield self
        except BaseException:
            self.finish(ok=False)
            raise

    def progress_fields(self) -> dict[str, Any]:
        """status.progress.trackerDegraded / trackerError while a tracker's calls fail."""
        if not self.workers:
            return dict(self._final)
        bad = [s for s in (w.status for w in self.workers) if s.degraded]
        fields: dict[str, Any] = {"tracker_degraded": bool(bad)}
        if bad:
            fields["tracker_error"] = "; ".join(f"{s.name}: {s.last_error}" for s in bad)[:300]
        return fields

    # ------------------------------------------------------------------- callback

    def on_save(self, args, state, control, **kwargs):
        """Before storage's manifest: the trackers' run ids go into the checkpoint."""
        if not self.workers:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        states = {w.name: w.state for w in self.workers if w.state is not None}
        if folder.is_dir() and states:
            (folder / TRACKING_STATE_FILE).write_text(json.dumps(states, indent=2, sort_keys=True) + "\n")
        for worker in self.workers:
            worker.submit("checkpoint", state.global_step)


def named_figures(worker: TrackerWorker, record: Mapping[str, Any]) -> dict[str, float]:
    """MLflow keeps metrics.jsonl's names; TensorBoard and W&B group them as train/... and eval/..."""
    return figures(record, sectioned=worker.name != "mlflow")


def purge_step(resume: str | None, history: list[Mapping[str, Any]]) -> int | None:
    """Where a resumed run's TensorBoard event file starts: every earlier point from there on is
    hidden. The history it replays begins there; without one, at the step after the checkpoint
    (the checkpoint's own step was trained and logged by the earlier attempt)."""
    if not resume:
        return None
    steps = [int(r["step"]) for r in history if figures(r, sectioned=False)]
    return min(steps) if steps else checkpoint_step(resume) + 1


def read_state(checkpoint: str | Path | None) -> dict[str, Any] | None:
    """The trackers' run ids saved in the checkpoint a run resumes from."""
    path = Path(checkpoint) / TRACKING_STATE_FILE if checkpoint else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        log.warning("%s is not JSON; the trackers start new runs", path)
        return None


def missing_packages(report_to: list[str]) -> list[ConfigIssue]:
    """A tracker whose library this image lacks: the run fails now, with the fix, not silently."""
    return [
        ConfigIssue("output.report_to", f"{name} is listed but the {pip} package is not installed; "
                    f"install it (pip install {pip}) or remove {name}")
        for name in report_to
        for module, pip in [PACKAGES[name]]
        if importlib.util.find_spec(module) is None
    ]


def open_tracking(cfg: FineTuneConfig, output_dir: Path, *, resume: str | None, store: Any = None,
                  environ: Mapping[str, str] | None = None, history: list[Mapping[str, Any]] = ()) -> Tracking:
    """The run's trackers; `history`: the metrics.jsonl records a resumed run kept (replayed to
    the trackers with `replays_history`, see Tracking)."""
    from .trackers import MlflowTracker, TensorBoardTracker, WandbTracker

    env = os.environ if environ is None else environ
    report_to = list(cfg.output.report_to)
    if not report_to or not world(env).is_main:
        return Tracking([], params={}, config={}, resume_state=None)
    if issues := missing_packages(report_to):
        raise ConfigError(issues)
    name, tags = run_name(cfg.output.run_name, env, output_dir), job_tags(env)
    tags = {**tags, "finetune.dev/method": cfg.fine_tuning.method, "finetune.dev/base-model": cfg.model.base_model}
    history = list(history) if resume else []
    purge = purge_step(resume, history)
    make = {
        "tensorboard": lambda: TensorBoardTracker(output_dir / TENSORBOARD_DIR, store=store, purge_step=purge),
        "mlflow": lambda: MlflowTracker(run_name=name, tags=tags, resuming=bool(resume)),
        "wandb": lambda: WandbTracker(run_name=name, tags=tags, directory=output_dir / WANDB_DIR),
    }
    config = cfg.model_dump(mode="json")
    flush = float(env.get(ENV_TRACKER_FLUSH_SECONDS) or TRACKER_FLUSH_SECONDS)
    workers = [TrackerWorker(make[n]()) for n in report_to]
    log.info("reporting to %s as run %r", ", ".join(report_to), name)
    return Tracking(workers, params=flatten(config), config=config, resume_state=read_state(resume),
                    flush_seconds=flush, history=history)
