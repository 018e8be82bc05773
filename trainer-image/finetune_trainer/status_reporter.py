"""The trainer's side of `status.progress`: rank 0 PATCHes its FineTuneJob's /status.

    reporter = StatusReporter.from_env()      # None outside a cluster (no FINETUNE_STATUS_URL)
    reporter(progress)                        # on every log step: never blocks, never raises
    reporter.set_checkpoint("s3://.../checkpoint-40")
    reporter.set_model({"source": ..., "revision": ...})   # status.model: what the run trains
    reporter.close()                          # sends the last figures, waits briefly

A merge patch of `status.progress` (Kubeflow Trainer's trainerStatus names plus ours) goes to
the URL the operator put in FINETUNE_STATUS_URL, with the pod's ServiceAccount token (re-read
each time: projected tokens rotate) and CA. The job's Role allows exactly get/patch on this
job's status. Patches are throttled (at most one per `min_interval` seconds, newest figures
win) and sent by a background thread with a short timeout; a failure is logged and counted,
never raised: an unreachable API server must not cost a training run.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import math
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("finetune_trainer.status")

from .contract import ENV_STATUS_CA_FILE, ENV_STATUS_TOKEN_FILE, ENV_STATUS_URL, world

DEFAULT_MIN_INTERVAL = 10.0  # seconds between patches: a 1000-pod cluster stays quiet
DEFAULT_TIMEOUT = 5.0  # seconds per PATCH: a slow API server only delays the next report

# the trainer's progress keys (training/callbacks.py progress_update) -> status.progress
FIELDS = {
    "step": "step",
    "total_steps": "totalSteps",
    "epoch": "epoch",
    "loss": "loss",
    "eval_loss": "evalLoss",
    "learning_rate": "learningRate",
    "tokens_per_second": "tokensPerSecond",
    "eta_seconds": "estimatedRemainingSeconds",
    # from the data stage (training/callbacks.py DataFields)
    "samples": "samples",
    "skipped_rows": "skippedRows",
    "packed_rows": "packedRows",
    "packing_efficiency": "packingEfficiency",
    # from the storage plug-in (storage/plugin.py progress_fields)
    "checkpoint_uri": "checkpointUri",
    "storage_degraded": "storageDegraded",
    "storage_error": "storageError",
    # from the experiment trackers (tracking/__init__.py progress_fields)
    "tracker_degraded": "trackerDegraded",
    "tracker_error": "trackerError",
}


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf and the API server refuses them: a diverged loss is left out."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def human_duration(seconds: float) -> str:
    """1h05m, 4m10s, 12s: for the ETA printer column."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


LOSS_HISTORY = 24  # losses kept in status.progress.lossHistory (a sparkline's worth, a few hundred bytes)


def progress_status(update: Mapping[str, Any], *, now: str, checkpoint_uri: str | None = None,
                    checkpoint_time: str | None = None, loss_history: list[float] | None = None) -> dict[str, Any]:
    """A progress update -> the `status.progress` object (absent/None figures left out, so a
    merge patch keeps the last known value, e.g. evalLoss between evaluations)."""
    out = {field: _finite(update.get(key)) for key, field in FIELDS.items()}
    step, total = update.get("step"), update.get("total_steps")
    if isinstance(step, int) and isinstance(total, int) and total > 0:
        out["progressPercentage"] = round(100.0 * min(step, total) / total, 2)
    eta = out.get("estimatedRemainingSeconds")
    if isinstance(eta, (int, float)):
        out["eta"] = human_duration(eta)
    out["lastUpdatedTime"] = now
    if checkpoint_uri:
        out["checkpointUri"] = checkpoint_uri
    if loss_history:
        out["lossHistory"] = [round(v, 4) for v in loss_history]
    if checkpoint_time and out.get("checkpointUri"):
        out["checkpointTime"] = checkpoint_time  # when this reporter first saw that checkpoint complete
    return {key: value for key, value in out.items() if value is not None}


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class StatusReporter:
    """Callable progress reporter for rank 0; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        token_file: str | None = None,
        ca_file: str | None = None,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.url = url
        self.token_file = token_file
        self.ca_file = ca_file
        self.min_interval = min_interval
        self.timeout = timeout
        self.clock = clock
        self.sent = 0
        self.failed = 0
        self.coalesced = 0  # updates replaced by a newer one before they were sent
        self.last_error: str | None = None
        self._pending: dict[str, Any] | None = None
        self._checkpoint: str | None = None
        self._checkpoint_seen: tuple[str | None, str | None] = (None, None)  # (uri, first seen at)
        self._losses: collections.deque[float] = collections.deque(maxlen=LOSS_HISTORY)
        self._evaluation: dict[str, Any] | None = None
        self._model: dict[str, Any] | None = None
        self._last_sent = -math.inf
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="status-reporter", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **kwargs: Any) -> StatusReporter | None:
        """Active only in a pod the operator started (FINETUNE_STATUS_URL set) and on rank 0."""
        env = os.environ if env is None else env
        url = env.get(ENV_STATUS_URL)
        if not url or not world(env).is_main:
            return None
        token_file = env.get(ENV_STATUS_TOKEN_FILE)
        if token_file and not os.path.exists(token_file):
            log.warning("status reporting off: no ServiceAccount token at %s", token_file)
            return None
        return cls(url, token_file=token_file, ca_file=env.get(ENV_STATUS_CA_FILE) or None, **kwargs)

    # ---------------------------------------------------------------- the trainer's side

    def __call__(self, progress: Mapping[str, Any]) -> None:
        """Queue the newest figures; never blocks on the network, never raises."""
        try:
            with self._cond:
                if self._pending is not None:
                    self.coalesced += 1
                self._pending = dict(progress)
                loss = progress.get("loss")
                if isinstance(loss, (int, float)) and math.isfinite(loss):
                    self._losses.append(float(loss))  # every logged loss, coalesced or not
                self._cond.notify()
        except Exception:  # noqa: BLE001 - reporting must not end training
            log.exception("status reporter: could not queue progress")

    def set_checkpoint(self, uri: str) -> None:
        """The newest complete checkpoint; goes out with the next patch."""
        with self._cond:
            self._checkpoint = uri
            if self._pending is None:
                self._pending = {}
            self._cond.notify()

    def set_evaluation(self, summary: dict[str, Any]) -> None:
        """`status.evaluation` (benchmarks before -> after); goes out with the next patch."""
        self._set("_evaluation", summary)

    def set_model(self, model: dict[str, Any]) -> None:
        """`status.model`: the base model as written and the Hub commit it resolved to
        (model/fetch.py); goes out with the next patch."""
        self._set("_model", model)

    def _set(self, name: str, value: dict[str, Any]) -> None:
        with self._cond:
            setattr(self, name, dict(value))
            if self._pending is None:
                self._pending = {}
            self._cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Send what is pending now (whatever the throttle says) and stop the thread."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify()
        self._thread.join(self.timeout + 1 if timeout is None else timeout)

    # ---------------------------------------------------------------- the thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    due = self._last_sent + self.min_interval - self.clock()
                    if self._pending is not None and (due <= 0 or self._closing):
                        break
                    if self._closing:
                        return
                    self._cond.wait(timeout=due if self._pending is not None else None)
                update, self._pending = self._pending, None
                losses = list(self._losses)
                checkpoint = self._checkpoint
                evaluation = self._evaluation
                model = self._model
                closing = self._closing
                self._last_sent = self.clock()
            stamp = _utc_now()
            newest = checkpoint or update.get("checkpoint_uri")
            if newest and newest != self._checkpoint_seen[0]:
                self._checkpoint_seen = (newest, stamp)
            self._send(progress_status(update, now=stamp, checkpoint_uri=checkpoint,
                                       checkpoint_time=self._checkpoint_seen[1], loss_history=losses), evaluation,
                       model)
            if closing:
                with self._cond:
                    if self._pending is None:
                        return

    def _send(self, progress: dict[str, Any], evaluation: dict[str, Any] | None = None,
              model: dict[str, Any] | None = None) -> None:
        try:
            status: dict[str, Any] = {"progress": progress}
            if evaluation is not None:
                status["evaluation"] = evaluation
            if model is not None:
                status["model"] = model
            body = json.dumps({"status": status}).encode()
            request = urllib.request.Request(self.url, data=body, method="PATCH")
            request.add_header("Content-Type", "application/merge-patch+json")
            request.add_header("Accept", "application/json")
            if self.token_file:
                with open(self.token_file, encoding="utf-8") as f:
                    request.add_header("Authorization", f"Bearer {f.read().strip()}")
            context = ssl.create_default_context(cafile=self.ca_file) if self.url.startswith("https") else None
            with urllib.request.urlopen(request, timeout=self.timeout, context=context) as response:
                response.read()
            self.sent += 1
        except Exception as exc:  # noqa: BLE001 - HTTP errors, timeouts, bad token file: all non-fatal
            self.failed += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("status reporter: PATCH %s failed (%s); training continues", self.url, self.last_error)
