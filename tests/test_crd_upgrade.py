"""Upgrading the chart must not break what users already run: the FineTuneJob CRD of the
previous release (before backends) and its examples, frozen in tests/fixtures/upgrade/, stay
valid under the new CRD, the new CRD only adds to the old one, and the documented upgrade path
(Helm never upgrades crds/, so `kubectl apply --server-side --force-conflicts` the chart's CRDs
first) really lands the new schema.

The Kubernetes API emulator does not implement server-side apply (it answers 415), so the
emulator part applies the new CRD with client-side `kubectl apply` over a CRD made by `kubectl
create` (as Helm's install creates it); server-side apply itself is not exercised here.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from kube_tools import CHART, REPO, binary, crd_schema_errors, run_tool

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "upgrade"
OLD_CRD = FIXTURES / "finetunejobs-before-backends.yaml"
NEW_CRD = REPO / "crds" / "finetunejobs.finetune.dev.yaml"
OLD_EXAMPLES = sorted((FIXTURES / "examples").glob("*.yaml"))
CRD_RESOURCE = "customresourcedefinitions.apiextensions.k8s.io"  # the emulator's discovery has no short names


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def version_schema(crd: dict, version: str) -> dict:
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return v["schema"]["openAPIV3Schema"]


def finetunejobs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "FineTuneJob"]


def nodes(schema: dict, path: str = "") -> dict[str, dict]:
    """Every schema node by its field path: `.a.b`, `[]` for list items, `{}` for map values."""
    out = {path: schema}
    for name, sub in (schema.get("properties") or {}).items():
        out |= nodes(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        out |= nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        out |= nodes(schema["additionalProperties"], f"{path}{{}}")
    return out


# ------------------------------------------------------------------ the frozen fixtures


def test_fixtures_are_the_previous_release():
    """Guards the fixtures themselves: a CRD before backends, and FineTuneJobs it accepts."""
    spec = version_schema(load(OLD_CRD), "v1alpha1")["properties"]["spec"]["properties"]
    assert "backend" not in spec and "training_runtime" not in spec
    assert OLD_EXAMPLES and all(finetunejobs(p) for p in OLD_EXAMPLES)
    for path in OLD_EXAMPLES:
        for job in finetunejobs(path):
            assert crd_schema_errors(job, OLD_CRD) == [], path.name


# ------------------------------------------------------------------ old objects, new CRD


@pytest.mark.parametrize("path", OLD_EXAMPLES, ids=lambda p: p.name)
def test_old_examples_validate_against_the_new_crd(path):
    for job in finetunejobs(path):
        assert crd_schema_errors(job, NEW_CRD) == [], f"{path.name}: {job['metadata']['name']}"


def test_new_crd_is_an_additive_change():
    """Same identity; every old field kept with its type (and openness); nothing newly required;
    no enum narrowed. Stored FineTuneJobs then stay valid and keep every field on read."""
    old, new = load(OLD_CRD), load(NEW_CRD)
    assert new["metadata"]["name"] == old["metadata"]["name"]
    for key in ("group", "names", "scope"):
        assert new["spec"][key] == old["spec"][key], key
    old_versions = {v["name"]: v for v in old["spec"]["versions"]}
    new_versions = {v["name"]: v for v in new["spec"]["versions"]}
    assert set(old_versions) <= set(new_versions)
    for name, v in old_versions.items():
        assert new_versions[name]["served"] is True
        assert new_versions[name]["storage"] == v["storage"], name
        assert new_versions[name].get("subresources") == v.get("subresources"), name

        old_nodes = nodes(version_schema(old, name))
        new_nodes = nodes(version_schema(new, name))
        problems = []
        for path, node in old_nodes.items():
            if not (path == ".spec" or path.startswith(".spec.") or path.startswith(".spec[")):
                continue
            now = new_nodes.get(path)
            if now is None:
                problems.append(f"{path}: removed")
                continue
            for key in ("type", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string"):
                if now.get(key) != node.get(key):
                    problems.append(f"{path}: {key} {node.get(key)!r} -> {now.get(key)!r}")
            if "enum" in node and not set(node["enum"]) <= set(now.get("enum") or node["enum"]):
                problems.append(f"{path}: enum lost {sorted(set(node['enum']) - set(now['enum']))}")
            if "enum" in now and "enum" not in node:
                problems.append(f"{path}: enum added")
            added_required = set(now.get("required") or []) - set(node.get("required") or [])
            if added_required:
                problems.append(f"{path}: newly required {sorted(added_required)}")
        # A brand-new field may not be required by its (old) parent either: covered above, since
        # the parent's `required` would grow. New subtrees may require keys inside themselves.
        assert problems == [], problems


def test_new_crd_has_the_backend_fields():
    """What the upgrade is for: without the new CRD applied, these fields are pruned on write."""
    spec = version_schema(load(NEW_CRD), "v1alpha1")["properties"]["spec"]
    backend = spec["properties"]["backend"]
    assert backend["type"] == "string"
    assert set(backend["enum"]) == {"auto", "pytorchjob", "trainjob", "jobset"}
    assert spec["properties"]["training_runtime"]["type"] == "string"
    assert not {"backend", "training_runtime"} & set(spec.get("required") or [])


# ------------------------------------------------------------------ the documented upgrade path


def test_helm_show_crds_gives_the_new_crd():
    """`helm show crds <chart> | kubectl apply ...` (README, NOTES) must carry the generated CRD."""
    out = run_tool("helm", "show", "crds", str(CHART)).stdout
    shown = {d["metadata"]["name"]: d for d in yaml.safe_load_all(out) if d}
    assert shown["finetunejobs.finetune.dev"] == load(NEW_CRD)
    assert {"kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"} <= set(shown)


def test_docs_give_the_upgrade_command():
    readme = (CHART / "README.md").read_text()
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    for text in (readme, notes):
        assert "kubectl apply --server-side --force-conflicts -f crds/" in text
        assert "| kubectl apply --server-side --force-conflicts -f -" in text
    assert ".Release.IsUpgrade" in notes


@pytest.mark.slow
def test_applying_the_new_crd_over_the_old_one(emulator, tmp_path):
    """Old CRD created as Helm's install does, then the new one applied: the stored CRD is the new one."""
    config = tmp_path / "kubeconfig"
    config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "e",
        "clusters": [{"name": "e", "cluster": {"server": emulator.url}}],
        "contexts": [{"name": "e", "context": {"cluster": "e", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
    }))

    def kubectl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(binary("kubectl")), "--cache-dir", str(tmp_path / "cache"), *args],
                              capture_output=True, text=True, env={**os.environ, "KUBECONFIG": str(config)})
        assert not check or proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}"
        return proc

    def stored() -> dict:
        return json.loads(kubectl("get", CRD_RESOURCE, "finetunejobs.finetune.dev", "-o", "json").stdout)

    # --validate=false: the emulator serves no OpenAPI document for kubectl's client-side checks.
    kubectl("create", "--validate=false", "-f", str(OLD_CRD))
    assert "backend" not in version_schema(stored(), "v1alpha1")["properties"]["spec"]["properties"]

    ssa = kubectl("apply", "--server-side", "--force-conflicts", "--validate=false", "-f", str(NEW_CRD), check=False)
    if ssa.returncode != 0:
        # The emulator's known gap (415); if it ever implements server-side apply, the documented
        # command above is what runs and this fallback goes unused.
        assert "Server-side apply not available" in ssa.stderr or "415" in ssa.stderr, ssa.stderr
        kubectl("apply", "--validate=false", "-f", str(NEW_CRD))

    crd = stored()
    assert crd["spec"]["versions"] == load(NEW_CRD)["spec"]["versions"]
    spec = version_schema(crd, "v1alpha1")["properties"]["spec"]["properties"]
    assert spec["backend"]["type"] == "string" and "training_runtime" in spec
