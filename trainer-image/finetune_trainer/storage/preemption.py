"""SIGTERM is Kubernetes' notice before a pod is killed (preemption, eviction, upgrades):
save at the next step boundary, upload, exit with a code the restart policy retries."""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)


class PreemptionFlag:
    """Set by the first SIGTERM; read at step boundaries."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: int | None = None

    def set(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    @property
    def exit_code(self) -> int:
        """128 + signal number (143 for SIGTERM): `restartPolicy: ExitCode` retries it."""
        return 128 + (self.signum or signal.SIGTERM)


def install_preemption_handler(signals: tuple[int, ...] = (signal.SIGTERM,)) -> PreemptionFlag:
    """First signal: set the flag (the callback saves at the next step boundary and stops).
    Second signal: die at once with the default action. Nothing half-written becomes visible
    either way, because a checkpoint's manifest is written only after all its files."""
    flag = PreemptionFlag()

    def handle(signum, _frame):
        if flag.is_set():
            log.warning("second %s: exiting now; an unfinished upload stays invisible (no manifest)",
                        signal.Signals(signum).name)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        log.warning("%s received: saving a checkpoint at the next step boundary, then exiting",
                    signal.Signals(signum).name)
        flag.set(signum)

    for sig in signals:
        signal.signal(sig, handle)
    return flag
