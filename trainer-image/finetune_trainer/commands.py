"""Trainer subcommands, registered on `finetune`'s CLI (cli.py imports this module if present)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli import EXIT_INVALID, _config_arg, _load_any, print_issues, register
from .config import ConfigError
from .launch import record_exit_code


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    """Fine-tune from a seed config or a FineTuneJob manifest; exit 1 on what a retry cannot fix."""
    code = EXIT_INVALID
    try:
        loaded = _load_any(args.config, overrides, "train")
        print_issues([], loaded.warnings, args.config)
        from .status_reporter import StatusReporter
        from .train import run_command  # torch and transformers load here, not for `finetune validate`

        reporter = StatusReporter.from_env()  # in a pod the operator started, on rank 0
        try:
            code = run_command(loaded.config, base_dir=Path(args.config).resolve().parent,
                               reporters=[reporter] if reporter else [])
        finally:
            if reporter:
                reporter.close()
        return code
    except ConfigError as exc:
        print_issues(exc.errors, exc.warnings, args.config)
        return code
    finally:
        record_exit_code(code)  # for `finetune launch` (torchrun would turn it into 1)


def cmd_launch(args: argparse.Namespace, overrides: list[str]) -> int:
    from .launch import launch

    return launch(args.config, overrides)


register(
    "train",
    "fine-tune a model (the command the training pods run); --section.key VALUE overrides a key",
    _config_arg,
)(cmd_train)
register(
    "launch",
    "run `finetune train` under torchrun (one process per GPU, from PET_* variables), keeping the trainer's exit code",
    _config_arg,
)(cmd_launch)


def cmd_preview(args: argparse.Namespace, overrides: list[str]) -> int:
    """The first samples as the model sees them; data and tokenizer only, no weights."""
    import sys

    from .data import DataError
    from .data.preview import preview_samples, render_sample
    from .model.loading import load_tokenizer

    try:
        loaded = _load_any(args.config, overrides, "validate")
        print_issues([], loaded.warnings, args.config)
        tokenizer = load_tokenizer(loaded.config)
        samples = preview_samples(loaded.config, tokenizer, args.n, split=args.split)
    except ConfigError as exc:
        print_issues(exc.errors, exc.warnings, args.config)
        return EXIT_INVALID
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    color = sys.stdout.isatty() if args.color == "auto" else args.color == "always"
    for number, sample in enumerate(samples, start=1):
        print(render_sample(sample, tokenizer, color=color, number=number))
    total = sum(len(s.input_ids) for s in samples)
    learned = sum(s.learned for s in samples)
    legend = "green" if color else "between [[ and ]]"
    print(f"--- {len(samples)} samples, {total} tokens, {learned} learned ({learned / max(total, 1):.0%}); "
          f"learned tokens are {legend}")
    return 0


def _preview_args(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument("-n", type=int, default=3, help="how many samples (default 3)")
    p.add_argument("--split", choices=("train", "eval"), default="train")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="mark learned tokens in colour (auto: on a terminal) or with [[ ]]")


register(
    "preview",
    "show the first samples exactly as the model sees them, learned tokens marked (reads data and tokenizer only)",
    _preview_args,
)(cmd_preview)
