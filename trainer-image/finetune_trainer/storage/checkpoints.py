"""Checkpoints in object storage: a checkpoint exists only once its manifest does.

Layout under the run's store (`<storage_uri>`):

    checkpoints/checkpoint-<step>/<files as the trainer saved them>
    checkpoints/checkpoint-<step>/parts/<node-rank>.json   multi-node only: what each node uploaded
    checkpoints/checkpoint-<step>/manifest.json            written LAST: files, sizes, sha256, step, epoch
    metrics.jsonl, final/...                               run artifacts (upload_file_artifact)

Multi-node: each node's local rank 0 uploads the files its node wrote and then its part list;
global rank 0 (node 0) waits until every node's part list for the same `attempt` is there, merges
them and writes the manifest. A node whose uploader dropped a checkpoint for a newer save (it
keeps only the newest pending) writes a part saying so (`skipped`): node 0 stops waiting for it
and leaves that checkpoint incomplete. A kill at any moment leaves no manifest, so nothing
half-written is ever resumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .stores import ObjectNotFound, ObjectStore, StorageError, StorageUnavailable, TransferSettings, join_key

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
PARTS = "parts"
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
_CHECKPOINT_KEY = re.compile(rf"^{CHECKPOINTS}/checkpoint-(\d+)/(.+)$")


class ChecksumMismatch(StorageError):
    """A downloaded file's sha256 or size differs from its manifest."""


class CheckpointSkipped(StorageError):
    """Another node never uploaded its files of this checkpoint (a newer save superseded it
    there before its upload began): it cannot be completed, and nothing is lost by that."""


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the checkpoint folder, with `/`
    size: int
    sha256: str


class JsonManifest:
    """JSON in and out for the manifest dataclasses (a checkpoint's here, a fetched model's in
    model/fetch.py): `files` are FileEntry, `format_version` must be this trainer's."""

    files: tuple[FileEntry, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, data: bytes | str):
        raw = json.loads(data)
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"manifest format_version {raw.get('format_version')!r}; this trainer reads {FORMAT_VERSION}")
        files = tuple(FileEntry(**f) for f in raw.pop("files"))
        return cls(files=files, **raw)


@dataclass(frozen=True)
class Manifest(JsonManifest):
    step: int
    epoch: float | None
    files: tuple[FileEntry, ...]
    timestamp: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    format_version: int = FORMAT_VERSION
    nodes: int = 1
    config: dict | None = None  # the run's resolved config: a checkpoint says what made it

    @property
    def prefix(self) -> str:
        return checkpoint_prefix(self.step)

    @property
    def name(self) -> str:
        return f"checkpoint-{self.step}"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step of a checkpoint folder (`.../checkpoint-<step>`)."""
    return int(Path(path).name.rsplit("-", 1)[-1])


def checkpoint_prefix(step: int) -> str:
    return f"{CHECKPOINTS}/checkpoint-{step}"


def sha256_file(path: Path, chunk: int = 4 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)  # releases the GIL: hashing overlaps uploads in other threads
    return digest.hexdigest()


def local_files(local_dir: Path, *, manifest: str = MANIFEST) -> list[str]:
    """Every file of a checkpoint folder, relative and sorted, minus our own bookkeeping."""
    found = []
    for dirpath, _, names in os.walk(local_dir):
        for name in names:
            rel = Path(dirpath, name).relative_to(local_dir).as_posix()
            if rel != manifest and not rel.startswith(PARTS + "/"):
                found.append(rel)
    return sorted(found)


def hash_files(local_dir: Path, rel_paths: list[str]) -> list[FileEntry]:
    """FileEntry (size, sha256) of each file, two hashed at a time (hashing releases the GIL)."""
    def entry(rel: str) -> FileEntry:
        return FileEntry(rel, (local_dir / rel).stat().st_size, sha256_file(local_dir / rel))

    with ThreadPoolExecutor(2, thread_name_prefix="hash") as pool:
        return list(pool.map(entry, rel_paths))


def _write_local_manifest(local_dir: Path, manifest: JsonManifest, name: str = MANIFEST) -> None:
    """The manifest into `local_dir` under `name`, whole or not at all (a rename)."""
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=local_dir)
    with os.fdopen(fd, "wb") as fh:
        fh.write(manifest.to_json())
    os.replace(tmp, local_dir / name)


# ---------------------------------------------------------------- upload


@contextlib.contextmanager
def transfer_lanes(transfer: TransferSettings, name: str) -> Iterator[Callable[[int], ThreadPoolExecutor]]:
    """Two lanes of transfers: files big enough for multipart go one after another (the
    transfer manager already keeps `max_concurrency` parts of each in flight; more streams
    only contend: 4 big files at once uploaded 89 MB/s where one at a time did 106 MB/s,
    benchmarks/checkpoint_io.py), small files `file_concurrency` at a time beside them.
    Yields `lane(size) -> executor`."""
    with ThreadPoolExecutor(1, thread_name_prefix=f"{name}-big") as big, ThreadPoolExecutor(
        max(1, transfer.file_concurrency), thread_name_prefix=f"{name}-small"
    ) as small:
        yield lambda size: big if size >= transfer.multipart_threshold else small


def _upload_files(store: ObjectStore, local_dir: Path, step: int, rel_paths: list[str]) -> list[FileEntry]:
    """Upload and hash every file, in parallel: the transfer manager splits big files into
    concurrent parts, small files travel beside them, and hashing runs beside both."""
    prefix = checkpoint_prefix(step)
    with transfer_lanes(store.transfer, "ckpt-up") as lane, ThreadPoolExecutor(2, thread_name_prefix="ckpt-hash") as hashes:
        # largest first, so the long transfer starts at once and small files fill the gaps
        size = {r: (local_dir / r).stat().st_size for r in rel_paths}
        order = sorted(rel_paths, key=lambda r: -size[r])
        put = {r: lane(size[r]).submit(store.put_file, local_dir / r, join_key(prefix, r)) for r in order}
        digest = {r: hashes.submit(sha256_file, local_dir / r) for r in order}
        try:
            entries = [FileEntry(r, size[r], digest[r].result()) for r in rel_paths]
            for future in put.values():
                future.result()
        except BaseException:
            for future in [*put.values(), *digest.values()]:
                future.cancel()  # fail fast: the files not started yet are not worth sending
            raise
    return entries


def upload_checkpoint(
    store: ObjectStore,
    local_dir: str | os.PathLike,
    step: int,
    epoch: float | None,
    *,
    files: list[str] | None = None,
    node_rank: int = 0,
    num_nodes: int = 1,
    attempt: str = "",
    parts_timeout: float = 1800.0,
    poll_interval: float = 1.0,
    config: dict | None = None,
) -> Manifest | None:
    """Upload `local_dir` as checkpoint `step`, manifest last. Returns the manifest, or None
    on nodes other than node 0 (they only upload their files and their part list).

    `files`: relative paths to upload (default: everything in `local_dir`). `attempt`: one
    token shared by all nodes for this save (stale part lists of a killed earlier attempt at
    the same step are ignored). `parts_timeout`: how long node 0 waits for the other nodes.
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():  # an empty part list would make a "complete" checkpoint lacking this node's files
        raise FileNotFoundError(f"checkpoint folder {local_dir} does not exist")
    rel_paths = sorted(files) if files is not None else local_files(local_dir)
    prefix = checkpoint_prefix(step)
    # re-saving a step (resume, preemption): it stops being complete before any file changes;
    # every node does this, whoever starts first, and only node 0 writes the manifest again
    store.delete([join_key(prefix, MANIFEST)])
    entries = _upload_files(store, local_dir, step, rel_paths)
    if num_nodes > 1:
        part = {"node_rank": node_rank, "attempt": attempt, "files": [asdict(e) for e in entries]}
        store.put_bytes(json.dumps(part).encode(), join_key(prefix, PARTS, f"{node_rank}.json"))
        if node_rank != 0:
            return None
        entries = _gather_parts(store, step, num_nodes, attempt, parts_timeout, poll_interval)
    manifest = Manifest(step=step, epoch=epoch, files=tuple(entries), nodes=num_nodes, config=config)
    _write_local_manifest(local_dir, manifest)  # this folder is now a verified local candidate
    store.put_bytes(manifest.to_json(), join_key(prefix, MANIFEST))  # LAST
    log.info("checkpoint %s complete: %d files, %.1f MB", store.uri_for(prefix), len(entries), manifest.total_bytes / 1e6)
    return manifest


def report_skipped(store: ObjectStore, step: int, *, node_rank: int, attempt: str) -> None:
    """A node other than 0 says it will never upload its files of checkpoint `step`."""
    part = {"node_rank": node_rank, "attempt": attempt, "skipped": True, "files": []}
    store.put_bytes(json.dumps(part).encode(), join_key(checkpoint_prefix(step), PARTS, f"{node_rank}.json"))


def write_local_manifest(local_dir: str | os.PathLike, step: int, epoch: float | None, *,
                         config: dict | None = None) -> Manifest:
    """A run without object storage: the same manifest (files, sizes, sha256, the config),
    on the checkpoint folder only, so "complete" means the same thing with or without storage."""
    local_dir = Path(local_dir)
    entries = hash_files(local_dir, local_files(local_dir))
    manifest = Manifest(step=step, epoch=epoch, files=tuple(entries), config=config)
    _write_local_manifest(local_dir, manifest)
    return manifest


def _gather_parts(store: ObjectStore, step: int, num_nodes: int, attempt: str, timeout: float, poll: float) -> list[FileEntry]:
    """Node 0: wait for every node's part list of this attempt, then merge them."""
    parts_prefix = join_key(checkpoint_prefix(step), PARTS) + "/"
    deadline = time.monotonic() + timeout
    while True:
        parts = {}
        for info in store.list(parts_prefix):
            raw = json.loads(store.get_bytes(info.key))
            if raw.get("attempt") == attempt:
                parts[int(raw["node_rank"])] = raw
        if skipped := sorted(rank for rank, part in parts.items() if part.get("skipped")):
            raise CheckpointSkipped(f"checkpoint-{step}: node(s) {skipped} skipped it for a newer save; "
                                    "it stays incomplete (retention removes its files)")
        missing = sorted(set(range(num_nodes)) - set(parts))
        if not missing:
            break
        if time.monotonic() > deadline:
            raise StorageError(
                f"checkpoint-{step}: nodes {missing} did not report their files within {timeout:.0f}s; no manifest written"
            )
        time.sleep(poll)
    merged: dict[str, FileEntry] = {}
    for rank in sorted(parts):
        for entry in (FileEntry(**f) for f in parts[rank]["files"]):
            if entry.path in merged and merged[entry.path] != entry:
                raise StorageError(f"checkpoint-{step}: nodes wrote different contents to {entry.path}")
            merged[entry.path] = entry
    return sorted(merged.values(), key=lambda e: e.path)


def upload_file_artifact(store: ObjectStore, local: str | os.PathLike, key: str) -> list[str]:
    """`metrics.jsonl` (a file, replaced on each call) or `final/` (a folder: its files, then
    a manifest last, so a reader of `final/manifest.json` knows the folder is whole)."""
    local = Path(local)
    if local.is_file():
        store.put_file(local, key)
        return [key]
    if not local.is_dir():
        raise FileNotFoundError(f"artifact {local} does not exist")
    rel_paths = local_files(local)
    entries = []
    for rel in rel_paths:
        store.put_file(local / rel, join_key(key, rel))
        entries.append({"path": rel, "size": (local / rel).stat().st_size, "sha256": sha256_file(local / rel)})
    manifest = {"format_version": FORMAT_VERSION, "files": entries,
                "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    store.put_bytes(json.dumps(manifest, indent=1).encode(), join_key(key, MANIFEST))
    return [join_key(key, r) for r in rel_paths] + [join_key(key, MANIFEST)]


# ---------------------------------------------------------------- listing


@dataclass
class RemoteCheckpoint:
    step: int
    objects: dict[str, int]  # relative path -> size, as listed

    @property
    def complete(self) -> bool:
        return MANIFEST in self.objects


def list_checkpoints(store: ObjectStore) -> dict[int, RemoteCheckpoint]:
    """Every checkpoint folder in the store, complete or not, from one listing."""
    found: dict[int, RemoteCheckpoint] = {}
    for info in store.list(CHECKPOINTS + "/"):
        if m := _CHECKPOINT_KEY.match(info.key):
            step = int(m.group(1))
            found.setdefault(step, RemoteCheckpoint(step, {})).objects[m.group(2)] = info.size
    return found


def _read_manifest(store: ObjectStore, step: int) -> Manifest | None:
    try:
        manifest = Manifest.from_json(store.get_bytes(join_key(checkpoint_prefix(step), MANIFEST)))
    except ObjectNotFound:
        return None
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("checkpoint-%d: unreadable manifest (%s); treated as incomplete", step, exc)
        return None
    if manifest.step != step:
        log.warning("checkpoint-%d: manifest names step %d; treated as incomplete", step, manifest.step)
        return None
    return manifest


def list_complete(store: ObjectStore) -> list[Manifest]:
    """Checkpoints with a readable manifest, newest first."""
    steps = sorted((c.step for c in list_checkpoints(store).values() if c.complete), reverse=True)
    return [m for s in steps if (m := _read_manifest(store, s)) is not None]


def verify(store: ObjectStore, manifest: Manifest, *, listing: dict[int, RemoteCheckpoint] | None = None) -> list[str]:
    """Problems visible from a listing: missing files, wrong sizes. (sha256 is checked while
    downloading, where the bytes pass by anyway.)"""
    listing = listing if listing is not None else list_checkpoints(store)
    objects = listing.get(manifest.step, RemoteCheckpoint(manifest.step, {})).objects
    problems = []
    for entry in manifest.files:
        if entry.path not in objects:
            problems.append(f"{entry.path}: missing")
        elif objects[entry.path] != entry.size:
            problems.append(f"{entry.path}: {objects[entry.path]} bytes, manifest says {entry.size}")
    return problems


def verify_local(local_dir: Path, manifest: JsonManifest, *, check_sha256: bool = True) -> list[str]:
    problems = []
    for entry in manifest.files:
        path = local_dir / entry.path
        if not path.is_file():
            problems.append(f"{entry.path}: missing")
        elif path.stat().st_size != entry.size:
            problems.append(f"{entry.path}: {path.stat().st_size} bytes, manifest says {entry.size}")
        elif check_sha256 and sha256_file(path) != entry.sha256:
            problems.append(f"{entry.path}: sha256 differs from the manifest")
    return problems


# ---------------------------------------------------------------- download and resume


def download_checkpoint(store: ObjectStore, manifest: Manifest, local_dir: str | os.PathLike) -> Path:
    """Download into a temporary sibling of `local_dir`, check every sha256, write the
    manifest, then rename into place: `local_dir` is whole or absent (or as it was)."""
    target = Path(local_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.download-", dir=target.parent))
    try:
        def fetch(entry: FileEntry) -> None:
            dest = tmp / entry.path
            store.get_file(join_key(manifest.prefix, entry.path), dest)
            size = dest.stat().st_size
            if size != entry.size or sha256_file(dest) != entry.sha256:
                raise ChecksumMismatch(f"{store.uri_for(join_key(manifest.prefix, entry.path))}: "
                                       f"content differs from its manifest (size {size}, manifest {entry.size})")

        with transfer_lanes(store.transfer, "ckpt-down") as lane:
            for future in [lane(e.size).submit(fetch, e) for e in sorted(manifest.files, key=lambda e: -e.size)]:
                future.result()
        _write_local_manifest(tmp, manifest)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _local_manifests(local_root: Path) -> list[tuple[Manifest, Path]]:
    found = []
    for path in local_root.glob("checkpoint-*"):
        m = CHECKPOINT_DIR.match(path.name)
        if not (m and (path / MANIFEST).is_file()):
            continue
        try:
            manifest = Manifest.from_json((path / MANIFEST).read_bytes())
        except (ValueError, TypeError, KeyError):
            continue
        if manifest.step == int(m.group(1)):
            found.append((manifest, path))
    return found


def find_resume_checkpoint(store: ObjectStore | None, local_dir_root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint that verifies, as a local folder ready for
    `resume_from_checkpoint`, or None to start fresh.

    Candidates are the store's complete checkpoints and the local `checkpoint-*` folders with
    our manifest, newest step first (the store first on a tie). A local folder that already
    matches the store's manifest is reused without downloading. One that fails verification
    is skipped with a warning. If the store is unreachable, local candidates still count.
    """
    local_root = Path(local_dir_root)
    remote: list[Manifest] = []
    listing: dict[int, RemoteCheckpoint] = {}
    if store is not None:
        try:
            listing = list_checkpoints(store)
            remote = list_complete(store)
        except StorageUnavailable as exc:
            log.warning("cannot reach %s to look for checkpoints (%s); trying local ones only", store.uri, exc)
    local = _local_manifests(local_root) if local_root.is_dir() else []
    candidates = [(m.step, 1, m, None) for m in remote] + [(m.step, 0, m, p) for m, p in local]
    reachable = True
    for _, _, manifest, path in sorted(candidates, key=lambda c: (c[0], c[1]), reverse=True):
        where = path if path is not None else store.uri_for(manifest.prefix)
        if path is None:  # remote
            if not reachable:
                continue
            target = local_root / manifest.name
            if (target / MANIFEST).is_file() and _same_files(target, manifest) and not verify_local(target, manifest):
                log.info("resuming from %s (local copy matches %s)", target, where)
                return target
            if problems := verify(store, manifest, listing=listing):
                log.warning("skipping %s: %s", where, "; ".join(problems))
                continue
            try:
                path = download_checkpoint(store, manifest, target)
            except (ChecksumMismatch, ObjectNotFound) as exc:
                log.warning("skipping %s: %s", where, exc)
                continue
            except StorageUnavailable as exc:
                log.warning("cannot download %s (%s); trying local checkpoints only", where, exc)
                reachable = False
                continue
            log.info("resuming from %s (downloaded from %s)", path, where)
            return path
        if problems := verify_local(path, manifest):
            log.warning("skipping %s: %s", where, "; ".join(problems))
            continue
        log.info("resuming from local %s", path)
        return path
    return None


def _same_files(local_dir: Path, manifest: Manifest) -> bool:
    try:
        return Manifest.from_json((local_dir / MANIFEST).read_bytes()).files == manifest.files
    except (OSError, ValueError, TypeError, KeyError):
        return False


# ---------------------------------------------------------------- retention


def retention_plan(checkpoints: dict[int, RemoteCheckpoint], limit: int | None) -> list[int]:
    """Steps to delete: complete ones beyond the newest `limit` (the newest complete one is
    always kept), and incomplete ones older than the newest complete one (leftovers of killed
    uploads; newer incomplete ones may still be uploading)."""
    complete = sorted((s for s, c in checkpoints.items() if c.complete), reverse=True)
    if not complete:
        return []
    keep = set(complete[: max(1, limit)]) if limit is not None else set(complete)
    stale = [s for s, c in checkpoints.items() if not c.complete and s < complete[0]]
    return sorted([s for s in complete if s not in keep] + stale)


def apply_retention(store: ObjectStore, limit: int | None) -> list[int]:
    """Delete what `retention_plan` says; returns the deleted steps. The manifest goes first,
    so a half-deleted checkpoint is merely incomplete, never resumed."""
    checkpoints = list_checkpoints(store)
    doomed = retention_plan(checkpoints, limit)
    for step in doomed:
        prefix = checkpoint_prefix(step)
        rest = [join_key(prefix, rel) for rel in checkpoints[step].objects if rel != MANIFEST]
        if checkpoints[step].complete:
            store.delete([join_key(prefix, MANIFEST)])
        store.delete(rest)
        log.info("retention: deleted %s", store.uri_for(prefix))
    return doomed
