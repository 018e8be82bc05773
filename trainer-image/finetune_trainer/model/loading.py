"""Loading the base model and its tokenizer, one logged decision at a time.

Small pure functions map the config to what transformers takes (`resolve_model_source`,
`bnb_config`, `attention_implementation`, `weights_dtype`); `load_model` and
`load_tokenizer` are the thin edges that call `from_pretrained` with them.

Weights dtype (decided here, see `weights_dtype`):
- CPU: fp32 weights always. `mixed_precision: bf16` then runs as torch autocast (the Trainer's
  `bf16=True` on CPU), which keeps fp32 master weights and computes matmuls in bf16.
- CUDA, `full` and `spectrum`: fp32 weights; AMP (or DeepSpeed's bf16 mode) computes in
  half. Trained weights need fp32 masters (bf16 loses small updates, fp16 gradients cannot be
  unscaled), and a model mixing fp32 and half modules fails outside autocast (generation).
  Spectrum's frozen modules are the ones to quantize when memory is short (`load_in_4bit`).
- CUDA, lora / qlora with bf16 or fp16: the frozen base loads in that dtype to halve its
  memory; peft keeps the adapters in fp32 and casts at their boundary (QLoRA's
  `prepare_model_for_kbit_training` upcasts the unquantized rest).
- `mixed_precision: no`: fp32.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_trainer.config.issues import ConfigError, ConfigIssue
from finetune_trainer.config.rules import model_source_kind
from finetune_trainer.contract import world

from . import builtin
from .modules import output_head_names

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

    from finetune_trainer.config.schema import FineTuneConfig

log = logging.getLogger(__name__)

GRADIENT_CHECKPOINTING_KWARGS = {"use_reentrant": False}  # works with frozen inputs and DDP


def config_error(path: str, message: str) -> ConfigError:
    """A problem the user fixes in the config: the trainer prints it and exits 1."""
    return ConfigError([ConfigIssue(path, message)])


# ----------------------------------------------------------------------- pure mappers


def resolve_model_source(base_model: str, *, field: str = "model.base_model") -> tuple[str, str | None]:
    """Where `from_pretrained` finds a model: `(path_or_hub_id, gguf_file_or_None)`.

    `builtin:NAME` -> the cached safetensors checkpoint of a built-in model; a `.gguf` file ->
    (its folder, its file name), which transformers dequantizes on load; an existing local
    directory; otherwise a Hugging Face Hub ID. A missing path is an error, not a hub lookup.
    An s3:// folder is an error here: `finetune train` fetches it first (model/fetch.py) and
    loads the fetched copy."""
    kind = model_source_kind(base_model)
    if kind == "s3":
        raise config_error(field, f"{base_model!r} is in object storage: `finetune train` fetches it before loading "
                           "(this command does not); give a local copy's path here")
    if kind == "builtin":
        try:
            return builtin.resolve(base_model), None
        except (ValueError, FileNotFoundError) as exc:
            raise config_error(field, str(exc)) from None
    path = Path(base_model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise config_error(field, f"GGUF file {base_model!r} does not exist; give the path of a .gguf file")
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    if kind == "local":
        raise config_error(
            field, f"{base_model!r} is not a directory; give a local model directory, a .gguf file or a Hub ID"
        )
    return base_model, None


def bnb_config(cfg: FineTuneConfig, skip_modules: list[str] | None = None) -> BitsAndBytesConfig | None:
    """bitsandbytes settings from `model.load_in_4bit/8bit` and `fine_tuning.quantization`;
    None when the model loads unquantized.

    `skip_modules` stay unquantized. transformers reads `llm_int8_skip_modules` for 4-bit too,
    and a given list *replaces* its default (the output head): callers pass the head as well."""
    from transformers import BitsAndBytesConfig

    q = cfg.fine_tuning.quantization
    skip = list(skip_modules) if skip_modules is not None else None
    if cfg.model.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=q.bnb_4bit_compute_dtype,
            bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
            llm_int8_skip_modules=skip,
        )
    if cfg.model.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return None


def attention_implementation(cfg: FineTuneConfig, *, cuda: bool, flash_attn_installed: bool) -> tuple[str, str]:
    """(attn_implementation, why). Flash Attention 2 needs the flash-attn package and a CUDA
    GPU; everything else gets PyTorch's SDPA, which runs everywhere."""
    if not cfg.model.use_flash_attention:
        return "sdpa", "model.use_flash_attention is false"
    if not cuda:
        return "sdpa", "flash_attention_2 needs a CUDA GPU and none is visible"
    if not flash_attn_installed:
        return "sdpa", "flash_attention_2 needs the flash-attn package, which is not installed (pip install flash-attn)"
    return "flash_attention_2", "flash-attn is installed and a CUDA GPU is present"


def weights_dtype(cfg: FineTuneConfig, *, cuda: bool) -> tuple[str, str]:
    """(torch dtype name the weights load in, why); see the module docstring."""
    precision = cfg.training.mixed_precision
    if not cuda:
        if precision == "bf16":
            return "float32", "CPU: fp32 weights, bf16 runs as autocast"
        return "float32", "CPU: fp32 weights"
    if precision == "no":
        return "float32", "training.mixed_precision is 'no'"
    if cfg.fine_tuning.method in ("full", "spectrum"):
        return "float32", f"{cfg.fine_tuning.method} trains base weights: fp32 masters, {precision} as mixed precision"
    name = "bfloat16" if precision == "bf16" else "float16"
    return name, f"{cfg.fine_tuning.method}: the frozen base loads in {precision}; trained weights are fp32"


def default_device_map(cfg: FineTuneConfig, *, cuda: bool) -> dict[str, Any] | None:
    """A quantized model must be placed while it loads: on this process's GPU (LOCAL_RANK,
    one model copy per process under DDP). Unquantized models load on CPU and the Trainer
    (or DeepSpeed) moves them."""
    if cuda and (cfg.model.load_in_4bit or cfg.model.load_in_8bit):
        return {"": world().local_rank}
    return None


def pretrained_kwargs(cfg: FineTuneConfig, name: str, gguf_file: str | None, *, revision: str | None) -> dict[str, Any]:
    """What every `from_pretrained` of `name` gets: remote code, the GGUF file, and for a Hub ID
    the pinned revision (a fetched model is read from its local copy, which has none)."""
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.model.trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if revision and model_source_kind(name) == "hub":
        kwargs["revision"] = revision
    return kwargs


# ----------------------------------------------------------------------- edges


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_tokenizer(cfg: FineTuneConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of `model.tokenizer`, or of the model. A tokenizer without a pad token
    pads with EOS (padded positions carry label -100, so they are never learned)."""
    from transformers import AutoTokenizer

    name = cfg.model.tokenizer or cfg.model.base_model
    field = "model.tokenizer" if cfg.model.tokenizer else "model.base_model"
    if builtin.is_builtin(name):
        try:  # the tokenizer alone: seconds, where the model's checkpoint may take a conversion
            source, gguf_file = str(builtin.tokenizer_dir(name[len(builtin.BUILTIN_PREFIX) :])), None
        except (ValueError, FileNotFoundError) as exc:
            raise config_error(field, str(exc)) from None
    else:
        source, gguf_file = resolve_model_source(name, field=field)
    kwargs = pretrained_kwargs(cfg, name, gguf_file, revision=None if cfg.model.tokenizer else cfg.model.revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError:
        from .fetch import hub_offline, offline_message

        if model_source_kind(name) != "hub" or not hub_offline(os.environ):
            raise
        raise config_error(field, offline_message(name, searched="the Hugging Face cache (HF_HOME)")) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise config_error(field, f"the tokenizer of {name!r} has neither a pad nor an EOS token; use another tokenizer")
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer: no pad token, padding with EOS %r", tokenizer.eos_token)
    return tokenizer


def liger_options(cfg: FineTuneConfig) -> tuple[dict[str, bool], str]:
    """(keyword arguments for Liger, what they change and why).

    Liger's fused linear cross-entropy multiplies the hidden states by `lm_head.weight` itself.
    A LoRA adapter on lm_head lives beside that weight, so the fused loss would never see it:
    the head adapter gets no gradient and training and generation disagree (trl#4612; seen on
    an H100: the tiny Llama's loss stalled at 10.6). Then Liger's plain cross-entropy runs
    instead, and its other kernels stay."""
    targets = cfg.fine_tuning.lora.target_modules
    adapts_head = cfg.fine_tuning.method in ("lora", "qlora") and targets != "all-linear" and any(
        t == "lm_head" or t.endswith(".lm_head") for t in targets)
    if adapts_head:
        return ({"fused_linear_cross_entropy": False, "cross_entropy": True},
                ", with its plain cross-entropy: the fused linear one would skip the LoRA adapter on lm_head")
    return {}, ""


def apply_liger(model: PreTrainedModel, cfg: FineTuneConfig) -> str:
    """Apply Liger's fused Triton kernels when asked and able; return (and log) what happened.

    Liger needs its package and a GPU Triton can drive; on CPU every kernel fails ("0 active
    drivers"), so we do not try there."""
    if not cfg.model.use_liger_kernels:
        return "liger: off (model.use_liger_kernels is false)"
    if importlib.util.find_spec("liger_kernel") is None:
        message = "liger: not applied, the liger-kernel package is not installed (pip install liger-kernel)"
    elif not _cuda():
        message = "liger: not applied, its Triton kernels need a CUDA GPU and none is visible"
    else:
        from liger_kernel.transformers.monkey_patch import (  # type: ignore[import-not-found]
            MODEL_TYPE_TO_APPLY_LIGER_FN,
            _apply_liger_kernel_to_instance,
        )

        model_type = getattr(model.config, "model_type", None)
        if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
            message = f"liger: not applied, it has no kernels for model type {model_type!r}"
        else:
            options, note = liger_options(cfg)
            _apply_liger_kernel_to_instance(model=model, **options)
            message = f"liger: applied its kernels for model type {model_type!r}{note}"
    log.info(message)
    return message


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant checkpointing; inputs that require grad keep it working when the first
    layers are frozen (PEFT, Spectrum) under any checkpointing flavour."""
    kwargs = dict(GRADIENT_CHECKPOINTING_KWARGS)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing


def no_cpu_inference_repacking(model: PreTrainedModel) -> int:
    """Stop bitsandbytes (0.50) from repacking 4-bit weights for AVX512-BF16 inference on CPU.

    Its Linear4bit does that on the first eval-mode, no-grad forward (an evaluation before or
    during training), and from then on computes with `gemv_4bit`, which has no autograd
    kernel: gradients flowing back through frozen 4-bit layers become silently wrong (seen
    here: up to 100% off). Training must not depend on whether evaluation ran first. Returns
    how many modules were changed; the flag only matters for inputs on CPU."""
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def load_model(
    cfg: FineTuneConfig,
    *,
    skip_modules: list[str] | None = None,
    device_map: Any = None,
) -> PreTrainedModel:
    """The base model as the config says: source, dtype, quantization, attention, Liger and
    gradient checkpointing. `skip_modules`: modules to keep unquantized in a 4/8-bit load (the
    output head is added, as transformers would by default). `device_map`: where to place the
    weights (default: `default_device_map`)."""
    import torch
    from transformers import AutoModelForCausalLM

    cuda = _cuda()
    source, gguf_file = resolve_model_source(cfg.model.base_model)
    dtype_name, dtype_why = weights_dtype(cfg, cuda=cuda)
    attn, attn_why = attention_implementation(
        cfg, cuda=cuda, flash_attn_installed=importlib.util.find_spec("flash_attn") is not None
    )
    if skip_modules is not None:
        skip_modules = sorted(set(skip_modules) | set(output_head_names(model_skeleton(cfg))))
    quantization = bnb_config(cfg, skip_modules)
    if device_map is None:
        device_map = default_device_map(cfg, cuda=cuda)

    log.info("model: %s%s", source, f" (GGUF file {gguf_file}, dequantized on load)" if gguf_file else "")
    log.info("model: weights in %s (%s)", dtype_name, dtype_why)
    log.info("model: attention %s (%s)", attn, attn_why)
    if quantization is not None:
        bits = 4 if cfg.model.load_in_4bit else 8
        kept = f", {len(skip_modules)} modules kept unquantized" if skip_modules else ""
        log.info("model: quantized to %d bits by bitsandbytes%s", bits, kept)

    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, dtype_name),
        "attn_implementation": attn,
        **pretrained_kwargs(cfg, cfg.model.base_model, gguf_file, revision=cfg.model.revision),
    }
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)

    if cfg.model.load_in_4bit and no_cpu_inference_repacking(model):
        log.info("model: 4-bit weights keep their training layout on CPU (bitsandbytes' inference repacking is off)")
    apply_liger(model, cfg)
    if cfg.training.gradient_checkpointing:
        enable_gradient_checkpointing(model)
        log.info("model: gradient checkpointing on (non-reentrant)")
    return model


def model_skeleton(cfg: FineTuneConfig) -> PreTrainedModel:
    """The base model's modules on the meta device: names and shapes, no weights, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    source, gguf_file = resolve_model_source(cfg.model.base_model)
    config = AutoConfig.from_pretrained(source, **pretrained_kwargs(cfg, cfg.model.base_model, gguf_file,
                                                                    revision=cfg.model.revision))
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
