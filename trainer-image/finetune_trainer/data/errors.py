"""The one error the data pipeline raises for problems a user can fix."""

from __future__ import annotations

from typing import Any


class DataError(ValueError):
    """Bad or missing training data. Permanent: a retry cannot fix it, so the trainer exits
    with a 1-127 code. The message names the config field or the file and row to fix.

    Network failures (S3 endpoint or the Hugging Face Hub unreachable) are raised as
    `ConnectionError` instead, because a retry can fix those."""


class RowProblem(Exception):
    """What is wrong with one row, raised by the pure parsers and turned into a
    `DataError` naming the file and row by whoever knows them."""


def row_error(source: str, row: int, problem: str | Exception) -> DataError:
    return DataError(f"{source} row {row}: {problem}")


def json_kind(value: Any) -> str:
    """What a JSON value is, in words, for messages ("got a list")."""
    return {
        type(None): "null",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)
