"""The DeepSpeed config: the user's (file or inline mapping) or one generated from `zero_stage`.

Generated configs say "auto" for every number the training section owns (micro batch,
accumulation, clipping, precision), so transformers' DeepSpeed integration fills them from
the TrainingArguments and the two can never disagree. They name no optimizer or scheduler:
the Trainer builds `training.optimizer` and `training.lr_scheduler_type` and DeepSpeed
wraps them. `config/rules.py` has already checked a user's file against the training section.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ..config.rules import resolve_deepspeed_path
from ..config.schema import FineTuneConfig


def _precision_blocks(mixed_precision: str) -> dict[str, Any]:
    # "auto" follows TrainingArguments' bf16/fp16, which the CPU fallback may have turned off;
    # the precision the config did not ask for is off outright.
    return {
        "bf16": {"enabled": "auto" if mixed_precision == "bf16" else False},
        "fp16": {"enabled": "auto" if mixed_precision == "fp16" else False},
    }


def zero_optimization(stage: int) -> dict[str, Any]:
    """The `zero_optimization` block for a stage, with DeepSpeed's recommended overlap settings."""
    block: dict[str, Any] = {"stage": stage}
    if stage >= 2:
        block |= {
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_scatter": True,
            "reduce_bucket_size": "auto",
            "allgather_bucket_size": 5e8,
        }
    if stage == 2:
        block["allgather_partitions"] = True
    if stage == 3:
        del block["allgather_bucket_size"]
        block |= {
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            # Without it, save_model under ZeRO-3 writes empty shards instead of the full model.
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    return block


def generated_config(cfg: FineTuneConfig) -> dict[str, Any]:
    """A DeepSpeed config from `distributed.zero_stage`, numbers left to the HF integration."""
    stage = cfg.distributed.zero_stage if cfg.distributed.zero_stage is not None else 2
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        **_precision_blocks(cfg.training.mixed_precision),
        "zero_optimization": zero_optimization(stage),
        "steps_per_print": 10**9,  # the Trainer logs; DeepSpeed's own lines would duplicate them
        "wall_clock_breakdown": False,
    }


def user_config(value: str | dict[str, Any], *, base_dir: Path) -> dict[str, Any]:
    """The user's DeepSpeed config as a mapping (a file path is read relative to the config file)."""
    if isinstance(value, dict):
        return copy.deepcopy(value)
    return json.loads(resolve_deepspeed_path(value, base_dir).read_text())


def deepspeed_config(cfg: FineTuneConfig, *, base_dir: Path) -> dict[str, Any] | None:
    """What TrainingArguments(deepspeed=...) gets; None when DeepSpeed is off.

    A user's config that lacks a ZeRO stage gets `zero_stage`'s, so both keys can be used
    together (the rules already refused a disagreement)."""
    dist = cfg.distributed
    if not dist.use_deepspeed:
        return None
    if dist.deepspeed_config is None:
        return generated_config(cfg)
    ds = user_config(dist.deepspeed_config, base_dir=base_dir)
    if dist.zero_stage is not None:
        zero = ds.setdefault("zero_optimization", {})
        zero.setdefault("stage", dist.zero_stage)
    return ds
