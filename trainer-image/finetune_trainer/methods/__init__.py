"""Fine-tuning methods: which parameters of the base model train.

    full      every parameter
    lora      peft LoRA adapters on `fine_tuning.lora.target_modules`; the base is frozen
    qlora     the same on a 4-bit base, prepared for k-bit training first
    spectrum  only the linear modules with the highest signal-to-noise ratio (spectrum.py)

`prepare_model(cfg)` loads the base model (Spectrum on a quantized model loads it twice) and
returns it ready for the Trainer, with counts and a one-line description for the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .spectrum import SpectrumSelection

if TYPE_CHECKING:
    from torch import nn

    from finetune_trainer.config.schema import FineTuneConfig

__all__ = ["MethodResult", "SpectrumSelection", "count_parameters", "prepare_model"]


@dataclass
class MethodResult:
    model: Any  # a transformers PreTrainedModel or a peft PeftModel
    method: str
    trainable_params: int
    total_params: int
    description: str
    spectrum: SpectrumSelection | None = None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, counting a bitsandbytes 4-bit tensor as the weights it
    holds (it stores two per byte), as peft does."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2 * getattr(getattr(param, "quant_storage", None), "itemsize", 1)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def prepare_model(cfg: FineTuneConfig, *, output_dir: Path | None = None, device_map: Any = None) -> MethodResult:
    """Load the base model and make the parameters of `fine_tuning.method` trainable.
    `output_dir`: where Spectrum writes its selection (None: not written)."""
    method = cfg.fine_tuning.method
    selection = None
    if method == "full":
        from .full import prepare_full

        model, what = prepare_full(cfg, device_map=device_map)
    elif method in ("lora", "qlora"):
        from .lora import prepare_lora

        model, what = prepare_lora(cfg, device_map=device_map)
    elif method == "spectrum":
        from .spectrum import prepare_spectrum

        model, selection = prepare_spectrum(cfg, output_dir=output_dir, device_map=device_map)
        what = selection.summary()
    else:  # the schema admits no other value
        raise ValueError(f"unknown fine_tuning.method {method!r}")
    trainable, total = count_parameters(model)
    description = f"{method}: {what}; {trainable:,} of {total:,} parameters train ({100 * trainable / max(total, 1):.2f}%)"
    return MethodResult(model, method, trainable, total, description, selection)
