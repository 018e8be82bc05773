"""From a file and command-line overrides to a typed, checked config.

`load_config(path, overrides, mode)` is the one entry point the CLI and the trainer use:
read YAML (syntax errors with line and column; duplicate keys refused), apply
`--section.key value` overrides (values parsed as YAML, unknown keys refused), validate
types, then cross-field rules. Every error found is raised at once in a ConfigError.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .issues import ConfigError, ConfigIssue, from_validation_error, model_at, unknown_key_message
from .rules import Mode, RuleContext, check
from .schema import FineTuneConfig


@dataclass
class LoadedConfig:
    config: FineTuneConfig
    warnings: list[ConfigIssue] = field(default_factory=list)
    source: Path | None = None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: YAML silently keeps the last one, which
    would hide a typo'd second copy of a section."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})", key_node.start_mark
            )
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, name: str = "<config>") -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        problem = exc.problem or str(exc)
        raise ConfigError([ConfigIssue("", f"{where}: invalid YAML: {problem}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue("", f"{name}: invalid YAML: {exc}")]) from None


def read_document(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in a file, or a ConfigError that says what is wrong with it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigIssue("", f"{path}: no such file")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue("", f"{path}: cannot be read: {exc}")]) from None
    data = parse_yaml(text, str(path))
    if data is None:
        raise ConfigError([ConfigIssue("", f"{path}: the file is empty; it must be a YAML mapping with a 'model' section")])
    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigIssue("", f"{path}: must be a YAML mapping of sections (model:, training:, ...), not a {_kind(data)}")]
        )
    return data


def _kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------- overrides


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """`["--training.learning_rate", "1e-4", "--model.load_in_4bit=true"]` ->
    `[("training.learning_rate", 1e-4), ("model.load_in_4bit", True)]`. Values are YAML
    scalars or flow lists (`'[q_proj, v_proj]'`)."""
    pairs: list[tuple[str, Any]] = []
    errors: list[ConfigIssue] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            errors.append(ConfigIssue("", f"unexpected argument {arg!r}; overrides look like --section.key value"))
            i += 1
            continue
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                errors.append(ConfigIssue(key, f"override --{key} has no value; write --{key} VALUE"))
                break
            raw = args[i + 1]
            i += 1
        i += 1
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw  # not YAML: take it as the string the user typed
        pairs.append((key, value))
    if errors:
        raise ConfigError(errors)
    return pairs


def apply_overrides(data: dict[str, Any], pairs: list[tuple[str, Any]], root: type[BaseModel] = FineTuneConfig) -> dict[str, Any]:
    """A copy of `data` with each dotted key set; keys the schema does not have are errors."""
    out = copy.deepcopy(data)
    errors: list[ConfigIssue] = []
    for key, value in pairs:
        parts = key.split(".")
        problem = _unknown_part(root, parts)
        if problem:
            errors.append(ConfigIssue(key, f"cannot override: {problem}"))
            continue
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    if errors:
        raise ConfigError(errors)
    return out


def _unknown_part(root: type[BaseModel], parts: list[str]) -> str | None:
    for depth, part in enumerate(parts):
        model = model_at(root, tuple(parts[:depth])) if depth else root
        if model is None:
            return f"{'.'.join(parts[:depth])} is a value, not a section"
        if part not in model.model_fields:
            return unknown_key_message(part, list(model.model_fields))
    if model_at(root, tuple(parts)) is not None:
        return f"{'.'.join(parts)} is a section; override one of its keys, e.g. --{'.'.join(parts)}.KEY VALUE"
    return None


# ------------------------------------------------------------------------------ loading


def validate_data(
    data: dict[str, Any],
    *,
    mode: Mode = "validate",
    base_dir: Path | None = None,
    root: type[FineTuneConfig] = FineTuneConfig,
    prefix: tuple[Any, ...] = (),
) -> LoadedConfig:
    """Types first, then cross-field rules; raise every error at once."""
    try:
        config = root.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(from_validation_error(exc, root, prefix)) from None
    found = check(config, RuleContext(mode=mode, base_dir=base_dir))
    if prefix:
        found = [ConfigIssue(".".join(map(str, prefix)) + "." + i.path, i.message, i.severity) for i in found]
    errors = [i for i in found if i.severity == "error"]
    warnings = [i for i in found if i.severity == "warning"]
    if errors:
        raise ConfigError(errors, warnings)
    return LoadedConfig(config, warnings)


def load_config(path: str | Path, overrides: list[str] | None = None, *, mode: Mode = "validate") -> LoadedConfig:
    """Read, override, validate and check a seed-format config file."""
    path = Path(path)
    data = read_document(path)
    if overrides:
        data = apply_overrides(data, parse_overrides(overrides))
    loaded = validate_data(data, mode=mode, base_dir=path.resolve().parent)
    loaded.source = path
    return loaded


def dump_config(config: FineTuneConfig) -> str:
    """The resolved config as YAML (every key, defaults filled), in the seed's order."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
