"""The training stage's small parts: TrainingArguments and DeepSpeed mappers, callbacks, plots.

`finetune_trainer.train` composes them; each module here is importable and testable alone.
"""
