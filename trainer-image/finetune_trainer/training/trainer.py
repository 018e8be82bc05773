"""The Trainer a run uses: transformers' own, with the loss taken over learned tokens only.

Packed batches carry no attention_mask, so their trained tokens are counted here, not as
"input_ids != pad id" (the pad id is <|im_end|> for SmolLM2: every sample holds it).
Everything else (loops, gradient accumulation, DDP and DeepSpeed, checkpoints) is the library's.
The head's input is narrowed to the learned positions for the length of each loss computation
(training.loss explains why); generation, benchmarks and saving see the model untouched.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from ..data.packing import real_tokens
from .loss import LearnedPositions, learned_token_loss


class FineTuneTrainer(Trainer):
    def __init__(self, *args: Any, model: Any, **kwargs: Any):
        self.learned_positions = LearnedPositions(model)
        if self.learned_positions.available:
            kwargs.setdefault("compute_loss_func", learned_token_loss)
        super().__init__(*args, model=model, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.compute_loss_func is not learned_token_loss:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        with self.learned_positions.armed(inputs.get("labels")):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    def _track_num_input_tokens(self, inputs):
        packed = "position_ids" in inputs and "attention_mask" not in inputs and "labels" in inputs
        pad = getattr(self.processing_class, "pad_token_id", None)
        if self.args.include_num_input_tokens_seen != "non_padding" or not packed or pad is None:
            return super()._track_num_input_tokens(inputs)
        import torch

        count = real_tokens(inputs["input_ids"], inputs["position_ids"], inputs["labels"], pad)
        seen = torch.as_tensor(count, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(seen).sum().item()
