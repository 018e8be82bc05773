"""Config problems as data: a dotted path, a message that says the fix, a severity.

Every layer (YAML parsing, overrides, pydantic types, cross-field rules) reports in this
one shape, so the CLI, the operator's status condition and its Events print the same
lines: `training.learning_rate: must be greater than 0 (got -1)`.
"""

from __future__ import annotations

import difflib
import re
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class ConfigIssue:
    path: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """Raised with every error found (and the warnings seen on the way)."""

    def __init__(self, errors: list[ConfigIssue], warnings: list[ConfigIssue] | None = None):
        self.errors = errors
        self.warnings = warnings or []
        super().__init__("\n".join(str(e) for e in errors))


def dotted(loc: tuple[Any, ...] | list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the key at `loc` (None if not a model)."""
    current: Any = root
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _model_in(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def unknown_key_message(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"unknown key {key!r}; did you mean {close[0]!r}?"
    return f"unknown key {key!r}; valid keys here: {', '.join(valid)}"


def _got(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return f"a list {value!r}" if len(repr(value)) < 60 else "a list"
    return repr(value)


def from_validation_error(exc: ValidationError, root: type[BaseModel], prefix: tuple[Any, ...] = ()) -> list[ConfigIssue]:
    """Turn pydantic's errors into one ConfigIssue each, in words a user can act on."""
    issues: list[ConfigIssue] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        kind = err["type"]
        if kind == "extra_forbidden":
            parent = model_at(root, loc[:-1])
            valid = list(parent.model_fields) if parent else []
            message = unknown_key_message(str(loc[-1]), valid)
        elif kind == "missing":
            message = "required key is missing"
            field = model_at(root, loc[:-1])
            info = field.model_fields.get(loc[-1]) if field else None
            if info is not None and info.description:
                message += f" ({info.description})"
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            message = f"must be a mapping of keys (got {_got(err['input'])})"
        elif kind == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            options = [o.strip("'") for o in re.split(r", | or ", expected) if o]
            message = f"must be one of {', '.join(expected.replace(' or ', ', ').split(', '))} (got {_got(err['input'])})"
            close = difflib.get_close_matches(str(err["input"]), options, n=1, cutoff=0.5)
            if close:
                message += f"; did you mean {close[0]!r}?"
        elif kind == "string_pattern_mismatch":  # the regex alone says little: add what the field holds
            message = f"must match the pattern {err['ctx']['pattern']} (got {_got(err['input'])})"
            field = model_at(root, loc[:-1])
            info = field.model_fields.get(loc[-1]) if field and isinstance(loc[-1], str) else None
            if info is not None and info.description:
                message += f"; expected: {info.description}"
        elif kind == "value_error":
            message = str(err["ctx"]["error"]) if "ctx" in err else err["msg"]
        else:
            text = err["msg"]
            if text.startswith("Input should be "):
                text = "must be " + text[len("Input should be "):]
            elif text.startswith("Input "):
                text = text[len("Input "):]
            message = f"{text[0].lower()}{text[1:]} (got {_got(err['input'])})"
        issues.append(ConfigIssue(dotted(prefix + loc), message))
    return issues
