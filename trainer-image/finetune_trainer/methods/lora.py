"""LoRA and QLoRA through peft: adapters on `fine_tuning.lora.target_modules`, base frozen.

QLoRA is LoRA on a 4-bit base; any k-bit base (8-bit LoRA too) first goes through
`peft.prepare_model_for_kbit_training`, which freezes the base, upcasts what is not quantized
to fp32 and wires gradient checkpointing for frozen inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from finetune_trainer.model.loading import GRADIENT_CHECKPOINTING_KWARGS, config_error, load_model
from finetune_trainer.model.modules import linear_modules, short_names

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from torch import nn

    from finetune_trainer.config.schema import FineTuneConfig

TARGETS_FIELD = "fine_tuning.lora.target_modules"


def lora_config(cfg: FineTuneConfig) -> LoraConfig:
    """peft's LoraConfig from `fine_tuning.lora`, key by key."""
    from peft import LoraConfig

    lora = cfg.fine_tuning.lora
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    targets = lora.target_modules if lora.target_modules == "all-linear" else list(lora.target_modules)
    return LoraConfig(
        r=lora.r,
        lora_alpha=alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias=lora.bias,
        task_type=lora.task_type,
    )


def unmatched_targets(module_names: list[str], targets: list[str]) -> list[str]:
    """Targets that name no module. peft matches a target against a module's full name or
    its dotted suffix (`q_proj` matches `model.layers.0.self_attn.q_proj`), and only fails
    when *no* target matches: a typo next to valid names would silently adapt less."""
    return [t for t in targets if not any(name == t or name.endswith("." + t) for name in module_names)]


def check_target_modules(model: nn.Module, targets: list[str] | str) -> None:
    if targets == "all-linear":
        return
    names = [name for name, _ in model.named_modules()]
    missing = unmatched_targets(names, list(targets))
    if missing:
        available = short_names(list(linear_modules(model)))
        raise config_error(
            TARGETS_FIELD,
            f"{', '.join(map(repr, missing))} match{'es' if len(missing) == 1 else ''} no module of this model; "
            f'its linear modules are: {", ".join(available)} (or use "all-linear")',
        )


def is_kbit(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_lora(cfg: FineTuneConfig, *, device_map: Any = None) -> tuple[PeftModel, str]:
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = load_model(cfg, device_map=device_map)
    check_target_modules(model, cfg.fine_tuning.lora.target_modules)
    kbit = is_kbit(model)
    if kbit:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.training.gradient_checkpointing,
            gradient_checkpointing_kwargs=dict(GRADIENT_CHECKPOINTING_KWARGS),
        )
    peft_model = get_peft_model(model, lora_config(cfg))
    from .dropout import use_cpu_dropout

    use_cpu_dropout(peft_model)
    lora = cfg.fine_tuning.lora
    adapted = sum(1 for name, _ in peft_model.named_modules() if name.endswith(".lora_A"))
    base = f"{4 if cfg.model.load_in_4bit else 8}-bit base" if kbit else "frozen base"
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
    return peft_model, f"rank-{lora.r} adapters (alpha {lora.alpha:g}) on {adapted} modules ({targets}), {base}"
