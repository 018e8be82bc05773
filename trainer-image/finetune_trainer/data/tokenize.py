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
5. Truncate to `training.max_seq_length`; a sample with no learned token left is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import DataError

if TYPE_CHECKING:
    from finetune_trainer.config.schema import FineTuneConfig, PreprocessingConfig

    from .formats import Conversation

IGNORE_INDEX = -100
SENTINEL = "\u241eFINETUNE-RESPONSE\u241e"
PLAIN_HEADERS = {"system": "### System:", "user": "### Instruction:", "assistant": "### Response:"}
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


def render(turns: Conversation, tokenizer: Any, *, use_chat_template: bool) -> Rendered:
    if use_chat_template and has_chat_template(tokenizer):
        return render_with_template(turns, tokenizer)
    return render_plain(turns, eos_text=getattr(tokenizer, "eos_token", None) or "")


def render_plain(turns: Conversation, *, eos_text: str) -> Rendered:
    text, learned = "", []
    for i, turn in enumerate(turns):
        text += ("\n\n" if text else "") + PLAIN_HEADERS[turn["role"]] + "\n"
        start = len(text)
        text += turn["content"]
        if turn["role"] == "assistant":
            if i < len(turns) - 1:
                text += eos_text
            learned.append((start, len(text)))
    return Rendered(text, learned)


def _apply_template(tokenizer: Any, turns: Conversation) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(turns, tokenize=False)
    except TemplateError as exc:
        raise DataError(
            f"the tokenizer's chat template rejected this conversation ({exc}); fix the row, or set "
            "dataset.preprocessing.use_chat_template: false"
        ) from None


def render_with_template(turns: Conversation, tokenizer: Any) -> Rendered:
    full = _apply_template(tokenizer, turns)
    learned = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        probe = _apply_template(tokenizer, [*turns[:i], {**turn, "content": SENTINEL}])
        before = probe[: probe.find(SENTINEL)] if SENTINEL in probe else None
        upto = _apply_template(tokenizer, turns[: i + 1])
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


def tokenize_conversation(turns: Conversation, tokenizer: Any, cfg: FineTuneConfig) -> dict[str, list[int]] | None:
    """input_ids, attention_mask and labels of one conversation; None when nothing is left
    to learn after truncating to training.max_seq_length (the sample is dropped)."""
    encoded = encode(turns, tokenizer, cfg.dataset.preprocessing, cfg.training.max_seq_length)
    return encoded.as_row() if encoded else None
