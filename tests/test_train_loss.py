"""The loss over learned tokens (training/loss.py, training/trainer.py) and LoRA's CPU dropout
(methods/dropout.py): each must give what transformers and peft give, only cheaper.

The loss: equal to the model's own `labels=` loss and gradients (fp32), with and without the
Trainer's num_items_in_batch, on padded and packed batches, while the head really sees only the
learned positions; and a Trainer run with gradient accumulation logs the same losses as plain
transformers. The dropout: the same drop rate, scale and backward mask, reproducible from the
seed, and the adapter it trains saves the same keys."""

from __future__ import annotations

import json
import math

import pytest
import torch

from finetune_trainer.methods.dropout import CpuDropout, drop_mask, use_cpu_dropout
from finetune_trainer.training.loss import LearnedPositions, learned_mask, learned_token_loss

IGNORE = -100


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")


def _batch(vocab: int, *, packed: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 24), generator=g)
    labels = ids.clone()
    labels[:, :9] = IGNORE  # prompts
    labels[2, 18:] = IGNORE  # padding
    extra = {}
    if packed:  # two samples per row; the second's first label never learned from the first
        extra["position_ids"] = torch.cat([torch.arange(10), torch.arange(14)]).repeat(3, 1)
        labels[:, 10] = IGNORE
    return ids, labels, extra


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("num_items", [None, 37])
def test_the_loss_and_gradients_equal_the_models_own(tiny, packed, num_items):
    ids, labels, extra = _batch(tiny.config.vocab_size, packed=packed)
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    tiny.zero_grad(set_to_none=True)
    reference = tiny(input_ids=ids, labels=labels, **extra, **kwargs).loss
    reference.backward()
    expected = _grads(tiny)

    tiny.zero_grad(set_to_none=True)
    positions = LearnedPositions(tiny)
    try:
        with positions.armed(labels):
            outputs = tiny(input_ids=ids, **extra)
        loss = learned_token_loss(outputs, labels, kwargs.get("num_items_in_batch"))
        loss.backward()
    finally:
        positions.remove()
    learned = int((labels[:, 1:] != IGNORE).sum())
    assert outputs.logits.shape == (learned, tiny.config.vocab_size)  # the head saw K rows, not B x T
    assert positions.selected == 1
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    got = _grads(tiny)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_head_input_of_another_shape_is_left_whole_and_the_loss_still_holds(tiny):
    ids, labels, _ = _batch(tiny.config.vocab_size, packed=False)
    positions = LearnedPositions(tiny)
    try:
        with positions.armed(labels[:, :-1]):  # a mask that does not describe this forward
            outputs = tiny(input_ids=ids)
    finally:
        positions.remove()
    assert outputs.logits.dim() == 3 and positions.selected == 0
    assert learned_token_loss(outputs, labels).item() == pytest.approx(tiny(input_ids=ids, labels=labels).loss.item(),
                                                                      rel=1e-6)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("num_items", [None, 37])
def test_a_head_the_hook_misses_gets_transformers_own_loss_over_the_full_logits(tiny, packed, num_items, monkeypatch):
    ids, labels, extra = _batch(tiny.config.vocab_size, packed=packed)
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    with torch.no_grad():
        reference = tiny(input_ids=ids, labels=labels, **extra, **kwargs).loss
    # a model whose head is not its output embeddings: the hook sits on a module its forward never calls
    monkeypatch.setattr(tiny, "get_output_embeddings", lambda: torch.nn.Linear(1, 1))
    positions = LearnedPositions(tiny)
    with torch.no_grad(), positions.armed(labels):
        outputs = tiny(input_ids=ids, **extra)
    assert outputs.logits.shape[:2] == ids.shape and positions.selected == 0
    loss = learned_token_loss(outputs, labels, kwargs.get("num_items_in_batch"))
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize("misfit", [lambda x: x[:, 1:], lambda x: torch.cat([x[:, :2], x], dim=1),
                                    lambda x: x.flatten(0, 1)], ids=["shorter-T", "longer-T", "B*T-rows"])
def test_logits_that_line_up_with_neither_the_labels_nor_the_learned_positions_raise(tiny, misfit):
    ids, labels, _ = _batch(tiny.config.vocab_size, packed=False)
    with torch.no_grad():
        logits = misfit(tiny(input_ids=ids).logits)
    with pytest.raises(ValueError, match="line up with neither"):
        learned_token_loss({"logits": logits}, labels, torch.tensor(37))


def test_disarmed_the_model_is_untouched(tiny):
    ids, _, _ = _batch(tiny.config.vocab_size, packed=False)
    positions = LearnedPositions(tiny)
    try:
        assert tiny(input_ids=ids).logits.shape[:2] == ids.shape  # generation, benchmarks
    finally:
        positions.remove()


def test_the_mask_marks_the_positions_whose_next_token_is_learned():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE]])
    assert learned_mask(labels).tolist() == [[False, True, True, False, False]]


def _train(tmp_path, model_dir, trainer_cls, name):
    import datasets
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, AutoTokenizer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(2)
    rows = []
    for i in range(16):
        n = 8 + (i * 5) % 17
        ids = torch.randint(0, 1000, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [IGNORE] * (n // 2) + ids[n // 2:]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=5e-3, max_steps=4, logging_steps=1,
                             use_cpu=True, report_to="none", save_strategy="no", seed=3, dataloader_num_workers=0)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE, return_tensors="pt")
    trainer = trainer_cls(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), data_collator=collator)
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e], trainer


def test_a_trainer_run_with_gradient_accumulation_logs_the_losses_transformers_logs(tmp_path, tiny_model_dir):
    from transformers import Trainer

    from finetune_trainer.training.trainer import FineTuneTrainer

    ours, trainer = _train(tmp_path, tiny_model_dir, FineTuneTrainer, "ours")
    plain, _ = _train(tmp_path, tiny_model_dir, Trainer, "plain")
    assert trainer.learned_positions.selected >= 8  # 4 steps x 2 micro-batches went through the narrow head
    assert len(ours) == len(plain) == 4
    assert ours == pytest.approx(plain, rel=1e-5)
    assert ours[-1] < ours[0]


# ----------------------------------------------------------------------------- the dropout


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_cpu_dropout_drops_at_the_rate_and_keeps_the_expectation(p):
    torch.manual_seed(0)
    x = torch.ones(400_000, requires_grad=True)
    dropout = CpuDropout(p).train()
    y = dropout(x)
    dropped = (y == 0).float().mean().item()
    sigma = math.sqrt(p * (1 - p) / x.numel())
    assert abs(dropped - p) < 5 * sigma + 1 / 65536
    assert y.mean().item() == pytest.approx(1.0, abs=5 * sigma / (1 - p) + 1e-4)  # E[y] = x
    y.sum().backward()
    assert torch.equal(x.grad == 0, y == 0)  # the backward uses the forward's mask
    assert torch.allclose(x.grad[x.grad != 0], y[y != 0])


def test_cpu_dropout_follows_the_seed_and_is_off_in_eval():
    x = torch.randn(1000)
    dropout = CpuDropout(0.2).train()
    torch.manual_seed(7)
    a = dropout(x)
    torch.manual_seed(7)
    assert torch.equal(a, dropout(x))
    assert not torch.equal(a, dropout(x))  # the generator moved on
    assert torch.equal(dropout.eval()(x), x)
    lanes = drop_mask((50_000,), 0.5)
    assert lanes.dtype == torch.bool and 0.49 < lanes.float().mean().item() < 0.51


def test_lora_layers_get_the_cpu_dropout_and_the_adapter_saves_the_same_keys(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def adapted():
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))

    plain, ours = adapted(), adapted()
    swapped = use_cpu_dropout(ours)
    assert swapped == sum(1 for n, _ in ours.named_modules() if n.endswith(".lora_A")) > 0
    assert all(isinstance(m, CpuDropout) for n, m in ours.named_modules() if n.endswith("lora_dropout.default"))
    from peft import get_peft_model_state_dict

    assert get_peft_model_state_dict(ours).keys() == get_peft_model_state_dict(plain).keys()
    assert json.dumps(ours.peft_config["default"].to_dict(), default=str) == json.dumps(
        plain.peft_config["default"].to_dict(), default=str)
