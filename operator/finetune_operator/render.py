"""FineTuneJob -> the Kubernetes objects that run it. Pure: same job, same settings, same output.

    render(job, settings, backend) -> [ConfigMap, ServiceAccount, Role, RoleBinding, workload]

The workload is the backend's kind (a PyTorchJob, TrainJob or JobSet, built in workloads.py);
everything else (the ConfigMap, per-job RBAC, the env contract, volumes, scheduling, Secrets
by reference, the grace period, labels) is shared, here. The operator applies these, `finetune
render` prints them and `finetune run` executes the workload's pods as local processes. No
clock, no environment, no kopf: the trainer image, default storage and policy come in through
RenderSettings. One builder per kind; names are deterministic (`<job>-config`, `<job>-trainer`,
`<job>`) and every object is owned by the FineTuneJob, so a retry never makes a twin and
deleting the job deletes them (the checkpoints in object storage stay).

An invalid job raises ConfigError with every problem (dotted `spec.` paths) and renders
nothing: the spec's own checks (validate_manifest) plus what only a cluster cares about
(policy, reserved env names, storage, names the training operator derives).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune_trainer.config import ConfigError, ConfigIssue, FineTuneConfig, LoadedConfig, dump_config
from finetune_trainer.config.schema import SECTIONS

from finetune_trainer import contract as c
from .backends import BACKENDS, JOBSET, PYTORCHJOB, TRAINJOB, Backend, parse_enabled
from .manifest import validate_manifest
from .spec import API_VERSION, GROUP, KIND, OPERATOR_MOUNTS, PLURAL, FineTuneJobSpec, StorageSpec

GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_TRAINER_IMAGE = "ghcr.io/finetune-operator/trainer:0.1.0"
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# The training operator names each pod's Service <job>-worker-<index>: a 63-character label.
MAX_JOB_NAME = 63 - len("-worker-") - 3


@dataclass(frozen=True)
class RenderSettings:
    """What the operator's deployment decides (flags of `finetune operator`), not the user."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    default_storage: StorageSpec | None = None  # for jobs without spec.storage
    forbid_trust_remote_code: bool = False
    # Where the trainer PATCHes status (None: no status reporting, e.g. local runs).
    status_api_url: str | None = c.IN_CLUSTER_API_URL
    status_token_file: str = f"{c.SERVICE_ACCOUNT_DIR}/token"
    status_ca_file: str = f"{c.SERVICE_ACCOUNT_DIR}/ca.crt"
    backoff_limit: int = 3  # retries of retryable exits (128-255) before the job fails
    output_dir: str = c.OUTPUT_DIR  # output.output_dir in the pods
    extra_labels: dict[str, str] = field(default_factory=dict)
    default_backend: str = c.BACKEND_AUTO  # for jobs without spec.backend
    enabled_backends: tuple[str, ...] = c.BACKENDS  # the kinds this operator may create (its RBAC)
    trainjob_runtime: str = c.DEFAULT_TRAINING_RUNTIME  # for TrainJobs whose spec names none
    hub_offline: bool = False  # HF_HUB_OFFLINE=1 in every pod: models come from volumes, caches or storage
    local_run: bool = False  # `finetune run`: the pods are processes here, an absolute model path is this machine's

    @classmethod
    def from_args(cls, args: Any) -> RenderSettings:
        """From `finetune operator|render|run` flags (absent flags keep the defaults)."""
        uri = getattr(args, "default_storage_uri", None)
        secret = getattr(args, "default_storage_credentials_secret", None)
        return cls(
            trainer_image=getattr(args, "trainer_image", None) or DEFAULT_TRAINER_IMAGE,
            default_storage=StorageSpec(uri=uri, credentials_secret=secret) if uri else None,
            forbid_trust_remote_code=bool(getattr(args, "forbid_trust_remote_code", False)),
            default_backend=getattr(args, "default_backend", None) or c.BACKEND_AUTO,
            enabled_backends=parse_enabled(getattr(args, "backends", None)),
            trainjob_runtime=getattr(args, "trainjob_runtime", None) or c.DEFAULT_TRAINING_RUNTIME,
            hub_offline=bool(getattr(args, "hub_offline", False)),
        )

    def offline_backend(self, spec_backend: str | None) -> str:
        """The backend without a cluster to ask (`finetune render`, `finetune run`): the one
        named, else PyTorchJob for auto (what a cluster with only Training Operator v1 gets)."""
        wanted = spec_backend or self.default_backend
        return c.BACKEND_PYTORCHJOB if wanted == c.BACKEND_AUTO else wanted


# --------------------------------------------------------------------------------- checks


def check(job: dict[str, Any], settings: RenderSettings, backend: Backend | None = None) -> LoadedConfig:
    """The job's spec, checked like `finetune validate` does plus the cluster's own rules
    (and, given the backend it will run on, what that backend cannot do)."""
    untyped = untyped_issues(job)
    try:
        loaded = validate_manifest(job, mode="validate", base_dir=Path(c.CONFIG_DIR))
    except ConfigError as exc:
        known = {e.path for e in exc.errors}
        raise ConfigError(exc.errors + [i for i in untyped if i.path not in known], exc.warnings) from None
    spec: FineTuneJobSpec = loaded.config  # type: ignore[assignment]
    issues = [*untyped, *policy_issues(spec, settings), *storage_issues(spec, settings), *spec_issues(spec, settings),
              *(backend_issues(spec, backend) if backend else [])]
    if issues:
        raise ConfigError(issues, loaded.warnings)
    return loaded


def untyped_issues(job: dict[str, Any]) -> list[ConfigIssue]:
    """The rules that need no valid spec (the name, spec.env): reported beside the schema's errors."""
    raw_spec = job.get("spec") if isinstance(job.get("spec"), dict) else {}
    raw_name = (job.get("metadata") or {}).get("name") if isinstance(job.get("metadata"), dict) else None
    return [*name_issues(raw_name), *env_issues(raw_spec.get("env"))]


def spec_issues(spec: FineTuneJobSpec, settings: RenderSettings) -> list[ConfigIssue]:
    """The run settings' rules that the spec alone decides (no cluster policy or default):
    `finetune validate -f` checks these too (manifest.load_document)."""
    return [*resource_issues(spec), *tracking_issues(spec), *model_volume_issues(spec, settings)]


def name_issues(name: Any) -> list[ConfigIssue]:
    """The PyTorchJob takes the job's name; the training operator wants a DNS-1035 label
    that still fits once it appends -worker-<index> for the pods' Services."""
    if not isinstance(name, str):
        return []  # the envelope check reports it
    if not DNS_1035.match(name):
        return [ConfigIssue("metadata.name", f"must start with a letter (the PyTorchJob and its Services reuse it) (got {name!r})")]
    if len(name) > MAX_JOB_NAME:
        return [ConfigIssue("metadata.name", f"at most {MAX_JOB_NAME} characters: pods get Services named "
                            f"<name>-worker-<index> (got {len(name)})")]
    return []


def policy_issues(spec: FineTuneJobSpec, settings: RenderSettings) -> list[ConfigIssue]:
    issues = []
    if settings.forbid_trust_remote_code and spec.model.trust_remote_code:
        issues.append(ConfigIssue(
            "spec.model.trust_remote_code",
            "this cluster forbids running code from model repositories; set it to false "
            "(the seed's default is true, so it must be written out)",
        ))
    if settings.hub_offline:  # the operator's HF_HUB_OFFLINE=1: a job can neither undo it nor push
        issues += [ConfigIssue(f"spec.env[{i}].name", f"{c.ENV_HF_HUB_OFFLINE} is set by this operator (hub.offline: "
                               "every job runs without the Hugging Face Hub); remove it here")
                   for i, var in enumerate(spec.env) if var.name == c.ENV_HF_HUB_OFFLINE]
        if spec.output.push_to_hub:
            issues.append(ConfigIssue("spec.output.push_to_hub", "this operator runs jobs offline (hub.offline): "
                                      "nothing may call the Hugging Face Hub; set it to false (the result is in "
                                      "storage, status.outputs)"))
    return issues


def env_issues(env: Any) -> list[ConfigIssue]:
    """spec.env (as written) against the contract's reserved names, and duplicates."""
    issues, seen = [], set()
    for i, var in enumerate(env if isinstance(env, list) else []):
        name = var.get("name") if isinstance(var, dict) else None
        if not isinstance(name, str):
            continue  # the schema reports it
        reason = c.reserved_env_reason(name)
        if reason:
            issues.append(ConfigIssue(f"spec.env[{i}].name", f"{name} is reserved: {reason}"))
        elif name in seen:
            issues.append(ConfigIssue(f"spec.env[{i}].name", f"{name} is set twice; keep one"))
        seen.add(name)
    return issues


def resource_issues(spec: FineTuneJobSpec) -> list[ConfigIssue]:
    return [
        ConfigIssue(f"spec.resources.{kind}", f"{GPU_RESOURCE} comes from spec.gpus_per_node; remove it here")
        for kind in ("requests", "limits")
        if GPU_RESOURCE in (spec.resources.get(kind) or {})
    ]


def backend_issues(spec: FineTuneJobSpec, backend: Backend) -> list[ConfigIssue]:
    """What a backend's API cannot carry. A TrainJob's runtimePatches may set only some pod
    fields (serviceAccountName, volumes, securityContext, scheduling, the grace period) and the
    trainer container's volumeMounts: spec.model_volume and model_cache fit, a PriorityClass not."""
    issues = []
    if backend is TRAINJOB and spec.priority_class_name:
        issues.append(ConfigIssue("spec.priority_class_name", "the trainjob backend cannot set a PriorityClass "
                                  "(Trainer v2's runtimePatches do not allow it): set it in the ClusterTrainingRuntime, "
                                  "remove it here, or use spec.backend jobset or pytorchjob"))
    if backend is not TRAINJOB and spec.training_runtime:
        issues.append(ConfigIssue("spec.training_runtime", f"names a ClusterTrainingRuntime, which only the trainjob "
                                  f"backend uses; this job runs on {backend.name}: set spec.backend to trainjob "
                                  f"(on a cluster that serves TrainJob) or remove spec.training_runtime"))
    return issues


def is_under(path: str, root: str) -> bool:
    """`path` is `root` or inside it (POSIX paths as written, no normalising)."""
    return path == root or path.startswith(root + "/")


def model_volume_issues(spec: FineTuneJobSpec, settings: RenderSettings) -> list[ConfigIssue]:
    """An absolute model path is read in the pod, whose root filesystem holds no models: it
    must lie on spec.model_volume, mounted where it does not shadow the operator's mounts.
    (`finetune run` reads such paths on this machine, or maps the volume's to --volume's.)"""
    volume, issues = spec.model_volume, []
    mount = volume.mount_path if volume else None
    pod_paths = () if settings.local_run else ("base_model", "tokenizer")
    for key in pod_paths:
        path = getattr(spec.model, key)
        if path and path.startswith("/") and not (mount and is_under(path, mount)):
            where = f"spec.model_volume.mount_path ({mount})" if mount else "the mount of spec.model_volume"
            issues.append(ConfigIssue(f"spec.model.{key}", f"{path} is a path in the pod, so it must lie under {where}: "
                                      "set spec.model_volume (claim_name, mount_path) to the PersistentVolumeClaim "
                                      "holding it, or name a Hugging Face model id"))
    if mount and any(is_under(mount, root) or is_under(root, mount) for root in OPERATOR_MOUNTS):
        issues.append(ConfigIssue("spec.model_volume.mount_path", f"{mount} overlaps a path the operator mounts "
                                  f"({', '.join(OPERATOR_MOUNTS)}): choose another, e.g. {c.MODEL_VOLUME_DIR}"))
    return issues


def tracking_issues(spec: FineTuneJobSpec) -> list[ConfigIssue]:
    """A tracker in output.report_to needs its endpoint (and W&B online its key) in spec.tracking."""
    tracking, issues = spec.tracking, []
    if "mlflow" in spec.output.report_to and not (tracking and tracking.mlflow):
        issues.append(ConfigIssue("spec.tracking.mlflow", "spec.output.report_to lists mlflow: set "
                                  "spec.tracking.mlflow.tracking_uri (e.g. http://mlflow.mlflow.svc:5000)"))
    if "wandb" in spec.output.report_to:
        if not (tracking and tracking.wandb):
            issues.append(ConfigIssue("spec.tracking.wandb", "spec.output.report_to lists wandb: set "
                                      "spec.tracking.wandb.project and api_key_secret (name, key of a Secret)"))
        elif tracking.wandb.mode == "online" and not tracking.wandb.api_key_secret:
            issues.append(ConfigIssue("spec.tracking.wandb.api_key_secret", "W&B online needs an API key: name the "
                                      "Secret key holding it (name, key), or set mode: offline"))
    return issues


def storage_issues(spec: FineTuneJobSpec, settings: RenderSettings) -> list[ConfigIssue]:
    issues = []
    if spec.output.storage_uri is not None:
        issues.append(ConfigIssue("spec.output.storage_uri", "is set by the operator from spec.storage.uri; "
                                  "set spec.storage.uri instead and remove this key"))
    if spec.storage is None and settings.default_storage is None:
        issues.append(ConfigIssue("spec.storage", "checkpoints and the final model need object storage and this "
                                  "operator has no default; set spec.storage.uri (s3://bucket/prefix)"))
    return issues


# ----------------------------------------------------------------------------------- render


def render(job: dict[str, Any], settings: RenderSettings, backend: str | None = None) -> list[dict[str, Any]]:
    """Every child object of the job, in apply order (the ConfigMap, which records the
    backend, first; RBAC before the pods that use it; the workload last). `backend`: the
    chosen one (backends.choose); None: spec.backend or the default, auto read as pytorchjob."""
    from .workloads import workload

    spec_backend = (job.get("spec") or {}).get("backend") if isinstance(job.get("spec"), dict) else None
    name = backend or settings.offline_backend(spec_backend if isinstance(spec_backend, str) else None)
    # A misspelt spec.backend renders nothing: check() reports it with the values it may take.
    chosen = BACKENDS.get(name, PYTORCHJOB)
    spec: FineTuneJobSpec = check(job, settings, chosen).config  # type: ignore[assignment]
    ctx = _Context.of(job, spec, settings, chosen)
    return [config_map(ctx), service_account(ctx), role(ctx), role_binding(ctx), workload(ctx)]


def spec_hash(spec: dict[str, Any]) -> str:
    """A short digest of the spec as stored; children carry it to tell a spec edit apart."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def config_map_name(job_name: str) -> str:
    return f"{job_name}-config"


def service_account_name(job_name: str) -> str:
    return f"{job_name}-trainer"


@dataclass(frozen=True)
class _Context:
    """What every builder needs, computed once."""

    name: str
    namespace: str
    uid: str | None
    spec: FineTuneJobSpec
    settings: RenderSettings
    storage: StorageSpec
    spec_hash: str
    backend: Backend = PYTORCHJOB

    @classmethod
    def of(cls, job: dict[str, Any], spec: FineTuneJobSpec, settings: RenderSettings,
           backend: Backend = PYTORCHJOB) -> _Context:
        meta = job["metadata"]
        storage = spec.storage or settings.default_storage
        assert storage is not None  # storage_issues refused the job otherwise
        return cls(meta["name"], meta.get("namespace") or "default", meta.get("uid"), spec, settings, storage,
                   spec_hash(job["spec"]), backend)

    @property
    def torchrun(self) -> bool:
        """Under TrainJob and JobSet the pods always start torchrun, which reads the PET_*
        variables; a one-process PyTorchJob pod runs the trainer itself (RANK from the operator)."""
        return self.backend is not PYTORCHJOB or self.nproc_per_node > 1

    @property
    def nproc_per_node(self) -> int:
        return max(self.spec.gpus_per_node, 1)

    def labels(self) -> dict[str, str]:
        return {c.LABEL_JOB_NAME: self.name, c.LABEL_MANAGED_BY: c.MANAGED_BY, **self.settings.extra_labels}

    def metadata(self, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
        """Name, namespace, labels, the spec hash and the owner reference (when the job has a
        uid: a file given to `finetune render` has none, an object from the API server does)."""
        meta: dict[str, Any] = {
            "name": name,
            "namespace": self.namespace,
            "labels": {**self.labels(), **(labels or {})},
            "annotations": {c.ANNOTATION_SPEC_HASH: self.spec_hash, c.ANNOTATION_BACKEND: self.backend.name},
        }
        if self.uid:
            meta["ownerReferences"] = [owner_reference(self.name, self.uid)]
        return meta


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    """Controller reference: garbage collection deletes the child with the job. No
    blockOwnerDeletion: where the OwnerReferencesPermissionEnforcement admission plugin runs it
    needs `update` on finetunejobs/finalizers, a grant the operator has no other use for."""
    return {"apiVersion": API_VERSION, "kind": KIND, "name": name, "uid": uid, "controller": True}


# ----------------------------------------------------------------------------- config map


def trainer_config(spec: FineTuneJobSpec, *, storage_uri: str, output_dir: str) -> FineTuneConfig:
    """The seed-format config the pods train from: the spec's sections, resolved, with the
    job's own storage prefix and a pod-local output directory."""
    data = spec.model_dump(mode="json", include=set(SECTIONS))
    data["output"]["storage_uri"] = storage_uri
    data["output"]["output_dir"] = output_dir
    return FineTuneConfig.model_validate(data)


def config_map(ctx: _Context) -> dict[str, Any]:
    cfg = trainer_config(
        ctx.spec,
        storage_uri=c.job_storage_uri(ctx.storage.uri, ctx.namespace, ctx.name),
        output_dir=ctx.settings.output_dir,
    )
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": ctx.metadata(config_map_name(ctx.name)),
            "data": {c.CONFIG_FILE: dump_config(cfg)}}


# ------------------------------------------------------------------------------------ RBAC


def service_account(ctx: _Context) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": ctx.metadata(service_account_name(ctx.name))}


def role(ctx: _Context) -> dict[str, Any]:
    """Exactly what rank 0 needs to report progress: this one job's status, get and patch."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": ctx.metadata(service_account_name(ctx.name)),
        "rules": [{"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "resourceNames": [ctx.name],
                   "verbs": ["get", "patch"]}],
    }


def role_binding(ctx: _Context) -> dict[str, Any]:
    name = service_account_name(ctx.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": ctx.metadata(name),
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ctx.namespace}],
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
    }


# ------------------------------------------------------------------------- the pods (shared)


def pod_template(ctx: _Context) -> dict[str, Any]:
    spec = ctx.spec
    pod: dict[str, Any] = {
        "serviceAccountName": service_account_name(ctx.name),
        "automountServiceAccountToken": ctx.settings.status_api_url is not None,
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": c.TRAINER_UID,
            "runAsGroup": c.TRAINER_UID,
            "fsGroup": c.TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container(ctx)],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(ctx.name)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            {"name": "workspace", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            *model_volumes(spec),
        ],
    }
    optional = {
        "nodeSelector": spec.node_selector,
        "tolerations": spec.tolerations,
        "affinity": spec.affinity,
        "priorityClassName": spec.priority_class_name,
    }
    pod.update({k: v for k, v in optional.items() if v})
    return {"metadata": {"labels": ctx.labels(), "annotations": {c.ANNOTATION_SPEC_HASH: ctx.spec_hash}},
            "spec": pod}


def container(ctx: _Context) -> dict[str, Any]:
    return {
        "name": c.CONTAINER_NAME,
        "image": ctx.spec.image or ctx.settings.trainer_image,
        "command": list(c.TORCHRUN_COMMAND if ctx.torchrun else c.TRAINER_COMMAND),
        "workingDir": c.WORK_DIR,
        # The trainer's last lines (the error a user must read) become the container's
        # termination message, which the Failed condition quotes.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "env": env(ctx),
        "resources": resources(ctx.spec),
        "ports": [{"name": c.MASTER_PORT_NAME, "containerPort": c.MASTER_PORT, "protocol": "TCP"}],  # torchrun's rendezvous
        "volumeMounts": [
            {"name": "config", "mountPath": c.CONFIG_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": c.SHM_DIR},
            {"name": "workspace", "mountPath": c.WORK_DIR},
            {"name": "tmp", "mountPath": c.TMP_DIR},
            *model_mounts(ctx.spec),
        ],
        # The outer wall around the trainer and the code its benchmarks run (sandbox.py):
        # nothing outside the emptyDirs is writable, no privilege can be gained.
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
    }


MODEL_VOLUME, MODEL_CACHE = "models", "model-cache"  # the pod's volume names for spec.model_volume, model_cache


def model_volumes(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """spec.model_volume (read-only unless it says otherwise) and spec.model_cache, as PVC volumes."""
    out = []
    if spec.model_volume:
        out.append({"name": MODEL_VOLUME, "persistentVolumeClaim": {"claimName": spec.model_volume.claim_name,
                                                                    "readOnly": spec.model_volume.read_only}})
    if spec.model_cache:
        out.append({"name": MODEL_CACHE, "persistentVolumeClaim": {"claimName": spec.model_cache.claim_name}})
    return out


def model_mounts(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if volume := spec.model_volume:
        out.append({"name": MODEL_VOLUME, "mountPath": volume.mount_path, "readOnly": volume.read_only,
                    **({"subPath": volume.sub_path} if volume.sub_path else {})})
    if spec.model_cache:
        out.append({"name": MODEL_CACHE, "mountPath": c.MODEL_CACHE_MOUNT})
    return out


def model_cache_env(spec: FineTuneJobSpec, settings: RenderSettings) -> list[dict[str, Any]]:
    """Where the trainer caches base models, whether every pod sees that cache, and (the
    operator's hub.offline) that nothing calls the Hub: all explicit, the trainer has no defaults."""
    shared = spec.model_cache is not None
    out = [_value(c.ENV_MODEL_CACHE, c.MODEL_CACHE_MOUNT if shared else c.MODEL_CACHE_DIR),
           _value(c.ENV_MODEL_CACHE_SHARED, int(shared))]
    return out + ([_value(c.ENV_HF_HUB_OFFLINE, 1)] if settings.hub_offline else [])


def resources(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The user's requests/limits plus the GPUs (a limit; Kubernetes copies it to requests)."""
    out = {kind: dict(spec.resources[kind]) for kind in ("requests", "limits") if spec.resources.get(kind)}
    if spec.gpus_per_node:
        out["limits"] = {**out.get("limits", {}), GPU_RESOURCE: spec.gpus_per_node}
    return out


def _value(name: str, value: str | int) -> dict[str, Any]:
    return {"name": name, "value": str(value)}


def jobset_rendezvous_env(ctx: _Context) -> list[dict[str, Any]]:
    """Under JobSet nobody injects torch.distributed's variables: set them from what JobSet
    guarantees (the first pod's DNS name; each pod's Job completion index), contract.py."""
    return [
        _value(c.ENV_PET_NNODES, ctx.spec.nodes),
        _value(c.ENV_PET_NPROC_PER_NODE, ctx.nproc_per_node),
        _value(c.ENV_PET_MASTER_ADDR, c.jobset_master_addr(ctx.name)),
        _value(c.ENV_PET_MASTER_PORT, c.MASTER_PORT),
        {"name": c.ENV_PET_NODE_RANK, "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{c.JOB_COMPLETION_INDEX_ANNOTATION}']"}}},
    ]


def _secret(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def env(ctx: _Context) -> list[dict[str, Any]]:
    """The contract's variables, Secrets by reference, storage settings, then the user's."""
    spec, settings, storage = ctx.spec, ctx.settings, ctx.storage
    out = [
        _value(c.ENV_JOB_NAME, ctx.name),
        _value(c.ENV_JOB_NAMESPACE, ctx.namespace),
        *([_value(c.ENV_JOB_UID, ctx.uid)] if ctx.uid else []),
        _value(c.ENV_CONFIG, c.CONFIG_PATH),
        _value(c.ENV_HF_HOME, c.HF_HOME),
        *model_cache_env(spec, settings),
    ]
    if settings.status_api_url:
        out += [
            _value(c.ENV_STATUS_URL, c.status_url(settings.status_api_url, ctx.namespace, ctx.name)),
            _value(c.ENV_STATUS_TOKEN_FILE, settings.status_token_file),
            _value(c.ENV_STATUS_CA_FILE, settings.status_ca_file),
        ]
    if not ctx.torchrun:
        out += [_value(c.ENV_LOCAL_RANK, 0), _value(c.ENV_LOCAL_WORLD_SIZE, 1)]
    else:  # leave torchrun's workers most of the grace period to save on SIGTERM
        out.append(_value(c.ENV_TORCHRUN_SHUTDOWN_TIMEOUT, max(spec.termination_grace_period_seconds - 10, 1)))
    if ctx.backend is JOBSET:
        out += jobset_rendezvous_env(ctx)
    if spec.hf_token_secret:
        out.append(_secret(c.ENV_HF_TOKEN, spec.hf_token_secret.name, spec.hf_token_secret.key))
    if storage.credentials_secret:
        out += [_secret(key, storage.credentials_secret, key) for key in (c.ENV_AWS_ACCESS_KEY_ID, c.ENV_AWS_SECRET_ACCESS_KEY)]
    if storage.endpoint_url:
        out.append(_value(c.ENV_AWS_ENDPOINT_URL, storage.endpoint_url))
    if storage.region:
        out.append(_value(c.ENV_AWS_REGION, storage.region))
    if storage.path_style:
        out.append(_value(c.ENV_S3_ADDRESSING, "path"))
    return out + tracking_env(spec, ctx.namespace) + [_value(var.name, var.value) for var in spec.env]


def tracking_env(spec: FineTuneJobSpec, namespace: str) -> list[dict[str, Any]]:
    """spec.tracking as the trackers' own variables: endpoints as values, keys by reference."""
    out: list[dict[str, Any]] = []
    mlflow = spec.tracking.mlflow if spec.tracking else None
    wandb = spec.tracking.wandb if spec.tracking else None
    if mlflow:
        out += [_value(c.ENV_MLFLOW_TRACKING_URI, mlflow.tracking_uri),
                _value(c.ENV_MLFLOW_EXPERIMENT_NAME, mlflow.experiment or namespace)]
        if mlflow.token_secret:
            out.append(_secret(c.ENV_MLFLOW_TRACKING_TOKEN, mlflow.token_secret.name, mlflow.token_secret.key))
        if mlflow.basic_auth_secret:
            out += [_secret(key, mlflow.basic_auth_secret, key)
                    for key in (c.ENV_MLFLOW_TRACKING_USERNAME, c.ENV_MLFLOW_TRACKING_PASSWORD)]
    if wandb:
        out += [_value(c.ENV_WANDB_PROJECT, wandb.project), _value(c.ENV_WANDB_MODE, wandb.mode)]
        out += [_value(name, value) for name, value in ((c.ENV_WANDB_ENTITY, wandb.entity),
                                                        (c.ENV_WANDB_BASE_URL, wandb.base_url)) if value]
        if wandb.api_key_secret:
            out.append(_secret(c.ENV_WANDB_API_KEY, wandb.api_key_secret.name, wandb.api_key_secret.key))
    return out


class _BlockStrings(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's config.yaml) as readable `|` blocks."""


_BlockStrings.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None),
)


def to_yaml(manifests: list[dict[str, Any]]) -> str:
    """A YAML stream for `kubectl apply -f -`."""
    return yaml.dump_all(manifests, Dumper=_BlockStrings, sort_keys=False, allow_unicode=True)
