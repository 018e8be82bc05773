"""The trainer's storage stage: where a run resumes, checkpoints as it trains, the
preemption save (SIGTERM: save, exit 143), and publishing the results.

`train()` calls it by name, in this order (after torch.distributed is up):
    storage = open_storage(cfg, output_dir)
    resume = storage.resume_checkpoint()       # one rule, with or without object storage
    Trainer(callbacks=[..., storage])          # each save: a manifest, and the upload
    storage.exit_code                          # not None: preempted, the checkpoint is saved
    storage.publish(output_dir)                # metrics.jsonl and final/ to storage
A checkpoint is complete when its manifest (files, sizes, sha256, the resolved config) is
written and its files verify: in `output.storage_uri` and on this disk alike (a run without
storage writes the manifest next to the checkpoint). Storage problems never fail the
training: uploads degrade and retry (see uploader.py); only the resume choice must agree
across ranks.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ..config import FineTuneConfig
from ..contract import FINAL_KEY, MERGED_DIR, METRICS_FILE, world
from .callback import CheckpointSyncCallback, _distributed, keep_trying
from .checkpoints import (
    checkpoint_step,
    _read_manifest,
    download_checkpoint,
    find_resume_checkpoint,
    upload_file_artifact,
)
from .preemption import PreemptionFlag, install_preemption_handler
from .stores import ObjectNotFound, ObjectStore, StorageError, open_store
from .uploader import BackgroundUploader, node_topology

log = logging.getLogger(__name__)

METRICS_KEY = METRICS_FILE
# What the final model folder holds: everything the run wrote at the top of output_dir
# except what has its own place in storage, and the folders named here (not checkpoints).
NOT_FINAL = {METRICS_FILE}
FINAL_FOLDERS = {MERGED_DIR}  # final/merged/: the merged model (output.merge_adapter)


class StoragePlugin(CheckpointSyncCallback):
    """Checkpoint sync + preemption for one run; add on every rank."""

    def __init__(self, store: ObjectStore | None, uploader: BackgroundUploader | None, preemption: PreemptionFlag,
                 output_dir: Path):
        super().__init__(uploader, preemption=preemption)
        self.store = store
        self.output_dir = output_dir
        self.stopped_by_signal = False
        if uploader is not None and world().rank == 0:
            # In the upload thread (never stalls training): before the checkpoint's files, so a pod killed
            # the moment its manifest lands still leaves the history up to it in storage; and after, for
            # the lines logged meanwhile.
            uploader.before_upload = lambda step: self._put_metrics()
            uploader.on_uploaded = self._publish_metrics

    # -------------------------------------------------------------- train.py's hooks

    @property
    def exit_code(self) -> int | None:
        """128 + signal after a preemption save (retried by `restartPolicy: ExitCode`)."""
        return self.preemption.exit_code if self.stopped_by_signal else None

    def resume_checkpoint(self) -> str | None:
        """The checkpoint every rank resumes from: global rank 0 chooses (storage first, then
        local, verified), every node's local rank 0 makes sure that exact step is on its disk
        (a node's disk holds only the files its ranks wrote), then all ranks meet."""
        chosen = None
        if world().rank == 0:
            path = find_resume_checkpoint(self.store, self.output_dir)
            chosen = checkpoint_step(path) if path else None
        dist = _distributed()
        if dist is not None:
            box = [chosen]
            dist.broadcast_object_list(box, src=0)
            chosen = box[0]
        if chosen is None:
            return None
        if world().rank == 0 and self.store is not None:
            self._restore_metrics()
        target = self.output_dir / f"checkpoint-{chosen}"
        if self.store is not None and world().local_rank == 0 and world().rank != 0:
            manifest = _read_manifest(self.store, chosen)
            if manifest is None:
                raise StorageError(f"checkpoint-{chosen} chosen by rank 0 has no manifest in {self.store.uri}")
            if target.exists():
                shutil.rmtree(target)  # this node's partial copy: the merged one replaces it
            download_checkpoint(self.store, manifest, target)
        if dist is not None:
            dist.barrier()
        return str(target)

    def _restore_metrics(self) -> None:
        """A new pod's disk is empty: fetch the run's metrics.jsonl so far from storage (the
        trainer then keeps its lines up to the resumed step), or the published history would
        start at the resumed step. A local one (same pod restarted) is newer; it is kept."""
        local = self.output_dir / METRICS_KEY
        if local.exists():
            return
        try:
            self.store.get_file(METRICS_KEY, local)
        except ObjectNotFound:
            pass
        except StorageError as exc:
            log.warning("metrics.jsonl of the earlier attempts not fetched from %s (%s); "
                        "the published history starts at the resumed step", self.store.uri, exc)

    def progress_fields(self) -> dict[str, Any]:
        """What the progress report shows about storage: the newest complete checkpoint, and
        whether uploads are failing (training goes on; they are retried at the next save)."""
        if self.uploader is None or self.store is None:
            return {}
        status = self.uploader.status
        fields: dict[str, Any] = {"checkpoint_uri": status.last_uploaded_uri, "storage_degraded": status.degraded}
        if status.degraded and status.last_error:
            fields["storage_error"] = status.last_error[:300]
        return fields

    def publish(self, output_dir: Path) -> None:
        """After the final save: `metrics.jsonl` and `final/` (the top of output_dir, and merged/
        as final/merged/) to storage (global rank 0)."""
        if self.uploader is not None:
            self.uploader.close()
        if self.store is None or world().rank != 0:
            return
        final = output_dir / ".final-upload"
        shutil.rmtree(final, ignore_errors=True)
        final.mkdir()
        for item in output_dir.iterdir():
            if item.is_file() and item.name not in NOT_FINAL:
                os.link(item, final / item.name)  # a hard link: no copy of the weights
            elif item.is_dir() and item.name in FINAL_FOLDERS:
                shutil.copytree(item, final / item.name, copy_function=os.link)

        def upload() -> None:
            if (output_dir / METRICS_KEY).is_file():
                upload_file_artifact(self.store, output_dir / METRICS_KEY, METRICS_KEY)
            upload_file_artifact(self.store, final, FINAL_KEY)
            log.info("results uploaded to %s", self.store.uri_for(FINAL_KEY))

        try:
            keep_trying(upload, "final results upload", self.drain_seconds)
        except StorageError as exc:  # the trained model is still on local disk; say so loudly
            log.error("could not upload the final results to %s: %s (they remain in %s)", self.store.uri, exc, output_dir)
        finally:
            shutil.rmtree(final, ignore_errors=True)

    def _put_metrics(self) -> None:
        """Storage's copy of metrics.jsonl, the live record a restarted pod continues (upload
        thread, global rank 0). Whole lines only: the training thread may be appending one right
        now. Raises StorageError: before a checkpoint, that checkpoint's upload fails with it."""
        path = self.output_dir / METRICS_KEY
        if self.store is None or not path.is_file():
            return
        data = path.read_bytes()
        self.store.put_bytes(data[: data.rfind(b"\n") + 1], METRICS_KEY)

    def _publish_metrics(self, manifest) -> None:
        """After each complete checkpoint: the lines logged while it went up."""
        try:
            self._put_metrics()
        except StorageError as exc:
            log.warning("metrics.jsonl not uploaded (%s); retried with the next checkpoint", exc)

    # ------------------------------------------------------------------- callback

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if control.should_training_stop and self.preemption.is_set():
            self.stopped_by_signal = True


def open_storage(cfg: FineTuneConfig, output_dir: Path) -> StoragePlugin:
    """The run's storage stage: always handles SIGTERM and writes each checkpoint's manifest;
    syncs to `output.storage_uri` when it is set."""
    preemption = install_preemption_handler()
    store = open_store(cfg.output.storage_uri) if cfg.output.storage_uri else None
    uploader = None
    if world().local_rank == 0:  # each node's local rank 0 writes (and uploads) what its node saved
        node_rank, num_nodes = node_topology()
        uploader = BackgroundUploader(
            store, save_total_limit=cfg.output.save_total_limit, node_rank=node_rank, num_nodes=num_nodes,
            config=cfg.model_dump(mode="json"),
        )
    return StoragePlugin(store, uploader, preemption, output_dir)
