"""Where rows come from: local JSON/JSONL files, s3:// objects, Hugging Face datasets.

`read_rows` decides by the string alone:
1. `s3://bucket/key.jsonl` -> downloaded to a temp file with the checkpoints' S3 client
   (storage/stores.py `s3_client`: endpoint, region, path-style addressing, retries), then
   read as a file.
2. An existing file -> `.jsonl` (one object per line; row numbers are line numbers, blank
   lines skipped) or `.json` (a list of objects, or one object: one row; JSON Lines in a
   .json file are accepted), either gzipped (`.jsonl.gz`, as Open-Assistant ships its
   exports), with or without a UTF-8 byte-order mark; `.parquet` and `.csv` (read with
   pyarrow, which `datasets` uses underneath; row numbers count data rows from 1).
3. An existing directory, or `DIR:split` -> `datasets.load_dataset(DIR, split=...)`.
4. Something that looks like a file path (ends in .json/.jsonl, starts with / ./ ../ ~)
   but is not there -> `DataError` naming the config field.
5. Anything else is a Hugging Face dataset ID: `org/name` (split "train") or
   `org/name:split` (e.g. `tatsu-lab/alpaca:train[:1000]`).
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from ..contract import PATH_PREFIXES
from .errors import DataError

JSON_SUFFIXES = (".json", ".jsonl")
TABLE_SUFFIXES = (".parquet", ".csv")
FILE_SUFFIXES = (*JSON_SUFFIXES, *(s + ".gz" for s in JSON_SUFFIXES), *TABLE_SUFFIXES)
FILE_KINDS = ".json (a list of rows), .jsonl (one row per line), either gzipped (.gz), .parquet or .csv"


class Rows(list):
    """A list of rows that remembers its source and the 1-based row numbers users see."""

    def __init__(self, rows: Iterable[Any], *, source: str, row_numbers: list[int] | None = None):
        super().__init__(rows)
        self.source = source
        self.row_numbers = row_numbers if row_numbers is not None else list(range(1, len(self) + 1))


def read_rows(path_or_uri: str, *, field: str) -> Rows:
    """All rows of one dataset location; `field` (e.g. "dataset.train_path") names the
    config key in messages."""
    rows = _read_any(path_or_uri, field)
    if not rows:
        raise DataError(f"{field}: {path_or_uri} has no rows")
    return rows


def is_hub_dataset(location: str) -> bool:
    """A Hugging Face dataset ID (what `read_rows` would download), by the string alone."""
    if location.startswith("s3://"):
        return False
    name, _, split = location.partition(":")
    path = Path(location).expanduser()
    if path.exists() or (split and Path(name).expanduser().is_dir()):
        return False
    return not (location.endswith(FILE_SUFFIXES) or location.startswith(PATH_PREFIXES))


def _read_any(location: str, field: str) -> Rows:
    if location.startswith("s3://"):
        return read_s3(location, field=field)
    path = Path(location).expanduser()
    if path.is_file():
        return read_file(path, source=location, field=field)
    if path.is_dir():
        return read_hf(location, "train", field=field)
    name, _, split = location.partition(":")
    if split and Path(name).expanduser().is_dir():
        return read_hf(name, split, field=field)
    if location.endswith(FILE_SUFFIXES) or location.startswith(PATH_PREFIXES):
        raise DataError(
            f"{field}: file not found: {location} (relative paths are read from {os.getcwd()}); "
            "fix the path, or give an s3:// URI or a Hugging Face dataset ID"
        )
    return read_hf(name, split or "train", field=field)


# --- local files ----------------------------------------------------------------------------


def data_suffix(name: str) -> str:
    """'.jsonl' for 'x.jsonl' and 'x.jsonl.gz'; '' when the name is none of FILE_SUFFIXES."""
    lower = name.lower()
    return next((s.removesuffix(".gz") for s in sorted(FILE_SUFFIXES, key=len, reverse=True) if lower.endswith(s)), "")


def read_file(path: Path, *, source: str, field: str) -> Rows:
    suffix = data_suffix(path.name)
    if not suffix:
        raise DataError(f"{field}: {source} is a '{path.suffix or 'suffix-less'}' file; local data must be {FILE_KINDS}")
    if suffix in TABLE_SUFFIXES:
        return read_table(path, suffix, source=source)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.lower().endswith(".gz") else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"{source}: not a readable gzip file ({exc})") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is not data
    except UnicodeDecodeError as exc:
        raise DataError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the file as UTF-8") from None
    return parse_jsonl(text, source=source) if suffix == ".jsonl" else parse_json(text, source=source)


def read_table(path: Path, suffix: str, *, source: str) -> Rows:
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path) if suffix == ".parquet" else pyarrow.csv.read_csv(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{source}: cannot read it as {suffix[1:]} ({exc})") from None
    return Rows(table.to_pylist(), source=source)


def parse_jsonl(text: str, *, source: str) -> Rows:
    rows, numbers = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{source} row {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        numbers.append(number)
    return Rows(rows, source=source, row_numbers=numbers)


def parse_json(text: str, *, source: str) -> Rows:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved as .json, as `datasets` writes them
            return parse_jsonl(text, source=source)
        raise DataError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if isinstance(data, dict):  # one row: a single conversation saved on its own
        return Rows([data], source=source)
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON list of rows, one JSON object, or one object per line in a "
                        f".jsonl file; got {type(data).__name__}")
    return Rows(data, source=source)


# --- object storage -------------------------------------------------------------------------


def split_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def read_s3(uri: str, *, field: str) -> Rows:
    """Download, then read like a local file; the URI stays the name in messages."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    from ..storage.stores import s3_client

    bucket, key = split_s3_uri(uri)
    if not bucket or not key or key.endswith("/"):
        raise DataError(f"{field}: {uri} must name one object, s3://bucket/path/file.jsonl")
    name = PurePosixPath(key).name
    if not data_suffix(name):
        raise DataError(f"{field}: {uri} must be a {FILE_KINDS} object")
    client = s3_client()  # the checkpoints' client: path-style on MinIO, retries, region
    with tempfile.TemporaryDirectory(prefix="finetune-data-") as tmp:
        local = Path(tmp) / name
        try:
            client.download_file(bucket, key, str(local))
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NoSuchBucket"):
                raise DataError(f"{field}: {uri} does not exist") from None
            if code in ("403", "AccessDenied"):
                raise DataError(f"{field}: access to {uri} denied; check the credentials and bucket policy") from None
            raise ConnectionError(f"{field}: could not download {uri}: {exc}") from exc
        except NoCredentialsError:
            raise DataError(
                f"{field}: no AWS credentials to read {uri}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from None
        except (EndpointConnectionError, BotoCoreError) as exc:
            raise ConnectionError(f"{field}: could not download {uri}: {exc}") from exc
        return read_file(local, source=uri, field=field)


# --- Hugging Face datasets ------------------------------------------------------------------


def read_hf(name: str, split: str, *, field: str) -> Rows:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except ConnectionError as exc:  # hub unreachable (or offline mode): a retry may fix it
        raise ConnectionError(f"{field}: could not reach the Hugging Face Hub for dataset {name!r}: {exc}") from exc
    except (FileNotFoundError, ValueError) as exc:  # no such dataset, or no such split
        raise DataError(
            f"{field}: {name!r} is not a local file and could not be loaded as a Hugging Face dataset "
            f"(split {split!r}): {exc}"
        ) from None
    return Rows(dataset.to_list(), source=f"{name}:{split}")
