"""ObjectStore against a real moto_server over HTTP and against the local filesystem:
the same suite for both (`storage_uri` is parametrized)."""

from __future__ import annotations

import os
import time

import boto3
import pytest

from finetune_trainer.storage import ObjectInfo, ObjectNotFound, RetryPolicy, StorageUnavailable, open_store
from finetune_trainer.storage.stores import TMP_MARK, s3_addressing_style

FAST = RetryPolicy(attempts=2, base_delay=0.05, max_delay=0.1, botocore_attempts=1, connect_timeout=1, read_timeout=5)
MiB = 1024 * 1024


@pytest.fixture
def store(storage_uri):
    return open_store(storage_uri, retry=FAST)


def test_bytes_and_files_round_trip(store, tmp_path):
    store.put_bytes(b"hello", "a/b.txt")
    assert store.get_bytes("a/b.txt") == b"hello"
    assert store.exists("a/b.txt") and not store.exists("a/missing.txt")
    store.put_bytes(b"replaced", "a/b.txt")
    assert store.get_bytes("a/b.txt") == b"replaced"

    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * MiB + 7))
    store.put_file(src, "files/src.bin")
    store.get_file("files/src.bin", tmp_path / "out" / "copy.bin")
    assert (tmp_path / "out" / "copy.bin").read_bytes() == src.read_bytes()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["copy.bin"]  # no temp leftovers


def test_missing_keys_raise_object_not_found(store, tmp_path):
    with pytest.raises(ObjectNotFound, match="nope.txt does not exist"):
        store.get_bytes("nope.txt")
    with pytest.raises(ObjectNotFound):
        store.get_file("nope.txt", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_list_is_a_string_prefix_relative_to_the_root_with_sizes(store):
    for key, size in [("ck/checkpoint-1/a", 1), ("ck/checkpoint-1/sub/b", 2), ("ck/checkpoint-10/a", 3), ("other", 4)]:
        store.put_bytes(b"x" * size, key)
    assert store.list("ck/checkpoint-1/") == [ObjectInfo("ck/checkpoint-1/a", 1), ObjectInfo("ck/checkpoint-1/sub/b", 2)]
    assert [o.key for o in store.list("ck/checkpoint-1")] == ["ck/checkpoint-1/a", "ck/checkpoint-1/sub/b", "ck/checkpoint-10/a"]
    assert sorted(o.key for o in store.list()) == ["ck/checkpoint-1/a", "ck/checkpoint-1/sub/b", "ck/checkpoint-10/a", "other"]
    assert store.list("nothing/") == []


def test_delete_is_idempotent_and_removes_only_the_keys(store):
    store.put_bytes(b"1", "d/one")
    store.put_bytes(b"2", "d/two")
    store.delete(["d/one", "d/never-existed"])
    assert [o.key for o in store.list("d/")] == ["d/two"]
    store.delete([])
    store.delete(["d/two"])
    assert store.list("d/") == []


def test_list_and_delete_past_s3s_1000_keys_per_request(store):
    """A ZeRO-3 checkpoint of a large world has thousands of shard files: listing pages and
    DeleteObjects batches (at most 1,000 keys each on S3) must cover them all."""
    from concurrent.futures import ThreadPoolExecutor

    keys = [f"many/shard-{i:05d}" for i in range(1234)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: store.put_bytes(b"s", k), keys))
    store.put_bytes(b"k", "many-kept")
    assert [o.key for o in store.list("many/")] == keys
    batches: list[int] = []  # keys per DeleteObjects request, as the real client sends them
    client = getattr(store, "client", None)
    if client is not None:  # moto_server accepts any number: watch the requests instead
        client.meta.events.register("before-call.s3.DeleteObjects",
                                    lambda params, **_: batches.append(params["body"].count(b"<Key>")))
    store.delete(keys)
    assert store.list("many/") == [] and store.exists("many-kept")
    if client is not None:
        assert batches == [1000, 234]


def test_store_root_isolates_runs(storage_uri):
    """Two jobs under one bucket/folder never see each other's keys."""
    a = open_store(storage_uri, retry=FAST)
    b = open_store(storage_uri.rstrip("/") + "-other", retry=FAST)
    a.put_bytes(b"a", "k")
    b.put_bytes(b"b", "k")
    assert a.get_bytes("k") == b"a" and b.get_bytes("k") == b"b"
    assert [o.key for o in a.list()] == ["k"]
    assert a.uri_for("checkpoints/x") == storage_uri.rstrip("/") + "/checkpoints/x"


def test_a_20_mb_upload_goes_multipart(s3_bucket, tmp_path):
    store = open_store(f"s3://{s3_bucket}/run", retry=FAST)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(20 * MiB))
    store.put_file(big, "big.bin")
    client = boto3.client("s3")
    head = client.head_object(Bucket=s3_bucket, Key="run/big.bin", PartNumber=1)
    assert head["PartsCount"] == 2  # 16 MiB parts
    assert client.head_object(Bucket=s3_bucket, Key="run/big.bin")["ETag"].strip('"').endswith("-2")
    store.get_file("big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()


def test_file_store_writes_are_atomic_and_temp_files_are_invisible(tmp_path):
    store = open_store((tmp_path / "root").as_uri())
    store.put_bytes(b"done", "c/done")
    (tmp_path / "root" / "c" / f"{TMP_MARK}abc-partial").write_bytes(b"half")  # a writer killed midway
    assert [o.key for o in store.list()] == ["c/done"]
    store.delete(["c/done"])
    assert not (tmp_path / "root" / "c" / "done").exists()


def test_file_store_writes_survive_a_concurrent_delete_pruning_their_folder(tmp_path):
    """Two nodes share a file:// store: one deleting the last object of a folder (the folder
    goes, as on S3) while the other starts a write there must not fail that write (CI saw node 0's
    checkpoint upload fail with ENOENT on its temp file as node 1 deleted the stale manifest)."""
    import threading

    store = open_store((tmp_path / "root").as_uri())
    done, errors = threading.Event(), []

    def prune_forever():
        while not done.is_set():
            store.delete(["c/checkpoint-1/manifest.json"])  # nothing there: only prunes the empty folder

    def write_and_delete(writer):  # two writers: one's mkdir finds the folder the other made, then it goes
        for i in range(1500):
            try:
                store.put_bytes(b"x", f"c/checkpoint-1/w{writer}-{i}")
            except OSError as exc:
                errors.append(exc)
            store.delete([f"c/checkpoint-1/w{writer}-{i}"])  # empty again: the next write races the pruner

    pruner = threading.Thread(target=prune_forever)
    writers = [threading.Thread(target=write_and_delete, args=(w,)) for w in (1, 2)]
    pruner.start()
    try:
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join()
    finally:
        done.set()
        pruner.join()
    assert errors == []


def test_unreachable_s3_raises_storage_unavailable_within_the_budget(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    store = open_store("s3://bucket/run", retry=FAST)
    start = time.monotonic()
    with pytest.raises(StorageUnavailable, match="after 2 attempts"):
        store.put_bytes(b"x", "k")
    assert time.monotonic() - start < 30


def test_missing_bucket_is_a_clear_permanent_error(s3_endpoint):
    store = open_store("s3://no-such-bucket-here/run", retry=FAST)
    with pytest.raises(Exception, match="NoSuchBucket") as info:
        store.put_bytes(b"x", "k")
    assert not isinstance(info.value, StorageUnavailable)


@pytest.mark.parametrize(
    "uri, message",
    [
        ("gs://bucket/x", "unsupported storage URI 'gs://bucket/x'"),
        ("s3:///prefix", "has no bucket"),
        ("file://relative/path", "three slashes"),
        ("/abs/path", "unsupported storage URI"),
    ],
)
def test_bad_uris_name_the_field(uri, message):
    with pytest.raises(ValueError, match=message) as info:
        open_store(uri)
    assert "output.storage_uri" in str(info.value)


@pytest.mark.parametrize(
    "env, style",
    [
        ({}, "auto"),
        ({"AWS_ENDPOINT_URL": "http://minio:9000"}, "path"),
        ({"AWS_ENDPOINT_URL_S3": "http://ceph"}, "path"),
        ({"AWS_ENDPOINT_URL": "https://r2", "FINETUNE_S3_ADDRESSING": "virtual"}, "virtual"),
        ({"FINETUNE_S3_ADDRESSING": "PATH"}, "path"),
    ],
)
def test_addressing_style(env, style):
    assert s3_addressing_style(env) == style


def test_bad_addressing_style_is_named():
    with pytest.raises(ValueError, match="FINETUNE_S3_ADDRESSING='sideways'"):
        s3_addressing_style({"FINETUNE_S3_ADDRESSING": "sideways"})
