"""Full fine-tuning: every parameter of the base model trains."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from finetune_trainer.model.loading import load_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from finetune_trainer.config.schema import FineTuneConfig


def prepare_full(cfg: FineTuneConfig, *, device_map: Any = None) -> tuple[PreTrainedModel, str]:
    """The unquantized base model with every parameter trainable (rules.py refuses `full`
    with load_in_4bit/8bit: quantized weights cannot be updated)."""
    model = load_model(cfg, device_map=device_map)
    for param in model.parameters():
        param.requires_grad_(True)
    return model, "every parameter trains"
