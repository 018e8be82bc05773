"""Base models fetched once per job, before anything loads them.

`fetch_model(cfg, environ)` runs in train() on every rank before the tokenizer loads, and says
where from_pretrained reads the model (and a tokenizer kept apart) on this disk:

  builtin:NAME, a local directory, a .gguf file   read where it is (a mounted volume's path is a
                                                  local directory): nothing to fetch
  s3://bucket/prefix/                             ranged GETs, in parallel, into the model cache
  a Hub ID (model.revision: a commit or tag)      huggingface_hub's snapshot, into the model cache;
                                                  with more than one node (and a cache per pod),
                                                  node 0 mirrors it once to <storage>/<ns>/<job>/model/
                                                  and the other nodes fetch it from there

The model cache (FINETUNE_MODEL_CACHE; unset: MODEL_CACHE_DIR in a pod, else
$FINETUNE_CACHE/models, i.e. ~/.cache/finetune-operator/models) holds a folder per source and
requested revision. With a shared cache (FINETUNE_MODEL_CACHE_SHARED=1: a ReadWriteMany claim in
every pod) global rank 0 fills it, else each node's local rank 0 fills its pod's; every other rank
waits for the folder's manifest (torch.distributed is not up yet, so it polls the file). A folder
is filled under a temporary name beside it (`<folder>.<random>`), its manifest (files, sizes,
sha256, the source and the Hub commit) written last, then renamed into place: a process killed
mid-download leaves a temporary folder that nothing reads and the next fetcher deletes. A folder
is reused when its manifest is there and every file has its size; sha256 is checked as the bytes
arrive (against the mirror's manifest when there is one), not at every reuse, which would re-read
a 140 GB model at each pod start. The Hub mirror, like a checkpoint, exists once its manifest does.

HF_HUB_OFFLINE=1: nothing calls the Hub. A Hub model comes from the model cache, the job's mirror
or the Hugging Face cache, or the run fails at once naming the sources to configure instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING

from ..config.rules import model_source_kind
from ..contract import (
    ENV_HF_HUB_OFFLINE,
    ENV_JOB_NAME,
    ENV_MODEL_CACHE,
    ENV_MODEL_CACHE_SHARED,
    MODEL_CACHE_DIR,
    MODEL_KEY,
    MODEL_MANIFEST_FILE,
    WORK_DIR,
    World,
    world,
)
from ..storage.checkpoints import (
    FORMAT_VERSION,
    MANIFEST,
    ChecksumMismatch,
    FileEntry,
    JsonManifest,
    _write_local_manifest,
    hash_files,
    transfer_lanes,
    verify_local,
)
from ..storage.stores import MiB, ObjectNotFound, ObjectStore, StorageError, StorageUnavailable, TransferSettings, open_store
from . import builtin
from .loading import config_error

if TYPE_CHECKING:
    from ..config.schema import FineTuneConfig

log = logging.getLogger(__name__)


class FetchTimeout(StorageUnavailable, TimeoutError):
    """The rank that fetches never finished (its manifest never appeared): the model source is
    unavailable to this rank, retryable like an outage (exit 170)."""


WAIT_SECONDS = 7200.0  # how long a rank waits for the one that fetches (a 140 GB model at 100 MB/s: 25 min)
POLL_SECONDS = 1.0
# What a model folder needs (huggingface_hub's allow_patterns, and the filter on an s3:// listing):
# weights, configs, tokenizer, chat template, and modelling code (model.trust_remote_code).
MODEL_FILES = ("*.safetensors", "*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py")
WEIGHTS = "*.safetensors"
# A tokenizer fetched on its own (model.tokenizer: s3://...): no weights.
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "config.json", "*.jinja",
                   "vocab*", "merges.txt", "*.model", "*.tiktoken")
HUB_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading of HF_HUB_OFFLINE
COMMIT = re.compile(r"[0-9a-f]{40}")
# Hub ID -> folder of its files: huggingface_hub.snapshot_download's signature, a test's stand-in.
Snapshot = Callable[..., str]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ModelManifest(JsonManifest):
    """A fetched model folder's manifest (in the cache, and the Hub mirror's): written last."""

    source: str  # model.base_model (or model.tokenizer) as written
    revision: str | None  # the Hub commit it resolved to; None: not a Hub model
    requested: str | None  # model.revision as written (None: the Hub's default branch)
    files: tuple[FileEntry, ...]
    timestamp: str = field(default_factory=_now)
    format_version: int = FORMAT_VERSION


@dataclass(frozen=True)
class FetchedModel:
    """Where this disk holds the model. `local_dir` None: it is read where it is (builtin, local)."""

    source: str  # model.base_model as written
    local_dir: Path | None = None
    revision: str | None = None  # the Hub commit (Hub models only)
    tokenizer_dir: Path | None = None  # model.tokenizer, fetched (s3:// only)

    def status(self) -> dict[str, str]:
        """status.model: the source as written and, for a Hub model, the commit it resolved to."""
        return {"source": self.source, **({"revision": self.revision} if self.revision else {})}


# ----------------------------------------------------------------------------- pure parts


def cache_root(environ: Mapping[str, str]) -> Path:
    """FINETUNE_MODEL_CACHE; unset: the pods' pod-local default, or beside the built-in models."""
    if value := environ.get(ENV_MODEL_CACHE):
        return Path(value)
    if environ.get(ENV_JOB_NAME) and os.access(WORK_DIR, os.W_OK):
        return Path(MODEL_CACHE_DIR)
    return builtin.cache_root() / "models"


def cache_entry(root: Path, source: str, requested: str | None) -> Path:
    """The cache folder of a source and requested revision: readable, and unique by its hash."""
    digest = hashlib.sha256(f"{source}\n{requested or ''}".encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", source.removeprefix("s3://")).strip("-.")[:80]
    return root / f"{slug}-{digest}"


def part_ranges(size: int, transfer: TransferSettings) -> list[tuple[int, int]]:
    """(start, length) of each ranged GET of a `size`-byte file: as few as fit in range_part_max,
    yet at least range_concurrency when the file has room for parts of multipart_chunksize, so
    one big file is still fetched by every stream; beyond that a multiple of range_concurrency,
    so no last part is left to one stream. Parts are whole MiB but the last."""
    if size <= 0:
        return []
    low, high, streams = transfer.multipart_chunksize, transfer.range_part_max, transfer.range_concurrency
    parts = max(_ceil_div(size, high), min(streams, _ceil_div(size, low)), 1)
    if parts > streams:
        parts = _ceil_div(parts, streams) * streams
    step = _ceil_div(_ceil_div(size, parts), MiB) * MiB
    return [(start, min(step, size - start)) for start in range(0, size, step)]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def hub_offline(environ: Mapping[str, str]) -> bool:
    return environ.get(ENV_HF_HUB_OFFLINE, "").strip().upper() in HUB_TRUE


def fetches(here: World, shared: bool) -> bool:
    """Whether this process fills the cache: global rank 0 of a shared one, else local rank 0."""
    return here.is_main if shared else here.is_local_main


def wanted(key: str, patterns: tuple[str, ...]) -> bool:
    """An object of a model folder worth fetching: at its top, a model file, not bookkeeping."""
    return "/" not in key and key not in (MANIFEST, MODEL_MANIFEST_FILE) and any(fnmatch(key, p) for p in patterns)


def offline_message(name: str, *, searched: str) -> str:
    return (f"{name!r} is a Hugging Face Hub ID and the Hub is off here ({ENV_HF_HUB_OFFLINE}=1), but it is not in "
            f"{searched}; give a source that needs no Hub: upload the model folder and set "
            "model.base_model: s3://bucket/prefix/, or mount a volume holding it (spec.model_volume) and give its "
            "path; or allow the Hub (the chart's hub.offline: false)")


def _mib(size: int) -> float:
    return size / MiB


# ----------------------------------------------------------------------------- the stage


def fetch_model(cfg: FineTuneConfig, environ: Mapping[str, str] | None = None, *, snapshot: Snapshot | None = None,
                wait_seconds: float = WAIT_SECONDS, poll_seconds: float = POLL_SECONDS) -> FetchedModel:
    """The base model (and an s3:// tokenizer) on this disk, fetched by one process per cache.
    `snapshot`: what downloads a Hub model (default huggingface_hub.snapshot_download)."""
    env = os.environ if environ is None else environ
    job = _Fetch(root=cache_root(env), here=world(env), shared=env.get(ENV_MODEL_CACHE_SHARED) == "1",
                 offline=hub_offline(env), storage_uri=cfg.output.storage_uri, snapshot=snapshot or hub_snapshot,
                 wait_seconds=wait_seconds, poll_seconds=poll_seconds)
    model = cfg.model
    kind = model_source_kind(model.base_model)
    fetched = FetchedModel(model.base_model)
    if kind == "s3":
        fetched = replace(fetched, local_dir=job.from_s3(model.base_model, "model.base_model", MODEL_FILES)[0])
    elif kind == "hub":
        entry, manifest = job.from_hub(model.base_model, model.revision)
        fetched = replace(fetched, local_dir=entry, revision=manifest.revision)
    if model.tokenizer and model_source_kind(model.tokenizer) == "s3":
        fetched = replace(fetched, tokenizer_dir=job.from_s3(model.tokenizer, "model.tokenizer", TOKENIZER_FILES)[0])
    return fetched


def recorded_config(cfg: FineTuneConfig, fetched: FetchedModel) -> FineTuneConfig:
    """The config as the run records it (config.yaml, checkpoints, trackers): the source as
    written, and model.revision the commit a Hub model resolved to."""
    if fetched.revision is None or cfg.model.revision == fetched.revision:
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"revision": fetched.revision})})


def loading_config(cfg: FineTuneConfig, fetched: FetchedModel) -> FineTuneConfig:
    """The config the loaders read: base_model (and a fetched tokenizer) point at this disk's
    copy; an unset model.tokenizer follows the model, so it comes from the same files."""
    update: dict[str, str | None] = {}
    if fetched.local_dir is not None:
        update |= {"base_model": str(fetched.local_dir), "revision": None}
    if fetched.tokenizer_dir is not None:
        update["tokenizer"] = str(fetched.tokenizer_dir)
    if not update:
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(update=update)})


def hub_snapshot(repo_id: str, *, revision: str | None, allow_patterns: list[str], local_files_only: bool) -> str:
    """The Hub model's files in the Hugging Face cache (HF_HOME): `.../snapshots/<commit>`."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns, local_files_only=local_files_only)


@dataclass
class _Fetch:
    """One job's fetching, as seen from this process."""

    root: Path
    here: World
    shared: bool
    offline: bool
    storage_uri: str | None
    snapshot: Snapshot
    wait_seconds: float
    poll_seconds: float

    @property
    def who(self) -> str:
        return "global rank 0" if self.shared else "this node's local rank 0"

    @property
    def mirrors(self) -> bool:
        """A Hub model goes through the job's storage: several nodes, each with its own cache."""
        return bool(self.storage_uri) and self.here.nodes > 1 and not self.shared

    # -------------------------------------------------------------- the cache folder

    def cached(self, source: str, requested: str | None, fill: Callable[[Path], ModelManifest]) -> tuple[Path, ModelManifest]:
        """The complete cache folder of `source`: reused, filled by `fill(temporary folder)`
        here, or, off the fetching process, waited for."""
        entry = cache_entry(self.root, source, requested)
        if not fetches(self.here, self.shared):
            return entry, self.wait_for(entry, source)
        manifest, wrong = inspect(entry)
        if manifest is not None:
            log.info("model: reusing cache %s for %s (%d files, %.0f MiB)", entry, source, len(manifest.files),
                     _mib(manifest.total_bytes))
            return entry, manifest
        if entry.exists():
            log.warning("model: %s is incomplete (%s); fetching again", entry, "; ".join(wrong)[:300])
        start = time.monotonic()

        def build(tmp: Path) -> None:
            _write_local_manifest(tmp, fill(tmp), MODEL_MANIFEST_FILE)  # last: the folder is now whole

        builtin.materialise(entry, build, complete=lambda path: complete(path) is not None)
        manifest, wrong = inspect(entry)
        if manifest is None:
            raise StorageError(f"model: {entry} was fetched but does not verify: {'; '.join(wrong)}")
        seconds = max(time.monotonic() - start, 1e-9)
        size = _mib(manifest.total_bytes)
        log.info("model: fetched %s (%d files, %.0f MiB) in %.1f s (%.0f MiB/s) into %s", source, len(manifest.files),
                 size, seconds, size / seconds, entry)
        return entry, manifest

    def wait_for(self, entry: Path, source: str) -> ModelManifest:
        deadline = time.monotonic() + self.wait_seconds
        while (manifest := complete(entry)) is None:
            if time.monotonic() > deadline:
                raise FetchTimeout(
                    f"model: waited {self.wait_seconds:.0f} s for {self.who} to fetch {source} into {entry}, and "
                    f"its {MODEL_MANIFEST_FILE} is still not there; that process's log says why")
            time.sleep(self.poll_seconds)
        return manifest

    # -------------------------------------------------------------- sources

    def from_s3(self, uri: str, path: str, patterns: tuple[str, ...]) -> tuple[Path, ModelManifest]:
        return self.cached(uri, None, lambda tmp: download_folder(_open(uri, path), tmp, source=uri, path=path,
                                                                  patterns=patterns))

    def from_hub(self, repo: str, requested: str | None) -> tuple[Path, ModelManifest]:
        # the job's mirror, for the process that fills this node's cache (no client for the others)
        mirror = None
        if self.mirrors and fetches(self.here, self.shared):
            mirror = _open(f"{self.storage_uri.rstrip('/')}/{MODEL_KEY}", "output.storage_uri")
        entry = cache_entry(self.root, repo, requested)

        def fill(tmp: Path) -> ModelManifest:
            if mirror is not None and (self.here.node_rank != 0 or mirrored(mirror, repo, requested)):
                if self.here.node_rank != 0:
                    self.wait_for_mirror(mirror, repo, requested)
                log.info("model: %s from the job's mirror %s", repo, mirror.uri)
                return download_folder(mirror, tmp, source=repo, path="model.base_model", patterns=MODEL_FILES)
            return self.from_snapshot(tmp, repo, requested, searched=f"the model cache ({entry})"
                                      + (f", the job's mirror ({mirror.uri})" if mirror else ""))

        entry, manifest = self.cached(repo, requested, fill)
        if mirror is not None and self.here.node_rank == 0:
            publish_mirror(mirror, entry, manifest)
        return entry, manifest

    def from_snapshot(self, tmp: Path, repo: str, requested: str | None, *, searched: str) -> ModelManifest:
        """The Hub's files (via the Hugging Face cache), linked into `tmp` where they can be."""
        from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            snap = Path(self.snapshot(repo, revision=requested, allow_patterns=list(MODEL_FILES),
                                      local_files_only=self.offline))
        except LocalEntryNotFoundError:
            if not self.offline:
                raise
            raise config_error("model.base_model", offline_message(repo, searched=f"{searched} or the Hugging Face "
                                                                                   "cache (HF_HOME)")) from None
        except RevisionNotFoundError:
            raise config_error("model.revision", f"{requested!r} is not a commit, tag or branch of {repo!r}") from None
        except (GatedRepoError, RepositoryNotFoundError) as exc:
            raise config_error("model.base_model", f"{repo!r}: {str(exc).splitlines()[0]} (a private or gated model "
                                "needs a token: spec.hf_token_secret)") from None
        files = sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())
        if not any(fnmatch(f, WEIGHTS) for f in files):
            raise config_error("model.base_model", f"{repo!r} has no {WEIGHTS} weights at revision "
                                f"{requested or 'main'}; use a revision (or a copy of the model) in safetensors")
        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(snap / rel, tmp / rel)
        revision = snap.name if COMMIT.fullmatch(snap.name) else requested
        log.info("model: %s at revision %s (commit %s) from the Hugging Face Hub", repo, requested or "main", revision)
        return ModelManifest(source=repo, revision=revision, requested=requested, files=tuple(hash_files(tmp, files)))

    def wait_for_mirror(self, mirror: ObjectStore, repo: str, requested: str | None) -> None:
        deadline = time.monotonic() + self.wait_seconds
        while not mirrored(mirror, repo, requested):
            if time.monotonic() > deadline:
                raise FetchTimeout(f"model: waited {self.wait_seconds:.0f} s for node 0 to mirror {repo} to "
                                   f"{mirror.uri}/, and its {MODEL_MANIFEST_FILE} is still not there; node 0's log says why")
            time.sleep(self.poll_seconds)


# ----------------------------------------------------------------------------- edges


def inspect(entry: Path) -> tuple[ModelManifest | None, list[str]]:
    """(the folder's manifest if the folder is whole, what is wrong with it): whole is a
    readable manifest and every file it lists there with its size."""
    try:
        manifest = ModelManifest.from_json((entry / MODEL_MANIFEST_FILE).read_bytes())
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return None, [f"no readable {MODEL_MANIFEST_FILE} ({type(exc).__name__})"]
    wrong = verify_local(entry, manifest, check_sha256=False)
    return (None if wrong else manifest), wrong


def complete(entry: Path) -> ModelManifest | None:
    return inspect(entry)[0]


def _open(uri: str, path: str) -> ObjectStore:
    try:
        return open_store(uri)
    except ValueError as exc:
        raise config_error(path, str(exc)) from None


def read_manifest(store: ObjectStore) -> ModelManifest | None:
    """The folder's own MODEL_MANIFEST_FILE (a Hub mirror has one), or None."""
    try:
        return ModelManifest.from_json(store.get_bytes(MODEL_MANIFEST_FILE))
    except ObjectNotFound:
        return None
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("model: %s is unreadable (%s); ignored", store.uri_for(MODEL_MANIFEST_FILE), exc)
        return None


def mirrored(mirror: ObjectStore, repo: str, requested: str | None) -> bool:
    """The job's mirror is complete and holds this model at this requested revision."""
    manifest = read_manifest(mirror)
    return manifest is not None and (manifest.source, manifest.requested) == (repo, requested)


def download_folder(store: ObjectStore, dest: Path, *, source: str, path: str, patterns: tuple[str, ...]) -> ModelManifest:
    """A model folder in object storage into `dest`: the files its manifest lists (checked against
    their sha256), or else the `patterns` files its listing shows (sha256 computed here).
    Patterns that include WEIGHTS are a model's: it must hold safetensors (a tokenizer's need
    not); `path`: the config key."""
    try:
        remote = read_manifest(store)
        if remote is not None:
            files, revision, requested = list(remote.files), remote.revision, remote.requested
        else:
            files, skipped = [], []
            for o in store.list():  # one listing, split into what is fetched and what is not
                if wanted(o.key, patterns):
                    files.append(FileEntry(o.key, o.size, ""))
                else:
                    skipped.append(o.key)
            revision = requested = None
            if skipped:
                log.info("model: %d objects of %s skipped (not model files, or in sub-folders): %s", len(skipped),
                         store.uri, ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    except StorageUnavailable:
        raise
    except StorageError as exc:
        raise config_error(path, f"cannot read {source}: {exc}; check the URI and the storage credentials") from None
    if WEIGHTS in patterns and not any(fnmatch(f.path, WEIGHTS) for f in files):
        raise config_error(path, f"{store.uri}/ holds no {WEIGHTS} file at its top ({len(files)} model files); "
                            "point it at a folder that save_pretrained wrote (safetensors, config.json, tokenizer)")
    if not files:
        raise config_error(path, f"{store.uri}/ holds no tokenizer files at its top; point it at a folder that "
                            "the tokenizer's save_pretrained wrote")
    entries = get_files(store, files, dest)
    return ModelManifest(source=source, revision=revision, requested=requested, files=tuple(entries))


def get_files(store: ObjectStore, files: list[FileEntry], dest: Path) -> list[FileEntry]:
    """Every file at once, in ranged GETs (`part_ranges`), `range_concurrency` in flight, each
    written in place at its offset; each file is hashed range by range as its ranges land, so
    hashing overlaps the rest of the download. A file's sha256, when given, must match. Returns
    the files with their sha256."""
    transfer = store.transfer
    order = sorted(files, key=lambda f: -f.size)  # the longest transfer starts first
    fds: dict[str, int] = {}
    try:
        for entry in order:
            target = dest / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            fds[entry.path] = fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(fd, entry.size)
        with ThreadPoolExecutor(transfer.range_concurrency, thread_name_prefix="model-get") as pool, \
                ThreadPoolExecutor(2, thread_name_prefix="model-hash") as hashes:
            parts = {e.path: [(start, length, pool.submit(store.read_range_into, e.path, start, length, fds[e.path]))
                              for start, length in part_ranges(e.size, transfer)] for e in order}
            digests = {e.path: hashes.submit(_hash_as_it_lands, dest / e.path, parts[e.path], store.uri_for(e.path))
                       for e in order}
            try:
                fetched = [FileEntry(e.path, e.size, digests[e.path].result()) for e in files]
            except BaseException:
                for future in [f for ps in parts.values() for *_, f in ps] + list(digests.values()):
                    future.cancel()  # fail fast: the ranges not started are not worth fetching
                raise
    finally:
        for fd in fds.values():
            os.close(fd)
    for want, got in zip(files, fetched):
        if want.sha256 and want.sha256 != got.sha256:
            raise ChecksumMismatch(f"{store.uri_for(want.path)}: sha256 differs from its manifest")
    return fetched


def _hash_as_it_lands(path: Path, parts: list[tuple[int, int, Future[int]]], uri: str) -> str:
    """sha256 of a file whose ranges are being written: each range read back (from the page
    cache) once it is in, in order."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for start, length, part in parts:
            if (got := part.result()) != length:
                raise ChecksumMismatch(f"{uri}: a range of {length} bytes gave {got}; the object changed while it "
                                       "was fetched")
            fh.seek(start)
            while length and (block := fh.read(min(4 * MiB, length))):
                digest.update(block)  # releases the GIL: the other ranges keep landing
                length -= len(block)
    return digest.hexdigest()


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link to the file a Hugging Face cache entry points at (no second copy on the same
    filesystem), or a copy."""
    real = Path(os.path.realpath(source))
    try:
        os.link(real, target)
    except OSError:
        shutil.copyfile(real, target)


def publish_mirror(mirror: ObjectStore, entry: Path, manifest: ModelManifest) -> None:
    """Node 0: the cache folder to the job's mirror, its manifest last (once: a mirror that
    already holds these files is left alone)."""
    current = read_manifest(mirror)
    if current is not None and (current.files, current.source) == (manifest.files, manifest.source):
        if current.requested != manifest.requested:  # the same files, asked for as another revision name:
            mirror.put_bytes(manifest.to_json(), MODEL_MANIFEST_FILE)  # the others wait for this name
        return
    mirror.delete([MODEL_MANIFEST_FILE])  # not complete while it changes
    start = time.monotonic()
    with transfer_lanes(mirror.transfer, "model-up") as lane:
        for future in [lane(f.size).submit(mirror.put_file, entry / f.path, f.path)
                       for f in sorted(manifest.files, key=lambda f: -f.size)]:
            future.result()
    mirror.put_bytes(manifest.to_json(), MODEL_MANIFEST_FILE)  # LAST
    log.info("model: mirrored %s to %s/ for the other nodes (%.0f MiB in %.1f s)", manifest.source, mirror.uri,
             _mib(manifest.total_bytes), time.monotonic() - start)
