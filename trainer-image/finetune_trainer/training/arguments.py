"""Our config -> transformers `TrainingArguments` keyword arguments, as one pure mapping.

Every key of the `training`, `output` and `evaluation` sections lands here, so a table
test can check each one without building a Trainer. Where transformers renamed a knob
(`warmup_ratio` became a fractional `warmup_steps`; `gradient_checkpointing` became
`activation_checkpointing`), `accepted` (the installed TrainingArguments' field names)
picks the spelling, so the mapping survives either version.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

from ..config.schema import FineTuneConfig

log = logging.getLogger(__name__)


def installed_argument_names() -> frozenset[str]:
    """The field names the installed transformers' TrainingArguments accepts."""
    import dataclasses

    from transformers import TrainingArguments

    return frozenset(f.name for f in dataclasses.fields(TrainingArguments))


def precision_flags(mixed_precision: str, *, use_cpu: bool, bf16_supported: bool = True) -> tuple[dict[str, bool], str | None]:
    """bf16/fp16 flags for the hardware, and a note when we had to fall back.

    On CPU, bf16 runs as torch autocast; fp16 autocast does not exist there, so fp16 becomes
    fp32. A GPU without bf16 (pre-Ampere) trains bf16 configs in fp32."""
    if mixed_precision == "bf16":
        if use_cpu or bf16_supported:
            return {"bf16": True, "fp16": False}, None
        return {"bf16": False, "fp16": False}, (
            "training.mixed_precision is bf16 but this GPU has no bf16 support; training in fp32 "
            "(set mixed_precision: fp16 to use half precision here)"
        )
    if mixed_precision == "fp16":
        if use_cpu:
            return {"bf16": False, "fp16": False}, (
                "training.mixed_precision is fp16 but there is no GPU, and fp16 autocast needs one; "
                "training in fp32 (set mixed_precision: bf16 for CPU autocast)"
            )
        return {"bf16": False, "fp16": True}, None
    return {"bf16": False, "fp16": False}, None


def _sampling(group_by_length: bool, accepted: Collection[str]) -> dict[str, Any]:
    """transformers 5 names the sampler (train_sampling_strategy); 4.x had group_by_length."""
    if not group_by_length:
        return {}
    if "train_sampling_strategy" in accepted:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def _checkpointing(enabled: bool, accepted: Collection[str]) -> dict[str, Any]:
    # Non-reentrant checkpointing works with frozen inputs (LoRA) and with DDP.
    kwargs = {"use_reentrant": False}
    if "activation_checkpointing" in accepted:
        return {"activation_checkpointing": enabled, "activation_checkpointing_kwargs": kwargs if enabled else None}
    return {"gradient_checkpointing": enabled, "gradient_checkpointing_kwargs": kwargs if enabled else None}


def _warmup(ratio: float, accepted: Collection[str]) -> dict[str, Any]:
    if "warmup_ratio" in accepted:
        return {"warmup_ratio": ratio}
    # transformers >= 5 reads a warmup_steps below 1 as a fraction of the total steps.
    return {"warmup_steps": ratio}


def _evaluation(cfg: FineTuneConfig) -> dict[str, Any]:
    ev = cfg.evaluation
    during = cfg.trains_eval()
    kwargs: dict[str, Any] = {
        "do_eval": during,
        "eval_strategy": ev.eval_strategy if during else "no",
        "per_device_eval_batch_size": ev.eval_batch_size,
        # "Eval loss before training": evaluated inside train(), after DeepSpeed and DDP are set up.
        "eval_on_start": bool(cfg.dataset.eval_path),
    }
    if during and ev.eval_strategy == "steps":
        kwargs["eval_steps"] = cfg.effective_eval_steps()
    return kwargs


def _hub(cfg: FineTuneConfig, hub_token: str | None) -> dict[str, Any]:
    out = cfg.output
    if not out.push_to_hub:
        return {"push_to_hub": False}
    # hub_strategy "end": the finished model is pushed, not every checkpoint.
    return {"push_to_hub": True, "hub_model_id": out.hub_model_id, "hub_token": hub_token, "hub_strategy": "end"}


def training_arguments(
    cfg: FineTuneConfig,
    *,
    output_dir: str | Path,
    world_size: int,
    use_cpu: bool,
    bf16_supported: bool = True,
    deepspeed: dict[str, Any] | None = None,
    hub_token: str | None = None,
    accepted: Collection[str] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for `TrainingArguments(**kwargs)`. `deepspeed` is the config from
    `deepspeed.deepspeed_config` (None: no DeepSpeed)."""
    accepted = installed_argument_names() if accepted is None else accepted
    t, out = cfg.training, cfg.output
    precision, note = precision_flags(t.mixed_precision, use_cpu=use_cpu, bf16_supported=bf16_supported)
    if note:
        log.warning(note)
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "num_train_epochs": t.epochs,
        "max_steps": t.max_steps if t.max_steps is not None else -1,
        "per_device_train_batch_size": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler_type,
        **_warmup(t.warmup_ratio, accepted),
        "max_grad_norm": t.max_grad_norm,
        "optim": t.optimizer,
        "weight_decay": t.weight_decay,
        **_checkpointing(t.gradient_checkpointing, accepted),
        **_sampling(t.group_by_length, accepted),
        **precision,
        "seed": t.seed,
        "data_seed": t.seed,
        "logging_strategy": "steps",
        "logging_steps": out.logging_steps,
        "logging_first_step": True,  # the loss curve starts at the untrained model
        "logging_nan_inf_filter": False,  # a NaN loss must reach the guard, not be averaged away
        "include_num_input_tokens_seen": "non_padding",  # tokens/s in metrics.jsonl
        "save_strategy": "steps",
        "save_steps": out.save_steps,
        "save_total_limit": out.save_total_limit,
        **_evaluation(cfg),
        **_hub(cfg, hub_token),
        "report_to": "none",
        "label_names": ["labels"],  # peft wrappers hide the signature the Trainer infers this from
        "use_cpu": use_cpu,
        # LoRA and frozen Spectrum modules leave parameters without gradients; looking for
        # them costs a graph walk per step, and gradient checkpointing under DDP forbids it.
        "ddp_find_unused_parameters": False if world_size > 1 else None,
    }
    if deepspeed is not None:
        kwargs["deepspeed"] = deepspeed
    return kwargs
