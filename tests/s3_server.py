"""S3 over real HTTP on loopback for tests: `moto_server` in a subprocess.

A pytest plugin (tests/conftest.py: `pytest_plugins = ["s3_server"]`) with fixtures:
  moto_server   session: one moto_server process (`.endpoint`); never stopped by a test
  s3_endpoint   the AWS environment (endpoint, dummy credentials, region) pointed at it
  s3_bucket     a fresh, empty bucket per test (its name)
  storage_uri   parametrized: an s3:// URI in a fresh bucket, then a file:// URI in tmp_path
  s3_outage     a private moto_server behind a TCP gate with a bucket: `.down()` refuses
                every connection (open ones are cut), `.up()` serves again with the data intact
The classes are importable on their own (benchmarks use MotoServer). `MotoServer.requests()`
reads the requests it served from its log; `TcpGate(port, rate=...)` also slows each connection.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}
AWS_ENV_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "FINETUNE_S3_ADDRESSING", "AWS_CONFIG_FILE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_server_binary() -> Path:
    path = Path(sys.executable).parent / "moto_server"
    if not path.exists():
        raise RuntimeError(f"{path} is missing: pip install 'moto[server]'")
    return path


class MotoServer:
    """One `moto_server` process on 127.0.0.1 (state in memory: lost when it stops)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> MotoServer:
        self.proc = subprocess.Popen(
            [str(moto_server_binary()), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}: {Path(self.log.name).read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto_server did not answer on {self.endpoint} within {timeout:.0f}s")

    def requests(self, method: str | None = None, path: str = "") -> list[str]:
        """The requests served so far, as "GET /bucket/key" (werkzeug's log lines; a line is written
        as its response ends), those of `method` whose path starts with `path`."""
        served = re.findall(r'"([A-Z]+) (\S+) HTTP/[\d.]+"', Path(self.log.name).read_text(errors="replace"))
        return [f"{m} {p}" for m, p in served if (method is None or m == method) and p.startswith(path)]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class TcpGate:
    """A loopback TCP forwarder that can refuse service and come back on the same port:
    an S3 outage (connection refused, open connections cut) whose data survives. `rate`: at most
    this many bytes a second through each connection, each way (a slow network)."""

    def __init__(self, target_port: int, port: int | None = None, rate: float | None = None):
        self.target_port = target_port
        self.port = port or free_port()
        self.rate = rate
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:  # one step with _accept's check: no connection is let in after this
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener:
            listener.close()
        for conn in conns:
            for close in (lambda c: c.shutdown(socket.SHUT_RDWR), lambda c: c.close()):
                try:
                    close(conn)
                except OSError:
                    pass

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            with self._lock:
                cut = self._listener is not listener  # down() came since accept: this one goes too
                if not cut:
                    self._conns |= {client, upstream}
            if cut:
                client.close()
                upstream.close()
                return
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                if self.rate:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            self._conns -= {src, dst}


def make_bucket(endpoint: str, name: str | None = None) -> str:
    import boto3

    name = name or f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=name)
    return name


def _point_aws_env_at(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    for name in AWS_ENV_UNSET:
        monkeypatch.delenv(name, raising=False)
    for name, value in {**AWS_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="session")
def moto_server():
    with MotoServer() as server:
        yield server


@pytest.fixture
def s3_endpoint(moto_server, monkeypatch) -> str:
    """The endpoint URL; the process environment (inherited by subprocesses) points boto3 at it."""
    _point_aws_env_at(monkeypatch, moto_server.endpoint)
    return moto_server.endpoint


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    return make_bucket(s3_endpoint)


@pytest.fixture(params=["s3", "file"])
def storage_uri(request, tmp_path) -> str:
    """The same test against both backends; the prefix mimics <storage.uri>/<namespace>/<job>."""
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('s3_bucket')}/team-a/job-1"
    return (tmp_path / "object-store" / "team-a" / "job-1").as_uri()


@dataclass
class S3Outage:
    server: MotoServer
    gate: TcpGate
    bucket: str

    @property
    def endpoint(self) -> str:
        return self.gate.endpoint

    def down(self) -> None:
        self.gate.down()

    def up(self) -> None:
        self.gate.up()


@pytest.fixture
def s3_outage(monkeypatch):
    with MotoServer() as server:
        gate = TcpGate(server.port)
        gate.up()
        _point_aws_env_at(monkeypatch, gate.endpoint)
        try:
            yield S3Outage(server, gate, make_bucket(gate.endpoint))
        finally:
            gate.down()
