"""The chart's backend values, rendered by the real helm: RBAC holds a rule for exactly the
enabled backends' kinds, the Deployment passes the choice to the operator, and impossible
combinations fail before anything reaches a cluster.

tests/test_helm_rbac.py proves the verbs on pytorchjobs are exactly what the operator calls (it
drives the PyTorchJob backend only). The operator treats every backend's kind alike (create, get,
list, watch, patch), so here the trainjobs and jobsets rules must carry the same verbs as that
proven pytorchjobs rule: the "nothing missing, nothing more" property carries over by symmetry.
"""

from __future__ import annotations

import pytest

from kube_tools import CHART, helm_template, helm_values_args, run_tool

# backend name -> (API group, plural) of its workload kind
KINDS = {
    "pytorchjob": ("kubeflow.org", "pytorchjobs"),
    "trainjob": ("trainer.kubeflow.org", "trainjobs"),
    "jobset": ("jobset.x-k8s.io", "jobsets"),
}
BACKEND_GROUPS = {group for group, _ in KINDS.values()}

ENABLED_SETS = {
    "default": None,  # the chart's own default: all three
    "pytorchjob-only": ["pytorchjob"],
    "trainjob-only": ["trainjob"],
    "jobset-pytorchjob": ["jobset", "pytorchjob"],
}
SCOPES = {"clusterwide": {}, "namespaced": {"watchNamespaces": ["team-a", "team-b"]}}


def render(enabled: list[str] | None, scope: str, **backend) -> list[dict]:
    values = dict(SCOPES[scope])
    if enabled is not None or backend:
        values["backend"] = {**({"enabled": enabled} if enabled is not None else {}), **backend}
    return helm_template(values)


def job_roles(objs: list[dict], scope: str) -> list[dict]:
    """The roles that carry the job rules: the ClusterRole, or each watched namespace's Role."""
    kind = "Role" if scope == "namespaced" else "ClusterRole"
    roles = [o for o in objs if o["kind"] == kind]
    assert roles, kind
    return roles


def backend_rules(role: dict) -> list[dict]:
    return [r for r in role["rules"] if set(r["apiGroups"]) & BACKEND_GROUPS]


def operator_args(objs: list[dict]) -> dict[str, str]:
    (dep,) = [o for o in objs if o["kind"] == "Deployment"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return dict(a.removeprefix("--").split("=", 1) for a in container["args"] if a.startswith("--") and "=" in a)


@pytest.fixture(scope="module")
def proven_verbs() -> dict[str, list[str]]:
    """The pytorchjobs verbs of the exact configuration tests/test_helm_rbac.py checks end to end."""
    objs = helm_template({"backend": {"enabled": ["pytorchjob"], "default": "pytorchjob"}})
    (rule,) = backend_rules(job_roles(objs, "clusterwide")[0])
    assert rule["resources"] == ["pytorchjobs"]
    return {"verbs": rule["verbs"]}


# ------------------------------------------------------------------------------ RBAC


@pytest.mark.parametrize("scope", sorted(SCOPES))
@pytest.mark.parametrize("name", sorted(ENABLED_SETS))
def test_rbac_has_a_rule_for_exactly_the_enabled_backends(name, scope, proven_verbs):
    enabled = ENABLED_SETS[name]
    expected = set(enabled if enabled is not None else KINDS)
    for role in job_roles(render(enabled, scope), scope):
        rules = backend_rules(role)
        granted = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
        assert granted == {KINDS[b] for b in expected}, (name, scope, rules)
        for rule in rules:
            # One kind per rule (no cross-product grants), the proven verbs, no narrowing by name.
            assert len(rule["apiGroups"]) == 1 and len(rule["resources"]) == 1, rule
            assert rule["verbs"] == proven_verbs["verbs"], rule
            assert set(rule) == {"apiGroups", "resources", "verbs"}, rule


@pytest.mark.parametrize("scope", sorted(SCOPES))
def test_only_backend_rules_depend_on_the_backends(scope):
    """Enabling backends must not add or drop anything else (the rest is proven by test_helm_rbac)."""
    def others(objs: list[dict]) -> list[list[dict]]:
        return [[r for r in role["rules"] if r not in backend_rules(role)] for role in job_roles(objs, scope)]

    baseline = others(render(["pytorchjob"], scope))
    for name, enabled in ENABLED_SETS.items():
        assert others(render(enabled, scope)) == baseline, name


def test_crd_watch_rule_stays_cluster_wide():
    for scope in SCOPES:
        (cluster_role,) = [o for o in render(["jobset"], scope) if o["kind"] == "ClusterRole"]
        assert {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
                "verbs": ["list", "watch"]} in cluster_role["rules"], scope


def test_no_backend_rbac_without_rbac_create():
    objs = helm_template({"rbac": {"create": False}, "backend": {"enabled": ["trainjob"]}})
    assert not [o for o in objs if o["apiVersion"].startswith("rbac.authorization.k8s.io")]


# ------------------------------------------------------------------------------ Deployment args


@pytest.mark.parametrize(
    "backend,expected",
    [
        ({}, {"default-backend": "auto", "backends": "trainjob,jobset,pytorchjob",
              "trainjob-runtime": "torch-distributed"}),
        ({"default": "jobset", "enabled": ["pytorchjob", "jobset"], "trainJobRuntime": "torch-cuda.v2"},
         {"default-backend": "jobset", "backends": "pytorchjob,jobset", "trainjob-runtime": "torch-cuda.v2"}),
        ({"default": "trainjob", "enabled": ["trainjob"]},
         {"default-backend": "trainjob", "backends": "trainjob", "trainjob-runtime": "torch-distributed"}),
    ],
)
def test_deployment_passes_the_backend_flags(backend, expected):
    args = operator_args(helm_template({"backend": backend} if backend else None))
    assert {k: args.get(k) for k in expected} == expected


def test_backend_flags_appear_once_each():
    (dep,) = [o for o in helm_template() if o["kind"] == "Deployment"]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    for flag in ("--default-backend=", "--backends=", "--trainjob-runtime="):
        assert sum(a.startswith(flag) for a in args) == 1, flag


# ------------------------------------------------------------------------------ refusals


def test_default_backend_must_be_enabled():
    """The operator would refuse every job without spec.backend: fail at render time, saying why."""
    proc = run_tool("helm", "template", "ft", str(CHART), "--set", "backend.default=jobset",
                    "--set", "backend.enabled={pytorchjob}", check=False)
    assert proc.returncode != 0
    assert "backend.default=jobset is not in backend.enabled (pytorchjob)" in proc.stderr, proc.stderr


def test_auto_default_needs_no_particular_backend():
    args = operator_args(helm_template({"backend": {"default": "auto", "enabled": ["jobset"]}}))
    assert args["default-backend"] == "auto" and args["backends"] == "jobset"


@pytest.mark.parametrize(
    "backend,message",
    [
        ({"default": "kubeflow"}, "/backend/default"),
        ({"enabled": ["mpijob"]}, "/backend/enabled/0"),
        ({"enabled": []}, "/backend/enabled"),
        ({"enabled": ["jobset", "jobset"]}, "/backend/enabled"),
        ({"enabled": "jobset"}, "/backend/enabled"),
        ({"trainJobRuntime": ""}, "/backend/trainJobRuntime"),
        ({"trainJobRuntime": "Torch_Distributed"}, "/backend/trainJobRuntime"),
        ({"runtime": "torch-distributed"}, "runtime"),
    ],
)
def test_values_schema_refuses_bad_backend_values(backend, message):
    proc = run_tool("helm", "template", "ft", str(CHART), *helm_values_args({"backend": backend}), check=False)
    assert proc.returncode != 0
    assert "schema" in proc.stderr and message in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------ NOTES


def notes(*args: str) -> str:
    """NOTES.txt as `helm install --dry-run=client` prints it (no cluster needed)."""
    out = run_tool("helm", "install", "ft", str(CHART), "--dry-run=client", "--namespace", "finetune-system",
                   *args).stdout
    return out.split("NOTES:", 1)[1]


def test_notes_check_the_crds_of_the_enabled_backends():
    text = notes()
    assert "kubectl get crd finetunejobs.finetune.dev trainjobs.trainer.kubeflow.org jobsets.jobset.x-k8s.io " \
           "pytorchjobs.kubeflow.org" in text
    for what in ("Kubeflow Training Operator v1.9", "Kubeflow Trainer v2", "ClusterTrainingRuntimes",
                 "clustertrainingruntime torch-distributed", "JobSet controller",
                 "kubectl apply --server-side --force-conflicts -f -"):
        assert what in text, what
    only = notes("--set", "backend.enabled={pytorchjob}", "--set", "backend.default=pytorchjob")
    assert "kubectl get crd finetunejobs.finetune.dev pytorchjobs.kubeflow.org\n" in only
    assert "trainjobs" not in only and "jobsets" not in only and "Kubeflow Trainer" not in only


def test_notes_on_upgrade_say_to_apply_the_crds_first(tmp_path):
    """`.Release.IsUpgrade` needs a release, and `helm template` skips NOTES.txt: render a copy of the
    chart whose NOTES.txt is wrapped into a manifest, with `helm template --is-upgrade`."""
    import shutil

    import yaml

    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    body = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "notes-as-manifest.yaml").write_text(
        '{{- define "test.notes" }}' + body + '{{- end }}\nnotes: {{ include "test.notes" . | toJson }}\n')

    def rendered(*flags: str) -> str:
        out = run_tool("helm", "template", "ft", str(chart), *flags,
                       "--show-only", "templates/notes-as-manifest.yaml").stdout
        return yaml.safe_load(out)["notes"]

    upgrade, install = rendered("--is-upgrade"), rendered()
    assert "Helm never upgrades the CRDs" in upgrade
    assert "kubectl apply --server-side --force-conflicts -f crds/" in upgrade
    assert "helm show crds <chart> | kubectl apply --server-side --force-conflicts -f -" in upgrade
    assert "kubectl apply --server-side --force-conflicts -f crds/" not in install  # the long text: upgrades only
