"""One S3 client for data and checkpoints: a MinIO-like endpoint on a host name (not an IP,
not localhost) needs path-style addressing, and datasets read from it as checkpoints do.

The name is mapped to moto_server's 127.0.0.1 in /etc/hosts for the test (removed after);
virtual-hosted addressing would ask DNS for `<bucket>.<name>`, which nothing resolves."""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path

import pytest
from s3_server import make_bucket

from finetune_trainer.data import read_rows
from finetune_trainer.storage.stores import open_store, s3_client

HOSTS = Path("/etc/hosts")


@pytest.fixture
def named_endpoint(moto_server, s3_endpoint, monkeypatch):
    name = f"minio-{uuid.uuid4().hex[:8]}"  # one label: moto would read a dotted name as <bucket>.<host>
    line = f"127.0.0.1 {name}\n"
    try:
        original = HOSTS.read_text()
        HOSTS.write_text(original + ("" if original.endswith("\n") else "\n") + line)
    except OSError as exc:
        pytest.fail(f"cannot map a test host name in {HOSTS} ({exc}); the suite runs as root in CI")
    try:
        assert socket.gethostbyname(name) == "127.0.0.1"
        endpoint = f"http://{name}:{moto_server.port}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.delenv("FINETUNE_S3_ADDRESSING", raising=False)
        yield endpoint
    finally:
        HOSTS.write_text(HOSTS.read_text().replace(line, ""))


def test_data_and_checkpoints_read_through_a_named_minio_endpoint(named_endpoint, moto_server):
    bucket = make_bucket(moto_server.endpoint)
    rows = [{"instruction": "Say hi.", "output": "hi"}, {"instruction": "Say yo.", "output": "yo"}]
    s3_client().put_object(Bucket=bucket, Key="data/train.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    assert list(read_rows(f"s3://{bucket}/data/train.jsonl", field="dataset.train_path")) == rows
    store = open_store(f"s3://{bucket}/team-a/job-1")
    store.put_bytes(b"weights", "checkpoints/checkpoint-1/model.safetensors")
    assert store.get_bytes("checkpoints/checkpoint-1/model.safetensors") == b"weights"


def test_data_and_checkpoints_follow_the_same_addressing_setting(named_endpoint, moto_server, monkeypatch):
    """FINETUNE_S3_ADDRESSING (spec.storage.path_style) decides for both: told "virtual",
    both ask DNS for <bucket>.<host> and fail alike. (A data client of its own, as before,
    ignored the setting: data worked where checkpoints failed, or the other way round.)"""
    from finetune_trainer.data import DataError
    from finetune_trainer.storage.stores import RetryPolicy, StorageError

    bucket = make_bucket(moto_server.endpoint)
    s3_client().put_object(Bucket=bucket, Key="train.jsonl", Body=b'{"instruction": "a", "output": "b"}\n')
    monkeypatch.setenv("FINETUNE_S3_ADDRESSING", "virtual")
    with pytest.raises((ConnectionError, DataError)) as data_failure:
        read_rows(f"s3://{bucket}/train.jsonl", field="dataset.train_path")
    assert "could not download" in str(data_failure.value)
    store = open_store(f"s3://{bucket}/job", retry=RetryPolicy(attempts=1, botocore_attempts=1))
    with pytest.raises(StorageError):
        store.get_bytes("anything")
