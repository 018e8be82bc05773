"""`finetune preview`: the first samples exactly as the model sees them, learned tokens marked.

Like axolotl's preprocess debug view: each sample is the decoded text of its token ids, the
tokens the loss is computed on shown in green on a terminal (between [[ and ]] otherwise),
with the token counts and the share learned. It reads the data and the tokenizer only,
never the model's weights, so it answers "what will this train on?" in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import DataError
from .formats import bad_rows_error, parse_rows
from .sources import read_rows
from .tokenize import IGNORE_INDEX, encode, encode_document

if TYPE_CHECKING:
    from finetune_trainer.config.schema import FineTuneConfig

GREEN, DIM, RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"
OPEN, CLOSE = "[[", "]]"


@dataclass(frozen=True)
class PreviewSample:
    row: int
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def learned(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def segments(sample: PreviewSample, tokenizer: Any) -> list[tuple[bool, str]]:
    """Runs of learned / not-learned tokens, each decoded as one piece of text."""
    out: list[tuple[bool, list[int]]] = []
    for token, label in zip(sample.input_ids, sample.labels):
        learned = label != IGNORE_INDEX
        if out and out[-1][0] == learned:
            out[-1][1].append(token)
        else:
            out.append((learned, [token]))
    return [(learned, tokenizer.decode(ids)) for learned, ids in out]


def learned_text(sample: PreviewSample, tokenizer: Any) -> list[str]:
    return [text for learned, text in segments(sample, tokenizer) if learned]


def render_sample(sample: PreviewSample, tokenizer: Any, *, color: bool, number: int) -> str:
    share = sample.learned / len(sample.input_ids) if sample.input_ids else 0.0
    cut = ", truncated at max_seq_length" if sample.truncated else ""
    header = (f"--- sample {number} (row {sample.row}): {len(sample.input_ids)} tokens, "
              f"{sample.learned} learned ({share:.0%}){cut}")
    body = "".join((f"{GREEN}{text}{RESET}" if color else f"{OPEN}{text}{CLOSE}") if learned
                   else (f"{DIM}{text}{RESET}" if color else text)
                   for learned, text in segments(sample, tokenizer))
    return f"{header}\n{body}"


def preview_samples(cfg: FineTuneConfig, tokenizer: Any, count: int, *, split: str = "train") -> list[PreviewSample]:
    """The first `count` samples of a split, tokenized as training does."""
    field = f"dataset.{split}_path"
    location = getattr(cfg.dataset, f"{split}_path")
    if not location:
        raise DataError(f"{field} is not set; nothing to preview")
    rows = read_rows(location, field=field)
    pre, max_length = cfg.dataset.preprocessing, cfg.training.max_seq_length
    out: list[PreviewSample] = []
    for start in range(0, len(rows), max(count, 16)):  # parse only as far as needed
        chunk = type(rows)(rows[start: start + max(count, 16)], source=rows.source,
                           row_numbers=rows.row_numbers[start: start + max(count, 16)])
        conversations, problems = parse_rows(chunk, cfg, source=rows.source)
        if problems:
            raise bad_rows_error(rows.source, problems)
        for number, conversation in conversations:
            if cfg.dataset.format == "text":
                pieces = encode_document(conversation[0]["content"], tokenizer, pre, max_length)
            else:
                encoded = encode(conversation, tokenizer, pre, max_length)
                pieces = [encoded] if encoded else []
            out += [PreviewSample(number, p.input_ids, p.labels, p.truncated) for p in pieces]
            if len(out) >= count:
                return out[:count]
    return out
