"""The chart's RBAC grants what the operator calls, and nothing more.

What the operator calls is not listed by hand: the test runs the real operator process
(`finetune` with the exact arguments of the chart's Deployment) against the Kubernetes API
emulator over HTTP, drives every path that talks to the API (accept, reject, run, succeed,
fail with an exit code read from the pods, drift of every child repaired after a restart,
peering), records each request the operator made, and compares those requests with the
rendered (Cluster)Roles through a small RBAC authorizer:

- every request the operator made is allowed by the rendered roles (nothing missing);
- every granted (group, resource, verb) was used by a request, or is needed to create the
  per-job Role that `render()` emits (RBAC's escalation rule: one can only grant what one
  holds) (nothing more);
- the per-job Roles fit inside the operator's own rights in the job's namespace.

Both scopes run: cluster-wide (ClusterRole) and two watched namespaces (a Role in each).
The chart is rendered with the PyTorchJob backend only (backend.enabled={pytorchjob},
backend.default=pytorchjob), the backend this test drives, so "nothing more" stays exact. The
trainjobs and jobsets rules of the other backends carry the same verbs on their own kind, which
tests/test_helm_backends.py checks against this proven pytorchjobs rule (symmetry).
The emulator does not enforce RBAC itself; that is what the authorizer here stands in for.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from kube_tools import REPO, helm_template

pytest.importorskip("kmock")
from finetune_operator.testing.kube_emulator import EmulatorThread, is_create  # noqa: E402  (fixture `emulator`: the plugin's)

OPERATOR_TOKEN = "operator-token"
TESTER_TOKEN = "tester-token"
FINETUNE = str(Path(sys.executable).with_name("finetune"))
JOB_FILE = REPO / "examples" / "finetunejob-smollm2-lora.yaml"
NAMESPACE = "ml-team"


# ------------------------------------------------------------------ requests -> RBAC attributes


@dataclass(frozen=True)
class Attributes:
    """What the API server's authorizer sees of a request (k8s.io/apiserver RequestInfo)."""

    verb: str
    group: str
    resource: str  # plural, or plural/subresource
    namespace: str | None
    name: str | None


def request_attributes(method: str, path: str, query: dict[str, str]) -> Attributes | None:
    """Resource request attributes, or None for a non-resource path (discovery, /version)."""
    parts = [p for p in path.split("?")[0].strip("/").split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 3:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        group, rest = parts[1], parts[3:]
    else:
        return None  # /api, /api/v1, /apis, /apis/<group>/<version>: discovery
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    plural, name, sub = rest[0], (rest[1] if len(rest) > 1 else None), "/".join(rest[2:])
    if method == "GET":
        verb = "get" if name else ("watch" if query.get("watch") in ("true", "1") else "list")
    else:
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update"}.get(method) or (
            "delete" if name else "deletecollection")
    return Attributes(verb, group, f"{plural}/{sub}" if sub else plural, namespace, name)


def _rule_allows(rule: dict, attrs: Attributes) -> bool:
    def has(values: Iterable[str], value: str) -> bool:
        return "*" in values or value in values

    names = rule.get("resourceNames") or []
    return (has(rule.get("apiGroups") or [], attrs.group) and has(rule.get("resources") or [], attrs.resource)
            and has(rule.get("verbs") or [], attrs.verb) and (not names or attrs.name in names))


@dataclass(frozen=True)
class Grant:
    """One rule of a role, with the scope its binding gives it (None: every namespace and the cluster)."""

    namespace: str | None
    rule: dict


def grants_for(objs: list[dict], account: tuple[str, str]) -> list[Grant]:
    """The rules bound to a ServiceAccount (namespace, name) by the rendered bindings."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objs
             if o["kind"] in ("Role", "ClusterRole")}
    grants = []
    for binding in (o for o in objs if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        subject = {"kind": "ServiceAccount", "namespace": account[0], "name": account[1]}
        if not any(s.items() >= subject.items() for s in binding["subjects"]):
            continue
        ref, scope = binding["roleRef"], binding["metadata"].get("namespace")
        role = roles[(ref["kind"], scope if ref["kind"] == "Role" else None, ref["name"])]
        grants += [Grant(scope, rule) for rule in role["rules"]]
    return grants


def allowed(grants: list[Grant], attrs: Attributes) -> bool:
    """RBAC: a RoleBinding's rules apply inside its namespace only (never to cluster-scoped objects)."""
    return any(_rule_allows(g.rule, attrs) for g in grants if g.namespace is None or g.namespace == attrs.namespace)


def granted_triples(grants: list[Grant]) -> set[tuple[str | None, str, str, str]]:
    return {(g.namespace, group, resource, verb) for g in grants for group in g.rule["apiGroups"]
            for resource in g.rule["resources"] for verb in g.rule["verbs"]}


def used_by(grant_triple: tuple[str | None, str, str, str], requests: Iterable[Attributes]) -> bool:
    """A cluster-wide grant is used by a matching request anywhere; a namespaced one by a matching
    request in any watched namespace (every watched namespace gets the same Role: checked below)."""
    scope, group, resource, verb = grant_triple
    return any(r.group == group and r.resource == resource and r.verb == verb
               and (scope is None or r.namespace is not None) for r in requests)


# ------------------------------------------------------------------ the emulator and its clients


def kubeconfig(path: Path, url: str, token: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": token}}],
    }))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, predicate: Callable[[], object], timeout: float = 30.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class TestClient:
    """The test's own API client (a different token, so its requests are not counted)."""

    __test__ = False  # not a pytest test class

    def __init__(self, emu: EmulatorThread, config_file: Path):
        from kubernetes import client, config

        configuration = client.Configuration()
        config.load_kube_config(str(config_file), client_configuration=configuration)
        self.api = client.ApiClient(configuration)
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)
        self.emu = emu

    def create(self, obj: dict) -> None:
        group, _, version = obj["apiVersion"].rpartition("/")
        plural = {"FineTuneJob": "finetunejobs", "KopfPeering": "kopfpeerings",
                  "ClusterKopfPeering": "clusterkopfpeerings"}[obj["kind"]]
        namespace = obj["metadata"].get("namespace")
        if namespace:
            self.custom.create_namespaced_custom_object(group, version, namespace, plural, obj)
        else:
            self.custom.create_cluster_custom_object(group, version, plural, obj)

    def patch_status(self, plural: str, group: str, version: str, name: str, status: dict) -> None:
        self.custom.patch_namespaced_custom_object_status(group, version, NAMESPACE, plural, name, {"status": status})

    def one(self, plural: str, name: str) -> dict | None:
        return next((o for o in self.emu.objects(plural, NAMESPACE) if o["metadata"]["name"] == name), None)

    def conditions(self, name: str) -> dict[str, str]:
        job = self.one("finetunejobs", name) or {}
        return {c["type"]: c["status"] for c in (job.get("status") or {}).get("conditions") or []}


class Operator:
    """`finetune <the Deployment's args>` as a process, stopped with SIGTERM like a pod."""

    def __init__(self, args: list[str], config_file: Path, log: Path):
        env = {**os.environ, "KUBECONFIG": str(config_file), "PYTHONUNBUFFERED": "1"}
        env.pop("KUBERNETES_SERVICE_HOST", None)  # never the in-cluster config
        self.log = log
        self.proc = subprocess.Popen([FINETUNE, *args], env=env, stdout=log.open("a"), stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def operator_requests(emu: EmulatorThread, since: int = 0) -> list[tuple[str, str, dict]]:
    return [(r.method.value, r.url.path, dict(r.params)) for r in list(emu.emulator._requests)[since:]
            if (r.headers.get("Authorization") or "") == f"Bearer {OPERATOR_TOKEN}"]


def watching(emu: EmulatorThread, *plurals: str) -> bool:
    seen = {request_attributes(m, p, q) for m, p, q in operator_requests(emu)}
    return all(any(a and a.verb == "watch" and a.resource == plural for a in seen) for plural in plurals)


def exercise(emu: EmulatorThread, objs: list[dict], tmp_path: Path) -> list[Attributes]:
    """Every API path of the operator, driven end to end; returns the operator's requests."""
    dep = next(o for o in objs if o["kind"] == "Deployment")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    op_config = kubeconfig(tmp_path / "operator.kubeconfig", emu.url, OPERATOR_TOKEN)
    tester = TestClient(emu, kubeconfig(tmp_path / "tester.kubeconfig", emu.url, TESTER_TOKEN))
    log = tmp_path / "operator.log"

    # What `helm install` and the cluster provide: namespaces, the chart's peering objects.
    for namespace in (NAMESPACE, "other"):
        tester.core.create_namespace({"metadata": {"name": namespace}})
    for obj in objs:
        if obj["kind"] in ("KopfPeering", "ClusterKopfPeering"):
            tester.create({k: v for k, v in obj.items() if k != "metadata"} | {"metadata": {
                "name": obj["metadata"]["name"], **({"namespace": obj["metadata"]["namespace"]}
                                                    if "namespace" in obj["metadata"] else {})}})

    operator = Operator(container["args"], op_config, log)
    try:
        wait_for("the operator to watch its resources", lambda: watching(emu, "finetunejobs", "pytorchjobs"))
        port = container["ports"][0]["containerPort"]
        probe = container["livenessProbe"]["httpGet"]["path"]
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}{probe}", timeout=5).status == 200

        job = yaml.safe_load(JOB_FILE.read_text())
        for name in ("ok", "fails"):
            tester.create(copy.deepcopy(job) | {"metadata": {"name": name, "namespace": NAMESPACE}})
        rejected = copy.deepcopy(job) | {"metadata": {"name": "rejected", "namespace": NAMESPACE}}
        rejected["spec"]["model"]["trust_remote_code"] = True  # the chart's default policy refuses it
        tester.create(rejected)
        wait_for("both PyTorchJobs", lambda: tester.one("pytorchjobs", "ok") and tester.one("pytorchjobs", "fails"))
        # flaky: its ConfigMap create hits an API hiccup once; kopf retries the reconcile after
        # RETRY_DELAY, waking itself by touching an annotation (the one patch of a FineTuneJob)
        emu.fail(lambda r: is_create("configmaps")(r) and "flaky" in str(r.url) + str(r.data), times=1)
        tester.create(copy.deepcopy(job) | {"metadata": {"name": "flaky", "namespace": NAMESPACE}})
        wait_for("the flaky job's PyTorchJob, after a retry", lambda: tester.one("pytorchjobs", "flaky"), timeout=60)
        wait_for("the rejection", lambda: tester.conditions("rejected").get("Accepted") == "False")

        # ok: Running -> Succeeded. fails: its Master pod exits 1, the PyTorchJob fails.
        tester.patch_status("pytorchjobs", "kubeflow.org", "v1", "ok", {"conditions": [
            {"type": "Running", "status": "True", "reason": "Running", "message": "running"}]})
        wait_for("Running", lambda: tester.conditions("ok").get("Running") == "True")
        tester.patch_status("pytorchjobs", "kubeflow.org", "v1", "ok", {"conditions": [
            {"type": "Running", "status": "False", "reason": "Done", "message": ""},
            {"type": "Succeeded", "status": "True", "reason": "Done", "message": "done"}]})
        pod = {"metadata": {"name": "fails-master-0", "labels": {
            "training.kubeflow.org/job-name": "fails", "training.kubeflow.org/replica-type": "master"}},
            "spec": {"containers": [{"name": "pytorch", "image": "trainer"}]}}
        tester.core.create_namespaced_pod(NAMESPACE, pod)
        tester.core.patch_namespaced_pod_status("fails-master-0", NAMESPACE, {"status": {"containerStatuses": [{
            "name": "pytorch", "ready": False, "restartCount": 0, "image": "trainer", "imageID": "",
            "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": "NaN loss",
                                     "finishedAt": "2026-01-01T00:00:00Z"}}}]}})
        tester.patch_status("pytorchjobs", "kubeflow.org", "v1", "fails", {"conditions": [
            {"type": "Failed", "status": "True", "reason": "Failed", "message": "pod exited"}]})
        wait_for("Succeeded", lambda: tester.conditions("ok").get("Succeeded") == "True")
        wait_for("Failed", lambda: tester.conditions("fails").get("Failed") == "True")

        # Drift every child of `ok`, then restart the operator: resume re-applies (409 -> get -> patch).
        drift = {"configmaps": {"data": {"config.yaml": "drifted"}},
                 "serviceaccounts": {"metadata": {"labels": {"finetune.dev/job-name": "drifted"}}},
                 "roles": {"rules": []},
                 "rolebindings": {"subjects": []},
                 "pytorchjobs": {"spec": {"runPolicy": {"backoffLimit": 99}}}}
        emu.call(lambda: _drift(emu, drift))
    finally:
        operator.stop()

    operator = Operator(container["args"], op_config, log)
    try:
        wait_for("every drifted child repaired", lambda: all(
            _repaired(tester, plural) for plural in drift), timeout=60)
    finally:
        operator.stop()
    assert operator.proc.returncode in (0, -signal.SIGTERM), log.read_text()[-3000:]
    return [a for m, p, q in operator_requests(emu) if (a := request_attributes(m, p, q))]


def _drift(emu: EmulatorThread, drift: dict) -> None:
    """Edit the stored children in place (as another client's write would), bumping resourceVersion."""
    for (res, ns, name), obj in emu.emulator.objects.items():
        if res.plural in drift and ns == NAMESPACE and name.startswith("ok") and not obj.deleted:
            raw = copy.deepcopy(obj.raw)
            for key, value in drift[res.plural].items():
                raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) and key == "metadata" else value
            if res.plural == "pytorchjobs":
                raw["spec"] = {**raw["spec"], "runPolicy": {**raw["spec"]["runPolicy"], "backoffLimit": 99}}
            raw["metadata"]["resourceVersion"] = emu.emulator._next_rv()
            emu.emulator._store((res, ns, name), raw)


def _repaired(tester: TestClient, plural: str) -> bool:
    objs = [o for o in tester.emu.objects(plural, NAMESPACE) if o["metadata"]["name"].startswith("ok")]
    return bool(objs) and all(
        (o.get("data") or {}).get("config.yaml") != "drifted"
        and (o["metadata"].get("labels") or {}).get("finetune.dev/job-name") != "drifted"
        and o.get("rules", [None]) != [] and o.get("subjects", [None]) != []
        and ((o.get("spec") or {}).get("runPolicy") or {}).get("backoffLimit") != 99
        for o in objs)


# ------------------------------------------------------------------ the tests

# Only the backend the test drives: the other kinds' rules are checked by symmetry in
# tests/test_helm_backends.py (the same verbs as the pytorchjobs rule proven here).
PYTORCHJOB_ONLY = {"backend": {"enabled": ["pytorchjob"], "default": "pytorchjob"}}
SCOPES = {
    "clusterwide": {"peering": {"enabled": True}, **PYTORCHJOB_ONLY},
    "namespaced": {"peering": {"enabled": True}, "watchNamespaces": [NAMESPACE, "other"], **PYTORCHJOB_ONLY},
}


@pytest.mark.slow
@pytest.mark.parametrize("scope", sorted(SCOPES))
def test_rbac_grants_exactly_what_the_operator_calls(scope, emulator, tmp_path):
    # the operator runs here, from the Deployment's args: neither port may be a fixed one CI has taken
    values = {**SCOPES[scope], "health": {"port": free_port()}, "metrics": {"port": free_port()}}
    objs = helm_template(values)
    account = ("finetune-system", next(o for o in objs if o["kind"] == "Deployment")
               ["spec"]["template"]["spec"]["serviceAccountName"])
    grants = grants_for(objs, account)
    roles = [o for o in objs if o["kind"] == "Role"]
    assert all(r["rules"] == roles[0]["rules"] for r in roles), "watched namespaces must get the same Role"

    requests = exercise(emulator, objs, tmp_path)

    missing = sorted({f"{a.verb} {a.group or 'core'}/{a.resource} in {a.namespace or 'cluster'}"
                      for a in requests if not allowed(grants, a)})
    assert missing == [], f"the operator made requests its RBAC does not allow: {missing}"

    # The per-job Roles the operator creates: it must hold every permission it grants.
    from finetune_operator.render import RenderSettings, render

    job = yaml.safe_load(JOB_FILE.read_text())
    job["metadata"]["uid"] = "uid-1"
    job_roles = [m for m in render(job, RenderSettings()) if m["kind"] == "Role"]
    delegated = [Attributes(verb, group, resource, NAMESPACE, name)
                 for role in job_roles for rule in role["rules"] for group in rule["apiGroups"]
                 for resource in rule["resources"] for verb in rule["verbs"]
                 for name in rule.get("resourceNames") or [None]]
    assert delegated and all(allowed(grants, a) for a in delegated), "a per-job Role would need `escalate`"

    unused = sorted(f"{v} {g or 'core'}/{r} in {ns or 'cluster'}" for ns, g, r, v in granted_triples(grants)
                    if not used_by((ns, g, r, v), requests + delegated))
    assert unused == [], f"granted but never called by the operator: {unused}"


def test_attribute_mapping():
    """The request -> RBAC attribute table the comparison rests on (the apiserver's RequestInfo)."""
    table = [
        ("GET", "/apis/finetune.dev/v1alpha1/finetunejobs", {"watch": "true"}, ("watch", "finetune.dev", "finetunejobs", None, None)),
        ("GET", "/apis/finetune.dev/v1alpha1/namespaces/a/finetunejobs", {}, ("list", "finetune.dev", "finetunejobs", "a", None)),
        ("PATCH", "/apis/finetune.dev/v1alpha1/namespaces/a/finetunejobs/j/status", {}, ("patch", "finetune.dev", "finetunejobs/status", "a", "j")),
        ("POST", "/api/v1/namespaces/a/events", {}, ("create", "", "events", "a", None)),
        ("GET", "/api/v1/namespaces", {"watch": "1"}, ("watch", "", "namespaces", None, None)),
        ("GET", "/api/v1/namespaces/a", {}, ("get", "", "namespaces", None, "a")),
        ("DELETE", "/apis/kubeflow.org/v1/namespaces/a/pytorchjobs/j", {}, ("delete", "kubeflow.org", "pytorchjobs", "a", "j")),
        ("PUT", "/api/v1/namespaces/a/configmaps/c", {}, ("update", "", "configmaps", "a", "c")),
    ]
    for method, path, query, expected in table:
        assert request_attributes(method, path, query) == Attributes(*expected), path
    for discovery in ("/api", "/api/v1", "/apis", "/apis/kopf.dev/v1"):
        assert request_attributes("GET", discovery, {}) is None


def test_authorizer_scopes_role_bindings_to_their_namespace():
    objs = [
        {"kind": "Role", "metadata": {"name": "r", "namespace": "a"},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]},
        {"kind": "RoleBinding", "metadata": {"name": "b", "namespace": "a"},
         "roleRef": {"kind": "Role", "name": "r"}, "subjects": [{"kind": "ServiceAccount", "name": "sa", "namespace": "s"}]},
    ]
    grants = grants_for(objs, ("s", "sa"))
    assert allowed(grants, Attributes("list", "", "pods", "a", None))
    assert not allowed(grants, Attributes("list", "", "pods", "b", None))
    assert not allowed(grants, Attributes("list", "", "pods", None, None))
    assert not allowed(grants, Attributes("get", "", "pods", "a", "p"))
    assert grants_for(objs, ("s", "other")) == []
