"""render(job, settings): table cases over the run settings, checked field by field, plus
the Kubernetes schemas (kubernetes-validate, strict) for every built-in kind and the pod
template, and the kubeflow.org/v1 PyTorchJob field names (from the training operator's API)."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
import yaml

from finetune_trainer import contract as c
from finetune_operator.render import RenderSettings, check, render, spec_hash, to_yaml
from finetune_operator.spec import StorageSpec
from finetune_trainer.cli import main
from finetune_trainer.config import ConfigError, load_config

SETTINGS = RenderSettings(trainer_image="registry.example/trainer:1")
K8S = "1.35"


def job(**spec_patch: Any) -> dict[str, Any]:
    spec = {
        "model": {"base_model": "builtin:SmolLM2-135M-Instruct", "trust_remote_code": False},
        "dataset": {"train_path": "s3://data/train.jsonl"},
        "storage": {"uri": "s3://ckpt/runs"},
        **spec_patch,
    }
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "team-a", "uid": "uid-1", "generation": 1},
        "spec": spec,
    }


def by_kind(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["kind"]: m for m in manifests}


def pod(manifests, replica: str = "Master") -> dict[str, Any]:
    return by_kind(manifests)["PyTorchJob"]["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]


def env_of(manifests, replica: str = "Master") -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod(manifests, replica)["containers"][0]["env"]}


# --------------------------------------------------------------------------- table: topology


@pytest.mark.parametrize(
    "nodes,gpus,workers,nproc,command,limits",
    [
        (1, 0, None, "1", list(c.TRAINER_COMMAND), None),
        (1, 1, None, "1", list(c.TRAINER_COMMAND), 1),
        (2, 0, 1, "1", list(c.TRAINER_COMMAND), None),
        (2, 8, 1, "8", list(c.TORCHRUN_COMMAND), 8),
        (4, 8, 3, "8", list(c.TORCHRUN_COMMAND), 8),
        (4, 2, 3, "2", list(c.TORCHRUN_COMMAND), 2),
    ],
)
def test_topology(nodes, gpus, workers, nproc, command, limits):
    manifests = render(job(nodes=nodes, gpus_per_node=gpus), SETTINGS)
    pj = by_kind(manifests)["PyTorchJob"]["spec"]
    replicas = pj["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas.get("Worker", {}).get("replicas") == workers
    assert pj["nprocPerNode"] == nproc
    for replica in replicas.values():
        assert replica["restartPolicy"] == "ExitCode"
        container = replica["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch" and container["command"] == command
        assert container["resources"].get("limits", {}).get("nvidia.com/gpu") == limits
    env = env_of(manifests)
    if nproc == "1":  # one process: the trainer itself, told it is local rank 0
        assert env[c.ENV_LOCAL_RANK] == "0" and c.ENV_TORCHRUN_SHUTDOWN_TIMEOUT not in env
    else:  # torchrun gets most of the grace period to let its workers save
        assert c.ENV_LOCAL_RANK not in env and env[c.ENV_TORCHRUN_SHUTDOWN_TIMEOUT] == "290"


@pytest.mark.parametrize(
    "patch,suspend,queue",
    [
        ({}, False, None),
        ({"suspend": True}, True, None),
        ({"queue_name": "gpus"}, True, "gpus"),  # Kueue admits by unsuspending
        ({"queue_name": "gpus", "suspend": True}, True, "gpus"),
    ],
)
def test_suspend_and_queue(patch, suspend, queue):
    pj = by_kind(render(job(**patch), SETTINGS))["PyTorchJob"]
    assert pj["spec"]["runPolicy"] == {"suspend": suspend, "backoffLimit": SETTINGS.backoff_limit}
    assert pj["metadata"]["labels"].get(c.LABEL_KUEUE_QUEUE) == queue


# ------------------------------------------------------------------------- table: env, secrets


@pytest.mark.parametrize(
    "patch,expected",
    [
        ({}, {c.ENV_JOB_NAME: "demo", c.ENV_JOB_NAMESPACE: "team-a", c.ENV_JOB_UID: "uid-1",
              c.ENV_CONFIG: c.CONFIG_PATH, c.ENV_HF_HOME: c.HF_HOME}),
        ({"hf_token_secret": {"name": "hf", "key": "token"}},
         {c.ENV_HF_TOKEN: {"secretKeyRef": {"name": "hf", "key": "token"}}}),
        ({"storage": {"uri": "s3://b/p", "credentials_secret": "s3-creds", "endpoint_url": "http://minio:9000",
                      "region": "eu-west-1", "path_style": True}},
         {c.ENV_AWS_ACCESS_KEY_ID: {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}},
          c.ENV_AWS_SECRET_ACCESS_KEY: {"secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}},
          c.ENV_AWS_ENDPOINT_URL: "http://minio:9000", c.ENV_AWS_REGION: "eu-west-1", c.ENV_S3_ADDRESSING: "path"}),
        ({"env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "AWS_DEFAULT_REGION", "value": "x"}]},
         {"NCCL_DEBUG": "INFO", "AWS_DEFAULT_REGION": "x"}),
    ],
)
def test_env(patch, expected):
    env = env_of(render(job(**patch), SETTINGS))
    assert {k: env.get(k) for k in expected} == expected


TRACKING = {"mlflow": {"tracking_uri": "http://mlflow.mlflow.svc:5000", "token_secret": {"name": "mlflow", "key": "token"},
                       "basic_auth_secret": "mlflow-basic"},
            "wandb": {"project": "llm", "entity": "team", "base_url": "https://wandb.example",
                      "api_key_secret": {"name": "wandb", "key": "api-key"}}}


def test_tracking_settings_become_the_trackers_env_with_keys_by_reference():
    manifests = render(job(tracking=TRACKING, output={"report_to": ["mlflow", "wandb", "tensorboard"]}), SETTINGS)
    env = env_of(manifests)
    assert {k: env.get(k) for k in (c.ENV_MLFLOW_TRACKING_URI, c.ENV_MLFLOW_EXPERIMENT_NAME, c.ENV_WANDB_PROJECT,
                                     c.ENV_WANDB_ENTITY, c.ENV_WANDB_BASE_URL, c.ENV_WANDB_MODE)} == {
        c.ENV_MLFLOW_TRACKING_URI: "http://mlflow.mlflow.svc:5000", c.ENV_MLFLOW_EXPERIMENT_NAME: "team-a",
        c.ENV_WANDB_PROJECT: "llm", c.ENV_WANDB_ENTITY: "team", c.ENV_WANDB_BASE_URL: "https://wandb.example",
        c.ENV_WANDB_MODE: "online"}
    assert env[c.ENV_MLFLOW_TRACKING_TOKEN] == {"secretKeyRef": {"name": "mlflow", "key": "token"}}
    assert env[c.ENV_WANDB_API_KEY] == {"secretKeyRef": {"name": "wandb", "key": "api-key"}}
    for key in (c.ENV_MLFLOW_TRACKING_USERNAME, c.ENV_MLFLOW_TRACKING_PASSWORD):
        assert env[key] == {"secretKeyRef": {"name": "mlflow-basic", "key": key}}
    config = yaml.safe_load(by_kind(manifests)["ConfigMap"]["data"][c.CONFIG_FILE])
    assert config["output"]["report_to"] == ["mlflow", "wandb", "tensorboard"]
    assert "tracking" not in config and "mlflow-basic" not in yaml.safe_dump(config)


@pytest.mark.parametrize(
    "patch,path",
    [
        ({"output": {"report_to": ["mlflow"]}}, "spec.tracking.mlflow"),
        ({"output": {"report_to": ["wandb"]}}, "spec.tracking.wandb"),
        ({"output": {"report_to": ["wandb"]}, "tracking": {"wandb": {"project": "p"}}}, "spec.tracking.wandb.api_key_secret"),
        ({"env": [{"name": "WANDB_API_KEY", "value": "k"}]}, "spec.env[0].name"),
        ({"env": [{"name": "MLFLOW_TRACKING_URI", "value": "http://x"}]}, "spec.env[0].name"),
    ],
)
def test_tracking_needs_its_settings(patch, path):
    with pytest.raises(ConfigError) as exc:
        check(job(**patch), SETTINGS)
    assert path in [e.path for e in exc.value.errors]


def test_every_secret_backed_variable_is_in_the_contract():
    """The trainer redacts the values of contract.SECRET_ENV from sandboxed programs'
    output: a variable rendered from a Secret but missing there would not be redacted."""
    manifests = render(job(hf_token_secret={"name": "hf", "key": "token"}, tracking=TRACKING,
                           output={"report_to": ["mlflow", "wandb"]},
                           storage={"uri": "s3://b/p", "credentials_secret": "s3-creds"}), SETTINGS)
    container = pod(manifests)["containers"][0]
    from_secrets = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert from_secrets and from_secrets <= set(c.SECRET_ENV)


def test_no_secret_without_a_reference():
    env = env_of(render(job(), SETTINGS))
    assert not {c.ENV_HF_TOKEN, c.ENV_AWS_ACCESS_KEY_ID, c.ENV_AWS_SECRET_ACCESS_KEY, c.ENV_S3_ADDRESSING} & set(env)


def test_status_url_and_token_follow_the_settings():
    env = env_of(render(job(), SETTINGS))
    assert env[c.ENV_STATUS_URL] == (
        "https://kubernetes.default.svc/apis/finetune.dev/v1alpha1/namespaces/team-a/finetunejobs/demo/status"
    )
    assert env[c.ENV_STATUS_TOKEN_FILE].startswith(c.SERVICE_ACCOUNT_DIR)
    local = RenderSettings(status_api_url=None)
    manifests = render(job(), local)
    assert c.ENV_STATUS_URL not in env_of(manifests)
    assert pod(manifests)["automountServiceAccountToken"] is False


@pytest.mark.parametrize(
    "env,path,words",
    [
        ([{"name": "FINETUNE_CONFIG", "value": "/x"}], "spec.env[0].name", "set by the operator"),
        ([{"name": "MASTER_ADDR", "value": "x"}], "spec.env[0].name", "training operator"),
        ([{"name": "A", "value": "1"}, {"name": "HF_TOKEN", "value": "hf_x"}], "spec.env[1].name", "hf_token_secret"),
        ([{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}], "spec.env[0].name", "credentials_secret"),
        ([{"name": "PET_NNODES", "value": "3"}], "spec.env[0].name", "reserved"),
        ([{"name": "FINETUNE_ANYTHING", "value": "3"}], "spec.env[0].name", "reserved"),
        ([{"name": "X", "value": "1"}, {"name": "X", "value": "2"}], "spec.env[1].name", "twice"),
    ],
)
def test_env_collisions_are_errors(env, path, words):
    with pytest.raises(ConfigError) as exc:
        render(job(env=env), SETTINGS)
    assert [e.path for e in exc.value.errors] == [path]
    assert words in exc.value.errors[0].message


# ------------------------------------------------------------------ table: resources, scheduling


@pytest.mark.parametrize(
    "resources,gpus,expected",
    [
        ({}, 0, {}),
        ({}, 4, {"limits": {"nvidia.com/gpu": 4}}),
        ({"requests": {"cpu": "8", "memory": "64Gi"}}, 2,
         {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"nvidia.com/gpu": 2}}),
        ({"limits": {"memory": "80Gi"}}, 1, {"limits": {"memory": "80Gi", "nvidia.com/gpu": 1}}),
    ],
)
def test_resources_merge(resources, gpus, expected):
    container = pod(render(job(resources=resources, gpus_per_node=gpus), SETTINGS))["containers"][0]
    assert container["resources"] == expected


def test_gpus_in_resources_are_refused():
    with pytest.raises(ConfigError) as exc:
        render(job(resources={"limits": {"nvidia.com/gpu": 2}}), SETTINGS)
    assert exc.value.errors[0].path == "spec.resources.limits" and "gpus_per_node" in exc.value.errors[0].message


def test_scheduling_fields_reach_every_replica():
    patch = {
        "nodes": 2,
        "node_selector": {"gpu": "h100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
        "priority_class_name": "training",
        "termination_grace_period_seconds": 900,
        "image": "my/trainer:2",
    }
    manifests = render(job(**patch), SETTINGS)
    for replica in ("Master", "Worker"):
        spec = pod(manifests, replica)
        assert spec["nodeSelector"] == patch["node_selector"] and spec["tolerations"] == patch["tolerations"]
        assert spec["affinity"] == patch["affinity"] and spec["priorityClassName"] == "training"
        assert spec["terminationGracePeriodSeconds"] == 900
        assert spec["containers"][0]["image"] == "my/trainer:2"
    plain = pod(render(job(), SETTINGS))
    assert not {"nodeSelector", "tolerations", "affinity", "priorityClassName"} & set(plain)
    assert plain["containers"][0]["image"] == SETTINGS.trainer_image


def test_pod_is_non_root_with_shm_and_the_config_mounted():
    spec = pod(render(job(), SETTINGS))
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = spec["containers"][0]
    # The sandbox's outer wall (sandbox.py's docstring relies on each of these).
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                            "privileged": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True}
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    # With the root filesystem read-only, every place the trainer writes is an emptyDir:
    # scratch, HOME and HF_HOME (the image's HOME is WORK_DIR), the output, /tmp, /dev/shm.
    env = {e["name"]: e.get("value") for e in container["env"]}
    writes = [c.WORK_DIR, c.OUTPUT_DIR, env[c.ENV_HF_HOME], c.TMP_DIR, c.SHM_DIR]
    for path in writes:
        mount = max((m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")), key=len)
        assert "emptyDir" in volumes[mounts[mount]], (path, mount)
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}
    assert volumes[mounts[c.CONFIG_DIR]]["configMap"] == {"name": "demo-config"}
    assert container["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}]
    assert spec["serviceAccountName"] == "demo-trainer"


# ------------------------------------------------------------ base models: volume, cache, Hub


def test_model_volume_is_mounted_read_only_and_the_cache_shared():
    manifests = render(job(model={"base_model": "/models/llama-3.1-8b", "trust_remote_code": False}, nodes=2,
                           model_volume={"claim_name": "base-models"}, model_cache={"claim_name": "cache"}), SETTINGS)
    for replica in ("Master", "Worker"):
        spec = pod(manifests, replica)
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
        assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "base-models", "readOnly": True}
        assert mounts[c.MODEL_VOLUME_DIR] == {"name": "models", "mountPath": c.MODEL_VOLUME_DIR, "readOnly": True}
        assert volumes[mounts[c.MODEL_CACHE_MOUNT]["name"]]["persistentVolumeClaim"] == {"claimName": "cache"}
        env = env_of(manifests, replica)
        assert (env[c.ENV_MODEL_CACHE], env[c.ENV_MODEL_CACHE_SHARED]) == (c.MODEL_CACHE_MOUNT, "1")
    assert "base_model: /models/llama-3.1-8b" in by_kind(manifests)["ConfigMap"]["data"][c.CONFIG_FILE]


@pytest.mark.parametrize(
    "model,volume,path",
    [
        ({"base_model": "/models/llama"}, None, "spec.model.base_model"),  # a path needs the volume
        ({"base_model": "/data/llama"}, {"claim_name": "m"}, "spec.model.base_model"),  # outside its mount
        ({"base_model": "/modelsx/llama"}, {"claim_name": "m"}, "spec.model.base_model"),  # a prefix is not a folder
        ({"base_model": "m", "tokenizer": "/tok"}, {"claim_name": "m", "mount_path": "/models"}, "spec.model.tokenizer"),
        ({"base_model": "m"}, {"claim_name": "m", "mount_path": "/workspace/models"}, "spec.model_volume.mount_path"),
        ({"base_model": "m"}, {"claim_name": "m", "mount_path": "/var"}, "spec.model_volume.mount_path"),
        ({"base_model": "m"}, {"claim_name": "m", "mount_path": "/models/"}, "spec.model_volume.mount_path"),
        ({"base_model": "m"}, {"claim_name": "m", "sub_path": "/abs"}, "spec.model_volume.sub_path"),
        ({"base_model": "m"}, {"claim_name": "m", "sub_path": "a/../b"}, "spec.model_volume.sub_path"),
        ({"base_model": "/data/llama"}, {"claim_name": "m", "mount_path": "/data"}, None),
        ({"base_model": "/models"}, {"claim_name": "m", "sub_path": "llama"}, None),  # the mount is the model
        ({"base_model": "m", "tokenizer": "/models/tok"}, {"claim_name": "m"}, None),  # only the tokenizer there
        ({"base_model": "meta-llama/Llama-3.1-8B"}, {"claim_name": "m"}, None),
    ],
)
def test_model_paths_must_lie_on_the_model_volume(model, volume, path):
    patch = {"model": {**model, "trust_remote_code": False}, **({"model_volume": volume} if volume else {})}
    if path is None:
        assert render(job(**patch), SETTINGS)
        return
    with pytest.raises(ConfigError) as exc:
        render(job(**patch), SETTINGS)
    assert [e.path for e in exc.value.errors] == [path]


def test_hub_offline_reaches_every_pod_and_refuses_what_needs_the_hub():
    offline = RenderSettings(trainer_image="x:1", hub_offline=True)
    assert env_of(render(job(nodes=2), offline), "Worker")[c.ENV_HF_HUB_OFFLINE] == "1"
    assert c.ENV_HF_HUB_OFFLINE not in env_of(render(job(), SETTINGS))
    # A job may go offline by itself (spec.env), but not back online where the operator says offline.
    assert env_of(render(job(env=[{"name": c.ENV_HF_HUB_OFFLINE, "value": "1"}]), SETTINGS))[c.ENV_HF_HUB_OFFLINE] == "1"
    with pytest.raises(ConfigError) as exc:
        render(job(env=[{"name": c.ENV_HF_HUB_OFFLINE, "value": "0"}],
                   output={"push_to_hub": True, "hub_model_id": "me/m"}), offline)
    assert [e.path for e in exc.value.errors] == ["spec.env[0].name", "spec.output.push_to_hub"]


# ----------------------------------------------------------------- config map, RBAC, ownership


def test_config_map_is_the_resolved_trainer_config(tmp_path):
    manifests = render(job(fine_tuning={"method": "qlora"}, training={"max_steps": 5}), SETTINGS)
    text = by_kind(manifests)["ConfigMap"]["data"][c.CONFIG_FILE]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    cfg = load_config(path).config  # the trainer's own loader accepts it as written
    assert cfg.output.storage_uri == "s3://ckpt/runs/team-a/demo"
    assert cfg.output.output_dir == c.OUTPUT_DIR
    assert cfg.model.load_in_4bit is True and cfg.training.max_steps == 5  # implied value written out
    assert "nodes" not in yaml.safe_load(text)  # run settings stay out of the trainer's config


def test_default_storage_from_the_settings():
    no_storage = job()
    del no_storage["spec"]["storage"]
    with pytest.raises(ConfigError) as exc:
        render(no_storage, SETTINGS)
    assert [e.path for e in exc.value.errors] == ["spec.storage"]
    settings = RenderSettings(default_storage=StorageSpec(uri="s3://shared/ft", credentials_secret="shared-s3"))
    manifests = render(no_storage, settings)
    text = by_kind(manifests)["ConfigMap"]["data"][c.CONFIG_FILE]
    assert "storage_uri: s3://shared/ft/team-a/demo" in text
    assert env_of(manifests)[c.ENV_AWS_ACCESS_KEY_ID] == {"secretKeyRef": {"name": "shared-s3", "key": "AWS_ACCESS_KEY_ID"}}


def test_role_allows_exactly_this_jobs_status():
    kinds = by_kind(render(job(), SETTINGS))
    assert kinds["Role"]["rules"] == [{"apiGroups": ["finetune.dev"], "resources": ["finetunejobs/status"],
                                       "resourceNames": ["demo"], "verbs": ["get", "patch"]}]
    binding = kinds["RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "demo-trainer", "namespace": "team-a"}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "demo-trainer"}


def test_every_child_is_owned_labelled_and_named_deterministically():
    manifests = render(job(), SETTINGS)
    assert [(m["kind"], m["metadata"]["name"]) for m in manifests] == [
        ("ConfigMap", "demo-config"), ("ServiceAccount", "demo-trainer"), ("Role", "demo-trainer"),
        ("RoleBinding", "demo-trainer"), ("PyTorchJob", "demo"),
    ]
    for m in manifests:
        meta = m["metadata"]
        assert meta["namespace"] == "team-a"
        assert meta["ownerReferences"] == [{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                            "name": "demo", "uid": "uid-1", "controller": True}]
        assert meta["labels"][c.LABEL_JOB_NAME] == "demo" and meta["labels"][c.LABEL_MANAGED_BY] == c.MANAGED_BY
        assert meta["annotations"][c.ANNOTATION_SPEC_HASH] == spec_hash(job()["spec"])
    assert render(job(), SETTINGS) == manifests  # pure: same input, same output
    assert to_yaml(render(job(), SETTINGS)) == to_yaml(manifests)


def test_spec_hash_tracks_content_not_key_order():
    spec = job()["spec"]
    reordered = dict(reversed(list(copy.deepcopy(spec).items())))
    assert spec_hash(spec) == spec_hash(reordered)
    assert spec_hash(spec) != spec_hash({**spec, "nodes": 2})


def test_no_uid_means_no_owner_reference():
    unowned = job()
    del unowned["metadata"]["uid"]
    assert all("ownerReferences" not in m["metadata"] for m in render(unowned, SETTINGS))


# ---------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "mutate,path",
    [
        (lambda j: j["spec"]["training"].update(learning_rate=-1), "spec.training.learning_rate"),
        (lambda j: j["spec"].update(fine_tuning={"method": "qlora"}, model={"base_model": "m", "load_in_4bit": False,
                                                                          "trust_remote_code": False}),
         "spec.model.load_in_4bit"),
        (lambda j: j["spec"]["output"].update(storage_uri="s3://elsewhere"), "spec.output.storage_uri"),
        (lambda j: j["metadata"].update(name="9lives"), "metadata.name"),
        (lambda j: j["metadata"].update(name="a" * 60), "metadata.name"),
        (lambda j: j.update(kind="Job"), "kind"),
    ],
)
def test_invalid_job_renders_nothing(mutate, path):
    bad = job(training={}, output={})
    mutate(bad)
    with pytest.raises(ConfigError) as exc:
        render(bad, SETTINGS)
    assert path in [e.path for e in exc.value.errors]


def test_trust_remote_code_policy():
    strict = RenderSettings(forbid_trust_remote_code=True)
    trusting = job(model={"base_model": "m"})  # the seed's default is true
    with pytest.raises(ConfigError) as exc:
        render(trusting, strict)
    assert [e.path for e in exc.value.errors] == ["spec.model.trust_remote_code"]
    assert render(trusting, SETTINGS)  # allowed where the cluster allows it
    assert render(job(), strict)  # written out as false: fine


# ------------------------------------------------------------------- against the real schemas

# kubeflow.org/v1 field names (training-operator API: PyTorchJobSpec, RunPolicy, ReplicaSpec).
PYTORCHJOB_FIELDS = {"elasticPolicy", "nprocPerNode", "pytorchReplicaSpecs", "runPolicy"}
RUN_POLICY_FIELDS = {"activeDeadlineSeconds", "backoffLimit", "cleanPodPolicy", "managedBy", "schedulingPolicy",
                     "suspend", "ttlSecondsAfterFinished"}
REPLICA_FIELDS = {"replicas", "restartPolicy", "template"}


@pytest.mark.parametrize("patch", [{}, {"nodes": 4, "gpus_per_node": 8, "hf_token_secret": {"name": "h", "key": "t"},
                                        "resources": {"requests": {"cpu": "4"}}, "queue_name": "q"},
                                   {"model": {"base_model": "/models/m", "trust_remote_code": False}, "nodes": 2,
                                    "model_volume": {"claim_name": "models", "sub_path": "hf", "read_only": False},
                                    "model_cache": {"claim_name": "cache"}}])
def test_manifests_pass_the_kubernetes_schemas(patch):
    manifests = render(job(**patch), SETTINGS)
    for m in manifests[:4]:
        kubernetes_validate.validate(m, K8S, strict=True)
    pj = manifests[4]
    assert set(pj["spec"]) <= PYTORCHJOB_FIELDS and set(pj["spec"]["runPolicy"]) <= RUN_POLICY_FIELDS
    assert isinstance(pj["spec"]["nprocPerNode"], str)
    for replica in pj["spec"]["pytorchReplicaSpecs"].values():
        assert set(replica) <= REPLICA_FIELDS
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": replica["template"]}
        kubernetes_validate.validate(template, K8S, strict=True)


def test_finetune_render_prints_a_yaml_stream(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    doc = job(nodes=2)
    del doc["metadata"]["uid"], doc["metadata"]["namespace"]
    path.write_text(yaml.safe_dump(doc))
    assert main(["render", "-f", str(path), "--image", "img:1", "--nodes", "3"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "PyTorchJob"]
    pj = docs[-1]
    assert pj["metadata"]["namespace"] == "default"
    assert pj["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2  # --nodes 3 overrode the file
    assert pj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["image"] == "img:1"


def test_finetune_render_reports_every_error(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job(env=[{"name": "RANK", "value": "0"}], training={"epochs": 0})))
    assert main(["render", "-f", str(path)]) == 1
    err = capsys.readouterr().err
    assert "spec.training.epochs" in err and "spec.env[0].name: RANK is reserved" in err  # all at once


def test_operator_modules_import_nothing_heavy():
    """Layering: render/crd/local/commands never pull in kopf, torch or transformers, so
    `finetune validate` and `finetune render` stay fast and the operator image stays slim."""
    import subprocess
    import sys

    code = (
        "import sys, finetune_trainer.cli as cli; cli.build_parser();"
        "import finetune_operator.render, finetune_operator.crd, finetune_operator.local, finetune_trainer.contract;"
        "print(sorted(m for m in ('kopf', 'torch', 'transformers', 'kubernetes') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
