"""Model loading: the config -> transformers mappers (tables) and real loads of the tiny
Llama in fp32, 4-bit NF4 and 8-bit (bitsandbytes 0.50 runs both on CPU), plus the built-in
SmolLM2 from its GGUF file.

Device-agnostic: on a GPU machine the quantized loads are placed on the GPU and the same
tests pass (seen on an H100); test_gpu_training.py trains there with bf16, NF4, LLM.int8 and
Liger. flash_attention_2 running is covered nowhere (flash-attn ships no wheel to install).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from finetune_trainer.config.issues import ConfigError
from finetune_trainer.config.schema import FineTuneConfig
from finetune_trainer.model.loading import (
    apply_liger,
    attention_implementation,
    bnb_config,
    default_device_map,
    liger_options,
    load_model,
    load_tokenizer,
    resolve_model_source,
    weights_dtype,
)
from finetune_trainer.model.modules import layer_linear_modules, linear_modules


def make_cfg(base_model: str | Path = "org/model", *, model=None, method="lora", quantization=None, training=None):
    return FineTuneConfig.model_validate(
        {
            "model": {"base_model": str(base_model), **(model or {})},
            "fine_tuning": {"method": method, "quantization": quantization or {}},
            "training": training or {},
        }
    )


def tiny_batch(model_dir: Path, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """One sentence, on the model's device (a quantized model is placed on the GPU if one exists)."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(["Spectrum trains the modules with signal."], return_tensors="pt").input_ids
    if model is not None:
        ids = ids.to(next(model.parameters()).device)
    return {"input_ids": ids, "labels": ids}


# ------------------------------------------------------------------ pure mappers


def test_resolve_model_source(tmp_path):
    gguf = tmp_path / "weights" / "m.Q4.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert resolve_model_source(str(gguf)) == (str(gguf.parent), "m.Q4.gguf")
    assert resolve_model_source(str(tmp_path)) == (str(tmp_path), None)
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)


@pytest.mark.parametrize(
    ("base_model", "message"),
    [
        ("builtin:NoSuchModel", "model.base_model: unknown built-in model 'NoSuchModel'"),
        ("/nowhere/model.gguf", "model.base_model: GGUF file '/nowhere/model.gguf' does not exist"),
        ("./missing-model", "model.base_model: './missing-model' is not a directory"),
    ],
)
def test_resolve_model_source_errors(base_model, message):
    with pytest.raises(ConfigError) as err:
        resolve_model_source(base_model)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(
    ("model", "quantization", "skip", "expected"),
    [
        ({}, {}, None, None),
        (
            {"load_in_4bit": True},
            {},
            None,
            {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16,
             "bnb_4bit_use_double_quant": True, "llm_int8_skip_modules": None},
        ),
        (
            {"load_in_4bit": True},
            {"bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": "float16", "bnb_4bit_use_double_quant": False},
            ["model.layers.0.mlp.up_proj", "lm_head"],
            {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": torch.float16,
             "bnb_4bit_use_double_quant": False, "llm_int8_skip_modules": ["model.layers.0.mlp.up_proj", "lm_head"]},
        ),
        (
            {"load_in_4bit": True},
            {"bnb_4bit_compute_dtype": "float32"},
            None,
            {"load_in_4bit": True, "bnb_4bit_compute_dtype": torch.float32},
        ),
        ({"load_in_8bit": True}, {}, None, {"load_in_8bit": True, "load_in_4bit": False, "llm_int8_skip_modules": None}),
        ({"load_in_8bit": True}, {}, ["lm_head"], {"load_in_8bit": True, "llm_int8_skip_modules": ["lm_head"]}),
    ],
)
def test_bnb_config(model, quantization, skip, expected):
    config = bnb_config(make_cfg(model=model, quantization=quantization), skip)
    if expected is None:
        assert config is None
        return
    for key, value in expected.items():
        assert getattr(config, key) == value, key


def test_qlora_implies_4bit_config():
    config = bnb_config(make_cfg(method="qlora"))
    assert config is not None and config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"


@pytest.mark.parametrize(
    ("use_flash", "cuda", "installed", "impl", "why"),
    [
        (True, True, True, "flash_attention_2", "flash-attn is installed"),
        (True, True, False, "sdpa", "not installed"),
        (True, False, True, "sdpa", "needs a CUDA GPU"),
        (True, False, False, "sdpa", "needs a CUDA GPU"),
        (False, True, True, "sdpa", "use_flash_attention is false"),
    ],
)
def test_attention_implementation(use_flash, cuda, installed, impl, why):
    got, reason = attention_implementation(
        make_cfg(model={"use_flash_attention": use_flash}), cuda=cuda, flash_attn_installed=installed
    )
    assert got == impl
    assert why in reason


@pytest.mark.parametrize(
    ("method", "precision", "cuda", "dtype"),
    [
        ("lora", "bf16", False, "float32"),
        ("full", "bf16", False, "float32"),
        ("qlora", "fp16", False, "float32"),
        ("lora", "bf16", True, "bfloat16"),
        ("qlora", "fp16", True, "float16"),
        ("lora", "no", True, "float32"),
        ("full", "bf16", True, "float32"),
        ("spectrum", "bf16", True, "float32"),
    ],
)
def test_weights_dtype(method, precision, cuda, dtype):
    assert weights_dtype(make_cfg(method=method, training={"mixed_precision": precision}), cuda=cuda)[0] == dtype


def test_default_device_map(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert default_device_map(make_cfg(model={"load_in_4bit": True}), cuda=True) == {"": 3}
    assert default_device_map(make_cfg(model={"load_in_8bit": True}), cuda=True) == {"": 3}
    assert default_device_map(make_cfg(), cuda=True) is None
    assert default_device_map(make_cfg(model={"load_in_4bit": True}), cuda=False) is None


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_from_model_and_pad_fallback(tiny_model_dir, tmp_path):
    tok = load_tokenizer(make_cfg(tiny_model_dir))
    assert tok.pad_token is not None and len(tok) == 49152

    no_pad = tmp_path / "no-pad"
    tok.pad_token = None
    tok.save_pretrained(no_pad)
    tok2 = load_tokenizer(make_cfg("org/not-used", model={"tokenizer": str(no_pad)}))
    assert tok2.pad_token == tok2.eos_token == "<|im_end|>"


def test_tokenizer_error_names_the_field():
    with pytest.raises(ConfigError, match=r"^model.tokenizer: './nope' is not a directory"):
        load_tokenizer(make_cfg(model={"tokenizer": "./nope"}))


# ------------------------------------------------------------------ real loads


def test_load_fp32_with_checkpointing(tiny_model_dir, caplog):
    caplog.set_level("INFO", logger="finetune_trainer.model.loading")
    # mixed_precision "no": fp32 weights on a GPU too (with bf16 a LoRA base loads in bf16 there)
    model = load_model(make_cfg(tiny_model_dir, training={"gradient_checkpointing": True, "mixed_precision": "no"}))
    assert next(model.parameters()).dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert model.is_activation_checkpointing
    assert model.config.use_cache is False
    decisions = [r.getMessage() for r in caplog.records]
    assert any("attention sdpa (" in line for line in decisions)
    assert any("weights in float32" in line for line in decisions)
    # checkpointed forward + backward works with every base weight frozen but the last layer
    for name, param in model.named_parameters():
        param.requires_grad_(".layers.1." in name)
    loss = model(**tiny_batch(tiny_model_dir, model)).loss
    loss.backward()
    assert model.model.layers[1].mlp.up_proj.weight.grad is not None


def test_load_4bit_nf4(tiny_model_dir):
    import bitsandbytes as bnb

    model = load_model(make_cfg(tiny_model_dir, method="qlora"))
    layers = layer_linear_modules(model)
    assert len(layers) == 14
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in layers.values())
    assert layers["model.layers.0.self_attn.q_proj"].weight.quant_state.quant_type == "nf4"
    assert type(model.lm_head) is nn.Linear  # the head stays unquantized
    assert torch.isfinite(model(**tiny_batch(tiny_model_dir, model)).loss)


def test_load_4bit_keeps_skip_modules_and_the_head(tiny_model_dir):
    import bitsandbytes as bnb

    keep = ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.v_proj"]
    model = load_model(make_cfg(tiny_model_dir, model={"load_in_4bit": True}, method="spectrum"), skip_modules=keep)
    kinds = {name: type(m) for name, m in linear_modules(model).items()}
    assert {name for name, kind in kinds.items() if kind is nn.Linear} == {*keep, "lm_head"}
    assert all(issubclass(kind, bnb.nn.Linear4bit) for name, kind in kinds.items() if name not in {*keep, "lm_head"})


def test_load_8bit(tiny_model_dir):
    import bitsandbytes as bnb

    model = load_model(make_cfg(tiny_model_dir, model={"load_in_8bit": True}))
    assert all(isinstance(m, bnb.nn.Linear8bitLt) for m in layer_linear_modules(model).values())
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.int8
    assert torch.isfinite(model(**tiny_batch(tiny_model_dir, model)).loss)


def test_liger_says_why_not(tiny_model_dir):
    from transformers import AutoConfig

    class Holder(nn.Module):  # apply_liger only reads .config on the paths that refuse
        config = AutoConfig.from_pretrained(tiny_model_dir)

    model = load_model(make_cfg(tiny_model_dir)) if torch.cuda.is_available() else Holder()
    assert apply_liger(model, make_cfg()) == "liger: off (model.use_liger_kernels is false)"
    message = apply_liger(model, make_cfg(model={"use_liger_kernels": True}))
    if importlib.util.find_spec("liger_kernel") is None:
        assert "liger-kernel package is not installed" in message
    elif not torch.cuda.is_available():
        assert "need a CUDA GPU" in message
    else:  # a GPU machine with Liger (test_gpu_training.py trains with it)
        assert message == "liger: applied its kernels for model type 'llama'"


@pytest.mark.slow
def test_gguf_file_and_builtin_load_the_same_weights():
    """The built-in model's GGUF loads directly (dequantized) and through `builtin:` (the
    cached safetensors conversion), with the same weights and 210 linear layer modules."""
    from finetune_trainer.model import builtin

    gguf = builtin.gguf_path()
    direct = load_model(make_cfg(gguf))
    cached = load_model(make_cfg("builtin:SmolLM2-135M-Instruct"))
    assert type(direct).__name__ == type(cached).__name__ == "LlamaForCausalLM"
    assert len(layer_linear_modules(direct)) == len(layer_linear_modules(cached)) == 210
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight"):
        assert torch.equal(direct.get_parameter(name), cached.get_parameter(name))
    tok = load_tokenizer(make_cfg(gguf))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>")


@pytest.mark.parametrize(
    ("method", "targets", "fused"),
    [
        ("lora", ["q_proj", "v_proj", "lm_head"], False),  # the fused loss would skip the head's adapter
        ("qlora", ["model.lm_head"], False),
        ("lora", ["q_proj", "v_proj"], True),
        ("lora", "all-linear", True),  # peft's all-linear leaves the output head out
        ("full", ["lm_head"], True),  # full trains lm_head.weight itself: the fused loss sees it
    ],
)
def test_liger_keeps_its_fused_loss_unless_lora_adapts_the_head(method, targets, fused):
    cfg = FineTuneConfig.model_validate({"model": {"base_model": "org/model", "use_liger_kernels": True},
                                         "fine_tuning": {"method": method, "lora": {"target_modules": targets}}})
    options, note = liger_options(cfg)
    assert options.get("fused_linear_cross_entropy", True) is fused
    assert (options.get("cross_entropy") is True) is (not fused)
    assert ("lm_head" in note) is (not fused)
