"""The thin edge between transformers' Trainer and the storage layer.

This module imports transformers (and torch); `finetune_trainer.storage` itself does not,
so import it as `from finetune_trainer.storage.callback import CheckpointSyncCallback`.

Wiring (the trainer):
    flag = install_preemption_handler()                  # main thread, before training
    uploader = BackgroundUploader(store, save_total_limit=..., node_rank=..., num_nodes=...)  # local rank 0 only
    trainer.add_callback(CheckpointSyncCallback(uploader or None, preemption=flag))
    trainer.train(resume_from_checkpoint=find_resume_checkpoint(store, output_dir))
    if flag.is_set(): sys.exit(flag.exit_code)           # 143: the restart policy retries
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

from .preemption import PreemptionFlag, install_preemption_handler
from .stores import StorageUnavailable
from .uploader import BackgroundUploader, node_topology

__all__ = ["CheckpointSyncCallback", "PreemptionFlag", "install_preemption_handler"]

log = logging.getLogger(__name__)

# The end of a run waits this long for storage to come back before giving up on an upload
# (a pod's disk is gone after it exits). Well under the process group's 30 min timeout, which
# the other ranks, waiting in the next collective, are bound by.
DRAIN_SECONDS = 600.0
DRAIN_PAUSE_SECONDS = 5.0


def keep_trying(attempt: Callable[[], None], what: str, seconds: float) -> None:
    """Run `attempt` again (every few seconds) while it raises StorageUnavailable, for up to
    `seconds`; then its last StorageUnavailable propagates. For the end of a run only: the
    pod's disk is gone once it exits, so an outage then is waited out, within bounds."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return attempt()
        except StorageUnavailable as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            log.warning("%s still failing at the end of training (%s); retrying for up to %.0fs", what, exc, left)
            time.sleep(min(DRAIN_PAUSE_SECONDS, left))


def _distributed():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _any_rank(value: bool) -> bool:
    """True on every rank if it is true on any: all ranks must save at the same step."""
    dist = _distributed()
    if dist is None:
        return value
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([int(value)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _shared_token() -> str:
    """One random token for all ranks (global rank 0's), naming this run attempt."""
    token = [uuid.uuid4().hex]
    if (dist := _distributed()) is not None:
        dist.broadcast_object_list(token, src=0)
    return token[0]


class CheckpointSyncCallback(TrainerCallback):
    """Add on every rank. `uploader`: a BackgroundUploader on each node's local rank 0, None
    elsewhere. `preemption`: the flag from `install_preemption_handler`."""

    def __init__(self, uploader: BackgroundUploader | None, *, preemption: PreemptionFlag | None = None,
                 wait_timeout: float | None = None, drain_seconds: float = DRAIN_SECONDS):
        self.uploader = uploader
        self.preemption = preemption
        self.wait_timeout = wait_timeout
        self.drain_seconds = drain_seconds

    def on_train_begin(self, args, state, control, **kwargs):
        if node_topology()[1] > 1:  # same answer on every rank, so all join the broadcast or none
            token = _shared_token()
            if self.uploader is not None:
                self.uploader.attempt = token

    def on_step_end(self, args, state, control, **kwargs):
        if self.preemption is not None and _any_rank(self.preemption.is_set()):
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        # The Trainer has no barrier after each rank writes its RNG state: wait for all files.
        if (dist := _distributed()) is not None:
            dist.barrier()
        if self.uploader is not None and state.is_local_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self.uploader.submit(folder, state.global_step, state.epoch)

    def on_train_end(self, args, state, control, **kwargs):
        """The last checkpoint is in storage before the run ends: an outage is waited out,
        one upload attempt (with its retries) after another, for up to `drain_seconds`."""
        if self.uploader is None:
            return
        uploader = self.uploader

        def uploaded() -> None:
            if not uploader.wait(self.wait_timeout):
                raise StorageUnavailable(uploader.status.last_error or "the upload has not finished")

        try:
            keep_trying(uploaded, "checkpoint upload", self.drain_seconds)
        except StorageUnavailable as exc:
            log.error("checkpoint upload incomplete at the end of training: %s", exc)
