"""`finetune`: the one command for users, pods and the operator.

Subcommands import what they need inside their own function, so `finetune validate`
stays sub-second (no torch, no kopf) while `finetune train` pulls in the training stack.

Exit codes are part of the contract with the PyTorchJob's `restartPolicy: ExitCode`:
1-127 are permanent (bad config, bad data), 128+ are retried (preempted after saving).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ConfigError, ConfigIssue

EXIT_OK = 0
EXIT_INVALID = 1  # permanent: the config or the data is wrong; a retry cannot fix it
EXIT_USAGE = 2  # argparse's own code for a malformed command line


def _print_issues(errors: list[ConfigIssue], warnings: list[ConfigIssue], source: str) -> None:
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if errors:
        noun = "error" if len(errors) == 1 else "errors"
        print(f"{source}: {len(errors)} {noun}:", file=sys.stderr)
        for e in errors:
            print(f"  {e}", file=sys.stderr)


def _load_any(path: str, overrides: list[str], mode: str):
    """A seed config or a FineTuneJob manifest (its spec is checked the same way)."""
    from .config import read_document
    from .config.loader import apply_overrides, parse_overrides, validate_data

    data = read_document(path)
    base_dir = Path(path).resolve().parent
    if data.get("kind") == "FineTuneJob" or "spec" in data and "apiVersion" in data:
        from finetune_operator.manifest import validate_manifest

        loaded = validate_manifest(data, overrides, mode=mode, base_dir=base_dir)
        loaded.manifest = True  # its data is read in the cluster, not here
        return loaded
    if overrides:
        data = apply_overrides(data, parse_overrides(overrides))
    loaded = validate_data(data, mode=mode, base_dir=base_dir)
    loaded.source = Path(path)
    return loaded


def cmd_validate(args: argparse.Namespace, overrides: list[str]) -> int:
    from .config.summary import summarize

    loaded = _load_any(args.config, overrides, "validate")
    _print_issues([], loaded.warnings, args.config)
    check = None
    if not getattr(loaded, "manifest", False) and args.data:
        from .data.check import check_data

        check = check_data(loaded.config)
        for warning in check.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if check.errors:
            for error in check.errors:
                print(error, file=sys.stderr)
            noun = "file has" if len(check.errors) == 1 else "files have"
            print(f"{args.config}: the config is valid, but {len(check.errors)} data {noun} errors.", file=sys.stderr)
            return EXIT_INVALID
    print(f"{args.config}: valid.")
    print(summarize(loaded.config))
    for line in check.lines if check else ():
        print(line)
    return EXIT_OK


def _validate_args(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument("--no-data", dest="data", action="store_false",
                   help="check only the config; by default local and s3:// data files are read and tokenized "
                        "(never downloaded from the Hub; a FineTuneJob manifest's data is read in the cluster)")


def cmd_config(args: argparse.Namespace, overrides: list[str]) -> int:
    from .config import dump_config

    loaded = _load_any(args.config, overrides, "validate")
    _print_issues([], loaded.warnings, args.config)
    sys.stdout.write(dump_config(loaded.config))
    return EXIT_OK


Command = Callable[[argparse.Namespace, list[str]], int]
COMMANDS: dict[str, tuple[str, Command, Callable[[argparse.ArgumentParser], Any] | None]] = {}


def register(name: str, help: str, configure: Callable[[argparse.ArgumentParser], Any] | None = None):
    """Adds a subcommand; used by this module and by the ones that extend the CLI."""

    def wrap(fn: Command) -> Command:
        COMMANDS[name] = (help, fn, configure)
        return fn

    return wrap


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", "-f", required=True, help="config YAML (seed format) or FineTuneJob manifest")


register("validate", "check a config (and its data) or a FineTuneJob manifest, and summarize it",
         _validate_args)(cmd_validate)
register("config", "print the resolved config (defaults filled, overrides applied)", _config_arg)(cmd_config)


def _load_extensions() -> None:
    """Subcommands defined beside their code (train, operator, render, ...)."""
    import importlib

    for module in ("finetune_trainer.commands", "finetune_operator.commands"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def build_parser() -> argparse.ArgumentParser:
    _load_extensions()
    parser = argparse.ArgumentParser(
        prog="finetune",
        description="Fine-tune language models locally or on Kubernetes. "
        "Any --section.key VALUE after the options overrides that config key.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, _, configure) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if configure:
            configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    _, fn, _ = COMMANDS[args.command]
    try:
        return fn(args, rest)
    except ConfigError as exc:
        _print_issues(exc.errors, exc.warnings, getattr(args, "config", None) or "config")
        return EXIT_INVALID


if __name__ == "__main__":
    # `python -m finetune_trainer.cli` (local runs, torchrun -m): run the importable module,
    # the one extension commands (train, run, ...) register on; this file is `__main__` here.
    from finetune_trainer.cli import main as _main

    sys.exit(_main())
