"""One small object-store interface over `s3://bucket/prefix` (boto3) and `file:///path`.

Keys are relative to the store's root (the URI's prefix), always with `/`, so the trainer
never branches on scheme. Errors come in two kinds: `ObjectNotFound` (the key is not
there; never retried) and `StorageUnavailable` (the service failed for longer than the
retry budget; the caller degrades and tries again later).

S3 settings come from the standard AWS environment:
  AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL  a custom endpoint (MinIO, Ceph, R2, moto); unset = AWS
  AWS_REGION / AWS_DEFAULT_REGION         the region
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, IRSA ...: boto3's chain
  FINETUNE_S3_ADDRESSING                  path | virtual | auto. Default: `path` when a custom
                                          endpoint is set (MinIO and Ceph need it and every
                                          S3-compatible service accepts it), else `auto` (AWS
                                          chooses virtual-hosted style).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from ..contract import ENV_S3_ADDRESSING, S3_PATH_STYLE

log = logging.getLogger(__name__)

T = TypeVar("T")
MiB = 1024 * 1024
TMP_MARK = ".tmp-"  # file:// writes land under this name first; listings never show them


class StorageError(Exception):
    """Base class of everything this module raises on purpose."""


class ObjectNotFound(StorageError, KeyError):
    """The key does not exist. Not retried."""

    def __str__(self) -> str:  # KeyError would print the repr
        return str(self.args[0]) if self.args else "object not found"


class StorageUnavailable(StorageError):
    """The store kept failing for longer than the retry budget (outage, throttling, network)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


@dataclass(frozen=True)
class RetryPolicy:
    """Our bounded retry of whole operations, on top of botocore's per-request retries.

    Worst case one operation takes about sum(min(max_delay, base_delay * 2**i)) plus the
    time of `attempts` failed tries; then it raises `StorageUnavailable`.
    """

    attempts: int = 5
    base_delay: float = 1.0
    max_delay: float = 30.0
    botocore_attempts: int = 3  # botocore "standard" mode: 5xx, throttling, connection errors
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter (attempt counts from 0)."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


@dataclass(frozen=True)
class TransferSettings:
    """boto3 transfer manager settings. 16 MiB parts keep a 100 GB file under S3's
    10,000-part limit; 8 concurrent parts saturate a pod's NIC without starving it."""

    multipart_threshold: int = 16 * MiB
    multipart_chunksize: int = 16 * MiB
    max_concurrency: int = 8
    file_concurrency: int = 4  # small (single-part) files in flight beside the big one (checkpoints.py)
    # Fetching a base model (model/fetch.py): ranged GETs over every file at once, each range
    # between multipart_chunksize and range_part_max bytes, range_concurrency in flight (as many
    # streams as an upload's parts, for the same reason; raise it on a node with a fatter NIC).
    range_concurrency: int = 8
    range_part_max: int = 64 * MiB


class ObjectStore(ABC):
    """What the trainer needs from object storage, and nothing more."""

    uri: str
    transfer: TransferSettings

    @abstractmethod
    def put_file(self, local: str | os.PathLike, key: str) -> None: ...

    @abstractmethod
    def put_bytes(self, data: bytes, key: str) -> None: ...

    @abstractmethod
    def get_file(self, key: str, local: str | os.PathLike) -> None:
        """Write the object to `local`; a partial download is never left under that name."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def read_range_into(self, key: str, start: int, length: int, fd: int) -> int:
        """Bytes start .. start+length-1 of the object, written to the open file `fd` at the same
        offset (os.pwrite: the ranges of one file land in parallel); returns how many were written.
        A failed try is retried whole (its bytes are simply written again)."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with `prefix` (a string prefix, not only a folder)."""

    @abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Delete these keys; missing ones are not an error."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    def uri_for(self, key: str = "") -> str:
        """The full URI of a key, for logs and the FineTuneJob status."""
        return f"{self.uri.rstrip('/')}/{key}" if key else self.uri


RANGE_CHUNK = 1 * MiB  # what one read of a ranged GET's body holds in memory


def _write_at(chunks: Iterable[bytes], fd: int, offset: int) -> int:
    written = 0
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            n = os.pwrite(fd, view, offset + written)
            view, written = view[n:], written + n
    return written


def join_key(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def open_store(
    uri: str, *, retry: RetryPolicy | None = None, transfer: TransferSettings | None = None
) -> ObjectStore:
    """`s3://bucket/prefix` or `file:///absolute/path` (the value of `output.storage_uri`)."""
    parsed = urlparse(uri)
    retry = retry or RetryPolicy()
    transfer = transfer or TransferSettings()
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"storage URI {uri!r} has no bucket: write s3://bucket/prefix (output.storage_uri)")
        return S3Store(parsed.netloc, parsed.path.strip("/"), retry=retry, transfer=transfer)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"storage URI {uri!r}: a file URI has three slashes, file:///absolute/path (output.storage_uri)")
        return FileStore(Path(unquote(parsed.path)), transfer=transfer)
    raise ValueError(
        f"unsupported storage URI {uri!r}: use s3://bucket/prefix or file:///absolute/path (output.storage_uri)"
    )


# ---------------------------------------------------------------- retry (both backends)


def with_retries(op: Callable[[], T], what: str, policy: RetryPolicy, transient: Callable[[BaseException], bool]) -> T:
    """Run `op`; retry what `transient` calls transient with backoff; then give up loudly."""
    for attempt in range(policy.attempts):
        try:
            return op()
        except Exception as exc:
            if not transient(exc):
                raise
            if attempt + 1 == policy.attempts:
                raise StorageUnavailable(f"{what}: still failing after {policy.attempts} attempts: {exc}") from exc
            pause = policy.delay(attempt)
            log.warning("%s failed (%s); retry %d/%d in %.1fs", what, exc, attempt + 1, policy.attempts - 1, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- s3://


def s3_addressing_style(env: dict[str, str]) -> str:
    """`path` for custom endpoints (MinIO, Ceph, moto) unless told otherwise; `auto` on AWS."""
    explicit = env.get(ENV_S3_ADDRESSING, "").strip().lower()
    if explicit:
        if explicit not in (S3_PATH_STYLE, "virtual", "auto"):
            raise ValueError(f"{ENV_S3_ADDRESSING}={explicit!r}: use path, virtual or auto")
        return explicit
    return "path" if s3_endpoint(env) else "auto"


def s3_endpoint(env: dict[str, str]) -> str | None:
    return env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None


def s3_region(env: dict[str, str]) -> str | None:
    return env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None


def botocore_config(env: dict[str, str], retry: RetryPolicy, transfer: TransferSettings):
    from botocore.config import Config

    return Config(
        region_name=s3_region(env),
        s3={"addressing_style": s3_addressing_style(env)},
        retries={"mode": "standard", "max_attempts": retry.botocore_attempts},
        connect_timeout=retry.connect_timeout,
        read_timeout=retry.read_timeout,
        # one connection per concurrent part of every file in flight, so none waits for the pool
        max_pool_connections=max(10, transfer.max_concurrency * transfer.file_concurrency),
    )


def transfer_config(transfer: TransferSettings):
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=transfer.multipart_threshold,
        multipart_chunksize=transfer.multipart_chunksize,
        max_concurrency=transfer.max_concurrency,
        use_threads=True,
    )


def _s3_transient(exc: BaseException) -> bool:
    """Network trouble, 5xx, throttling: worth another try. 403/404/bad request: not."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, ParamValidationError

    if isinstance(exc, (NoCredentialsError, ParamValidationError)):
        return False
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = exc.response.get("Error", {}).get("Code", "")
        return status >= 500 or status == 429 or code in ("SlowDown", "Throttling", "RequestTimeout", "InternalError")
    if isinstance(exc, S3UploadFailedError):  # the transfer manager wraps the cause in text only
        return not any(s in str(exc) for s in ("AccessDenied", "NoSuchBucket", "InvalidAccessKeyId", "(403)", "(404)"))
    return isinstance(exc, (BotoCoreError, ConnectionError, TimeoutError))


def _is_not_found(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    err = exc.response.get("Error", {})
    return err.get("Code") in ("404", "NoSuchKey", "NotFound") or exc.response.get("ResponseMetadata", {}).get(
        "HTTPStatusCode"
    ) == 404 and err.get("Code") != "NoSuchBucket"


def s3_client(*, retry: RetryPolicy | None = None, transfer: TransferSettings | None = None,
              env: dict[str, str] | None = None) -> Any:
    """The one way this project makes an S3 client (checkpoints, results, datasets,
    evaluation inputs): endpoint, region, addressing style, retries and timeouts from the
    environment above, a session of its own (boto3's default one is not thread-safe)."""
    import boto3

    env = dict(os.environ) if env is None else env
    return boto3.session.Session().client(
        "s3", endpoint_url=s3_endpoint(env), config=botocore_config(env, retry or RetryPolicy(), transfer or TransferSettings())
    )


class S3Store(ObjectStore):
    def __init__(self, bucket: str, prefix: str, *, retry: RetryPolicy, transfer: TransferSettings):
        self.bucket, self.prefix = bucket, prefix
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.retry, self.transfer = retry, transfer
        self.client = s3_client(retry=retry, transfer=transfer)
        self._transfer_config = transfer_config(transfer)

    def _key(self, key: str) -> str:
        return join_key(self.prefix, key)

    def _call(self, op: Callable[[], T], what: str, key: str) -> T:
        try:
            return with_retries(op, f"{what} {self.uri_for(key)}", self.retry, _s3_transient)
        except Exception as exc:
            if _is_not_found(exc):
                raise ObjectNotFound(f"{self.uri_for(key)} does not exist") from None
            if isinstance(exc, StorageError):
                raise
            raise StorageError(f"{what} {self.uri_for(key)} failed: {exc}") from exc

    def put_file(self, local, key):
        self._call(
            lambda: self.client.upload_file(str(local), self.bucket, self._key(key), Config=self._transfer_config),
            "upload to",
            key,
        )

    def put_bytes(self, data, key):
        self._call(lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data), "write", key)

    def get_file(self, key, local):
        # s3transfer downloads to a temporary name and renames it into place
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        self._call(
            lambda: self.client.download_file(self.bucket, self._key(key), str(local), Config=self._transfer_config),
            "download",
            key,
        )

    def get_bytes(self, key):
        return self._call(
            lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read(), "read", key
        )

    def read_range_into(self, key, start, length, fd):
        if length <= 0:
            return 0

        def run() -> int:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key),
                                          Range=f"bytes={start}-{start + length - 1}")["Body"]
            try:
                return _write_at(body.iter_chunks(RANGE_CHUNK), fd, start)
            finally:
                body.close()

        return self._call(run, "download", key)

    def list(self, prefix=""):
        full = join_key(self.prefix, prefix)
        if prefix.endswith("/") or (not prefix and self.prefix):
            full += "/"
        strip = len(self.prefix) + 1 if self.prefix else 0

        def run() -> list[ObjectInfo]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            return [ObjectInfo(o["Key"][strip:], o["Size"]) for page in pages for o in page.get("Contents", [])]

        return self._call(run, "list", prefix)

    def delete(self, keys):
        keys = list(keys)
        for start in range(0, len(keys), 1000):  # S3's limit per DeleteObjects request
            batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]

            def run(batch=batch):
                resp = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                if errors := resp.get("Errors"):
                    raise StorageError(f"delete under {self.uri}: {errors[0].get('Key')}: {errors[0].get('Message')}")

            self._call(run, "delete under", "")

    def exists(self, key):
        try:
            self._call(lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)), "check", key)
            return True
        except ObjectNotFound:
            return False


# ---------------------------------------------------------------- file://


class FileStore(ObjectStore):
    """The same semantics on a local (or mounted) filesystem. Every write goes to a hidden
    temporary name in the target folder and is renamed into place, so a reader sees a whole
    file or none, exactly like an S3 PUT."""

    def __init__(self, root: Path, *, transfer: TransferSettings | None = None):
        if not root.is_absolute():
            raise ValueError(f"file storage URI needs an absolute path, got {root} (output.storage_uri)")
        self.root = root
        self.uri = root.as_uri()
        self.transfer = transfer or TransferSettings()

    def _path(self, key: str) -> Path:
        key = key.strip("/")
        if not key or any(part in ("", ".", "..") for part in key.split("/")):
            raise ValueError(f"invalid object key {key!r}")
        return self.root / key

    def _write(self, target: Path, fill: Callable[[Path], None]) -> None:
        # Another writer's delete prunes a folder it leaves empty (see _prune): it can go between
        # our mkdir and our temp file (CI saw a two-node upload fail so). Once the temp file is
        # in it, the folder is not empty and stays.
        for attempt in range(100):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=TMP_MARK, suffix="-" + target.name, dir=target.parent)
                break
            except (FileNotFoundError, FileExistsError):  # the latter: mkdir saw it, then it went
                if attempt == 99:
                    raise
        os.close(fd)
        try:
            fill(Path(tmp))
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, local, key):
        self._write(self._path(key), lambda tmp: shutil.copyfile(local, tmp))

    def put_bytes(self, data, key):
        self._write(self._path(key), lambda tmp: tmp.write_bytes(data))

    def get_file(self, key, local):
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(f"{self.uri_for(key)} does not exist")
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f"{local.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, local)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def get_bytes(self, key):
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"{self.uri_for(key)} does not exist") from None

    def read_range_into(self, key, start, length, fd):
        source = self._path(key)
        try:
            src = os.open(source, os.O_RDONLY)
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"{self.uri_for(key)} does not exist") from None
        try:
            def chunks() -> Iterable[bytes]:
                done = 0
                while done < length and (block := os.pread(src, min(RANGE_CHUNK, length - done), start + done)):
                    done += len(block)
                    yield block

            return _write_at(chunks(), fd, start)
        finally:
            os.close(src)

    def list(self, prefix=""):
        folder = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not folder.is_dir():
            return []
        found = []
        for dirpath, _, names in os.walk(folder):
            for name in names:
                if name.startswith(TMP_MARK):
                    continue
                path = Path(dirpath, name)
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    try:
                        found.append(ObjectInfo(key, path.stat().st_size))
                    except FileNotFoundError:  # deleted while listing
                        pass
        return sorted(found, key=lambda o: o.key)

    def delete(self, keys):
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            self._prune(path.parent)

    def _prune(self, folder: Path) -> None:
        """Remove folders the deletes left empty, like S3, where folders do not exist."""
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def exists(self, key):
        return self._path(key).is_file()
