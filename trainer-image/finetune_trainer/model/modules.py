"""Names of a model's linear modules, and what they say about a module's place in it.

Transformer checkpoints name modules `<prefix>.<layer index>.<path inside the layer>`, e.g.
`model.layers.3.self_attn.q_proj`. The part after the first number is the module's *type*
(`self_attn.q_proj`): the unit Spectrum ranks within, and what LoRA's `target_modules`
match against (by last component).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def layer_index(name: str) -> int | None:
    """The transformer layer a module belongs to: the first all-digit component of its name."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def module_type(name: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `self_attn.q_proj`; a name without a layer index
    is its own type (as in the reference Spectrum implementation)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i + 1 :])
    return name


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer by name, quantized ones included (bitsandbytes' Linear4bit and
    Linear8bitLt subclass nn.Linear; GPT-2 style Conv1D is a linear layer too)."""
    from torch import nn

    kinds: tuple[type, ...] = (nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        kinds += (Conv1D,)
    except ImportError:  # pragma: no cover - every supported transformers has it
        pass
    return {name: module for name, module in model.named_modules() if isinstance(module, kinds)}


def output_head_names(model: nn.Module) -> list[str]:
    """Module names of the output head (lm_head); bitsandbytes keeps it unquantized by default."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None:
        return []
    return [name for name, module in model.named_modules() if module is head]


def layer_linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The linear modules inside the numbered transformer layers: what Spectrum scans and
    trains. The output head is left out: it is not ranked (Spectrum trains it with the input
    embeddings unless `train_embeddings` is false, and it is often tied to them)."""
    heads = set(output_head_names(model))
    return {
        name: module
        for name, module in linear_modules(model).items()
        if layer_index(name) is not None and name not in heads
    }


def short_names(names: list[str] | set[str]) -> list[str]:
    """The distinct last components (`q_proj`, `down_proj`, ...), sorted: what a user writes
    in `target_modules`."""
    return sorted({name.rsplit(".", 1)[-1] for name in names})
