"""What `finetune validate` says about the data, before any training.

It reads local files and s3:// objects (never a Hugging Face dataset: validate downloads
nothing), parses every row, and, when the tokenizer is at hand without a download (the
built-in model, a local folder, the Hugging Face cache), tokenizes them as training will:
per-file counts (rows, samples, turns, tool calls, tokens, the share learned, samples
truncated at max_seq_length) and every bad row. Bad rows beyond `dataset.skip_bad_rows`
are an error, as in `finetune train`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import DataError
from .formats import bad_rows_error
from .sources import is_hub_dataset, read_rows

if TYPE_CHECKING:
    from finetune_trainer.config.schema import FineTuneConfig

SPLITS = (("train", "dataset.train_path"), ("eval", "dataset.eval_path"))


@dataclass
class DataCheck:
    lines: list[str] = field(default_factory=list)  # what to print
    errors: list[str] = field(default_factory=list)  # each one makes validate exit 1
    warnings: list[str] = field(default_factory=list)


def local_tokenizer(cfg: FineTuneConfig) -> tuple[Any | None, str | None]:
    """The tokenizer if it loads with the Hub switched off, else (None, why)."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # this process is a validation: nothing is fetched
    from finetune_trainer.model.loading import load_tokenizer

    try:
        return load_tokenizer(cfg), None
    except Exception as exc:  # noqa: BLE001 - any failure: count rows only, and say why
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def check_data(cfg: FineTuneConfig, *, tokenizer: Any | None = None, load_tokenizer: bool = True) -> DataCheck:
    from . import encode_rows

    check = DataCheck()
    locations = [(name, key, getattr(cfg.dataset, key.split(".")[1])) for name, key in SPLITS]
    locations = [(n, k, loc) for n, k, loc in locations if loc]
    if not locations:
        return check
    readable = [(n, k, loc) for n, k, loc in locations if not is_hub_dataset(loc)]
    for name, key, location in locations:
        if is_hub_dataset(location):
            check.lines.append(f"{key}: {location} is a Hugging Face dataset ID; not downloaded by validate")
    missing = [(n, k, loc) for n, k, loc in readable if not loc.startswith("s3://") and not _exists(loc)]
    for name, key, location in missing:  # like a DeepSpeed file: it may live in the image or a volume
        check.warnings.append(f"{key}: {location} not found here (relative paths are read from {os.getcwd()}); "
                              "finetune train fails unless it exists where the trainer runs")
    readable = [entry for entry in readable if entry not in missing]
    if readable and tokenizer is None and load_tokenizer:
        tokenizer, why = local_tokenizer(cfg)
        if tokenizer is None:
            check.lines.append(f"token counts skipped: the tokenizer of {cfg.model.tokenizer or cfg.model.base_model} "
                               f"is not available without a download ({why})")
    for name, key, location in readable:
        try:
            rows = read_rows(location, field=key)
            samples, stats, problems = encode_rows(rows, cfg, tokenizer, source=rows.source)
        except DataError as exc:
            check.errors.append(str(exc))
            continue
        check.lines.append(f"{key} {rows.source}: " + stats.summary(name, cfg.training.max_seq_length if tokenizer else None)
                           + (f", {stats.truncated / stats.samples:.0%} of samples truncated" if tokenizer and stats.samples else ""))
        bound = cfg.dataset.skip_bad_rows
        if problems:
            message = str(bad_rows_error(rows.source, problems))
            if len(problems) > bound:
                check.errors.append(message + (f"\n  {len(problems)} bad rows is more than dataset.skip_bad_rows ({bound})"
                                               if bound else "\n  fix these rows, or set dataset.skip_bad_rows: N to skip up to N bad rows"))
            else:
                check.lines.append(message + f"\n  (skipped in training: dataset.skip_bad_rows is {bound})")
        if tokenizer is not None and not samples and stats.dropped:
            check.errors.append(f"{key}: none of the samples in {rows.source} has a response token left within "
                                f"training.max_seq_length ({cfg.training.max_seq_length}); raise it or shorten the prompts")
    return check


def _exists(location: str) -> bool:
    from pathlib import Path

    name, _, split = location.partition(":")
    return Path(location).expanduser().exists() or bool(split and Path(name).expanduser().is_dir())
