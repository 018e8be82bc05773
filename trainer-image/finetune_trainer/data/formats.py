"""Dataset formats -> conversations: lists of turns `{"role", "content"}`, role one of
system, user, assistant, tool. An assistant turn may carry `tool_calls` ([{"type":
"function", "function": {"name", "arguments": {...}}}], what it learns besides its content)
and `weight` (0: not learned); a tool turn may carry `tool_call_id` and `name`. A
conversation's row-level tool schemas are `Conversation.tools`.

Pure functions over rows (dicts); no I/O, no tokenizer. Each parser raises `RowProblem`
with what is wrong; `parse_rows` collects every bad row with its 1-based number, and
`numbered_conversations` raises one `DataError` listing them (file, row, field).

Formats (`dataset.format`):
- alpaca:   {instruction, input?, output, system?, history?}; the user turn is the
            instruction, then a blank line and the input when there is one; `history`
            ([[user, assistant], ...], LLaMA-Factory) becomes the earlier turns.
- sharegpt: {conversations: [{from, value}], system?, tools?} with from in human/gpt/system
            (user/assistant accepted too), function_call (the assistant's tool call, a JSON
            {name, arguments}) and observation (the tool's result); a row's `system` is its
            system prompt, `tools` its tool schemas (a JSON list, or a string holding one).
            The OpenAI chat layout `messages: [{role, content}]` is read the same way:
            content a string, a list of text parts, or null beside `tool_calls`; role `tool`
            with `tool_call_id`; `weight: 0` on an assistant turn masks it; a row-level
            `tools` list.
- oasst:    Open-Assistant message trees (oasst.py): one message per row {message_id,
            parent_id, role "prompter"/"assistant", text, rank?, deleted?}, nested trees as the
            `*.trees.jsonl` exports ship them ({message_tree_id, prompt: {..., replies: [...]}}
            or a root message with replies), and the one-column form {text: "### Human: ...
            ### Assistant: ..."}, mixed freely. `dataset.oasst_paths`: "best" follows the best
            reply at every branch (lowest rank; unranked after ranked; file order breaks ties),
            "all" every root-to-leaf path. Deleted messages and their replies are skipped.
- custom:   dataset.custom.prompt_template / response_template / system_template, Python
            format strings over the row's fields.

- text:     {text}: raw documents for continued pre-training; every token is learned (see
            `text_document`; the tokenizer splits long ones into max_seq_length pieces).

Every conversational format: trailing non-assistant turns are dropped (nothing to learn from
them), and a row with no assistant turn left to learn (all of them `weight: 0`) is malformed.
Images, audio and video (a media content part, or an `images`/`videos`/`audios` column) are
refused: this trainer trains text-only models, and a placeholder trained as text is wrong.
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import DataError, RowProblem, row_error
from .errors import json_kind as _kind

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from finetune_trainer.config.schema import CustomFormatConfig, FineTuneConfig

Turn = dict[str, Any]


class Conversation(list):
    """Turns, and the tool schemas the row offers the model (None: no tools)."""

    def __init__(self, turns: Sequence[Turn] = (), tools: list[dict[str, Any]] | None = None):
        super().__init__(turns)
        self.tools = tools


MAX_LISTED_PROBLEMS = 20
TEXT_ONLY = ("this trainer trains text-only models; remove the {what} (and any <image>/<audio> "
             "placeholders in the text), or use a vision/audio-language trainer")
MEDIA_COLUMNS = ("images", "videos", "audios", "image", "audio", "video")
MEDIA_PART_TYPES = {"image", "image_url", "input_image", "audio", "input_audio", "audio_url", "video", "video_url", "file"}
TEXT_PART_TYPES = {"text", "input_text", "output_text"}

ALPACA_NEEDS = "alpaca rows need instruction and output"
SHAREGPT_NEEDS = "sharegpt rows need conversations: a list of {from, value} turns"
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",  # LLaMA-Factory: the assistant's tool call, its value a JSON call
    "observation": "tool",  # LLaMA-Factory: the tool's result
    "tool": "tool",
    "function": "tool",  # OpenAI's legacy function-calling result
    "ipython": "tool",  # Llama 3.1's name for the tool's result
}
TOOL_CALL_ROLES = {"function_call"}


# --- entry points -------------------------------------------------------------------------


def row_numbers(rows: Sequence[Any]) -> list[int]:
    """1-based numbers users see: the line numbers of a JSONL file (kept by the reader on
    `rows.row_numbers`), else positions."""
    numbers = getattr(rows, "row_numbers", None)
    return list(numbers) if numbers is not None else list(range(1, len(rows) + 1))


def parse_rows(rows: Sequence[Any], cfg: FineTuneConfig, *, source: str) -> tuple[list[tuple[int, Conversation]], list[tuple[int, str]]]:
    """Every good row's conversation with its row number (the root's row for oasst trees),
    and every bad row's (number, what is wrong): one bad row never hides the next."""
    fmt = cfg.dataset.format
    numbers = row_numbers(rows)
    if fmt == "oasst":
        return _oasst(rows, numbers, cfg, source=source)
    parse: Callable[[dict[str, Any]], Conversation]
    if fmt == "alpaca":
        parse = alpaca_turns
    elif fmt == "sharegpt":
        parse = sharegpt_turns
    elif fmt == "custom":
        parse = custom_parser(cfg.dataset.custom)
    elif fmt == "text":
        parse = text_document_row
    else:  # the schema forbids it; kept for callers that build configs by hand
        raise DataError(f"dataset.format: unknown format {fmt!r}; use alpaca, sharegpt, oasst, custom or text")
    out, problems = [], []
    for number, row in zip(numbers, rows):
        try:
            row = _mapping(row)
            _refuse_media_columns(row)
            out.append((number, parse(row)))
        except RowProblem as problem:
            problems.append((number, str(problem)))
    return out, problems


def bad_rows_error(source: str, problems: Sequence[tuple[int, str]], *, hint: str = "") -> DataError:
    """One message for every bad row: the first MAX_LISTED_PROBLEMS, then a count."""
    if len(problems) == 1:
        number, message = problems[0]
        return row_error(source, number, message + hint)
    listed = "\n".join(f"  row {n}: {m}" for n, m in problems[:MAX_LISTED_PROBLEMS])
    more = len(problems) - MAX_LISTED_PROBLEMS
    tail = f"\n  ... and {more} more bad rows" if more > 0 else ""
    return DataError(f"{source}: {len(problems)} bad rows:\n{listed}{tail}{hint}")


def numbered_conversations(rows: Sequence[Any], cfg: FineTuneConfig, *, source: str) -> list[tuple[int, Conversation]]:
    """Each conversation with the row it came from; `DataError` listing every bad row."""
    out, problems = parse_rows(rows, cfg, source=source)
    if problems:
        raise bad_rows_error(source, problems)
    return out


def to_conversations(rows: Sequence[Any], cfg: FineTuneConfig, *, source: str) -> list[Conversation]:
    """Rows of `cfg.dataset.format` -> conversations; `DataError` (file, row, field) on bad rows."""
    return [turns for _, turns in numbered_conversations(rows, cfg, source=source)]


def _oasst(rows: Sequence[Any], numbers: Sequence[int], cfg: FineTuneConfig, *, source: str):
    from .oasst import oasst_conversations

    result = oasst_conversations(rows, numbers, source=source, paths=cfg.dataset.oasst_paths)
    log.info("%s: %s", source, result.summary())
    return [(n, Conversation(turns)) for n, turns in result.conversations], list(result.problems)


# --- field helpers --------------------------------------------------------------------------


def _mapping(row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise RowProblem(f"expected a JSON object, got {_kind(row)}")
    return row


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


def _finish(turns: Sequence[Turn], *, what: str, tools: list[dict[str, Any]] | None = None) -> Conversation:
    """Drop trailing turns that are not the assistant's; insist one is left to learn."""
    turns = list(turns)
    while turns and turns[-1]["role"] != "assistant":
        turns = turns[:-1]
    if not turns:
        raise RowProblem(f"{what} has no assistant turn to learn from")
    if all(t.get("weight", 1) == 0 for t in turns if t["role"] == "assistant"):
        raise RowProblem(f"{what}: every assistant turn has weight 0, so nothing is learned from this row; "
                         "give one weight 1 or remove the row")
    return Conversation(turns, tools)


def _refuse_media_columns(row: dict[str, Any]) -> None:
    for column in MEDIA_COLUMNS:
        if row.get(column) not in (None, [], "", {}):
            raise RowProblem(f"field '{column}': " + TEXT_ONLY.format(what=f"'{column}' column"))


def _content(value: Any, *, where: str, allow_null: bool = False) -> str:
    """A turn's content: a string, or a list of text parts (OpenAI, LLaMA-Factory v1),
    joined with newlines. Media parts are refused."""
    if value is None:
        if allow_null:
            return ""
        raise RowProblem(f"{where}: content is null")
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowProblem(f"{where}: content must be a string or a list of text parts, got {_kind(value)}")
    texts = []
    for i, part in enumerate(value):
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in MEDIA_PART_TYPES:
            raise RowProblem(f"{where}[{i}] is an {kind!r} part: " + TEXT_ONLY.format(what=f"{kind} part"))
        text = part.get("text", part.get("value")) if isinstance(part, dict) else None
        if (kind is not None and kind not in TEXT_PART_TYPES) or not isinstance(text, str):
            raise RowProblem(f"{where}[{i}]: expected a text part {{\"type\": \"text\", \"text\": ...}}, got {_kind(part)}"
                             + (f" of type {kind!r}" if kind else ""))
        texts.append(text)
    return "\n".join(texts)


def _json_value(value: Any, *, where: str, expected: str) -> Any:
    """A JSON column that may arrive as a string holding JSON (LLaMA-Factory's tools)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowProblem(f"{where}: not valid JSON ({exc.msg} at character {exc.pos}); expected {expected}") from None
    return value


def _tools(row: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The row's tool schemas as [{"type": "function", "function": {name, ...}}]."""
    if row.get("tools") in (None, "", []):
        return None
    tools = _json_value(row["tools"], where="field 'tools'", expected="a list of JSON schemas of functions")
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise RowProblem(f"field 'tools' must be a list of function schemas, got {_kind(tools)}")
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RowProblem(f"field 'tools'[{i}]: a function schema needs a name "
                             "({\"name\": ..., \"description\": ..., \"parameters\": {...}})")
        out.append({"type": "function", "function": function})
    return out or None


def _tool_call(call: Any, *, where: str) -> dict[str, Any]:
    """One call as {"type": "function", "function": {"name", "arguments": {...}}} from
    OpenAI's form ({id?, type, function: {name, arguments: JSON string}}) or a bare
    {name, arguments}."""
    call = _json_value(call, where=where, expected='{"name": ..., "arguments": {...}}')
    if not isinstance(call, dict):
        raise RowProblem(f"{where}: a tool call must be an object with name and arguments, got {_kind(call)}")
    function = call.get("function", call)
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise RowProblem(f"{where}: a tool call needs the function's name")
    arguments = _json_value(function.get("arguments", {}), where=f"{where}.arguments", expected="a JSON object")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise RowProblem(f"{where}.arguments must be a JSON object, got {_kind(arguments)}")
    out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


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
    turns += _alpaca_history(row.get("history"))
    return Conversation([*turns, {"role": "user", "content": user}, {"role": "assistant", "content": output}])


def _alpaca_history(history: Any) -> list[Turn]:
    """LLaMA-Factory's `history`: [[user, assistant], ...], the turns before this one."""
    if history in (None, []):
        return []
    if not isinstance(history, list):
        raise RowProblem(f"field 'history' must be a list of [user, assistant] pairs, got {_kind(history)}")
    turns = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(t, str) and t.strip() for t in pair)):
            raise RowProblem(f"field 'history'[{i}] must be a pair of non-empty strings [user, assistant]")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return turns


# --- sharegpt -------------------------------------------------------------------------------


def sharegpt_turns(row: dict[str, Any]) -> Conversation:
    column = "conversations" if "conversations" in row or "messages" not in row else "messages"
    entries = row.get(column)
    if entries is None:
        raise RowProblem(f"missing field 'conversations' ({SHAREGPT_NEEDS})")
    if not isinstance(entries, list) or not entries:
        raise RowProblem(f"field '{column}' must be a non-empty list of {{from, value}} turns, got {_kind(entries)}")
    turns = [_sharegpt_turn(entry, f"{column}[{i}]") for i, entry in enumerate(entries)]
    system = _optional_text(row, "system")
    if system is not None:
        if turns[0]["role"] == "system":
            raise RowProblem(f"the row has both a field 'system' and a system turn ({column}[0]); keep one")
        turns.insert(0, {"role": "system", "content": system})
    _system_first(turns, label=lambda i: f"{column}[{i - (system is not None)}]")
    return _finish(turns, what=f"field '{column}'", tools=_tools(row))


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
            f"{label}.{role_key} is {speaker!r}; expected one of human, gpt, system, function_call, observation "
            "(or user, assistant, tool)"
        )
    if isinstance(speaker, str) and speaker.lower() in TOOL_CALL_ROLES:  # the value is the call itself
        if text_key not in entry:
            raise RowProblem(f"{label}: missing field '{text_key}' (the call as JSON: {{\"name\": ..., \"arguments\": {{...}}}})")
        calls = _json_value(entry[text_key], where=f"{label}.{text_key}", expected='{"name": ..., "arguments": {...}}')
        calls = calls if isinstance(calls, list) else [calls]
        return {"role": "assistant", "content": "",
                "tool_calls": [_tool_call(c, where=f"{label}.{text_key}") for c in calls]}
    tool_calls = entry.get("tool_calls") or ([entry["function_call"]] if entry.get("function_call") else None)
    if tool_calls is not None and role != "assistant":
        raise RowProblem(f"{label}: only an assistant turn can make tool calls (this one is {speaker!r})")
    if text_key not in entry and not tool_calls:
        raise RowProblem(f"{label}: missing field '{text_key}' ({SHAREGPT_NEEDS})")
    content = _content(entry.get(text_key), where=f"{label}.{text_key}", allow_null=bool(tool_calls))
    if not content.strip() and not tool_calls:
        raise RowProblem(f"{label}: field '{text_key}' is empty")
    turn: Turn = {"role": role, "content": content}
    if tool_calls:
        if not isinstance(tool_calls, list):
            raise RowProblem(f"{label}.tool_calls must be a list, got {_kind(tool_calls)}")
        turn["tool_calls"] = [_tool_call(c, where=f"{label}.tool_calls[{i}]") for i, c in enumerate(tool_calls)]
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(entry.get(key), str) and entry[key]:
                turn[key] = entry[key]
    if "weight" in entry:
        weight = entry["weight"]
        if role != "assistant":
            raise RowProblem(f"{label}.weight: only assistant turns have a weight (this one is {speaker!r})")
        if weight not in (0, 1) or isinstance(weight, bool):
            raise RowProblem(f"{label}.weight must be 0 (not learned) or 1 (learned), got {weight!r}")
        turn["weight"] = int(weight)
    return turn


# --- text -----------------------------------------------------------------------------------


def text_document_row(row: dict[str, Any]) -> Conversation:
    """A raw document as one pseudo-turn {"role": "text"}: tokenize.py learns all of it."""
    return Conversation([{"role": "text", "content": text_document(row)}])


def text_document(row: dict[str, Any]) -> str:
    return _text(row, "text", needs="text rows need a field 'text' holding the document")


# --- oasst: see oasst.py (flat message rows, nested trees, tree exports, '### Human:' text) ---


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
