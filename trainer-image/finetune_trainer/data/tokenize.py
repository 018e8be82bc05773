"""Conversations -> token ids and labels, with the loss masked to the responses.

1. Render the conversation to text, and find the character spans the model should learn:
   each assistant turn's content plus the end-of-turn marker that closes it.
   - Chat template (`use_chat_template` and the tokenizer has one): the spans come from
     rendering prefix by prefix. For assistant turn i, render turns[:i] plus that turn with a
     sentinel as its content: the text before the sentinel is where the content starts. The
     turn ends where the rendering of turns[:i+1] ends, less trailing whitespace (so
     "Hi<|im_end|>" is learned, the "\n" the template puts after it is not). Each prefix
     must be a prefix of the full rendering, or the template is refused with a message.
   - Plain fallback (no template, or `use_chat_template: false`):

         ### System:
         {system}

         ### Instruction:
         {user}

         ### Response:
         {assistant}<eos>

         ### Instruction:
         ...

     Blocks are separated by a blank line. An assistant turn followed by more turns ends
     with the EOS token (its end-of-turn marker, learned); the last one ends with EOS when
     `add_eos_token` says so (below).
2. Tokenize the whole text once (no special tokens added) with character offsets; a token is
   learned when it starts inside a span. Tokenizing once keeps the ids exactly those the
   model sees when the same text is rendered at inference.
3. `add_bos_token`: prepend BOS unless the text already starts with it (never learned).
   `add_eos_token`: end with EOS (learned) — append it, unless the sequence already ends with
   EOS, in which case whitespace the template put after that EOS is removed.
4. Labels are the ids on learned tokens, -100 elsewhere (`train_on_inputs`: on every token).
   An assistant turn with `weight: 0` is not learned.
5. Truncate to `training.max_seq_length`; a sample with no learned token left is dropped.

Tools: the row's tool schemas go to the template as `apply_chat_template(..., tools=...)`,
assistant `tool_calls` and `tool` turns as they are, when the template renders all three
(probed once per template with marker names). Many templates ignore them silently; then,
and in the plain format, they are rendered as text in the Hermes / Qwen2.5 form: the schemas
in a `<tools>` block appended to the system prompt (a system turn is added when the row has
none), each call as `<tool_call>{"name": ..., "arguments": ...}</tool_call>` in the
assistant's content (learned), each result as `<tool_response>...</tool_response>` in a
user turn (not learned).

Raw text (`dataset.format: text`, `encode_document`): BOS/EOS as above, then the whole
document is learned, in pieces of max_seq_length tokens (nothing is cut away).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import DataError

if TYPE_CHECKING:
    from finetune_trainer.config.schema import FineTuneConfig, PreprocessingConfig

    from .formats import Conversation

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
SENTINEL = "\u241eFINETUNE-RESPONSE\u241e"
PLAIN_HEADERS = {"system": "### System:", "user": "### Instruction:", "assistant": "### Response:"}
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>"
)
TEMPLATE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")  # what a template sees of a turn
NOT_PREFIX_STABLE = (
    "the tokenizer's chat template renders earlier turns differently once later turns are added, "
    "so the response tokens cannot be located; set dataset.preprocessing.use_chat_template: false "
    "to use the plain '### Instruction:/### Response:' format"
)


@dataclass(frozen=True)
class Rendered:
    text: str
    learned: list[tuple[int, int]]  # character spans [start, end) the model learns


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    def as_row(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "attention_mask": [1] * len(self.input_ids), "labels": self.labels}


# --- rendering ------------------------------------------------------------------------------


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_tools(turns: Conversation) -> bool:
    return bool(getattr(turns, "tools", None)) or any(t.get("tool_calls") or t["role"] == "tool" for t in turns)


def render(turns: Conversation, tokenizer: Any, *, use_chat_template: bool) -> Rendered:
    tools = getattr(turns, "tools", None)
    if use_chat_template and has_chat_template(tokenizer):
        if uses_tools(turns) and not template_renders_tools(tokenizer):
            turns, tools = tools_as_text(turns), None
        return render_with_template(turns, tokenizer, tools=tools)
    if uses_tools(turns):
        turns = tools_as_text(turns)
    return render_plain(turns, eos_text=getattr(tokenizer, "eos_token", None) or "")


def _learned(turn: dict[str, Any]) -> bool:
    return turn["role"] == "assistant" and turn.get("weight", 1) != 0


def render_plain(turns: Conversation, *, eos_text: str) -> Rendered:
    text, learned = "", []
    for i, turn in enumerate(turns):
        text += ("\n\n" if text else "") + PLAIN_HEADERS[turn["role"]] + "\n"
        start = len(text)
        text += turn["content"]
        if turn["role"] == "assistant":
            if i < len(turns) - 1:
                text += eos_text
            if _learned(turn):
                learned.append((start, len(text)))
    return Rendered(text, learned)


def _call_text(call: dict[str, Any]) -> str:
    function = call["function"]
    body = json.dumps({"name": function["name"], "arguments": function["arguments"]}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def tools_as_text(turns: Conversation) -> list[dict[str, Any]]:
    """The conversation with its tools, calls and results as plain text turns (the
    Hermes / Qwen2.5 form), for templates and formats that cannot render them."""
    out: list[dict[str, Any]] = []
    tools = getattr(turns, "tools", None)
    rest = list(turns)
    if tools:
        block = TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if rest and rest[0]["role"] == "system":
            out.append({**rest.pop(0), "content": f"{turns[0]['content']}\n\n{block}"})
        else:
            out.append({"role": "system", "content": block})
    previous_was_tool = False
    for turn in rest:
        if turn["role"] == "tool":
            response = f"<tool_response>\n{turn['content']}\n</tool_response>"
            if previous_was_tool:  # results of calls made together: one user turn
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response})
            previous_was_tool = True
            continue
        previous_was_tool = False
        turn = dict(turn)
        calls = turn.pop("tool_calls", None)
        if calls:
            text = "\n".join(_call_text(c) for c in calls)
            turn["content"] = f"{turn['content']}\n{text}" if turn["content"].strip() else text
        out.append(turn)
    return out


def _clean(turns: Conversation) -> list[dict[str, Any]]:
    return [{k: v for k, v in t.items() if k in TEMPLATE_KEYS} for t in turns]


def _apply_template(tokenizer: Any, turns: Conversation, tools: list[dict[str, Any]] | None = None,
                    generation_prompt: bool = False) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(_clean(turns), tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except TemplateError as exc:
        raise DataError(
            f"the tokenizer's chat template rejected this conversation ({exc}); fix the row, or set "
            "dataset.preprocessing.use_chat_template: false"
        ) from None


PROBE_NAMES = ("finetune_probe_schema_7f3a", "finetune_probe_call_7f3a", "finetune_probe_result_7f3a")


@functools.lru_cache(maxsize=8)
def _template_renders_tools(template: str, tokenizer: Any) -> bool:
    schema, call, result = PROBE_NAMES
    turns = [
        {"role": "user", "content": "probe"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": call, "arguments": {"x": 1}}, "id": "call_0"}]},
        {"role": "tool", "content": result, "tool_call_id": "call_0", "name": call},
        {"role": "assistant", "content": "done"},
    ]
    tools = [{"type": "function", "function": {"name": schema, "description": "probe",
                                               "parameters": {"type": "object", "properties": {}}}}]
    try:
        text = tokenizer.apply_chat_template(turns, tools=tools, tokenize=False)
    except Exception:  # noqa: BLE001 - any template failure means: not natively
        text = ""
    native = all(name in text for name in PROBE_NAMES)
    if not native:
        log.warning("the tokenizer's chat template does not render tools, tool calls and tool results; "
                    "rendering them as text in the Hermes form (<tools>, <tool_call>, <tool_response>)")
    return native


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders the tools schema, the calls and the results."""
    return _template_renders_tools(tokenizer.chat_template, tokenizer)


def render_with_template(turns: Conversation, tokenizer: Any, tools: list[dict[str, Any]] | None = None) -> Rendered:
    full = _apply_template(tokenizer, turns, tools)
    learned = []
    for i, turn in enumerate(turns):
        if not _learned(turn):
            continue
        probe = _apply_template(tokenizer, [*turns[:i], {**turn, "content": SENTINEL}], tools)
        before = probe[: probe.find(SENTINEL)] if SENTINEL in probe else None
        upto = _apply_template(tokenizer, turns[: i + 1], tools)
        if (before is None or not upto.startswith(before)) and turn.get("tool_calls"):
            # a call with no content: the turn starts where the generation prompt ends
            before = _apply_template(tokenizer, turns[:i], tools, generation_prompt=True)
        if before is None or not upto.startswith(before) or not full.startswith(upto):
            raise DataError(NOT_PREFIX_STABLE)
        learned.append((len(before), len(upto.rstrip())))
    return Rendered(full, learned)


# --- tokens ---------------------------------------------------------------------------------


def _token_ids_and_learned(text: str, learned: list[tuple[int, int]], tokenizer: Any) -> tuple[list[int], list[bool]]:
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    flags = [any(s <= start < e for s, e in learned) for start, _ in encoding["offset_mapping"]]
    return ids, flags


def _ends_with_eos(ids: list[int], eos: int, tokenizer: Any) -> int | None:
    """Index of a final EOS, looking past trailing whitespace tokens; None if not there."""
    i = len(ids) - 1
    while i >= 0 and ids[i] != eos and not tokenizer.decode([ids[i]]).strip():
        i -= 1
    return i if i >= 0 and ids[i] == eos else None


def encode(turns: Conversation, tokenizer: Any, pre: PreprocessingConfig, max_length: int) -> Encoded | None:
    """The pure core of `tokenize_conversation`, also saying whether it truncated."""
    rendered = render(turns, tokenizer, use_chat_template=pre.use_chat_template)
    ids, flags = _token_ids_and_learned(rendered.text, rendered.learned, tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if pre.add_bos_token and bos is not None and (not ids or ids[0] != bos):
        ids, flags = [bos, *ids], [False, *flags]
    if pre.add_eos_token and eos is not None:
        last = _ends_with_eos(ids, eos, tokenizer)
        if last is None:
            ids, flags = [*ids, eos], [*flags, True]
        else:
            ids, flags = ids[: last + 1], [*flags[:last], True]
    labels = list(ids) if pre.train_on_inputs else [t if f else IGNORE_INDEX for t, f in zip(ids, flags)]
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return Encoded(ids, labels, truncated)


def encode_document(text: str, tokenizer: Any, pre: PreprocessingConfig, max_length: int) -> list[Encoded]:
    """A raw document, every token learned, cut into pieces of `max_length` tokens (a last
    piece of one token, which predicts nothing, is left out)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if pre.add_bos_token and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    if pre.add_eos_token and eos is not None and (not ids or ids[-1] != eos):
        ids = [*ids, eos]
    pieces = [ids[i: i + max_length] for i in range(0, len(ids), max_length)]
    return [Encoded(piece, list(piece), False) for piece in pieces if len(piece) > 1]


def tokenize_conversation(turns: Conversation, tokenizer: Any, cfg: FineTuneConfig) -> dict[str, list[int]] | None:
    """input_ids, attention_mask and labels of one conversation; None when nothing is left
    to learn after truncating to training.max_seq_length (the sample is dropped)."""
    encoded = encode(turns, tokenizer, cfg.dataset.preprocessing, cfg.training.max_seq_length)
    return encoded.as_row() if encoded else None
