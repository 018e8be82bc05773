"""One tracker behind a queue, in its own thread: a tracker that is slow, down or hanging
delays only itself, never a training step.

Calls are delivered in order. The first, `start`, is retried until it works (backing off,
up to RETRY_CAP seconds between tries) and everything else waits behind it; a later call
that fails RETRIES times is dropped, counted. At most MAX_PENDING calls wait;
beyond that the oldest metrics are dropped, counted. `close(timeout)` gives what is queued
that long to go out; what is left is logged by count (metrics.jsonl keeps every figure).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("finetune_trainer.tracking")

MAX_PENDING = 20_000
RETRIES = 3
RETRY_FIRST, RETRY_CAP = 2.0, 60.0


@dataclass(frozen=True)
class WorkerStatus:
    name: str
    started: bool
    degraded: bool
    last_error: str | None
    dropped: int
    pending: int


def backoff(failures: int, first: float = RETRY_FIRST, cap: float = RETRY_CAP) -> float:
    """Seconds before try number failures + 1: 2, 4, 8, ... capped."""
    return min(first * 2 ** max(failures - 1, 0), cap)


class TrackerWorker:
    """Runs `tracker.<method>(*args)` calls in a daemon thread; see the module docstring."""

    def __init__(self, tracker: Any, *, clock: Callable[[], float] = time.monotonic,
                 max_pending: int = MAX_PENDING, retry_first: float = RETRY_FIRST):
        self.tracker = tracker
        self.name: str = tracker.name
        self._clock = clock
        self._max_pending = max_pending
        self._retry_first = retry_first
        self._cond = threading.Condition()
        self._pending: deque[tuple[str, tuple[Any, ...]]] = deque()
        self._closing = False
        self._deadline = float("inf")
        self._retry_at = 0.0
        self._in_flight: tuple[str, tuple[Any, ...]] | None = None  # the call being delivered now
        self._failures = 0
        self._started = False
        self._degraded = False
        self._last_error: str | None = None
        self._dropped = 0
        self.state: dict[str, Any] | None = None  # what `start` returned (the run id): saved in checkpoints
        self._thread = threading.Thread(target=self._run, name=f"tracker-{self.name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the training thread

    def submit(self, method: str, *args: Any) -> None:
        with self._cond:
            if self._closing:
                return
            if len(self._pending) >= self._max_pending:
                self._drop_oldest_metrics()
            self._pending.append((method, args))
            self._cond.notify()

    def close(self, timeout: float) -> WorkerStatus:
        """Deliver what is queued for at most `timeout` seconds, then stop; say what was lost."""
        with self._cond:
            self._closing = True
            self._deadline = self._clock() + timeout
            self._cond.notify()
        self._thread.join(timeout + 1.0)
        status = self.status
        if self._thread.is_alive() or status.pending or status.dropped:
            cause = f" ({status.last_error})" if status.last_error else ""
            log.warning("%s: %d calls not delivered and %d dropped%s; every figure is in metrics.jsonl",
                        self.name, status.pending, status.dropped, cause)
        return status

    @property
    def status(self) -> WorkerStatus:
        with self._cond:
            return WorkerStatus(self.name, self._started, self._degraded, self._last_error, self._dropped,
                                len(self._pending))

    # ------------------------------------------------------------------ its thread

    def _drop_oldest_metrics(self) -> None:
        """Never the call on its way (the head, while a hanging tracker holds it): that one is
        taken off the queue once it returns, and dropping it here would take another with it."""
        for i, (method, _) in enumerate(self._pending):
            if method == "log_metrics" and self._pending[i] is not self._in_flight:
                del self._pending[i]
                self._dropped += 1
                return
        for i, call in enumerate(self._pending):
            if call is not self._in_flight and call[0] != "start":  # without its run, nothing lands
                del self._pending[i]
                self._dropped += 1
                return

    def _finish_head(self, call: tuple[str, tuple[Any, ...]]) -> None:
        self._in_flight = None
        if self._pending and self._pending[0] is call:
            self._pending.popleft()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                now = self._clock()
                if self._retry_at > now:
                    if self._closing and self._retry_at > self._deadline:
                        return  # the next try would be after the deadline: close() reports what is left
                    self._cond.wait(min(self._retry_at, self._deadline) - now)
                    continue
                if self._closing and now > self._deadline:
                    return
                call = self._in_flight = self._pending[0]
            method, args = call
            error = self._deliver(method, args)
            with self._cond:
                if error is None:
                    self._finish_head(call)
                    self._started |= method == "start"
                    if self._degraded:
                        log.info("%s: reachable again", self.name)
                    self._failures, self._degraded, self._last_error = 0, False, None
                    continue
                self._failures += 1
                if not self._degraded:
                    log.warning("%s: %s failed (%s); training goes on, retrying in the background",
                                self.name, method, error)
                self._degraded, self._last_error = True, f"{method}: {error}"[:300]
                self._in_flight = None  # tried again from the head, unless given up on here
                if method != "start" and self._failures >= RETRIES:
                    self._finish_head(call)
                    self._dropped += 1
                    self._failures = 0
                self._retry_at = self._clock() + backoff(self._failures, self._retry_first)

    def _deliver(self, method: str, args: tuple[Any, ...]) -> str | None:
        try:
            result = getattr(self.tracker, method)(*args)
            if method == "start":
                self.state = result or {}
            return None
        except Exception as exc:  # noqa: BLE001 - any tracker failure is the tracker's, never the run's
            return f"{type(exc).__name__}: {exc}".splitlines()[0]
