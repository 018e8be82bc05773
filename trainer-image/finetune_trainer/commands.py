"""Trainer subcommands, registered on `finetune`'s CLI (cli.py imports this module if present)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli import _config_arg, _load_any, _print_issues, register


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    """Fine-tune from a seed config or a FineTuneJob manifest; exit 1 on what a retry cannot fix."""
    loaded = _load_any(args.config, overrides, "train")  # a ConfigError is printed by cli.main
    _print_issues([], loaded.warnings, args.config)
    from .train import run_command  # torch and transformers load here, not for `finetune validate`

    return run_command(loaded.config, base_dir=Path(args.config).resolve().parent)


register(
    "train",
    "fine-tune a model (the command the training pods run); --section.key VALUE overrides a key",
    _config_arg,
)(cmd_train)
