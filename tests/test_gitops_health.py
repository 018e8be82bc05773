"""GitOps: the Argo CD health check (Lua, run by a Lua 5.1 interpreter as Argo CD's gopher-lua
is) and Flux's kstatus reading on statuses the operator's own status code produces, for every
phase of a job; and the Argo CD / Flux manifests pointing at what exists in this repository."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kube_tools import REPO, emulated_kubectl, helm_template, run_tool

GITOPS = REPO / "examples" / "gitops"
HEALTH_LUA = GITOPS / "argocd" / "health.lua"
HEALTH_KEY = "resource.customizations.health.finetune.dev_FineTuneJob"


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]


# ------------------------------------------------------------------ statuses, from the operator's code


def pytorchjob(*conditions: tuple[str, str], suspend: bool = False) -> dict:
    return {"metadata": {"name": "job"}, "spec": {"runPolicy": {"suspend": suspend}},
            "status": {"conditions": [{"type": t, "status": s, "reason": t, "message": f"{t} message"}
                                      for t, s in conditions]}}


def finetunejob(generation: int, status: dict | None) -> dict:
    obj = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "job", "namespace": "ml-team", "generation": generation}, "spec": {}}
    if status is not None:
        obj["status"] = status
    return obj


def operator_status(acceptance, *, child: dict | None = None, suspend: bool = False, exit_code: int | None = None,
                    progress: dict | None = None, generation: int = 1) -> dict:
    """What the operator writes, derived by its own pure status function (as handlers.py does)."""
    from finetune_operator import status as st

    exit_info = st.ExitInfo(exit_code, "Error", "loss is NaN", "job-master-0") if exit_code is not None else None
    summary = st.summarize_pytorchjob(child, exit_info) if child is not None else None
    status = st.conditions_for(generation=generation, acceptance=acceptance, suspend=suspend, workload=summary,
                               progress=progress, now="2026-01-01T00:00:00Z")
    return {**status, **({"progress": progress} if progress else {})}


def scenarios() -> dict[str, tuple[dict, str, str, str]]:
    """name -> (FineTuneJob, Argo CD health, a word of its message, kstatus)."""
    from finetune_operator.status import Acceptance

    valid = Acceptance.valid(1)
    running = operator_status(valid, child=pytorchjob(("Created", "True"), ("Running", "True")),
                              progress={"progressPercentage": 42, "step": 420, "totalSteps": 1000})
    return {
        "no status yet": (finetunejob(1, None), "Progressing", "Waiting", "Current"),
        "not validated yet": (finetunejob(1, operator_status(Acceptance.pending(1))), "Progressing", "", "InProgress"),
        "invalid spec": (finetunejob(1, operator_status(Acceptance.invalid(1, ["spec.nodes: must be >= 1"]))),
                         "Degraded", "spec.nodes", "Failed"),
        "starting": (finetunejob(1, operator_status(valid, child=pytorchjob(("Created", "True")))),
                     "Progressing", "", "InProgress"),
        "running": (finetunejob(1, running), "Progressing", "42%", "Current"),
        "restarting": (finetunejob(1, operator_status(valid, child=pytorchjob(("Created", "True"), ("Restarting", "True")),
                                                      exit_code=143)), "Progressing", "", "InProgress"),
        "suspended": (finetunejob(1, operator_status(valid, child=pytorchjob(("Created", "True"), ("Suspended", "True"),
                                                                              suspend=True), suspend=True)),
                      "Suspended", "", "InProgress"),
        "succeeded": (finetunejob(1, operator_status(valid, child=pytorchjob(("Created", "True"), ("Succeeded", "True")))),
                      "Healthy", "", "Current"),
        "failed": (finetunejob(1, operator_status(valid, child=pytorchjob(("Created", "True"), ("Failed", "True")),
                                                  exit_code=1)), "Degraded", "exit code 1", "Failed"),
        "spec edited while running": (finetunejob(2, operator_status(
            Acceptance.change_rejected(2, 1), child=pytorchjob(("Created", "True"), ("Running", "True")), generation=2)),
            "Degraded", "spec changed", "Failed"),
        "new generation not observed yet": (finetunejob(2, running), "Progressing", "", "InProgress"),
    }


SCENARIOS = scenarios()


def assert_chart_takes(values: dict) -> None:
    """The real helm renders the chart with these values (its values.schema.json included)."""
    objs = helm_template(values)
    args = next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    for namespace in values.get("watchNamespaces", []):
        assert f"--namespace={namespace}" in args


# ------------------------------------------------------------------ Argo CD: the Lua, really run


def argo_health(obj: dict, script: str | None = None) -> dict:
    """Run the health check the way Argo CD does: a Lua 5.1 state with the object as global
    `obj` (JSON objects and arrays as tables), the script's returned table as the result."""
    from lupa import lua51

    lua = lua51.LuaRuntime(unpack_returned_tuples=True)

    def to_lua(value):
        if isinstance(value, dict):
            return lua.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([to_lua(v) for v in value])
        return value

    lua.globals().obj = to_lua(json.loads(json.dumps(obj)))
    result = lua.execute(script if script is not None else HEALTH_LUA.read_text())
    return {"status": result["status"], "message": result["message"]}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_argocd_health(name):
    obj, health, word, _ = SCENARIOS[name]
    result = argo_health(obj)
    assert result["status"] == health, (name, result)
    assert word in (result["message"] or ""), (name, result)


def test_argocd_health_can_fail():
    """The runtime is real: a broken script raises, and a check that ignores status says so."""
    from lupa import lua51

    with pytest.raises(lua51.LuaError):
        argo_health(SCENARIOS["running"][0], "return obj.status.conditions[1].missing.field")
    assert argo_health(SCENARIOS["failed"][0], 'return {status = "Healthy", message = ""}')["status"] == "Healthy"


def test_argocd_configmap_carries_the_same_lua():
    (cm,) = documents(GITOPS / "argocd" / "argocd-cm-health.yaml")
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "argocd-cm"
    assert cm["data"][HEALTH_KEY] == HEALTH_LUA.read_text()


def test_argocd_applications_point_at_the_repository():
    apps = {d["metadata"]["name"]: d for p in (GITOPS / "argocd").glob("application-*.yaml") for d in documents(p)}
    operator, jobs = apps["finetune-operator"], apps["finetune-jobs"]
    assert (REPO / operator["spec"]["source"]["path"] / "Chart.yaml").exists()
    assert_chart_takes(operator["spec"]["source"]["helm"]["valuesObject"])
    assert (REPO / jobs["spec"]["source"]["path"] / "kustomization.yaml").exists()
    assert jobs["spec"]["syncPolicy"]["automated"]["prune"] is False  # never delete a training job
    assert "resources-finalizer.argocd.argoproj.io" not in operator["metadata"].get("finalizers", [])


# ------------------------------------------------------------------ Flux: kstatus on the same statuses


def kstatus(obj: dict) -> str:
    """The status Flux's health check computes for a custom resource: the rules of
    sigs.k8s.io/cli-utils kstatus `Compute` (generic properties, then the Ready condition)."""
    meta, status = obj["metadata"], obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return "Terminating"
    if "generation" in meta and "observedGeneration" in status and status["observedGeneration"] != meta["generation"]:
        return "InProgress"
    conditions = status.get("conditions") or []
    for cond in conditions:
        if cond.get("type") == "Reconciling" and cond.get("status") == "True":
            return "InProgress"
        if cond.get("type") == "Stalled" and cond.get("status") == "True":
            return "Failed"
    for cond in conditions:
        if cond.get("type") == "Ready":
            return "Current" if cond.get("status") == "True" else "InProgress"
    return "Current"


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_flux_kstatus(name):
    """A sync waits while a job is validated and its pods start, never for the hours of training;
    a failed or refused job fails the health check."""
    obj, _, _, expected = SCENARIOS[name]
    assert kstatus(obj) == expected


def test_flux_kustomization_checks_every_example_job():
    (kustomization,) = documents(GITOPS / "flux" / "finetune-jobs.yaml")
    spec = kustomization["spec"]
    assert (REPO / spec["path"] / "kustomization.yaml").exists()
    built = [d for d in yaml.safe_load_all(run_tool("kubectl", "kustomize", str(REPO / spec["path"])).stdout) if d]
    jobs = {(d["apiVersion"], d["kind"], d["metadata"]["namespace"], d["metadata"]["name"]) for d in built
            if d["kind"] == "FineTuneJob"}
    checks = {(c["apiVersion"], c["kind"], c["namespace"], c["name"]) for c in spec["healthChecks"]}
    assert jobs and checks == jobs
    assert spec["prune"] is False and spec["targetNamespace"] == "ml-team"
    (source,) = documents(GITOPS / "flux" / "gitrepository.yaml")
    assert spec["sourceRef"] == {"kind": "GitRepository", "name": source["metadata"]["name"]}


def test_flux_helmrelease_installs_the_chart():
    (release,) = documents(GITOPS / "flux" / "helmrelease-operator.yaml")
    chart = release["spec"]["chart"]["spec"]
    assert (REPO / chart["chart"] / "Chart.yaml").exists()
    assert_chart_takes(release["spec"]["values"])


# ------------------------------------------------------------------ kubectl parses them all


@pytest.fixture(scope="module")
def kubectl_dry_run(tmp_path_factory):
    pytest.importorskip("kmock")
    with emulated_kubectl(tmp_path_factory.mktemp("kube")) as dry_run:
        yield dry_run


@pytest.mark.parametrize("path", sorted(GITOPS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(GITOPS)))
def test_kubectl_apply_dry_run(kubectl_dry_run, path):
    names = kubectl_dry_run("-f", str(path))
    assert len(names) == len(documents(path))
