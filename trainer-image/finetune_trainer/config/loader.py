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
        raise ConfigError([ConfigIssue("", yaml_error_message(exc, name))]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue("", f"{name}: invalid YAML: {exc}")]) from None


def yaml_error_message(exc: yaml.MarkedYAMLError, name: str) -> str:
    """Where the problem starts: for an unterminated quote or bracket the parser gives up at
    the end of the file, but its context mark is where the quote or bracket opened."""
    problem = exc.problem or str(exc)
    context, opened, found = exc.context, exc.context_mark, exc.problem_mark
    if context and opened and (found is None or found.line != opened.line):
        at = f" at line {found.line + 1}, column {found.column + 1}" if found else ""
        return (f"{name}:{opened.line + 1}:{opened.column + 1}: invalid YAML: {context} that starts here: "
                f"{problem}{at}")
    mark = found or opened
    where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
    return f"{where}: invalid YAML: {problem}"


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


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """`["--training.learning_rate", "1e-4", "--model.load_in_4bit=true"]` ->
    `[("training.learning_rate", "1e-4"), ("model.load_in_4bit", "true")]`; the values are
    typed against the schema by `apply_overrides`."""
    pairs: list[tuple[str, str]] = []
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
        pairs.append((key, raw))
    if errors:
        raise ConfigError(errors)
    return pairs


def apply_overrides(data: dict[str, Any], pairs: list[tuple[str, str]], root: type[BaseModel] = FineTuneConfig) -> dict[str, Any]:
    """A copy of `data` with each dotted key set; keys the schema does not have are errors.

    Values are read as YAML scalars or flow lists (`1e-4`, `true`, `null`, `[q_proj, v_proj]`),
    except that a key that only takes text gets the text as typed (`--model.tokenizer yes`
    means the string "yes", not YAML's boolean)."""
    out = copy.deepcopy(data)
    errors: list[ConfigIssue] = []
    for key, raw in pairs:
        parts = key.split(".")
        problem = _unknown_part(root, parts)
        if problem:
            errors.append(ConfigIssue(key, f"cannot override: {problem}"))
            continue
        value = _typed(raw, model_at(root, tuple(parts[:-1])) or root, parts[-1])
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


def _typed(raw: str, model: type[BaseModel], name: str) -> Any:
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw  # not YAML: the string the user typed
    if isinstance(value, (bool, int, float)) and _text_only(model.model_fields[name].annotation):
        return raw
    return value


def _text_only(annotation: Any) -> bool:
    """str, a Literal of strings, or either | None (after unwrapping Annotated), nothing else.
    (A Literal of strings: `--training.mixed_precision no` means "no", not YAML's false.)"""
    import typing

    if typing.get_origin(annotation) is typing.Annotated:
        return _text_only(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) is typing.Literal:
        return all(isinstance(a, str) for a in typing.get_args(annotation))
    if annotation is str:
        return True
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return bool(args) and all(_text_only(a) for a in args)


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
    """Types first, then cross-field rules; raise every error at once.

    When some keys have the wrong type, the rules still run on the rest (those keys
    dropped, so their defaults stand in) and report what else is wrong: a user fixes a
    config in one round, not one error per round."""
    ctx = RuleContext(mode=mode, base_dir=base_dir)
    try:
        config = root.model_validate(data)
    except ValidationError as exc:
        type_errors = from_validation_error(exc, root, prefix)
        rule_issues = _rules_without(data, exc, root, ctx)
        bad_paths = {e.path for e in type_errors}
        extra = [i for i in _prefixed(rule_issues, prefix)
                 if not any(i.path == bad or i.path.startswith(f"{bad}.") for bad in bad_paths)]
        raise ConfigError(
            type_errors + [i for i in extra if i.severity == "error"], [i for i in extra if i.severity == "warning"]
        ) from None
    found = _prefixed(check(config, ctx), prefix)
    errors = [i for i in found if i.severity == "error"]
    warnings = [i for i in found if i.severity == "warning"]
    if errors:
        raise ConfigError(errors, warnings)
    return LoadedConfig(config, warnings)


def _prefixed(issues: list[ConfigIssue], prefix: tuple[Any, ...]) -> list[ConfigIssue]:
    if not prefix:
        return issues
    head = ".".join(map(str, prefix))
    return [ConfigIssue(f"{head}.{i.path}" if i.path else head, i.message, i.severity) for i in issues]


def _rules_without(data: dict[str, Any], exc: ValidationError, root: type[FineTuneConfig], ctx: RuleContext) -> list[ConfigIssue]:
    """Cross-field issues of `data` with its ill-typed keys removed and its missing required
    ones stood in for (a missing `model:` must not hide `push_to_hub` without `hub_model_id`);
    [] if it still cannot be validated. The stand-ins' own issues are filtered by the caller."""
    pruned = copy.deepcopy(data)
    errors = exc.errors()
    for _ in range(4):  # a stood-in section may reveal its own required keys
        changed = False
        for err in errors:
            loc = tuple(err["loc"])
            node: Any = pruned
            for part in loc[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                continue
            if err["type"] == "missing":
                node[loc[-1]] = {} if model_at(root, loc) is not None else STAND_IN
                changed = True
            elif loc[-1] in node:
                node.pop(loc[-1])
                changed = True
        try:
            return check(root.model_validate(pruned), ctx)
        except ValidationError as again:
            errors = again.errors()
        if not changed:
            break
    return []


STAND_IN = "stand-in-for-a-missing-key"


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
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml when present: the operator renders many
    return yaml.dump(config.model_dump(mode="json"), Dumper=dumper, sort_keys=False, allow_unicode=True)
