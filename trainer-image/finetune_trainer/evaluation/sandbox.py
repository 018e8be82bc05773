"""Run a model-written Python program in a sandboxed subprocess.

What it guarantees, layer by layer (outermost first), and where each holds:
- a fresh temp folder as the working directory (removed afterwards), a stripped
  environment (PATH, HOME and TMPDIR pointing into that folder, LANG; nothing else: no
  credentials, no proxies), stdin closed, stdout/stderr to files (not memory);
- its own session, killed whole (SIGKILL to the process group) at the wall-clock timeout;
- the trainer marks itself non-dumpable before the first program runs
  (process_guard.py): its /proc/<pid>/ files (environ, cmdline, mem, ...)
  become root's, so a non-root program cannot read them. Kernel-enforced, everywhere
  (a pod's trainer is non-root); it does not stop a root program;
- a kernel view of its own, where the kernel allows (root, or unprivileged user
  namespaces; a pod without CAP_SYS_ADMIN usually gets neither): new network, mount and
  PID namespaces (`unshare`), so it sees a loopback that is down, a /proc with only its
  own processes, and every known secret place of the trainer (secret_env.secret_places:
  /var/run/secrets, ~/.aws, ~/.cache/huggingface, ~/.netrc, ~/.config, HF_HOME, the
  token files the environment names, /etc/shadow) covered by an empty read-only tmpfs
  or /dev/null. Falls back to a network namespace alone, then to nothing (the hook below
  stays on in every case);
- in the child, before the program runs (sandbox_boot.py): `resource.setrlimit` for CPU
  seconds, address space, file size, open files, core dumps and processes, and a PEP 578
  audit hook refusing writes outside the folder, reads and listings outside an allow-list
  (the folder, Python's standard library, its own /proc/<pid>, /dev/null, /dev/urandom,
  time zones: so no other process's /proc files and no secret file), sockets, new
  processes, ctypes, and raising limits;
- what it printed is kept only as a tail with every secret value of the trainer's
  environment replaced by [redacted] (secret_env.secret_values) before anything
  (results, evaluation.json, logs, status) sees it.

What it does not guarantee: the audit hook is a guard inside the interpreter, not a kernel
boundary; a bug in CPython or a C extension of the standard library could step around it.
Where no namespace can be made and the trainer runs as root, the hook is the only wall
between the program and root's files. Redaction matches the secrets' literal values: a
program that could read a secret could also print it encoded. The outer wall is the pod:
non-root, read-only root filesystem, no privilege escalation, every capability dropped,
RuntimeDefault seccomp (render.py sets all of them on the training pods).
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

from .. import secret_env
from ..process_guard import mark_not_dumpable

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


_PRIVATE_VIEW = ("--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child")


@dataclass(frozen=True)
class KernelView:
    command: tuple[str, ...]  # the unshare prefix
    words: str
    hides: bool  # mount + PID namespaces: secret places covered, /proc shows only the program


KERNEL_VIEWS = (
    KernelView(("unshare", *_PRIVATE_VIEW), "network, mount and PID namespaces", True),
    KernelView(("unshare", "--user", "--map-root-user", *_PRIVATE_VIEW), "user, network, mount and PID namespaces", True),
    KernelView(("unshare", "--net"), "network namespace", False),
    KernelView(("unshare", "--user", "--net"), "user and network namespaces", False),
)
# Run inside the new mount namespace by `sh -c HIDE_SCRIPT sh PLACE... -- PROGRAM...`: cover
# each place, then run the program as a child (not exec: the PID namespace's init ignores
# signals it has no handler for, and unshare mangles a signalled init's status); its
# status comes back as the shell's, 128 + N for signal N.
HIDE_SCRIPT = """
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
  if [ -d "$1" ]; then mount -t tmpfs -o ro,nosuid,nodev,noexec,size=4k,mode=0 finetune-hidden "$1" || exit 125
  elif [ -e "$1" ]; then mount --bind /dev/null "$1" || exit 125; fi  # 125: not hidden, not run
  shift
done
shift
unset PWD OLDPWD  # the shell's own; the program gets sandbox_env() and nothing else
"$@"
exit $?
"""


def view_command(view: KernelView, places: tuple[str, ...]) -> tuple[str, ...]:
    return (*view.command, "sh", "-c", HIDE_SCRIPT, "sh", *places, "--") if view.hides else view.command


@functools.cache
def kernel_view() -> KernelView | None:
    """The first namespace set that works here (probed once: a tmpfs over a folder and a
    /dev/null over a file, as a real run makes them), or None (then the audit hook alone
    keeps the program off the network and the secret places)."""
    if shutil.which("unshare") is None:
        return None
    with tempfile.TemporaryDirectory(prefix="finetune-sandbox-probe-") as probe:
        folder, file = Path(probe, "folder"), Path(probe, "file")
        folder.mkdir()
        (folder / "inside").write_text("x")
        file.write_text("x")
        check = ["sh", "-c", '[ ! -e "$1/inside" ] && [ ! -s "$2" ]', "sh", str(folder), str(file)]
        for view in KERNEL_VIEWS:
            try:
                result = subprocess.run([*view_command(view, (str(folder), str(file))), *(check if view.hides else ["true"])],
                                        capture_output=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if result.returncode == 0:
                return view
    return None


def network_namespace_prefix() -> tuple[str, ...] | None:
    view = kernel_view()
    return view.command if view else None


def isolation_in_words(view: KernelView | None) -> str:
    if view:
        return f"{view.words} ({' '.join(view.command)}) + audit hook"
    return "audit hook (no namespaces available here)"


@functools.cache
def _not_dumpable() -> bool:
    return mark_not_dumpable()


def sandbox_env(folder: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(folder),
        "TMPDIR": str(folder),
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
    }


def boot_settings(folder: Path, limits: SandboxLimits, *, block_sockets: bool, guard_reads: bool = True) -> dict:
    return {
        "workdir": str(folder),
        "program": PROGRAM,
        "cpu_seconds": max(1, math.ceil(limits.timeout_seconds)),
        "memory_bytes": limits.memory_mb * 1024 * 1024,
        "file_bytes": limits.file_size_mb * 1024 * 1024,
        "open_files": limits.open_files,
        "block_sockets": block_sockets,
        "guard_reads": guard_reads,
    }


def _tail(path: Path, secrets: tuple[str, ...]) -> str:
    """The last OUTPUT_TAIL characters, secrets redacted first (so none is cut in half)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4 * OUTPUT_TAIL - 4 * max(map(len, secrets), default=0)))
        text = f.read().decode("utf-8", "replace")
    return secret_env.redact(text, secrets)[-OUTPUT_TAIL:]


def _returncode(code: int, view: KernelView | None) -> int:
    """The program's own status: behind the hiding shell a signal N reads as 128 + N."""
    if view and view.hides and code > 128:
        return -(code - 128)
    return code


def _kill_group(proc: subprocess.Popen, *, settle_seconds: float = 10.0) -> None:
    """SIGKILL to the whole session, then wait until none of it runs any more: a killed
    process takes a moment to die on a busy machine, and its folder is removed next."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.monotonic() + settle_seconds
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group is still alive (zombies, already dead, do not count)."""
    try:
        entries = list(os.scandir("/proc"))
    except OSError:  # no /proc: nothing to wait on
        return False
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def run_program(
    source: str,
    limits: SandboxLimits = SandboxLimits(),
    *,
    isolation: Isolation = "auto",
    block_sockets: bool = True,
    guard_reads: bool = True,
) -> ExecutionResult:
    """Run `source` as a Python program under the sandbox; never raises for what the
    program does. `isolation="audit-hook"` skips the namespaces, `block_sockets=False` and
    `guard_reads=False` turn the hook's socket and read guards off: all three exist so that
    tests can prove each layer on its own."""
    _not_dumpable()
    view = kernel_view() if isolation == "auto" else None
    secrets = secret_env.secret_values()
    base = Path(tempfile.mkdtemp(prefix="finetune-sandbox-"))
    try:
        folder = base / "work"
        folder.mkdir()
        (folder / PROGRAM).write_text(source, encoding="utf-8")
        settings = boot_settings(folder, limits, block_sockets=block_sockets, guard_reads=guard_reads)
        places = tuple(p for p in secret_env.secret_places() if not _contains(p, base))
        prefix = view_command(view, places) if view else ()
        command = [*prefix, sys.executable, "-I", "-S", "-B", str(BOOT), json.dumps(settings)]
        start = time.monotonic()
        with open(base / "stdout", "wb") as out, open(base / "stderr", "wb") as err:
            proc = subprocess.Popen(
                command, cwd=folder, env=sandbox_env(folder), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, close_fds=True,
            )
            try:
                returncode = _returncode(proc.wait(timeout=limits.timeout_seconds), view)
                timed_out = returncode in (-signal.SIGXCPU, -signal.SIGKILL)  # the CPU limit
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                returncode, timed_out = None, True
            else:
                _kill_group(proc)  # anything it left behind in its session
        seconds = time.monotonic() - start
        status: Status = "timed out" if timed_out else "passed" if returncode == 0 else "failed"
        return ExecutionResult(
            status, returncode, round(seconds, 3), _tail(base / "stdout", secrets), _tail(base / "stderr", secrets),
            isolation_in_words(view) if block_sockets or view else "none (tests only)",
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _contains(place: str, path: Path) -> bool:
    """Covering `place` would cover the program's own folder too."""
    real = os.path.realpath(path)
    return real == place or real.startswith(place.rstrip("/") + "/")
