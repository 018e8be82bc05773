"""finetune trainer: config language, data, model, methods, training, storage, CLI."""

__version__ = "0.1.0"
