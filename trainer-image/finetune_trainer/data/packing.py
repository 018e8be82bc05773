"""Sample packing (training.sample_packing): many short samples in one row, none seeing another.

    pack(samples, capacity)   best-fit decreasing: each sample, longest first, goes into the
                              open row with the least room that still fits it (ties: the
                              oldest row), else a new row; deterministic, so a resumed run packs
                              the same rows
    packed_row(samples)       the row: input_ids and labels concatenated, position_ids
                              restarting at 0 for each sample, the first label of each sample
                              -100 (it would be predicted from the previous sample's last token)
    PackedCollator            pads rows; no attention_mask and no KV cache, so transformers
                              builds the block-diagonal causal mask from the position_ids (SDPA,
                              eager, flex) or runs flash-attention's varlen kernel: isolation.
                              Under flash-attention (FLATTENING_ATTENTION) the batch is one row
                              with no padding at all (padding-free, as TRL's padding_free and
                              transformers' DataCollatorWithFlattening); SDPA and eager keep
                              rows, since their mask over one long row would cost (B x T)^2

The response-only masks are the samples' own labels, kept as they are. Padding is one more
"sample" at the row's end (positions from 0, labels -100), so it attends only to itself.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .tokenize import IGNORE_INDEX

# Attention implementations whose masks transformers derives from packed position_ids
# (masking_utils.find_packed_sequence_indices; flash-attention's varlen path).
ISOLATING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
# Those whose cost follows the samples' own lengths (varlen), so one flattened row costs nothing more.
FLATTENING_ATTENTION = ("flash_attention_2", "flash_attention_3")


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Sample indices per row, best-fit decreasing into rows of `capacity` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for i in order:
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"sample {i} has {size} tokens, more than the row capacity {capacity}")
        at = bisect.bisect_left(room, (size, -1))
        if at < len(room):
            free, row = room.pop(at)
        else:
            free, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if free - size > 0:
            bisect.insort(room, (free - size, row))
    return [sorted(r) for r in rows]  # within a row, the data's own order


def packed_row(samples: Sequence[dict[str, list[int]]]) -> dict[str, list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for sample in samples:
        ids, marks = sample["input_ids"], list(sample["labels"])
        marks[0] = IGNORE_INDEX
        input_ids += ids
        labels += marks
        position_ids += range(len(ids))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


@dataclass(frozen=True)
class Packed:
    rows: list[dict[str, list[int]]]
    samples: int
    tokens: int
    capacity: int

    @property
    def efficiency(self) -> float:
        """Real tokens over row capacity: what fraction of each row's compute trains something."""
        return self.tokens / (len(self.rows) * self.capacity) if self.rows else 0.0


def pack_samples(samples: Sequence[dict[str, list[int]]], capacity: int) -> Packed:
    groups = pack([len(s["input_ids"]) for s in samples], capacity)
    rows = [packed_row([samples[i] for i in group]) for group in groups]
    return Packed(rows, len(samples), sum(len(s["input_ids"]) for s in samples), capacity)


class PackedCollator:
    """Pads packed rows (input_ids with the pad id, labels -100, position_ids counting from 0
    again) and leaves attention_mask out; unpacked rows (the evaluation set) go to `fallback`."""

    def __init__(self, pad_token_id: int, fallback: Any, *, flatten: bool = False):
        self.pad_token_id = pad_token_id
        self.fallback = fallback
        self.flatten = flatten

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if "position_ids" not in features[0]:
            return self.fallback(features)
        import torch

        if self.flatten:  # one row, no padding at all: flash-attention's varlen kernel splits it
            row = {k: [t for f in features for t in f[k]] for k in ("input_ids", "labels", "position_ids")}
            return {**{k: torch.tensor([v], dtype=torch.long) for k, v in row.items()}, "use_cache": False}
        width = max(len(f["input_ids"]) for f in features)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for f in features:
            pad = width - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            batch["position_ids"].append(list(f["position_ids"]) + list(range(pad)))
        # use_cache False: with a KV cache transformers reads the position_ids as one sequence
        # continuing and builds no packed mask (masking_utils: packing is detected without a cache).
        return {**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}, "use_cache": False}


def real_tokens(input_ids: Any, position_ids: Any, labels: Any, pad_token_id: int) -> int:
    """Tokens of a collated packed batch that are not padding. There is no attention_mask to
    count, and the pad id is often a token every sample holds (SmolLM2 pads with <|im_end|>), so
    padding is found by shape: the row's last segment (positions restarting at 0) when it is
    all pad ids and learns nothing."""
    total = 0
    for ids, positions, marks in zip(input_ids.tolist(), position_ids.tolist(), labels.tolist()):
        start = len(positions) - 1 - positions[::-1].index(0) if 0 in positions else 0
        tail = range(start, len(ids))
        padded = start > 0 and all(ids[i] == pad_token_id and marks[i] == IGNORE_INDEX for i in tail)
        total += start if padded else len(ids)
    return total


def isolation_problem(model: Any) -> str | None:
    """Why packed rows would leak between samples in this model, or None when they cannot."""
    import inspect

    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    if attention not in ISOLATING_ATTENTION:
        return (f"training.sample_packing: the model's attention ({attention}) cannot keep packed samples apart; "
                f"load it with sdpa, eager or flash-attention, or set sample_packing to false")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return (f"training.sample_packing: {type(base).__name__} takes no position_ids, so packed samples would "
                f"see each other; set sample_packing to false")
    return None
