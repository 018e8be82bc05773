"""Checkpoint uploads off the training thread.

One worker thread, so two uploads never race (least of all two of the same checkpoint).
Only the newest pending checkpoint is kept: a newer save supersedes one still waiting.
An outage longer than the store's retry budget does not raise into training: the uploader
turns `degraded` (with the last error), keeps the checkpoint pending and tries again at the
next `submit` (or at `wait`), so the newest checkpoint always reaches the store once it is back.
On a node other than 0, a checkpoint dropped that way is reported to storage (see checkpoints.py),
so node 0 never waits for a part that will not come.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..contract import world
from .checkpoints import (
    CheckpointSkipped,
    Manifest,
    apply_retention,
    checkpoint_prefix,
    report_skipped,
    upload_checkpoint,
    write_local_manifest,
)
from .stores import ObjectStore, StorageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadJob:
    local_dir: Path
    step: int
    epoch: float | None


@dataclass(frozen=True)
class UploaderStatus:
    """What the progress report shows."""

    degraded: bool
    last_error: str | None
    last_uploaded_step: int | None
    last_uploaded_uri: str | None
    uploading_step: int | None
    pending_step: int | None


def node_topology(env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(node rank, number of nodes) from what torchrun or the training operator sets."""
    here = world(env)
    return here.node_rank, here.nodes


class BackgroundUploader:
    def __init__(
        self,
        store: ObjectStore | None,
        *,
        save_total_limit: int | None = None,
        node_rank: int = 0,
        num_nodes: int = 1,
        attempt: str = "",
        parts_timeout: float = 900.0,
        on_uploaded: Callable[[Manifest], None] | None = None,
        before_upload: Callable[[int], None] | None = None,
        config: dict | None = None,
    ):
        self.store = store
        self.config = config  # the resolved config, into every manifest
        self.save_total_limit = save_total_limit
        self.node_rank, self.num_nodes = node_rank, num_nodes
        self.attempt = attempt  # shared by all nodes; see CheckpointSyncCallback.on_train_begin
        self.parts_timeout = parts_timeout
        self.on_uploaded = on_uploaded
        # Called with the step before a checkpoint's files go up, so what must be in storage by the
        # time the checkpoint is complete (the metrics history up to it) is there before its manifest.
        self.before_upload = before_upload
        self._cond = threading.Condition()
        self._pending: UploadJob | None = None
        self._current: UploadJob | None = None
        self._go = False  # the pending job may be tried now (set by submit and wait)
        self._closed = False
        self._degraded = False
        self._last_error: str | None = None
        self._last_step: int | None = None
        self._newest: int | None = None  # newest step submitted: an older one never overwrites it
        self._skipped: list[int] = []  # superseded steps node 0 must hear of (see _report_skipped)
        self._thread = threading.Thread(target=self._run, name="checkpoint-uploader", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ training side

    def submit(self, local_dir: str | os.PathLike, step: int, epoch: float | None = None) -> None:
        """Queue a saved checkpoint folder; returns at once."""
        with self._cond:
            if self._newest is not None and step < self._newest:
                log.warning("checkpoint-%d submitted after checkpoint-%d; ignored", step, self._newest)
                return
            self._newest = step
            if self._pending is not None and self._pending.step != step:
                log.info("checkpoint-%d superseded by checkpoint-%d before its upload began", self._pending.step, step)
                self._skipped.append(self._pending.step)
            self._pending = UploadJob(Path(local_dir), step, epoch)
            self._go = True
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending or uploading; a checkpoint left pending by an
        outage gets one more try first. True when everything submitted is in the store."""
        with self._cond:
            if self._pending is not None:
                self._go = True
                self._cond.notify_all()
            self._cond.wait_for(lambda: self._current is None and (self._pending is None or not self._go), timeout)
            return self._current is None and self._pending is None

    def close(self, timeout: float | None = None) -> None:
        """Stop the worker after its current upload (call `wait` first to drain)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def status(self) -> UploaderStatus:
        with self._cond:
            return UploaderStatus(
                degraded=self._degraded,
                last_error=self._last_error,
                last_uploaded_step=self._last_step,
                last_uploaded_uri=self.store.uri_for(checkpoint_prefix(self._last_step))
                if self._last_step is not None and self.store is not None
                else None,
                uploading_step=self._current.step if self._current else None,
                pending_step=self._pending.step if self._pending else None,
            )

    @property
    def degraded(self) -> bool:
        return self.status.degraded

    # ------------------------------------------------------------ worker side

    def _write_manifest(self, job: UploadJob) -> bool:
        try:
            write_local_manifest(job.local_dir, job.step, job.epoch, config=self.config)
        except FileNotFoundError:
            log.warning("checkpoint %s vanished before its manifest was written; skipped", job.local_dir)
        with self._cond:
            self._last_step = job.step
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or (self._pending is not None and self._go))
                if self._pending is None or not self._go:
                    return  # closed, nothing to do
                job, self._pending, self._current, self._go = self._pending, None, self._pending, False
                skipped, self._skipped = self._skipped, []
            ok = self._upload(job, skipped)
            with self._cond:
                self._current = None
                if not ok and self._pending is None:
                    self._pending = job  # kept; tried again at the next submit or wait
                    self._skipped[:0] = skipped  # said again before that try
                elif not ok:  # a newer save came while this one failed: it is dropped, and said so
                    self._skipped[:0] = [*skipped, job.step]
                self._cond.notify_all()

    def _before_upload(self, step: int) -> None:
        """The hook's storage failure is this checkpoint's: its manifest must not land before
        what the hook puts there (CI saw a whole outage pass with only this write failing, and no
        `degraded` reported). Any other failure of the hook is a bug; it never stops the uploads."""
        if self.before_upload is None:
            return
        try:
            self.before_upload(step)
        except StorageError:
            raise
        except Exception:
            log.exception("before_upload hook failed for checkpoint-%d", step)

    def _report_skipped(self, steps: Sequence[int]) -> None:
        """Node 0 may be waiting for this node's part of a checkpoint it dropped for a newer one
        (CI saw node 0 wait out its whole parts timeout): say so first, before the newer upload."""
        if self.num_nodes > 1 and self.node_rank != 0:
            for step in steps:
                report_skipped(self.store, step, node_rank=self.node_rank, attempt=self.attempt)

    def _upload(self, job: UploadJob, skipped: Sequence[int] = ()) -> bool:
        if self.store is None:  # no object storage: the folder's manifest is all there is to write
            return self._write_manifest(job)
        try:
            self._report_skipped(skipped)
            self._before_upload(job.step)
            manifest = upload_checkpoint(
                self.store, job.local_dir, job.step, job.epoch,
                node_rank=self.node_rank, num_nodes=self.num_nodes,
                attempt=self.attempt, parts_timeout=self.parts_timeout, config=self.config,
            )
        except CheckpointSkipped as exc:  # node 0: another node moved on to a newer save
            log.warning("%s", exc)
            return True
        except Exception as exc:
            if not job.local_dir.is_dir():  # the trainer's own rotation removed it; a newer one exists
                log.warning("checkpoint %s vanished locally before its upload finished; skipped", job.local_dir)
                try:
                    self._report_skipped([job.step])
                except StorageError as err:  # node 0 then waits out its parts timeout for this one
                    log.warning("could not tell node 0 that checkpoint-%d was skipped: %s", job.step, err)
                return True
            with self._cond:
                if not self._degraded:
                    log.error("checkpoint upload degraded: checkpoint-%d not uploaded (%s); "
                              "training continues, the upload is retried at the next save", job.step, exc)
                self._degraded, self._last_error = True, f"checkpoint-{job.step}: {exc}"
            return False
        with self._cond:
            if self._degraded:
                log.warning("checkpoint uploads recovered with checkpoint-%d", job.step)
            self._degraded = False
            self._last_step = job.step
        if manifest is not None:  # node 0: the checkpoint is complete
            if self.on_uploaded:
                try:
                    self.on_uploaded(manifest)
                except Exception:  # a progress hook must never stop the uploads
                    log.exception("on_uploaded hook failed for checkpoint-%d", job.step)
            try:
                apply_retention(self.store, self.save_total_limit)
            except Exception as exc:  # a leftover costs space, not correctness; next upload retries
                log.warning("retention after checkpoint-%d failed: %s", job.step, exc)
        return True
