"""render(job, settings, backend) for TrainJob and JobSet: table cases over the run settings,
every rendered workload against the structural schema of the fields we use (tests/
workload_schemas.py, from the upstream Go types), and its pod template / Job spec / env /
volumes against the real Kubernetes schemas (kubernetes-validate, strict)."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from finetune_trainer import contract as c
from finetune_trainer.config import ConfigError
from finetune_operator.backends import BACKENDS, Refusal, choose, parse_enabled
from finetune_operator.render import RenderSettings, render
from finetune_operator.spec import BackendName
from workload_schemas import JOBSET, TRAINJOB

SETTINGS = RenderSettings(trainer_image="registry.example/trainer:1")
K8S = "1.35"

PATCHES = [
    {},
    {"nodes": 4, "gpus_per_node": 8, "hf_token_secret": {"name": "h", "key": "t"},
     "resources": {"requests": {"cpu": "4", "memory": "64Gi"}}, "queue_name": "q",
     "node_selector": {"gpu": "h100"}, "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
     "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
         {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
     "env": [{"name": "NCCL_DEBUG", "value": "INFO"}], "termination_grace_period_seconds": 600,
     "storage": {"uri": "s3://ckpt/runs", "credentials_secret": "s3", "endpoint_url": "http://minio:9000"}},
    {"suspend": True},
    {"model": {"base_model": "/models/llama-3.1-8b", "trust_remote_code": False}, "nodes": 2,
     "model_volume": {"claim_name": "base-models", "sub_path": "hf"}, "model_cache": {"claim_name": "model-cache"}},
]


def job(**spec_patch: Any) -> dict[str, Any]:
    spec = {
        "model": {"base_model": "builtin:SmolLM2-135M-Instruct", "trust_remote_code": False},
        "dataset": {"train_path": "s3://data/train.jsonl"},
        "storage": {"uri": "s3://ckpt/runs"},
        **spec_patch,
    }
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "demo", "namespace": "team-a", "uid": "uid-1", "generation": 1}, "spec": spec}


def workload(backend: str, **patch: Any) -> dict[str, Any]:
    manifests = render(job(**patch), SETTINGS, backend)
    assert [m["kind"] for m in manifests[:4]] == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding"]
    return manifests[-1]


def schema_errors(obj: dict, schema: dict) -> list[str]:
    return sorted(".".join(map(str, e.absolute_path)) + ": " + e.message
                  for e in jsonschema.Draft4Validator(schema).iter_errors(obj))


def jobset_pod_template(js: dict) -> dict:
    return js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]


def env_of(entries: list[dict]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in entries}


# ------------------------------------------------------------------ schemas


@pytest.mark.parametrize("patch", PATCHES)
def test_jobset_passes_its_structural_schema_and_kubernetes_job_schema(patch):
    js = workload("jobset", **patch)
    assert schema_errors(js, JOBSET) == []
    job_spec = js["spec"]["replicatedJobs"][0]["template"]
    kubernetes_validate.validate({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "demo-node-0"},
                                  "spec": job_spec["spec"]}, K8S, strict=True)


@pytest.mark.parametrize("patch", PATCHES)
def test_trainjob_passes_its_structural_schema_and_its_kubernetes_parts_theirs(patch):
    tj = workload("trainjob", **patch)
    assert schema_errors(tj, TRAINJOB) == []
    patched = tj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = copy.deepcopy(patched["template"]["spec"]["template"])
    box = pod["spec"]["containers"][0]
    # The runtime's container, as the patch and spec.trainer complete it: a valid pod.
    box.update(image=tj["spec"]["trainer"]["image"], command=tj["spec"]["trainer"]["command"],
               env=tj["spec"]["trainer"]["env"], resources=tj["spec"]["trainer"].get("resourcesPerNode", {}))
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                  "template": pod}, K8S, strict=True)


def test_the_schemas_catch_a_misspelt_field():
    js = workload("jobset")
    js["spec"]["failurePolicy"]["maxRestart"] = 3
    assert any("maxRestart" in e for e in schema_errors(js, JOBSET))
    tj = workload("trainjob")
    tj["spec"]["trainer"]["numProcsPerNode"] = 2
    assert any("numProcsPerNode" in e for e in schema_errors(tj, TRAINJOB))
    tj = workload("trainjob")
    patch_spec = tj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    patch_spec["template"]["spec"]["template"]["spec"]["priorityClassName"] = "high"  # not patchable
    assert any("priorityClassName" in e for e in schema_errors(tj, TRAINJOB))


# ------------------------------------------------------------------ table: what each backend gets


@pytest.mark.parametrize("nodes, gpus, nproc", [(1, 0, 1), (2, 1, 1), (4, 8, 8)])
def test_jobset_topology_and_rendezvous(nodes, gpus, nproc):
    js = workload("jobset", nodes=nodes, gpus_per_node=gpus)
    rj = js["spec"]["replicatedJobs"][0]
    assert (rj["name"], rj["replicas"]) == ("node", 1)
    spec = rj["template"]["spec"]
    assert (spec["parallelism"], spec["completions"], spec["completionMode"], spec["backoffLimit"]) == \
        (nodes, nodes, "Indexed", 0)
    box = spec["template"]["spec"]["containers"][0]
    assert box["command"] == list(c.TORCHRUN_COMMAND)  # always torchrun: it reads PET_*
    env = env_of(box["env"])
    assert env["PET_NNODES"] == str(nodes) and env["PET_NPROC_PER_NODE"] == str(nproc)
    assert env["PET_MASTER_ADDR"] == "demo-node-0-0.demo" and env["PET_MASTER_PORT"] == str(c.MASTER_PORT)
    assert env["PET_NODE_RANK"] == {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert "RANK" not in env and "LOCAL_RANK" not in env
    assert js["spec"]["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True}


def test_jobset_failure_policy_mirrors_the_exit_code_contract():
    js = workload("jobset")
    policy = js["spec"]["failurePolicy"]
    assert policy["maxRestarts"] == SETTINGS.backoff_limit
    assert policy["rules"][0] == {"name": "PermanentExitCode", "action": "FailJobSet",
                                  "onJobFailureReasons": ["PodFailurePolicy"]}
    assert policy["rules"][-1]["action"] == "RestartJobSet"
    job_spec = js["spec"]["replicatedJobs"][0]["template"]["spec"]
    rule = job_spec["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["operator"] == "In"
    codes = rule["onExitCodes"]["values"]
    assert codes == [n for n in range(256) if 1 <= n <= 127]
    assert all(not c.exit_code_is_retryable(n) for n in codes) and c.EXIT_PREEMPTED not in codes
    assert job_spec["template"]["spec"]["restartPolicy"] == "Never"


@pytest.mark.parametrize("backend", ["jobset", "trainjob"])
def test_shared_pod_contract(backend):
    w = workload(backend, **PATCHES[1])
    if backend == "jobset":
        pod = jobset_pod_template(w)
        box, env = pod["spec"]["containers"][0], env_of(pod["spec"]["containers"][0]["env"])
        spec = pod["spec"]
    else:
        pod = w["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
            "template"]["spec"]["template"]
        spec, box, env = pod["spec"], pod["spec"]["containers"][0], env_of(w["spec"]["trainer"]["env"])
    assert spec["serviceAccountName"] == "demo-trainer"
    assert spec["terminationGracePeriodSeconds"] == 600 and env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "590"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert box["securityContext"]["readOnlyRootFilesystem"] is True
    assert {v["name"] for v in spec["volumes"]} == {"config", "dshm", "workspace", "tmp"}
    assert {m["mountPath"] for m in box["volumeMounts"]} == {c.CONFIG_DIR, c.SHM_DIR, c.WORK_DIR, c.TMP_DIR}
    assert spec["nodeSelector"] == {"gpu": "h100"} and spec["tolerations"][0]["key"] == "gpu" and spec["affinity"]
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "h", "key": "t"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and env["NCCL_DEBUG"] == "INFO"
    assert env["FINETUNE_CONFIG"] == c.CONFIG_PATH
    assert w["metadata"]["labels"][c.LABEL_KUEUE_QUEUE] == "q" and w["spec"]["suspend"] is True  # queued
    assert w["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert w["metadata"]["annotations"][c.ANNOTATION_BACKEND] == backend


def pod_parts(w: dict) -> tuple[dict, dict, list[dict]]:
    """(pod spec, trainer container, its env) of any backend's workload; a TrainJob's from its patch."""
    if w["kind"] == "TrainJob":
        spec = w["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
            "template"]["spec"]["template"]["spec"]
        return spec, spec["containers"][0], w["spec"]["trainer"]["env"]
    template = (w["spec"]["pytorchReplicaSpecs"]["Master"]["template"] if w["kind"] == "PyTorchJob"
                else jobset_pod_template(w))
    return template["spec"], template["spec"]["containers"][0], template["spec"]["containers"][0]["env"]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("read_only", [None, False])
def test_model_volume_and_shared_cache_reach_every_backend(backend, read_only):
    volume = {"claim_name": "base-models", "mount_path": "/data/models", "sub_path": "hf",
              **({} if read_only is None else {"read_only": read_only})}
    w = workload(backend, model={"base_model": "/data/models/llama", "trust_remote_code": False}, model_volume=volume,
                 model_cache={"claim_name": "shared-cache"})
    spec, box, env = pod_parts(w)
    ro = read_only is None  # read-only unless the spec says otherwise
    volumes, mounts = {v["name"]: v for v in spec["volumes"]}, {m["name"]: m for m in box["volumeMounts"]}
    assert volumes["models"] == {"name": "models", "persistentVolumeClaim": {"claimName": "base-models", "readOnly": ro}}
    assert mounts["models"] == {"name": "models", "mountPath": "/data/models", "readOnly": ro, "subPath": "hf"}
    assert volumes["model-cache"] == {"name": "model-cache", "persistentVolumeClaim": {"claimName": "shared-cache"}}
    assert mounts["model-cache"] == {"name": "model-cache", "mountPath": c.MODEL_CACHE_MOUNT}
    assert (env_of(env)[c.ENV_MODEL_CACHE], env_of(env)[c.ENV_MODEL_CACHE_SHARED]) == (c.MODEL_CACHE_MOUNT, "1")
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["fsGroup"] == c.TRAINER_UID


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("offline", [False, True])
def test_without_a_model_cache_each_pod_caches_in_its_emptydir(backend, offline):
    spec, box, env = pod_parts(render(job(), RenderSettings(trainer_image="x:1", hub_offline=offline), backend)[-1])
    assert not [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    values = env_of(env)
    assert (values[c.ENV_MODEL_CACHE], values[c.ENV_MODEL_CACHE_SHARED]) == (c.MODEL_CACHE_DIR, "0")
    assert c.MODEL_CACHE_DIR.startswith(c.WORK_DIR + "/")  # in the workspace emptyDir
    assert values.get(c.ENV_HF_HUB_OFFLINE) == ("1" if offline else None)


def test_trainjob_trainer_and_runtime():
    tj = workload("trainjob", nodes=2, gpus_per_node=4, resources={"limits": {"memory": "80Gi"}})
    assert tj["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                        "name": "torch-distributed"}
    trainer = tj["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    assert trainer["resourcesPerNode"] == {"limits": {"memory": "80Gi", "nvidia.com/gpu": 4}}
    assert trainer["command"] == list(c.TORCHRUN_COMMAND)
    assert not [e for e in trainer["env"] if e["name"].startswith("PET_")]  # the torch plug-in's
    patch = tj["spec"]["runtimePatches"]
    assert len(patch) == 1 and patch[0]["manager"] == c.TRAINJOB_PATCH_MANAGER
    pod = patch[0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["name"] == "node" and pod["template"]["spec"]["template"]["spec"]["containers"][0]["name"] == "node"
    assert workload("trainjob", training_runtime="my-runtime")["spec"]["runtimeRef"]["name"] == "my-runtime"
    other = RenderSettings(trainer_image="x:1", trainjob_runtime="site-torch")
    assert render(job(), other, "trainjob")[-1]["spec"]["runtimeRef"]["name"] == "site-torch"


def test_trainjob_refuses_what_its_patches_cannot_carry():
    with pytest.raises(ConfigError) as exc:
        render(job(priority_class_name="high"), SETTINGS, "trainjob")
    assert [i.path for i in exc.value.errors] == ["spec.priority_class_name"]
    assert "ClusterTrainingRuntime" in exc.value.errors[0].message
    assert render(job(priority_class_name="high"), SETTINGS, "jobset")  # JobSet carries the whole pod


@pytest.mark.parametrize("backend", ["pytorchjob", "jobset"])
def test_a_training_runtime_on_a_backend_that_ignores_it_is_refused_not_dropped(backend):
    with pytest.raises(ConfigError) as exc:
        render(job(training_runtime="my-runtime"), SETTINGS, backend)
    assert [i.path for i in exc.value.errors] == ["spec.training_runtime"]
    assert f"runs on {backend}" in exc.value.errors[0].message and "spec.backend to trainjob" in exc.value.errors[0].message


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_everything_but_the_workload_is_the_same_for_every_backend(backend):
    base = render(job(nodes=2), SETTINGS, "pytorchjob")[:4]
    other = render(job(nodes=2), SETTINGS, backend)[:4]
    strip = [{**m, "metadata": {k: v for k, v in m["metadata"].items() if k != "annotations"}} for m in base]
    assert strip == [{**m, "metadata": {k: v for k, v in m["metadata"].items() if k != "annotations"}} for m in other]


def test_offline_render_reads_auto_as_pytorchjob_and_follows_spec_backend():
    assert render(job(), SETTINGS)[-1]["kind"] == "PyTorchJob"
    assert render(job(backend="auto"), SETTINGS)[-1]["kind"] == "PyTorchJob"
    assert render(job(backend="jobset"), SETTINGS)[-1]["kind"] == "JobSet"
    assert render(job(), RenderSettings(default_backend="trainjob"))[-1]["kind"] == "TrainJob"


# ------------------------------------------------------------------ the choice (pure)

ALL = ("pytorchjob", "trainjob", "jobset")


@pytest.mark.parametrize("requested, default, enabled, served, recorded, expected", [
    (None, "auto", ALL, {"pytorchjob"}, None, "pytorchjob"),
    (None, "auto", ALL, {"pytorchjob", "jobset"}, None, "jobset"),
    (None, "auto", ALL, set(ALL), None, "trainjob"),
    ("auto", "pytorchjob", ALL, {"jobset", "trainjob"}, None, "trainjob"),
    (None, "auto", ("pytorchjob", "jobset"), set(ALL), None, "jobset"),  # only the enabled
    (None, "jobset", ALL, set(ALL), None, "jobset"),  # the operator's default
    ("pytorchjob", "auto", ALL, set(ALL), None, "pytorchjob"),
    (None, "auto", ALL, set(), "pytorchjob", "pytorchjob"),  # recorded: discovery is not asked
    ("trainjob", "auto", ALL, set(ALL), "jobset", "jobset"),  # recorded wins over an edit
    (None, "auto", ALL, set(), None, "BackendNotInstalled"),
    ("trainjob", "auto", ALL, {"pytorchjob"}, None, "BackendNotInstalled"),
    ("jobset", "auto", ("pytorchjob",), set(ALL), None, "BackendNotEnabled"),
])
def test_choose(requested, default, enabled, served, recorded, expected):
    asked = []

    def discovery():
        asked.append(1)
        return served

    got = choose(requested, default=default, enabled=enabled, served=discovery, recorded=recorded)
    assert (got.reason if isinstance(got, Refusal) else got.backend.name) == expected
    if recorded:
        assert asked == []


def test_backend_names_are_one_list():
    assert BackendName.__args__ == (c.BACKEND_AUTO, *c.BACKENDS)
    assert parse_enabled("jobset, pytorchjob") == ("jobset", "pytorchjob")
    with pytest.raises(ValueError):
        parse_enabled("jobset,argo")


def test_a_misspelt_backend_is_one_message_naming_the_field():
    with pytest.raises(ConfigError) as exc:
        render(job(backend="jobsets"), SETTINGS)
    (issue,) = [i for i in exc.value.errors if i.path == "spec.backend"]
    assert "'auto'" in issue.message and "'jobset'" in issue.message
