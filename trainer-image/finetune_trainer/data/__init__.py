"""The trainer's data stage: rows -> conversations -> token ids with masked labels.

    read_rows (sources.py)         local .json/.jsonl, s3://, Hugging Face dataset IDs
    to_conversations (formats.py)  alpaca / sharegpt / oasst / custom -> role/content turns
    tokenize_conversation          chat template (or plain format), loss on responses only,
    (tokenize.py)                  BOS/EOS, truncation at training.max_seq_length
    prepare_data                   all of it, for dataset.train_path and dataset.eval_path

Problems a user can fix raise `DataError` naming the config field, or the file and row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import DataError
from .formats import Conversation, numbered_conversations, to_conversations
from .sources import Rows, read_rows
from .tokenize import IGNORE_INDEX, encode, tokenize_conversation

if TYPE_CHECKING:
    import datasets

    from finetune_trainer.config.schema import FineTuneConfig

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

    def summary(self, name: str = "train", max_length: int | None = None) -> str:
        at = f" at {max_length} tokens" if max_length else ""
        return (
            f"{name}: {self.rows} rows -> {self.samples} samples, {self.tokens} tokens; "
            f"{self.truncated} of {self.samples + self.dropped} samples truncated{at}, {self.dropped} dropped"
        )


@dataclass
class PreparedData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    stats: dict[str, DataStats]


def encode_split(
    rows: Rows, cfg: FineTuneConfig, tokenizer: Any, *, source: str
) -> tuple[list[dict[str, list[int]]], DataStats]:
    """Tokenized samples of one split and their stats; errors name the row."""
    samples, truncated, dropped = [], 0, 0
    pre, max_length = cfg.dataset.preprocessing, cfg.training.max_seq_length
    for number, turns in numbered_conversations(rows, cfg, source=source):
        try:
            encoded = encode(turns, tokenizer, pre, max_length)
        except DataError as exc:
            raise DataError(f"{source} row {number}: {exc}") from None
        if encoded is None:
            dropped += 1
            continue
        truncated += encoded.truncated
        samples.append(encoded.as_row())
    tokens = sum(len(s["input_ids"]) for s in samples)
    return samples, DataStats(len(rows), len(samples), truncated, dropped, tokens)


def _prepare_split(location: str, field: str, cfg: FineTuneConfig, tokenizer: Any) -> tuple[datasets.Dataset, DataStats]:
    import datasets

    rows = read_rows(location, field=field)
    samples, stats = encode_split(rows, cfg, tokenizer, source=rows.source)
    if not samples:
        raise DataError(
            f"{field}: none of the {stats.dropped} samples in {rows.source} has a response token left "
            f"within training.max_seq_length ({cfg.training.max_seq_length}); raise it or shorten the prompts"
        )
    columns = {key: [s[key] for s in samples] for key in ("input_ids", "attention_mask", "labels")}
    return datasets.Dataset.from_dict(columns), stats


def prepare_data(cfg: FineTuneConfig, tokenizer: Any) -> PreparedData:
    """The training set (and the evaluation set when dataset.eval_path is set), tokenized."""
    if not cfg.dataset.train_path:
        raise DataError("dataset.train_path is not set; point it at a JSON/JSONL file, an s3:// URI or a Hugging Face dataset ID")
    train, train_stats = _prepare_split(cfg.dataset.train_path, "dataset.train_path", cfg, tokenizer)
    stats = {"train": train_stats}
    evaluation = None
    if cfg.dataset.eval_path:
        evaluation, stats["eval"] = _prepare_split(cfg.dataset.eval_path, "dataset.eval_path", cfg, tokenizer)
    return PreparedData(train, evaluation, stats)


def data_collator(tokenizer: Any) -> Any:
    """Pads a batch: input_ids with the pad id, attention_mask with 0, labels with -100
    (transformers' DataCollatorForSeq2Seq; padding side follows `tokenizer.padding_side`).
    A tokenizer without a pad token pads with EOS (masked out, so never learned)."""
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise DataError("the tokenizer has neither a pad token nor an EOS token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
