"""The trackers: TensorBoard, MLflow and W&B, each behind the same six calls, which its
worker (worker.py) makes from its own thread:

    start(state) -> state   state: what tracking.json kept in the checkpoint (the run id), or None
    log_params(params, config)   once, on a fresh run: the resolved config (flat, and nested)
    log_metrics(figures, step, wall_time)
    log_evaluation(rows)         the before -> after benchmark table (evaluation/report.py rows)
    checkpoint(step)             a checkpoint is complete: TensorBoard publishes its event files
    finish(ok)

Each imports its library inside `start`, so the training thread never pays for the import,
and reads its endpoint and key from the library's own environment variables.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from ..contract import (
    ENV_MLFLOW_EXPERIMENT_NAME,
    ENV_WANDB_ENTITY,
    ENV_WANDB_PROJECT,
    TENSORBOARD_KEY,
)
from .records import JOB_UID_TAG, evaluation_markdown

log = logging.getLogger("finetune_trainer.tracking")

# MLflow's HTTP client retries 7 times with exponential backoff by default (minutes per
# call); our worker retries itself, so each try is kept short unless the user set these.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
MLFLOW_PARAMS_PER_CALL = 100  # log_batch's limits
MLFLOW_METRICS_PER_CALL = 1000
MLFLOW_MAX_PARAM_VALUE = 6000  # the server's limit on a param value
MLFLOW_DEFAULT_EXPERIMENT = "Default"
WANDB_DEFAULT_PROJECT = "finetune"
TENSORBOARD_PUBLISH_SECONDS = 30.0  # event files go to storage at most this often (and at each checkpoint)


class MlflowTracker:
    name = "mlflow"
    replays_history = True  # identical metric points are stored once: a resume can refill gaps

    def __init__(self, *, run_name: str, tags: dict[str, str], resuming: bool = False):
        self.run_name, self.tags = run_name, tags
        self.resuming = resuming  # the run resumes from a checkpoint (which may predate the run's id)
        self.client: Any = None
        self.run_id: str | None = None
        self.resumed = False

    def start(self, state: dict[str, Any] | None) -> dict[str, Any]:
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.client = MlflowClient()  # MLFLOW_TRACKING_URI (and token / basic auth) from the env
        run_id = (state or {}).get("run_id")
        if run_id:
            try:
                self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
                self.run_id, self.resumed = run_id, True
            except MlflowException as exc:
                if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                    raise
        if self.run_id is None:
            name = os.environ.get(ENV_MLFLOW_EXPERIMENT_NAME) or MLFLOW_DEFAULT_EXPERIMENT
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            if self.resuming and (earlier := self._run_of_this_job(experiment_id)):
                self.client.update_run(earlier, status="RUNNING")
                self.run_id, self.resumed = earlier, True
            else:
                self.run_id = self.client.create_run(experiment_id, run_name=self.run_name, tags=self.tags).info.run_id
        # Unset MLFLOW_TRACKING_URI means mlflow's local default: say where the run went.
        log.info("mlflow: %s run %s at %s", "resumed" if self.resumed else "started", self.run_id,
                 self.client.tracking_uri)
        return {"run_id": self.run_id}

    def _run_of_this_job(self, experiment_id: str) -> str | None:
        """The newest run tagged with this FineTuneJob's uid: the one an earlier attempt created
        after the checkpoint this attempt resumes from was saved (so it carries no run id)."""
        uid = self.tags.get(JOB_UID_TAG)
        if not uid:
            return None
        runs = self.client.search_runs([experiment_id], filter_string=f"tags.`{JOB_UID_TAG}` = '{uid}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def log_params(self, params: dict[str, str], config: dict[str, Any]) -> None:
        if self.resumed:
            return  # params are immutable in MLflow; the resumed run already has them
        from mlflow.entities import Param

        items = [Param(k, v[:MLFLOW_MAX_PARAM_VALUE]) for k, v in params.items()]
        for i in range(0, len(items), MLFLOW_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=items[i:i + MLFLOW_PARAMS_PER_CALL])

    def log_metrics(self, figures: dict[str, float], step: int, wall_time: float) -> None:
        from mlflow.entities import Metric

        stamp = int(wall_time * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, step) for k, v in figures.items()])

    def log_history(self, points: list[tuple[dict[str, float], int, float]]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, int(t * 1000), step) for figures, step, t in points for k, v in figures.items()]
        for i in range(0, len(metrics), MLFLOW_METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + MLFLOW_METRICS_PER_CALL])

    def log_evaluation(self, rows: list[dict[str, Any]]) -> None:
        self.client.log_dict(self.run_id, {"rows": rows}, "evaluation/table.json")
        self.client.log_text(self.run_id, evaluation_markdown(rows), "evaluation/table.md")

    def checkpoint(self, step: int) -> None:
        pass

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "KILLED")


class TensorBoardTracker:
    """Event files in <output_dir>/tensorboard/, copied to <storage>/tensorboard/ as training goes,
    so `tensorboard --logdir s3://.../tensorboard` follows a run on the cluster."""

    name = "tensorboard"
    replays_history = True  # its event file starts with purge_step, the first replayed step

    def __init__(self, log_dir: Path, *, store: Any = None, purge_step: int | None = None,
                 publish_every: float = TENSORBOARD_PUBLISH_SECONDS, clock=time.monotonic):
        self.log_dir, self.store, self.purge_step = Path(log_dir), store, purge_step
        self.publish_every, self.clock = publish_every, clock
        self.writer: Any = None
        self._published: dict[str, int] = {}
        self._last_publish = clock()

    def start(self, state: dict[str, Any] | None) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run's new event file makes TensorBoard drop what earlier attempts
        # logged from that step on: the history it replays, and the steps trained again.
        self.writer = SummaryWriter(str(self.log_dir), purge_step=self.purge_step)
        return {}

    def log_params(self, params: dict[str, str], config: dict[str, Any]) -> None:
        rows = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + rows, global_step=self.purge_step or 0)

    def log_metrics(self, figures: dict[str, float], step: int, wall_time: float) -> None:
        self.log_history([(figures, step, wall_time)])
        if self.clock() - self._last_publish >= self.publish_every:
            self.publish()

    def log_history(self, points: list[tuple[dict[str, float], int, float]]) -> None:
        for figures, step, wall_time in points:
            for key, value in figures.items():
                self.writer.add_scalar(key, value, global_step=step, walltime=wall_time)

    def log_evaluation(self, rows: list[dict[str, Any]]) -> None:
        self.writer.add_text("evaluation", evaluation_markdown(rows))
        for row in rows:
            for stage in ("before", "after"):
                if isinstance(row[stage], (int, float)):
                    self.writer.add_scalar(f"evaluation/{row['benchmark']}/{row['metric']}/{stage}", row[stage])

    def checkpoint(self, step: int) -> None:
        self.publish()

    def finish(self, ok: bool) -> None:
        self.writer.close()
        self.publish()

    def publish(self) -> None:
        """Event files that grew since they were last copied, whole (objects are immutable)."""
        self._last_publish = self.clock()
        if self.store is None:
            return
        self.writer.flush()
        for path in sorted(self.log_dir.rglob("events.out.tfevents.*")):
            size, rel = path.stat().st_size, path.relative_to(self.log_dir).as_posix()
            if self._published.get(rel) != size:
                self.store.put_file(path, f"{TENSORBOARD_KEY}/{rel}")
                self._published[rel] = size


def new_wandb_id() -> str:
    """A W&B run id of ours (8 lowercase letters and digits, as wandb makes them), so the
    checkpoint can carry it before the run exists on the server."""
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class WandbTracker:
    """A W&B run (WANDB_API_KEY, WANDB_PROJECT, WANDB_MODE, ... from the env); its id is ours,
    so a resumed attempt continues it."""

    name = "wandb"

    def __init__(self, *, run_name: str, tags: dict[str, str], directory: Path):
        self.run_name, self.tags, self.directory = run_name, tags, Path(directory)
        self.run: Any = None
        self.run_id: str | None = None
        self.resumed = False

    def plan(self, state: dict[str, Any] | None) -> dict[str, Any]:
        """The id, known before wandb.init returns (seconds): a checkpoint saved meanwhile carries it."""
        self.resumed = bool((state or {}).get("run_id"))
        self.run_id = (state or {}).get("run_id") or new_wandb_id()
        return {"run_id": self.run_id}

    def start(self, state: dict[str, Any] | None) -> dict[str, Any]:
        import wandb

        if self.run_id is None:
            self.plan(state)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get(ENV_WANDB_PROJECT) or WANDB_DEFAULT_PROJECT,
            entity=os.environ.get(ENV_WANDB_ENTITY) or None,
            name=self.run_name,
            id=self.run_id,
            resume="allow",
            tags=[f"{k.rsplit('/', 1)[-1]}:{v}"[:64] for k, v in self.tags.items()],
            dir=str(self.directory),
            settings=wandb.Settings(init_timeout=60, silent=True, x_disable_stats=True),
        )
        return {"run_id": self.run.id}

    def log_params(self, params: dict[str, str], config: dict[str, Any]) -> None:
        if not self.resumed:
            self.run.config.update({**config, "finetune_job": self.tags}, allow_val_change=True)

    def log_metrics(self, figures: dict[str, float], step: int, wall_time: float) -> None:
        self.run.log(figures, step=step)

    def log_evaluation(self, rows: list[dict[str, Any]]) -> None:
        import wandb

        columns = ["benchmark", "metric", "before", "after", "delta"]
        self.run.log({"evaluation": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])})

    def checkpoint(self, step: int) -> None:
        pass

    def finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)
