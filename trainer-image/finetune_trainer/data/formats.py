"""Dataset formats -> conversations: lists of `{"role": "system"|"user"|"assistant", "content": str}`.

Pure functions over rows (dicts); no I/O, no tokenizer. Each parser raises `RowProblem`
with what is wrong; `numbered_conversations` adds the file and the 1-based row number.

Formats (`dataset.format`):
- alpaca:   {instruction, input?, output, system?}; the user turn is the instruction, then a
            blank line and the input when there is one.
- sharegpt: {conversations: [{from, value}]} with from in human/gpt/system (user/assistant
            accepted too); a `messages: [{role, content}]` column is read the same way.
- oasst:    OpenAssistant message trees, one message per row {message_id, parent_id, role
            "prompter"/"assistant", text, rank?, lang?, deleted?}. Each tree becomes one
            conversation: from the root, follow the best reply at every branch (lowest rank;
            unranked after ranked; file order breaks ties) down to a leaf. Deleted messages
            and their replies are skipped; a missing parent_id means a root. Also the one-column
            form {text: "### Human: ... ### Assistant: ..."} (any number of turns, optional
            leading "### System:").
- custom:   dataset.custom.prompt_template / response_template / system_template, Python
            format strings over the row's fields.

Every format: trailing non-assistant turns are dropped (nothing to learn from them), and a
row with no assistant turn left is malformed.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import DataError, RowProblem, row_error

if TYPE_CHECKING:
    from finetune_trainer.config.schema import CustomFormatConfig, FineTuneConfig

Turn = dict[str, str]
Conversation = list[Turn]

ALPACA_NEEDS = "alpaca rows need instruction and output"
SHAREGPT_NEEDS = "sharegpt rows need conversations: a list of {from, value} turns"
OASST_NEEDS = (
    "oasst rows need message_id, parent_id, role and text, or a single text column in the "
    "'### Human: ... ### Assistant: ...' form"
)
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
OASST_ROLES = {"prompter": "user", "user": "user", "assistant": "assistant"}
TEXT_TURN_MARKER = re.compile(r"###\s*(Human|Assistant|System)\s*:", re.IGNORECASE)
TEXT_ROLES = {"human": "user", "assistant": "assistant", "system": "system"}


# --- entry points -------------------------------------------------------------------------


def row_numbers(rows: Sequence[Any]) -> list[int]:
    """1-based numbers users see: the line numbers of a JSONL file (kept by the reader on
    `rows.row_numbers`), else positions."""
    numbers = getattr(rows, "row_numbers", None)
    return list(numbers) if numbers is not None else list(range(1, len(rows) + 1))


def numbered_conversations(rows: Sequence[Any], cfg: FineTuneConfig, *, source: str) -> list[tuple[int, Conversation]]:
    """Each conversation with the row it came from (the root's row for oasst trees)."""
    fmt = cfg.dataset.format
    numbers = row_numbers(rows)
    if fmt == "oasst":
        return oasst_conversations(rows, numbers, source=source)
    parse: Callable[[dict[str, Any]], Conversation]
    if fmt == "alpaca":
        parse = alpaca_turns
    elif fmt == "sharegpt":
        parse = sharegpt_turns
    elif fmt == "custom":
        parse = custom_parser(cfg.dataset.custom)
    else:  # the schema forbids it; kept for callers that build configs by hand
        raise DataError(f"dataset.format: unknown format {fmt!r}; use alpaca, sharegpt, oasst or custom")
    out = []
    for number, row in zip(numbers, rows):
        try:
            out.append((number, parse(_mapping(row))))
        except RowProblem as problem:
            raise row_error(source, number, problem) from None
    return out


def to_conversations(rows: Sequence[Any], cfg: FineTuneConfig, *, source: str) -> list[Conversation]:
    """Rows of `cfg.dataset.format` -> conversations; `DataError` (file, row, field) on a bad row."""
    return [turns for _, turns in numbered_conversations(rows, cfg, source=source)]


# --- field helpers --------------------------------------------------------------------------


def _mapping(row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise RowProblem(f"expected a JSON object, got {_kind(row)}")
    return row


def _kind(value: Any) -> str:
    return {
        type(None): "null",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _text(row: dict[str, Any], name: str, *, needs: str, where: str = "") -> str:
    """A required, non-empty string field; `where` prefixes nested fields ("conversations[2]: ")."""
    if name not in row or row[name] is None:
        raise RowProblem(f"{where}missing field '{name}' ({needs})")
    value = row[name]
    if not isinstance(value, str):
        raise RowProblem(f"{where}field '{name}' must be a string, got {_kind(value)}")
    if not value.strip():
        raise RowProblem(f"{where}field '{name}' is empty")
    return value


def _optional_text(row: dict[str, Any], name: str) -> str | None:
    value = row.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RowProblem(f"field '{name}' must be a string, got {_kind(value)}")
    return value if value.strip() else None


def _finish(turns: Conversation, *, what: str) -> Conversation:
    """Drop trailing turns that are not the assistant's; insist one is left."""
    while turns and turns[-1]["role"] != "assistant":
        turns = turns[:-1]
    if not turns:
        raise RowProblem(f"{what} has no assistant turn to learn from")
    return turns


def _system_first(turns: Conversation, *, label: Callable[[int], str]) -> None:
    for i, turn in enumerate(turns):
        if turn["role"] == "system" and i != 0:
            raise RowProblem(f"{label(i)}: a system turn must come first")


# --- alpaca ---------------------------------------------------------------------------------


def alpaca_turns(row: dict[str, Any]) -> Conversation:
    instruction = _text(row, "instruction", needs=ALPACA_NEEDS)
    output = _text(row, "output", needs=ALPACA_NEEDS)
    extra = _optional_text(row, "input")
    system = _optional_text(row, "system")
    user = f"{instruction}\n\n{extra}" if extra else instruction
    turns = [{"role": "system", "content": system}] if system else []
    return [*turns, {"role": "user", "content": user}, {"role": "assistant", "content": output}]


# --- sharegpt -------------------------------------------------------------------------------


def sharegpt_turns(row: dict[str, Any]) -> Conversation:
    column = "conversations" if "conversations" in row or "messages" not in row else "messages"
    entries = row.get(column)
    if entries is None:
        raise RowProblem(f"missing field 'conversations' ({SHAREGPT_NEEDS})")
    if not isinstance(entries, list) or not entries:
        raise RowProblem(f"field '{column}' must be a non-empty list of {{from, value}} turns, got {_kind(entries)}")
    turns = [_sharegpt_turn(entry, f"{column}[{i}]") for i, entry in enumerate(entries)]
    _system_first(turns, label=lambda i: f"{column}[{i}]")
    return _finish(turns, what=f"field '{column}'")


def _sharegpt_turn(entry: Any, label: str) -> Turn:
    if not isinstance(entry, dict):
        raise RowProblem(f"{label} must be an object with from and value, got {_kind(entry)}")
    role_key = "from" if "from" in entry or "role" not in entry else "role"
    text_key = "value" if "value" in entry or "content" not in entry else "content"
    speaker = entry.get(role_key)
    if speaker is None:
        raise RowProblem(f"{label}: missing field '{role_key}' ({SHAREGPT_NEEDS})")
    role = SHAREGPT_ROLES.get(str(speaker).lower()) if isinstance(speaker, str) else None
    if role is None:
        raise RowProblem(
            f"{label}.{role_key} is {speaker!r}; expected one of human, gpt, system (or user, assistant)"
        )
    content = _text(entry, text_key, needs=SHAREGPT_NEEDS, where=f"{label}: ")
    return {"role": role, "content": content}


# --- oasst ----------------------------------------------------------------------------------


@dataclass
class _Message:
    id: str
    parent: str | None
    role: str
    text: str
    rank: float | None
    row: int
    order: int


def oasst_conversations(rows: Sequence[Any], numbers: Sequence[int], *, source: str) -> list[tuple[int, Conversation]]:
    """Trees and one-column text rows, in file order (a tree where its root is)."""
    items: list[tuple[int, Conversation | _Message]] = []
    deleted: set[str] = set()
    for order, (number, row) in enumerate(zip(numbers, rows)):
        try:
            row = _mapping(row)
            if "message_id" in row:
                message = _oasst_message(row, number, order)
                if row.get("deleted") is True:
                    deleted.add(message.id)
                else:
                    items.append((number, message))
            elif "text" in row:
                items.append((number, oasst_text_turns(row)))
            else:
                raise RowProblem(f"missing field 'text' ({OASST_NEEDS})")
        except RowProblem as problem:
            raise row_error(source, number, problem) from None
    messages = [m for _, m in items if isinstance(m, _Message)]
    trees = _oasst_trees(messages, deleted, source=source)
    out: list[tuple[int, Conversation]] = []
    for number, item in items:
        if not isinstance(item, _Message):
            out.append((number, item))
        elif item.id in trees:
            out.append((number, trees[item.id]))
    return out


def _oasst_message(row: dict[str, Any], number: int, order: int) -> _Message:
    message_id = row["message_id"]
    if not isinstance(message_id, str) or not message_id:
        raise RowProblem(f"field 'message_id' must be a non-empty string, got {_kind(message_id)}")
    parent = row.get("parent_id")
    if parent is not None and not isinstance(parent, str):
        raise RowProblem(f"field 'parent_id' must be a string or null, got {_kind(parent)}")
    if "role" not in row or row["role"] is None:
        raise RowProblem(f"missing field 'role' ({OASST_NEEDS})")
    role = OASST_ROLES.get(row["role"]) if isinstance(row["role"], str) else None
    if role is None:
        raise RowProblem(f"field 'role' is {row['role']!r}; expected 'prompter' or 'assistant'")
    text = _text(row, "text", needs=OASST_NEEDS)
    rank = row.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int | float)):
        raise RowProblem(f"field 'rank' must be a number or null, got {_kind(rank)}")
    return _Message(message_id, parent or None, role, text, rank, number, order)


def _oasst_trees(messages: list[_Message], deleted: set[str], *, source: str) -> dict[str, Conversation]:
    """root message_id -> the conversation along the best replies; roots without any
    assistant reply are left out (a prompt nobody answered teaches nothing)."""
    by_id: dict[str, _Message] = {}
    for m in messages:
        if m.id in by_id:
            raise row_error(source, m.row, f"message_id {m.id!r} appears twice (also row {by_id[m.id].row})")
        by_id[m.id] = m
    children: dict[str, list[_Message]] = {}
    roots: list[_Message] = []
    for m in messages:
        if m.parent is None:
            if m.role != "user":
                raise row_error(source, m.row, f"a conversation must start with a prompter message, "
                                               f"but root message {m.id!r} has role 'assistant'")
            roots.append(m)
        elif m.parent in by_id:
            children.setdefault(m.parent, []).append(m)
        elif m.parent not in deleted:  # replies to deleted messages go with them
            raise row_error(source, m.row, f"field 'parent_id' is {m.parent!r}, which matches no message_id in the file")
    trees = {}
    for root in roots:
        path = [root]
        while children.get(path[-1].id):
            path.append(min(children[path[-1].id], key=_best_reply))
        turns = [{"role": m.role, "content": m.text} for m in path]
        try:
            trees[root.id] = _finish(turns, what=f"message tree {root.id!r}")
        except RowProblem:
            continue
    return trees


def _best_reply(m: _Message) -> tuple[bool, float, int]:
    return (m.rank is None, m.rank if m.rank is not None else 0.0, m.order)


def oasst_text_turns(row: dict[str, Any]) -> Conversation:
    """'### Human: ... ### Assistant: ...' (as in timdettmers/openassistant-guanaco)."""
    text = _text(row, "text", needs=OASST_NEEDS)
    parts = TEXT_TURN_MARKER.split(text)
    if parts[0].strip():
        raise RowProblem("field 'text' must start with '### Human:' (or '### System:')")
    turns = []
    for n, (speaker, content) in enumerate(zip(parts[1::2], parts[2::2]), start=1):
        if not content.strip():
            raise RowProblem(f"field 'text': turn {n} ('### {speaker}:') is empty")
        turns.append({"role": TEXT_ROLES[speaker.lower()], "content": content.strip()})
    _system_first(turns, label=lambda i: f"field 'text': turn {i + 1}")
    return _finish(turns, what="field 'text'")


# --- custom ---------------------------------------------------------------------------------


def template_fields(template: str, key: str) -> list[str]:
    """Row fields a format string names; a bad template is a config error on `key`."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise DataError(f"{key}: not a valid format string ({exc}); write fields as {{name}} and braces as {{{{ }}}}") from None
    fields = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        base = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not base or base.isdigit():
            raise DataError(f"{key}: uses a positional field {{{name}}}; name a row field instead, e.g. {{question}}")
        if base not in fields:
            fields.append(base)
    return fields


def custom_parser(custom: CustomFormatConfig) -> Callable[[dict[str, Any]], Conversation]:
    """Checks the templates once, then returns the row parser."""
    templates: list[tuple[str, str, str, list[str]]] = []
    for role, name in (("system", "system_template"), ("user", "prompt_template"), ("assistant", "response_template")):
        template = getattr(custom, name)
        if template is None:
            if role == "system":
                continue
            raise DataError(f"dataset.custom.{name} is not set; dataset.format 'custom' needs it (e.g. \"{{question}}\")")
        templates.append((role, name, template, template_fields(template, f"dataset.custom.{name}")))

    def parse(row: dict[str, Any]) -> Conversation:
        turns = []
        for role, name, template, fields in templates:
            for field in fields:
                if row.get(field) is None:
                    raise RowProblem(f"missing field '{field}' (dataset.custom.{name} names it)")
            try:
                content = template.format(**row)
            except (KeyError, IndexError, AttributeError, ValueError, TypeError) as exc:
                raise RowProblem(f"cannot fill dataset.custom.{name}: {type(exc).__name__}: {exc}") from None
            if not content.strip():
                if role == "system":
                    continue
                raise RowProblem(f"dataset.custom.{name} renders an empty {role} turn")
            turns.append({"role": role, "content": content})
        return turns

    return parse
