"""The human-eval sandbox, attacked by real programs: it must not write outside its temp
folder, reach the network, start processes, or run past its timeout."""

from __future__ import annotations

import os
import socket
import textwrap
import threading
import time

import pytest

from finetune_trainer.evaluation.sandbox import SandboxLimits, network_namespace_prefix, run_program

FAST = SandboxLimits(timeout_seconds=5)


def run(source: str, limits: SandboxLimits = FAST, **kwargs):
    return run_program(textwrap.dedent(source), limits, **kwargs)


def test_exit_status_is_the_verdict():
    ok = run("import math\nassert math.gcd(12, 18) == 6\nprint('fine')")
    assert ok.status == "passed" and ok.returncode == 0 and ok.stdout.strip() == "fine"
    bad = run("assert 1 + 1 == 3, 'arithmetic'")
    assert bad.status == "failed" and "AssertionError: arithmetic" in bad.stderr


def test_writes_inside_its_folder_work():
    result = run(
        """
        import os, shutil
        os.makedirs('a/b')
        with open('a/b/f.txt', 'w') as f:
            f.write('x')
        os.rename('a/b/f.txt', 'a/g.txt')
        shutil.rmtree('a/b')
        print(open('a/g.txt').read(), os.environ['HOME'] == os.getcwd())
        """
    )
    assert result.status == "passed", result.stderr
    assert result.stdout.split() == ["x", "True"]


ESCAPES = {
    "open": "open(TARGET, 'w').write('escaped')",
    "os.open": "import os\nos.close(os.open(TARGET, os.O_WRONLY | os.O_CREAT))",
    "pathlib": "import pathlib\npathlib.Path(TARGET).write_text('escaped')",
    "relative after chdir": "import os\nos.chdir(os.path.dirname(TARGET))\nopen(os.path.basename(TARGET), 'w')",
    "through a symlink": "import os\nos.symlink(os.path.dirname(TARGET), 'link')\nopen('link/' + os.path.basename(TARGET), 'w')",
    "dir_fd": "import os\nfd = os.open(os.path.dirname(TARGET), os.O_RDONLY)\nos.open(os.path.basename(TARGET), os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
    "rename into it": "import os\nopen('mine', 'w').write('escaped')\nos.rename('mine', TARGET)",
    "shell": "import os\nos.system('touch ' + TARGET)",
    "subprocess": "import subprocess\nsubprocess.run(['touch', TARGET])",
    "ctypes": "import ctypes\nlibc = ctypes.CDLL(None)\nlibc.creat(TARGET.encode(), 0o644)",
    "rebound builtins": "import builtins\nbuiltins.type = lambda x: str\nbuiltins.isinstance = lambda *a: True\nopen(TARGET, 'w')",
    "raised limits": "import resource\nresource.setrlimit(resource.RLIMIT_NPROC, (100, 100))\nimport os\nos.system('touch ' + TARGET)",
}


@pytest.mark.parametrize("how", list(ESCAPES))
def test_cannot_write_outside_its_folder(tmp_path, how):
    target = tmp_path / "outside.txt"
    result = run(f"TARGET = {str(target)!r}\n" + ESCAPES[how])
    assert result.status == "failed"
    assert "PermissionError: sandbox:" in result.stderr, result.stderr
    assert not target.exists()


def test_cannot_delete_or_change_files_outside(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    for action in ("os.remove(V)", "os.chmod(V, 0o777)", "os.truncate(V, 0)", "shutil.rmtree(os.path.dirname(V))"):
        result = run(f"import os, shutil\nV = {str(victim)!r}\n{action}")
        assert result.status == "failed" and "PermissionError: sandbox:" in result.stderr, action
    assert victim.read_text() == "precious" and oct(victim.stat().st_mode & 0o777) != "0o777"


def test_the_hook_cannot_be_disarmed_from_its_own_traceback(tmp_path):
    """A PermissionError's traceback leads to the hook's frame; nothing there can be rebound."""
    target = tmp_path / "outside.txt"
    result = run(
        f"""
        T = {str(target)!r}
        try:
            open(T, 'w')
        except PermissionError as e:
            tb = e.__traceback__
            while tb.tb_next:
                tb = tb.tb_next
            for value in tb.tb_frame.f_locals.values():
                if callable(value) and hasattr(value, '__code__'):
                    value.__code__ = (lambda *a: None).__code__
        open(T, 'w')
        """
    )
    assert result.status == "failed" and not target.exists()


class Listener:
    """A real TCP server on the host's loopback that counts connections."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


CONNECT = "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\nprint('connected')"


def test_control_the_listener_accepts_an_unsandboxed_connection(listener):
    socket.create_connection(("127.0.0.1", listener.port), timeout=2).close()
    deadline = time.monotonic() + 30  # the listener's thread takes it when it is next scheduled
    while listener.accepted == 0 and time.monotonic() < deadline:
        threading.Event().wait(0.05)
    assert listener.accepted == 1


def test_no_network_with_the_audit_hook_alone(listener):
    """The shim used where no network namespace can be made (a pod without CAP_SYS_ADMIN)."""
    result = run(CONNECT.format(port=listener.port), isolation="audit-hook")
    assert result.status == "failed" and "PermissionError: sandbox: socket" in result.stderr
    assert result.isolation.startswith("audit hook")
    assert listener.accepted == 0


@pytest.mark.skipif(network_namespace_prefix() is None, reason="this kernel or user may not create network namespaces")
def test_no_network_with_the_namespace_alone(listener):
    """The socket guard off: the kernel alone keeps the program off the host's network."""
    result = run(CONNECT.format(port=listener.port), block_sockets=False)
    assert result.status == "failed" and "connected" not in result.stdout
    assert "sandbox:" not in result.stderr  # refused by the kernel, not by the hook
    assert "network" in result.isolation and "namespace" in result.isolation.split(" + ")[0]
    assert listener.accepted == 0


def test_no_network_by_default(listener):
    result = run(CONNECT.format(port=listener.port))
    assert result.status == "failed" and listener.accepted == 0


@pytest.mark.parametrize("program", ["while True:\n    pass", "import time\ntime.sleep(60)"], ids=["busy", "sleeping"])
def test_cannot_run_past_its_timeout(tmp_path, program):
    import psutil

    result = run("import os, sys\nprint(os.getcwd(), flush=True)\n" + program, SandboxLimits(timeout_seconds=4))  # room to start on a loaded machine
    assert result.status == "timed out"  # the wall clock or the CPU limit, whichever came first
    folder = result.stdout.split()[0]  # in its own PID namespace its pid means nothing here:
    left = []  # find it by its folder, which is on its command line
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(folder in part for part in proc.info["cmdline"] or ()):
            left.append(proc)
    assert not left, left  # killed, not left running


def test_cannot_start_processes():
    for program in ("import os\nos.fork()", "import os\nos.posix_spawn('/bin/true', ['true'], {})",
                    "import multiprocessing\nmultiprocessing.Process(target=print).start()"):
        result = run(program)
        assert result.status == "failed" and "PermissionError: sandbox:" in result.stderr, program


def test_memory_is_limited():
    result = run("x = bytearray(3 * 1024 ** 3)", SandboxLimits(timeout_seconds=5, memory_mb=256))
    assert result.status == "failed" and "MemoryError" in result.stderr


def test_environment_is_stripped(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak")
    monkeypatch.setenv("HF_TOKEN", "do-not-leak")
    result = run("import os\nprint(sorted(os.environ))\nprint(os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR'])")
    assert result.status == "passed"
    assert result.stdout.splitlines() == ["['HOME', 'LANG', 'PATH', 'PYTHONHASHSEED', 'TMPDIR']", "True"]


def test_each_run_gets_a_fresh_folder_that_is_removed():
    first = run("import os\nopen('left.txt', 'w').write('x')\nprint(os.getcwd())")
    second = run("import os\nprint(os.path.exists('left.txt'), os.getcwd())")
    assert first.status == second.status == "passed"
    folder = first.stdout.strip()
    assert second.stdout.split()[0] == "False" and second.stdout.split()[1] != folder
    assert not os.path.exists(folder)
