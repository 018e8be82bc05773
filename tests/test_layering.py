"""The layers, as import-linter contracts (pyproject.toml [tool.importlinter]): the trainer
never imports the operator, config and contract import nothing heavy, the operator never
imports torch, and nothing at run time imports the test fake (finetune_operator.testing). A control contract that must break shows the linter really sees imports."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"


def lint(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LINT_IMPORTS, "--no-cache", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_the_layering_contracts_hold():
    result = lint()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "4 kept, 0 broken" in result.stdout


def test_a_contract_the_code_breaks_is_reported(tmp_path):
    """The operator does import the trainer (its config and contract): forbidding that must fail."""
    config = tmp_path / "importlinter.ini"
    config.write_text(
        "[importlinter]\nroot_packages =\n    finetune_trainer\n    finetune_operator\n\n"
        "[importlinter:contract:control]\nname = control\ntype = forbidden\n"
        "source_modules =\n    finetune_operator.render\nforbidden_modules =\n    finetune_trainer.contract\n"
    )
    result = lint("--config", str(config))
    assert result.returncode == 1 and "BROKEN" in result.stdout, result.stdout[-2000:]
    assert "finetune_operator.render -> finetune_trainer.contract" in result.stdout
