"""training.sample_packing (data/packing.py): best-fit decreasing rows, per-sample position_ids,
boundary labels, and, on SmolLM2 in fp32, a packed batch's per-token loss equal to the same
samples run one by one; plus the test that fails when isolation is removed."""

from __future__ import annotations

import random

import pytest

from finetune_trainer.data.packing import (
    PackedCollator,
    isolation_problem,
    pack,
    pack_samples,
    packed_row,
)
from finetune_trainer.data.tokenize import IGNORE_INDEX


def test_best_fit_decreasing_places_every_sample_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    rows = pack(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    lower_bound = -(-sum(lengths) // 128)
    assert len(rows) <= lower_bound * 1.05 + 1  # BFD is near the bound on such data
    assert pack(lengths, 128) == rows  # deterministic: a resumed run packs the same rows


def test_best_fit_beats_first_fit_where_it_should():
    # first-fit in data order: [7, 2] [5, 4] [6]... BFD: 7+3? no: sorted 7,6,5,4,3,2,2,1 into 10s
    lengths = [7, 2, 5, 4, 6, 3, 2, 1]
    rows = pack(lengths, 10)
    assert len(rows) == 3 and all(sum(lengths[i] for i in r) == 10 for r in rows)


def test_a_sample_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="more than the row capacity"):
        pack([5, 11], 10)


def test_packed_row_restarts_positions_and_never_learns_across_a_boundary():
    a = {"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]}
    b = {"input_ids": [4, 5], "labels": [4, 5]}  # train_on_inputs: every label set
    row = packed_row([a, b])
    assert row["input_ids"] == [1, 2, 3, 4, 5]
    assert row["position_ids"] == [0, 1, 2, 0, 1]
    assert row["labels"] == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]  # b's first token is not predicted from a
    stats = pack_samples([a, b, a], capacity=8)
    assert stats.samples == 3 and stats.tokens == 8 and stats.efficiency == 8 / (len(stats.rows) * 8)


def test_collator_pads_as_a_sample_of_its_own_and_hands_unpacked_rows_on():
    collate = PackedCollator(pad_token_id=0, fallback=lambda features: "fallback")
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 0]},
                     {"input_ids": [8], "labels": [-100], "position_ids": [0]}])
    assert "attention_mask" not in batch and batch["use_cache"] is False  # the block-diagonal mask is derived
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert collate([{"input_ids": [1], "labels": [1], "attention_mask": [1]}]) == "fallback"


# ------------------------------------------------------------------ the model sees what it should


@pytest.fixture(scope="module")
def smollm2():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_trainer.model import builtin

    model = AutoModelForCausalLM.from_pretrained(builtin.model_dir(), dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    return model, AutoTokenizer.from_pretrained(builtin.tokenizer_dir())


def _samples(tokenizer) -> list[dict[str, list[int]]]:
    texts = ["The capital of France is Paris.", "Two plus two equals four, said the teacher.",
             "Water boils at one hundred degrees Celsius at sea level."]
    out = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]})
    return out


def _token_losses(model, batch) -> "torch.Tensor":  # noqa: F821
    import torch

    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "use_cache")},
                       use_cache=batch.get("use_cache")).logits
    labels = batch["labels"]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                               ignore_index=IGNORE_INDEX, reduction="none")
    return losses[labels[:, 1:].flatten() != IGNORE_INDEX]


def test_packed_loss_equals_unpacked_per_token(smollm2):
    import torch

    model, tokenizer = smollm2
    samples = _samples(tokenizer)
    one_by_one = torch.cat([_token_losses(model, {
        "input_ids": torch.tensor([s["input_ids"]]), "labels": torch.tensor([s["labels"]])}) for s in samples])
    packed = pack_samples(samples, capacity=sum(len(s["input_ids"]) for s in samples))
    assert len(packed.rows) == 1
    batch = PackedCollator(tokenizer.pad_token_id or 0, fallback=None)(packed.rows)
    # the row holds the samples in data order, so the learned tokens line up
    assert torch.allclose(_token_losses(model, batch), one_by_one, atol=1e-4)


def test_a_flattened_batch_trains_the_same_tokens_as_padded_rows(smollm2):
    """Padding-free (flash-attention's layout): the batch's rows end to end in one row, no pad
    token anywhere, and per-token losses equal the padded rows' (SDPA isolates both ways here)."""
    import torch

    model, tokenizer = smollm2
    samples = _samples(tokenizer)
    packed = pack_samples(samples, capacity=max(len(s["input_ids"]) for s in samples) + 2)
    assert len(packed.rows) >= 2  # several rows of unequal length: the padded layout pads
    padded = PackedCollator(tokenizer.pad_token_id or 0, fallback=None)(packed.rows)
    flat = PackedCollator(tokenizer.pad_token_id or 0, fallback=None, flatten=True)(packed.rows)
    real = sum(len(r["input_ids"]) for r in packed.rows)
    assert flat["input_ids"].shape == (1, real) and padded["input_ids"].numel() > real
    assert torch.allclose(_token_losses(model, flat), _token_losses(model, padded), atol=1e-4)


def test_flash_attention_flattens_and_sdpa_keeps_rows(builtin_tokenizer_dir):
    from transformers import AutoTokenizer

    from finetune_trainer.data import data_collator

    tokenizer = AutoTokenizer.from_pretrained(builtin_tokenizer_dir)
    assert data_collator(tokenizer, attention="flash_attention_2").flatten
    assert not data_collator(tokenizer, attention="sdpa").flatten


def test_without_isolation_the_second_sample_sees_the_first(smollm2):
    """The same packed row with plain positions (0..n) and no block mask: the losses move. So the
    equality above holds because of isolation, and this test fails if isolation is removed."""
    import torch

    model, tokenizer = smollm2
    samples = _samples(tokenizer)
    packed = pack_samples(samples, capacity=1024)
    batch = PackedCollator(tokenizer.pad_token_id or 0, fallback=None)(packed.rows)
    leaky = {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1])[None]}
    isolated, leaked = _token_losses(model, batch), _token_losses(model, leaky)
    first = len(samples[0]["input_ids"]) - 1  # the first sample's learned tokens are the same either way
    assert torch.allclose(isolated[:first], leaked[:first], atol=1e-4)
    assert (isolated[first:] - leaked[first:]).abs().max() > 1e-2


def test_a_model_that_cannot_isolate_is_refused():
    class Config:
        _attn_implementation = "some_custom_kernel"

    class Model:
        config = Config()

        def forward(self, input_ids, position_ids=None):
            pass

    assert "cannot keep packed samples apart" in isolation_problem(Model())
    Model.config._attn_implementation = "sdpa"
    assert isolation_problem(Model()) is None

    class NoPositions(Model):
        def forward(self, input_ids):
            pass

    assert "takes no position_ids" in isolation_problem(NoPositions())


def test_the_data_stage_log_line_says_how_well_it_packed():
    from finetune_trainer.data import DataStats

    stats = DataStats(rows=10, samples=10, truncated=0, dropped=0, tokens=800, packed_rows=4, packing_efficiency=0.78)
    assert "packed into 4 rows (78% of their capacity is real tokens)" in stats.summary()
    assert "packed" not in DataStats(rows=1, samples=1, truncated=0, dropped=0, tokens=5).summary()


def test_real_tokens_counts_pad_ids_inside_samples_and_not_the_padding():
    import torch

    pad = 2  # SmolLM2 pads with <|im_end|>, which ends every turn of every sample
    a = {"input_ids": [5, 6, pad], "labels": [IGNORE_INDEX, 6, pad]}
    b = {"input_ids": [7, pad], "labels": [IGNORE_INDEX, pad]}
    rows = [packed_row([a, b]), packed_row([b])]
    batch = PackedCollator(pad, fallback=None)(rows)
    from finetune_trainer.data.packing import real_tokens

    assert batch["input_ids"].shape == (2, 5)
    assert real_tokens(batch["input_ids"], batch["position_ids"], batch["labels"], pad) == 5 + 2
    assert int((batch["input_ids"] != pad).sum()) == 3 + 1  # what counting by pad id would say
