"""The loss over learned tokens only: the vocabulary head runs on the positions that have a label.

A causal LM computes logits for every position, then its loss throws most of them away: prompt
tokens (response-only masks), padding, and in packed rows each sample's first label. On SmolLM2
the head is a 49k x 576 matmul per position plus a 49k-wide log-softmax in float32, the largest
single tensor of a step. Here the head sees only the positions whose next token is learned:

    LearnedPositions    a forward pre-hook on the model's output embeddings; while armed with a
                        batch's labels it hands the head hidden[mask] ([K, H]) instead of [B, T, H]
    learned_mask        mask[b, t] = labels[b, t + 1] != -100 (position t predicts token t + 1)
    learned_token_loss  the Trainer's compute_loss_func: cross-entropy of those K logits, summed
                        and divided by the Trainer's num_items_in_batch exactly as transformers'
                        ForCausalLMLoss does, so gradient accumulation and multi-rank averaging
                        are unchanged

The model's own forward still runs (DDP's and DeepSpeed's hooks see it); only the head's input
shrinks. A model whose head input is not [B, T, H], or whose head is not its output embeddings,
gets the full hidden states and transformers' own loss (the hook checks the shape; the loss
checks the logits' shape).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

IGNORE_INDEX = -100


def learned_mask(labels: Any) -> Any:
    """[B, T] bool: True where the position's next token has a label (is learned)."""
    import torch

    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def learned_token_loss(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
    """Cross-entropy of the learned tokens; `outputs.logits` is [K, V] (the head saw the learned
    positions) or [B, T, V] (it saw every position: transformers' own ForCausalLMLoss). Both reduce
    as transformers does (`fixed_cross_entropy`: a sum over num_items_in_batch, else the mean).
    Logits that line up with neither (another K, another B or T) raise: no loss beats a wrong one."""
    from transformers.loss.loss_utils import ForCausalLMLoss, fixed_cross_entropy

    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    if logits.dim() == 3 and tuple(logits.shape[:2]) == tuple(labels.shape):  # the head saw every position
        return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=num_items_in_batch,
                               ignore_index=IGNORE_INDEX)
    targets = labels[:, 1:][learned_mask(labels)[:, :-1]].to(logits.device)
    if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} line up with neither labels {tuple(labels.shape)} "
                         f"nor their {targets.shape[0]} learned positions")
    return fixed_cross_entropy(logits.float(), targets, num_items_in_batch, ignore_index=IGNORE_INDEX)


class LearnedPositions:
    """Arms the output embeddings' pre-hook with a batch's mask for the length of one forward."""

    def __init__(self, model: Any):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.head = base.get_output_embeddings()
        self._mask = None
        self.selected = 0  # forwards whose head input was narrowed (a test reads it)
        self._handle = self.head.register_forward_pre_hook(self._select) if self.head is not None else None

    @property
    def available(self) -> bool:
        return self._handle is not None

    def _select(self, module: Any, args: tuple) -> tuple | None:
        mask = self._mask
        if mask is None or not args:
            return None
        hidden = args[0]
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(mask.shape):
            return None  # not the [B, T, H] this batch's labels describe: leave it whole
        self.selected += 1
        return (hidden[mask.to(hidden.device)], *args[1:])

    @contextmanager
    def armed(self, labels: Any):
        self._mask = learned_mask(labels) if labels is not None else None
        try:
            yield
        finally:
            self._mask = None

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
