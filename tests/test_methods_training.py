"""Each fine-tuning method on the tiny Llama: which parameters train, that a few optimizer
steps on a fixed batch lower the loss, and that exactly the trainable tensors changed.
QLoRA and Spectrum on 4-bit run bitsandbytes NF4 on CPU; Spectrum on 8-bit LLM.int8."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from finetune_trainer.config.issues import ConfigError
from finetune_trainer.config.schema import FineTuneConfig
from finetune_trainer.methods import MethodResult, prepare_model
from finetune_trainer.methods.lora import lora_config
from finetune_trainer.methods.spectrum import SpectrumScanError, scan_snr
from finetune_trainer.model.loading import model_skeleton
from finetune_trainer.model.modules import layer_linear_modules, linear_modules

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_cfg(model_dir: Path, method: str, *, model=None, fine_tuning=None, training=None) -> FineTuneConfig:
    return FineTuneConfig.model_validate(
        {
            "model": {"base_model": str(model_dir), **(model or {})},
            "fine_tuning": {"method": method, **(fine_tuning or {})},
            "training": training or {},
        }
    )


@pytest.fixture(scope="module")
def batch(tiny_model_dir) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(
        ["Low-rank adapters learn fast.", "Spectrum trains the modules with the most signal."],
        return_tensors="pt",
        padding=True,
    )
    labels = ids.input_ids.masked_fill(ids.attention_mask == 0, -100)
    return {"input_ids": ids.input_ids, "attention_mask": ids.attention_mask, "labels": labels}


def on_device(model, batch) -> dict[str, torch.Tensor]:
    """The batch where the model is: a quantized model is placed on the GPU when one exists."""
    device = next(model.parameters()).device
    return {key: value.to(device) for key, value in batch.items()}


def eval_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return model(**on_device(model, batch)).loss.item()


def train_and_diff(result: MethodResult, batch, *, steps: int = 4, lr: float = 1e-2) -> tuple[float, float, set[str]]:
    """(loss before, loss after, names of the parameters that changed) after `steps` AdamW
    steps (no weight decay: only gradients move weights) on one fixed batch."""
    model = result.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    first = eval_loss(model, batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        model(**on_device(model, batch)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    last = eval_loss(model, batch)
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}
    return first, last, changed


def trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def assert_trains_exactly_trainable(result: MethodResult, batch, **kwargs) -> None:
    first, last, changed = train_and_diff(result, batch, **kwargs)
    assert math.isfinite(first) and last < first - 0.05, (first, last)
    assert changed == trainable(result.model)


# ------------------------------------------------------------------ full, LoRA, QLoRA


def test_full_trains_everything(tiny_model_dir, batch):
    result = prepare_model(make_cfg(tiny_model_dir, "full"))
    names = {name for name, _ in result.model.named_parameters()}
    assert trainable(result.model) == names
    assert result.trainable_params == result.total_params == sum(p.numel() for p in result.model.parameters())
    assert_trains_exactly_trainable(result, batch, lr=1e-3)


def test_lora_trains_only_adapters(tiny_model_dir, batch):
    cfg = make_cfg(tiny_model_dir, "lora", fine_tuning={"lora": {"r": 4, "alpha": 8, "dropout": 0.0}})
    result = prepare_model(cfg)
    names = trainable(result.model)
    assert len(names) == 2 * 7 * 2  # lora_A and lora_B on 7 projections in 2 layers
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    assert result.trainable_params == 2 * 4 * (64 + 64 + 64 + 32 + 32 + 64 + 64 + 64 + 64 + 128 + 64 + 128 + 128 + 64)
    assert "rank-4 adapters (alpha 8) on 14 modules" in result.description
    assert_trains_exactly_trainable(result, batch)


def test_qlora_4bit_with_gradient_checkpointing(tiny_model_dir, batch):
    import bitsandbytes as bnb

    cfg = make_cfg(tiny_model_dir, "qlora", fine_tuning={"lora": {"r": 4, "dropout": 0.0}},
                   training={"gradient_checkpointing": True})
    result = prepare_model(cfg)
    base = result.model.get_base_model()
    assert isinstance(base.model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
    assert base.is_activation_checkpointing
    assert all(".lora_" in n for n in trainable(result.model)) and len(trainable(result.model)) == 28
    assert "4-bit base" in result.description
    assert result.total_params == prepare_model(make_cfg(tiny_model_dir, "lora", fine_tuning={"lora": {"r": 4}})).total_params
    assert_trains_exactly_trainable(result, batch)


def test_lora_on_8bit_base(tiny_model_dir, batch):
    cfg = make_cfg(tiny_model_dir, "lora", model={"load_in_8bit": True},
                   fine_tuning={"lora": {"r": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}})
    result = prepare_model(cfg)
    assert len(trainable(result.model)) == 2 * 2 * 2
    assert_trains_exactly_trainable(result, batch)


@pytest.mark.parametrize(
    ("lora", "expected"),
    [
        ({}, {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": set(PROJECTIONS), "bias": "none"}),
        (
            {"r": 8, "alpha": 12.5, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"], "bias": "lora_only"},
            {"r": 8, "lora_alpha": 12.5, "lora_dropout": 0.1, "target_modules": {"q_proj", "v_proj"}, "bias": "lora_only"},
        ),
        ({"target_modules": "all-linear", "bias": "all"}, {"target_modules": "all-linear", "bias": "all"}),
    ],
)
def test_lora_config(lora, expected):
    config = lora_config(make_cfg(Path("org/m"), "lora", fine_tuning={"lora": lora}))
    assert config.task_type == "CAUSAL_LM"
    for key, value in expected.items():
        assert getattr(config, key) == value, key


def test_unknown_target_module_names_field_and_lists_modules(tiny_model_dir):
    cfg = make_cfg(tiny_model_dir, "lora", fine_tuning={"lora": {"target_modules": ["q_proj", "qkv_proj"]}})
    with pytest.raises(ConfigError) as err:
        prepare_model(cfg)
    assert str(err.value) == (
        "fine_tuning.lora.target_modules: 'qkv_proj' matches no module of this model; its linear modules are: "
        'down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj (or use "all-linear")'
    )


# ------------------------------------------------------------------ Spectrum


def test_spectrum_trains_selected_modules_and_writes_selection(tiny_model_dir, batch, tmp_path):
    result = prepare_model(make_cfg(tiny_model_dir, "spectrum"), output_dir=tmp_path)
    selection = result.spectrum
    assert selection is not None and selection.mode == "snr"
    assert len(selection.modules) == 14 and len(selection.trained) == 7  # one of two per type
    assert {m.type for m in selection.modules if m.trained} == {m.type for m in selection.modules}
    for kind in selection.types:  # the trained one of each type has the higher SNR
        pair = sorted((m for m in selection.modules if m.type == kind), key=lambda m: -m.snr)
        assert [m.trained for m in pair] == [True, False]
    # plus the (tied) embeddings and head, as in the reference: one parameter
    assert trainable(result.model) == {f"{name}.weight" for name in selection.trained} | {"model.embed_tokens.weight"}
    assert result.model.model.embed_tokens.weight.requires_grad
    assert not result.model.model.norm.weight.requires_grad

    written = json.loads((tmp_path / "spectrum_selection.json").read_text())
    assert written["snr_threshold"] == 0.5 and written["mode"] == "snr"
    assert [(m["module"], m["trained"]) for m in written["modules"]] == [(m.module, m.trained) for m in selection.modules]
    assert all(set(m) == {"module", "type", "layer", "snr", "trained"} for m in written["modules"])
    table = (tmp_path / "spectrum_selection.txt").read_text()
    assert "7 of 14 linear modules train" in table and "model.layers.1.mlp.down_proj" in table

    assert_trains_exactly_trainable(result, batch, lr=1e-3)


def test_spectrum_threshold_changes_how_many_train(tiny_model_dir):
    everything = prepare_model(make_cfg(tiny_model_dir, "spectrum", fine_tuning={"spectrum": {"snr_threshold": 0.0}}))
    assert len(everything.spectrum.trained) == 14
    with pytest.raises(ConfigError, match=r"^fine_tuning.spectrum.snr_threshold: 1 selects no module"):
        prepare_model(make_cfg(tiny_model_dir, "spectrum", fine_tuning={"spectrum": {"snr_threshold": 1.0}}))


def test_spectrum_on_4bit_quantizes_only_frozen_modules(tiny_model_dir, batch, tmp_path):
    import bitsandbytes as bnb

    full_precision = prepare_model(make_cfg(tiny_model_dir, "spectrum")).spectrum
    result = prepare_model(make_cfg(tiny_model_dir, "spectrum", model={"load_in_4bit": True}), output_dir=tmp_path)
    selection = result.spectrum
    # the scan ran on full-precision weights: the same choice as without quantization
    assert selection.trained == full_precision.trained and selection.quantized_bits == 4
    layers = layer_linear_modules(result.model)
    for name, module in layers.items():
        if name in selection.trained:
            assert type(module) is nn.Linear and module.weight.dtype == torch.float32
            assert module.weight.requires_grad
        else:
            assert isinstance(module, bnb.nn.Linear4bit) and not module.weight.requires_grad
    assert "the rest frozen in 4-bit" in result.description
    assert_trains_exactly_trainable(result, batch, lr=1e-3)


def test_spectrum_on_4bit_trains_in_the_transformers_trainer(tiny_model_dir, batch, tmp_path):
    """The Trainer refuses "purely quantized" models; ours has trainable unquantized modules."""
    from transformers import Trainer, TrainingArguments

    result = prepare_model(make_cfg(tiny_model_dir, "spectrum", model={"load_in_4bit": True}))
    before = {n: p.detach().clone() for n, p in result.model.named_parameters()}
    rows = [{k: v[0].tolist() for k, v in batch.items()}] * 4
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=5e-3,
        lr_scheduler_type="constant", use_cpu=not torch.cuda.is_available(), bf16=True, report_to="none",
        save_strategy="no", logging_steps=1,
    )
    trainer = Trainer(model=result.model, args=args, train_dataset=rows)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    changed = {n for n, p in result.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == {f"{name}.weight" for name in result.spectrum.trained} | {"model.embed_tokens.weight"}


def test_spectrum_layers_on_8bit(tiny_model_dir, batch, tmp_path):
    import bitsandbytes as bnb

    cfg = make_cfg(tiny_model_dir, "spectrum", model={"load_in_8bit": True},
                   fine_tuning={"spectrum": {"layers_to_finetune": [1]}})
    result = prepare_model(cfg, output_dir=tmp_path)
    assert result.spectrum.mode == "layers"
    assert set(result.spectrum.trained) == {f"model.layers.1.{k}.{p}" for k, p in
                                            [("self_attn", p) for p in PROJECTIONS[:4]] + [("mlp", p) for p in PROJECTIONS[4:]]}
    assert all(isinstance(m, bnb.nn.Linear8bitLt) for m in result.model.model.layers[0].modules() if isinstance(m, nn.Linear))
    assert json.loads((tmp_path / "spectrum_selection.json").read_text())["modules"][0]["snr"] is None
    assert_trains_exactly_trainable(result, batch, lr=1e-3)


def test_spectrum_layer_out_of_range(tiny_model_dir):
    cfg = make_cfg(tiny_model_dir, "spectrum", fine_tuning={"spectrum": {"layers_to_finetune": [0, 2]}})
    with pytest.raises(ConfigError) as err:
        prepare_model(cfg)
    assert str(err.value) == (
        "fine_tuning.spectrum.layers_to_finetune: layer 2 does not exist; this model has 2 layers, indices 0-1"
    )


def test_spectrum_scan_fails_instead_of_training_everything(tiny_model_dir):
    skeleton = model_skeleton(make_cfg(tiny_model_dir, "spectrum"))  # weights on the meta device
    with pytest.raises(SpectrumScanError, match="does not fall back to training everything"):
        scan_snr(skeleton)
    assert "lm_head" in linear_modules(skeleton)  # the head is a linear module but not scanned
    assert "lm_head" not in layer_linear_modules(skeleton)


def test_evaluating_first_does_not_change_4bit_gradients(tiny_model_dir, batch):
    """bitsandbytes 0.50 repacks 4-bit weights for CPU inference on an eval-mode forward and
    then backpropagates wrongly through them; the loader turns that repacking off."""

    def grads(evaluate_first: bool) -> dict[str, torch.Tensor]:
        cfg = make_cfg(tiny_model_dir, "spectrum", model={"load_in_4bit": True},
                       fine_tuning={"spectrum": {"layers_to_finetune": [0]}})
        model = prepare_model(cfg).model
        if evaluate_first:
            eval_loss(model, batch)
        model.train()
        model(**on_device(model, batch)).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, after_eval = grads(False), grads(True)
    assert plain.keys() == after_eval.keys() and len(plain) == 7 + 1  # layer 0's projections, the tied embeddings
    for name in plain:
        torch.testing.assert_close(after_eval[name], plain[name], msg=name)
