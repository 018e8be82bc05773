"""Run a model-written Python program in a sandboxed subprocess.

Layers, outermost first:
- a fresh temp folder as the working directory (removed afterwards), a stripped
  environment (PATH, HOME and TMPDIR pointing into that folder, LANG; nothing else: no
  credentials, no proxies), stdin closed, stdout/stderr to files (not memory);
- its own session, killed whole (SIGKILL to the process group) at the wall-clock timeout;
- no network: a new network namespace (`unshare --net`, or `unshare --user --net` for a
  non-root user where unprivileged user namespaces are allowed) holds only a loopback that
  is down. Where the kernel refuses (a pod without CAP_SYS_ADMIN, the usual case), the
  in-process guard below is the no-network shim; it is on in both cases;
- in the child, before the program runs (sandbox_boot.py): `resource.setrlimit` for CPU
  seconds, address space, file size, open files, core dumps and processes, and a PEP 578
  audit hook refusing writes outside the folder, sockets, new processes, ctypes, and
  raising limits.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

BOOT = Path(__file__).with_name("sandbox_boot.py")
PROGRAM = "program.py"
OUTPUT_TAIL = 2000  # characters of stdout/stderr kept in a result

Isolation = Literal["auto", "audit-hook"]
Status = Literal["passed", "failed", "timed out"]


@dataclass(frozen=True)
class SandboxLimits:
    timeout_seconds: float = 10.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    open_files: int = 64


@dataclass(frozen=True)
class ExecutionResult:
    status: Status
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str
    isolation: str  # how the network was cut off, in words

    @property
    def passed(self) -> bool:
        return self.status == "passed"


NAMESPACE_COMMANDS = (("unshare", "--net"), ("unshare", "--user", "--net"))


@functools.cache
def network_namespace_prefix() -> tuple[str, ...] | None:
    """The first `unshare` command that works here, or None (then the audit hook alone
    keeps the program off the network)."""
    if shutil.which("unshare") is None:
        return None
    for command in NAMESPACE_COMMANDS:
        try:
            probe = subprocess.run([*command, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return command
    return None


def isolation_in_words(prefix: tuple[str, ...] | None) -> str:
    if prefix:
        return f"network namespace ({' '.join(prefix)}) + audit hook"
    return "audit hook (no network namespace available here)"


def sandbox_env(folder: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(folder),
        "TMPDIR": str(folder),
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
    }


def boot_settings(folder: Path, limits: SandboxLimits, *, block_sockets: bool) -> dict:
    return {
        "workdir": str(folder),
        "program": PROGRAM,
        "cpu_seconds": max(1, math.ceil(limits.timeout_seconds)),
        "memory_bytes": limits.memory_mb * 1024 * 1024,
        "file_bytes": limits.file_size_mb * 1024 * 1024,
        "open_files": limits.open_files,
        "block_sockets": block_sockets,
    }


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4 * OUTPUT_TAIL))
        return f.read().decode("utf-8", "replace")[-OUTPUT_TAIL:]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_program(
    source: str,
    limits: SandboxLimits = SandboxLimits(),
    *,
    isolation: Isolation = "auto",
    block_sockets: bool = True,
) -> ExecutionResult:
    """Run `source` as a Python program under the sandbox; never raises for what the
    program does. `isolation="audit-hook"` skips the network namespace, and
    `block_sockets=False` turns the in-process socket guard off: both exist so that tests
    can prove each no-network layer on its own."""
    prefix = network_namespace_prefix() if isolation == "auto" else None
    base = Path(tempfile.mkdtemp(prefix="finetune-sandbox-"))
    try:
        folder = base / "work"
        folder.mkdir()
        (folder / PROGRAM).write_text(source, encoding="utf-8")
        settings = boot_settings(folder, limits, block_sockets=block_sockets)
        command = [*(prefix or ()), sys.executable, "-I", "-S", "-B", str(BOOT), json.dumps(settings)]
        start = time.monotonic()
        with open(base / "stdout", "wb") as out, open(base / "stderr", "wb") as err:
            proc = subprocess.Popen(
                command, cwd=folder, env=sandbox_env(folder), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, close_fds=True,
            )
            try:
                returncode = proc.wait(timeout=limits.timeout_seconds)
                timed_out = returncode in (-signal.SIGXCPU, -signal.SIGKILL)  # the CPU limit
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                returncode, timed_out = None, True
            else:
                _kill_group(proc)  # anything it left behind in its session
        seconds = time.monotonic() - start
        status: Status = "timed out" if timed_out else "passed" if returncode == 0 else "failed"
        return ExecutionResult(
            status, returncode, round(seconds, 3), _tail(base / "stdout"), _tail(base / "stderr"),
            isolation_in_words(prefix) if block_sockets or prefix else "none (tests only)",
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
