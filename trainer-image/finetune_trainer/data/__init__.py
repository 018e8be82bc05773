"""The trainer's data stage: rows -> conversations -> token ids with masked labels.

    read_rows (sources.py)         local .json/.jsonl, s3://, Hugging Face dataset IDs
    to_conversations (formats.py)  alpaca / sharegpt / oasst / custom -> role/content turns
    tokenize_conversation          chat template (or plain format), loss on responses only,
    (tokenize.py)                  tools, BOS/EOS, truncation at training.max_seq_length;
                                   raw documents (format text) learned whole, in pieces
    pack_samples (packing.py)      training.sample_packing: short samples share rows, isolated
    prepare_data                   all of it, for dataset.train_path and dataset.eval_path

Problems a user can fix raise `DataError` naming the config field, or the file and row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import logging

from .errors import DataError
from .formats import Conversation, bad_rows_error, parse_rows, to_conversations
from .sources import Rows, read_rows
from .tokenize import IGNORE_INDEX, encode, encode_document, tokenize_conversation

if TYPE_CHECKING:
    import datasets

    from finetune_trainer.config.schema import FineTuneConfig

log = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "Conversation",
    "DataError",
    "DataStats",
    "PreparedData",
    "data_collator",
    "prepare_data",
    "read_rows",
    "to_conversations",
    "tokenize_conversation",
]


@dataclass
class DataStats:
    """What one split's preparation did; `summary()` is the trainer's log line."""

    rows: int  # rows read from the source
    samples: int  # samples kept for training
    truncated: int  # kept samples cut at training.max_seq_length
    dropped: int  # conversations with no learned token left after truncation
    tokens: int  # tokens in the kept samples
    skipped: int = 0  # bad rows skipped (dataset.skip_bad_rows)
    turns: int = 0  # turns in the kept conversations (documents: pieces)
    tool_calls: int = 0  # assistant tool calls in them
    learned_tokens: int = 0  # tokens with a label (what the loss is computed on)
    packed_rows: int = 0  # rows the samples were packed into (training.sample_packing), else 0
    packing_efficiency: float = 0.0  # real tokens / (packed rows x max_seq_length)

    def summary(self, name: str = "train", max_length: int | None = None) -> str:
        at = f" at {max_length} tokens" if max_length else ""
        learned = f" ({self.learned_tokens / self.tokens:.0%} learned)" if self.tokens else ""
        calls = f", {self.tool_calls} tool calls" if self.tool_calls else ""
        skipped = f", {self.skipped} bad rows skipped" if self.skipped else ""
        packed = (f"; packed into {self.packed_rows} rows ({self.packing_efficiency:.0%} of their capacity is real "
                  f"tokens)" if self.packed_rows else "")
        return (
            f"{name}: {self.rows} rows -> {self.samples} samples, {self.tokens} tokens{learned}, "
            f"{self.turns} turns{calls}; "
            f"{self.truncated} of {self.samples + self.dropped} samples truncated{at}, {self.dropped} dropped{skipped}"
            f"{packed}"
        )

    def as_dict(self) -> dict[str, int | float]:
        return dict(self.__dict__)


@dataclass
class PreparedData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    stats: dict[str, DataStats]


def encode_rows(
    rows: Rows, cfg: FineTuneConfig, tokenizer: Any | None, *, source: str
) -> tuple[list[dict[str, list[int]]], DataStats, list[tuple[int, str]]]:
    """Samples, stats and every bad row (number, what is wrong), sorted; raises for no row.
    Without a tokenizer (validate with a model it may not download) only the rows are
    parsed: samples stay empty and the token counts 0."""
    samples, truncated, dropped, turns, calls, kept = [], 0, 0, 0, 0, 0
    pre, max_length = cfg.dataset.preprocessing, cfg.training.max_seq_length
    conversations, problems = parse_rows(rows, cfg, source=source)
    for number, conversation in conversations:
        if tokenizer is None:
            kept += 1
            turns, calls = turns + len(conversation), calls + _tool_calls(conversation)
            continue
        try:
            if cfg.dataset.format == "text":
                pieces = encode_document(conversation[0]["content"], tokenizer, pre, max_length)
                turns += len(pieces)
                samples += [piece.as_row() for piece in pieces]
                continue
            encoded = encode(conversation, tokenizer, pre, max_length)
        except DataError as exc:
            problems.append((number, str(exc)))
            continue
        if encoded is None:
            dropped += 1
            continue
        truncated += encoded.truncated
        turns, calls = turns + len(conversation), calls + _tool_calls(conversation)
        samples.append(encoded.as_row())
    tokens = sum(len(s["input_ids"]) for s in samples)
    learned = sum(sum(1 for label in s["labels"] if label != IGNORE_INDEX) for s in samples)
    stats = DataStats(len(rows), len(samples) or kept, truncated, dropped, tokens, 0, turns, calls, learned)
    return samples, stats, sorted(problems)


def _tool_calls(conversation: Conversation) -> int:
    return sum(len(t.get("tool_calls") or ()) for t in conversation)


def encode_split(
    rows: Rows, cfg: FineTuneConfig, tokenizer: Any, *, source: str
) -> tuple[list[dict[str, list[int]]], DataStats]:
    """Tokenized samples of one split and their stats. Every bad row is collected; more of
    them than `dataset.skip_bad_rows` is one `DataError` listing them."""
    samples, stats, problems = encode_rows(rows, cfg, tokenizer, source=source)
    stats.skipped = skip_bad_rows(problems, cfg.dataset.skip_bad_rows, source=source)
    return samples, stats


def skip_bad_rows(problems: list[tuple[int, str]], bound: int, *, source: str) -> int:
    """How many bad rows are skipped; raises when there are more than `bound`."""
    if not problems:
        return 0
    problems = sorted(problems)
    if len(problems) > bound:
        hint = (f"\n  {len(problems)} bad rows is more than dataset.skip_bad_rows ({bound})" if bound else
                "\n  fix these rows, or set dataset.skip_bad_rows: N to skip up to N bad rows")
        raise bad_rows_error(source, problems, hint=hint if len(problems) > 1 or bound else "")
    log.warning("%s", bad_rows_error(source, problems, hint=f"\n  skipped (dataset.skip_bad_rows: {bound})"))
    return len(problems)


def _prepare_split(location: str, field: str, cfg: FineTuneConfig, tokenizer: Any,
                   *, packed: bool = False) -> tuple[datasets.Dataset, DataStats]:
    import datasets

    rows = read_rows(location, field=field)
    samples, stats = encode_split(rows, cfg, tokenizer, source=rows.source)
    if not samples and stats.dropped:
        raise DataError(
            f"{field}: none of the {stats.dropped} samples in {rows.source} has a response token left "
            f"within training.max_seq_length ({cfg.training.max_seq_length}); raise it or shorten the prompts"
        )
    if not samples:
        raise DataError(f"{field}: {rows.source} has no sample to train on ({stats.rows} rows, "
                        f"{stats.skipped} of them bad and skipped)")
    if packed:
        from .packing import pack_samples

        result = pack_samples(samples, cfg.training.max_seq_length)
        stats.packed_rows, stats.packing_efficiency = len(result.rows), round(result.efficiency, 4)
        columns = {key: [r[key] for r in result.rows] for key in ("input_ids", "labels", "position_ids")}
        return datasets.Dataset.from_dict(columns), stats
    columns = {key: [s[key] for s in samples] for key in ("input_ids", "attention_mask", "labels")}
    return datasets.Dataset.from_dict(columns), stats


def prepare_data(cfg: FineTuneConfig, tokenizer: Any) -> PreparedData:
    """The training set (and the evaluation set when dataset.eval_path is set), tokenized."""
    if not cfg.dataset.train_path:
        raise DataError("dataset.train_path is not set; point it at a JSON/JSONL file, an s3:// URI or a Hugging Face dataset ID")
    # Only the training set is packed: the evaluation set's rows are also the prompts the
    # report's sample answer is generated from, and its per-token loss is the same either way.
    train, train_stats = _prepare_split(cfg.dataset.train_path, "dataset.train_path", cfg, tokenizer,
                                        packed=cfg.training.sample_packing)
    stats = {"train": train_stats}
    evaluation = None
    if cfg.dataset.eval_path:
        evaluation, stats["eval"] = _prepare_split(cfg.dataset.eval_path, "dataset.eval_path", cfg, tokenizer)
    return PreparedData(train, evaluation, stats)


def data_collator(tokenizer: Any, *, attention: str | None = None) -> Any:
    """Pads a batch: input_ids with the pad id, attention_mask with 0, labels with -100
    (transformers' DataCollatorForSeq2Seq; padding side follows `tokenizer.padding_side`).
    A tokenizer without a pad token pads with EOS (masked out, so never learned)."""
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise DataError("the tokenizer has neither a pad token nor an EOS token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
    from .packing import FLATTENING_ATTENTION, PackedCollator

    # packed rows carry position_ids; `attention` (the model's implementation) decides flattening
    return PackedCollator(tokenizer.pad_token_id, fallback=padded, flatten=attention in FLATTENING_ATTENTION)
