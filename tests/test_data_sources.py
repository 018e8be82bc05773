"""Where rows come from: local JSON/JSONL, s3:// through a real moto_server on loopback, and
Hugging Face `datasets` (a local dataset folder; the hub is off in tests)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune_trainer.config.schema import FineTuneConfig
from finetune_trainer.data import DataError, prepare_data, read_rows

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
MOTO_SERVER = Path(sys.executable).parent / "moto_server"


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_jsonl_row_numbers_are_line_numbers():
    rows = read_rows(str(FIXTURES / "alpaca.jsonl"), field="dataset.train_path")
    assert rows == rows_of(FIXTURES / "alpaca.jsonl")
    assert rows.row_numbers == [1, 2, 4]  # line 3 is blank


def test_json_list_and_json_lines_saved_as_json(tmp_path):
    rows = read_rows(str(FIXTURES / "sharegpt.json"), field="dataset.train_path")
    assert len(rows) == 3 and rows.row_numbers == [1, 2, 3]
    lines = tmp_path / "lines.json"
    lines.write_text('{"a": 1}\n{"a": 2}\n')
    assert read_rows(str(lines), field="dataset.train_path") == [{"a": 1}, {"a": 2}]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("bad_line.jsonl", r"bad_line\.jsonl row 2: not valid JSON \(Expecting ',' delimiter at column 52\)"),
    ],
)
def test_malformed_files(name, message):
    with pytest.raises(DataError, match=message):
        read_rows(str(FIXTURES / name), field="dataset.train_path")


def test_one_json_object_is_one_row():
    rows = read_rows(str(FIXTURES / "not_a_list.json"), field="dataset.train_path")
    assert len(rows) == 1 and list(rows[0]) == ["rows"]


ROWS = [{"instruction": "Say hi.", "output": "hi"}, {"instruction": "Say yo, ünïcode.", "output": "yo"}]


@pytest.mark.parametrize("name", ["bom.jsonl", "bom.json", "data.jsonl.gz", "data.json.gz", "data.parquet", "data.csv",
                                  "DATA.JSONL.GZ"])
def test_every_file_kind_reads_the_same_rows(tmp_path, name):
    """A UTF-8 byte-order mark (Windows editors), gzip (Open-Assistant's exports), parquet
    and csv (what `datasets` and spreadsheets write) all give the same rows."""
    import gzip

    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    path = tmp_path / name
    jsonl = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS)
    lower = name.lower()
    if lower.startswith("bom"):
        body = jsonl if lower.endswith(".jsonl") else json.dumps(ROWS, ensure_ascii=False)
        path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    elif lower.endswith(".gz"):
        body = jsonl if ".jsonl" in lower else json.dumps(ROWS)
        path.write_bytes(gzip.compress(body.encode()))
    elif lower.endswith(".parquet"):
        pyarrow.parquet.write_table(pa.Table.from_pylist(ROWS), path)
    else:
        pyarrow.csv.write_csv(pa.Table.from_pylist(ROWS), path)
    rows = read_rows(str(path), field="dataset.train_path")
    assert list(rows) == ROWS and rows.row_numbers == [1, 2]


def test_a_corrupt_gzip_names_the_file(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"x\.jsonl\.gz: not a readable gzip file"):
        read_rows(str(path), field="dataset.train_path")


def test_broken_json_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"a": 1},\n  {"a": }\n]\n')
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON \(Expecting value at line 3 column 9\)"):
        read_rows(str(path), field="dataset.train_path")


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("", ".jsonl", r"dataset\.train_path: .*empty\.jsonl has no rows"),
        ("a,b\n1,2\n", ".txt", r"dataset\.train_path: .*empty\.txt is a '\.txt' file; local data must be \.json"),
    ],
)
def test_empty_or_unsupported_files(tmp_path, content, suffix, message):
    path = tmp_path / f"empty{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_rows(str(path), field="dataset.train_path")


@pytest.mark.parametrize("location", ["data/train.json", "./train", "/nowhere/train.jsonl"])
def test_missing_local_file_names_field_and_path(location):
    with pytest.raises(DataError) as caught:
        read_rows(location, field="dataset.eval_path")
    assert str(caught.value).startswith(f"dataset.eval_path: file not found: {location} (relative paths are read from")


# --- Hugging Face datasets --------------------------------------------------------------------


def test_hf_dataset_folder_and_split(tmp_path):
    folder = tmp_path / "demo-dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text((FIXTURES / "alpaca.jsonl").read_text())
    (folder / "test.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    train = read_rows(str(folder), field="dataset.train_path")
    columns = {"instruction": None, "input": None, "output": None, "system": None}  # datasets fills absent keys with None
    assert train == [{**columns, **row} for row in rows_of(FIXTURES / "alpaca.jsonl")]
    assert train.source == f"{folder}:train"
    assert read_rows(f"{folder}:test", field="dataset.eval_path") == [{**columns, "instruction": "x", "output": "y"}]
    with pytest.raises(DataError, match=r"^dataset\.eval_path: .* could not be loaded as a Hugging Face dataset \(split 'validation'\)"):
        read_rows(f"{folder}:validation", field="dataset.eval_path")


def test_hf_hub_id_unreachable_is_a_retryable_error():
    """The hub is off in tests (HF_HUB_OFFLINE): the real code path, failing as it would when the hub is down."""
    with pytest.raises(ConnectionError, match=r"^dataset\.train_path: could not reach the Hugging Face Hub for dataset 'someone/some-data'"):
        read_rows("someone/some-data:train", field="dataset.train_path")


# --- s3:// through moto_server ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    port = free_port()
    server = subprocess.Popen(
        [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def bucket(s3_endpoint, monkeypatch):
    import boto3

    for key, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="datasets")
    for name in ("alpaca.jsonl", "alpaca_bad.jsonl", "sharegpt.json"):
        client.upload_file(str(FIXTURES / name), "datasets", f"fixtures/{name}")
    return client


def test_s3_object_reads_like_the_local_file(bucket):
    rows = read_rows("s3://datasets/fixtures/alpaca.jsonl", field="dataset.train_path")
    assert rows == rows_of(FIXTURES / "alpaca.jsonl") and rows.row_numbers == [1, 2, 4]
    assert rows.source == "s3://datasets/fixtures/alpaca.jsonl"
    assert len(read_rows("s3://datasets/fixtures/sharegpt.json", field="dataset.train_path")) == 3


def test_s3_bad_row_names_the_uri(bucket, builtin_tokenizer_dir):
    from transformers import AutoTokenizer

    cfg = FineTuneConfig(model={"base_model": "x"}, dataset={"train_path": "s3://datasets/fixtures/alpaca_bad.jsonl"})
    with pytest.raises(DataError, match=r"^s3://datasets/fixtures/alpaca_bad\.jsonl row 3: missing field 'output'"):
        prepare_data(cfg, AutoTokenizer.from_pretrained(builtin_tokenizer_dir))


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://datasets/fixtures/nope.jsonl", r"dataset\.train_path: s3://datasets/fixtures/nope\.jsonl does not exist"),
        ("s3://no-such-bucket/x.jsonl", r"dataset\.train_path: s3://no-such-bucket/x\.jsonl does not exist"),
        ("s3://datasets/fixtures/", r"must name one object"),
        ("s3://datasets/fixtures/data.txt", r"must be a \.json .*\.parquet or \.csv object"),
    ],
)
def test_s3_errors(bucket, uri, message):
    with pytest.raises(DataError, match=message):
        read_rows(uri, field="dataset.train_path")
