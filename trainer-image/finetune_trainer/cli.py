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

from .contract import EXIT_OK, EXIT_PERMANENT

EXIT_INVALID = EXIT_PERMANENT  # the config or the data is wrong; a retry cannot fix it
EXIT_USAGE = 2  # argparse's own code for a malformed command line


def print_issues(errors: list[ConfigIssue], warnings: list[ConfigIssue], source: str) -> None:
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
    for loader in document_loaders():  # e.g. the operator's: a FineTuneJob manifest's spec
        loaded = loader(data, overrides, mode=mode, base_dir=base_dir)
        if loaded is not None:
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
    print_issues([], loaded.warnings, args.config)
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
    print_issues([], loaded.warnings, args.config)
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


# Extensions find the CLI by these entry-point groups (pyproject.toml), so the trainer never
# names the packages that extend it: the operator adds its commands and its manifest loader
# when it is installed.
COMMAND_GROUP = "finetune.commands"  # a module whose import registers subcommands
DOCUMENT_GROUP = "finetune.documents"  # fn(data, overrides, *, mode, base_dir) -> LoadedConfig | None


def _entry_points(group: str) -> list[Any]:
    from importlib.metadata import entry_points

    return sorted(entry_points(group=group), key=lambda ep: (ep.name != "trainer", ep.name))  # its own first


def document_loaders() -> list[Callable[..., Any]]:
    """Readers of documents other than a seed config; each returns None for what is not its."""
    return [ep.load() for ep in _entry_points(DOCUMENT_GROUP)]


def _load_extensions() -> None:
    """Subcommands defined beside their code (train, preview, launch; crd, render, run, operator)."""
    for ep in _entry_points(COMMAND_GROUP):
        ep.load()


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
        print_issues(exc.errors, exc.warnings, getattr(args, "config", None) or "config")
        return EXIT_INVALID


if __name__ == "__main__":
    # `python -m finetune_trainer.cli` (local runs, torchrun -m): run the importable module,
    # the one extension commands (train, run, ...) register on; this file is `__main__` here.
    from finetune_trainer.cli import main as _main

    sys.exit(_main())
