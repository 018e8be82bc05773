"""The FineTuneJob's spec: the seed's config sections unchanged, plus what a cluster needs.

A user pastes a seed config under `spec:` and adds run settings (image, nodes, storage,
Secrets by reference). Same pydantic machinery as the config, so `finetune validate`
checks a manifest exactly as the operator will, and the CRD is generated from this model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from finetune_trainer.config.schema import FineTuneConfig, NonEmptyStr, Section

from finetune_trainer.contract import API_VERSION, GROUP, KIND, PLURAL, SHORT_NAME, VERSION  # noqa: F401 (re-exported)
from finetune_trainer import contract as c

BackendName = Literal["auto", "pytorchjob", "trainjob", "jobset"]  # contract.BACKEND_AUTO + contract.BACKENDS

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"


DNS_SUBDOMAIN = r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$"  # names of Secrets and ClusterTrainingRuntimes


class SecretKeyRef(Section):
    """A key of a Secret in the job's namespace; the value never enters the spec."""

    name: NonEmptyStr = Field(pattern=DNS_SUBDOMAIN, description="Secret name.")
    key: NonEmptyStr = Field(description="Key within the Secret.")


class StorageSpec(Section):
    """Object storage for checkpoints and results."""

    uri: NonEmptyStr = Field(
        pattern=r"^(s3|file)://.+",
        description="Base URI (s3://bucket/prefix or file:///path); the job writes under <uri>/<namespace>/<job>/.",
    )
    endpoint_url: NonEmptyStr | None = Field(
        default=None, description="S3 endpoint for MinIO, Ceph, R2, ... (AWS_ENDPOINT_URL). Default: AWS."
    )
    region: NonEmptyStr | None = Field(default=None, description="S3 region (AWS_REGION).")
    path_style: bool = Field(default=False, description="Use path-style addressing (MinIO, Ceph).")
    credentials_secret: NonEmptyStr | None = Field(
        default=None,
        pattern=DNS_SUBDOMAIN,
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, passed to the pods by reference.",
    )


class MlflowTracking(Section):
    """Where output.report_to's mlflow reports (the pods' MLFLOW_* env)."""

    tracking_uri: NonEmptyStr = Field(
        pattern=r"^(https?://.+|databricks(://.*)?)$",
        description="MLflow tracking server (MLFLOW_TRACKING_URI), e.g. http://mlflow.mlflow.svc:5000.",
    )
    experiment: NonEmptyStr | None = Field(
        default=None, description="Experiment name (MLFLOW_EXPERIMENT_NAME). Default: the job's namespace."
    )
    token_secret: SecretKeyRef | None = Field(
        default=None, description="Secret key holding a bearer token (MLFLOW_TRACKING_TOKEN), by reference."
    )
    basic_auth_secret: NonEmptyStr | None = Field(
        default=None,
        pattern=DNS_SUBDOMAIN,
        description="Secret with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, by reference.",
    )


class WandbTracking(Section):
    """Where output.report_to's wandb reports (the pods' WANDB_* env)."""

    project: NonEmptyStr = Field(description="W&B project (WANDB_PROJECT).")
    entity: NonEmptyStr | None = Field(default=None, description="W&B entity: team or user (WANDB_ENTITY).")
    base_url: NonEmptyStr | None = Field(
        default=None, pattern=r"^https?://.+", description="Self-hosted W&B server (WANDB_BASE_URL). Default: W&B cloud."
    )
    api_key_secret: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the W&B API key (WANDB_API_KEY), by reference. Needed online."
    )
    mode: Literal["online", "offline"] = Field(
        default="online", description="offline: the run is written to the pod's disk only (WANDB_MODE)."
    )


class TrackingSpec(Section):
    """Endpoints and credentials of the experiment trackers named in output.report_to."""

    mlflow: MlflowTracking | None = Field(default=None, description="MLflow tracking server.")
    wandb: WandbTracking | None = Field(default=None, description="Weights & Biases.")


MOUNT_PATH = r"^(/[-._a-zA-Z0-9]+)+$"  # absolute, no trailing "/", no empty segment
# Where the pods already have a mount (the operator's volumes, the kubelet's ServiceAccount
# token): spec.model_volume may not shadow them (render.model_volume_issues, crd.CEL_RULES).
OPERATOR_MOUNTS = (c.CONFIG_DIR, c.SHM_DIR, c.WORK_DIR, c.TMP_DIR, c.MODEL_CACHE_MOUNT, c.SECRETS_MOUNT_ROOT)
RELATIVE_PATH = r"^[^/].*$"


def _no_dot_segments(value: str | None) -> str | None:
    if value is not None and {".", ".."} & set(value.split("/")):
        raise ValueError(f"may not hold a '.' or '..' segment (got {value!r})")
    return value


class ModelVolumeSpec(Section):
    """A PersistentVolumeClaim holding base models, mounted in every trainer pod: model.base_model
    (and model.tokenizer) may then be a path under mount_path, e.g. /models/llama-3.1-8b."""

    claim_name: NonEmptyStr = Field(
        pattern=DNS_SUBDOMAIN,
        description="PersistentVolumeClaim in the job's namespace (ReadOnlyMany or ReadWriteMany when the job "
        "has more than one node).",
    )
    mount_path: NonEmptyStr = Field(
        default=c.MODEL_VOLUME_DIR, pattern=MOUNT_PATH, max_length=255,
        description="Where the pods see the claim: an absolute path without a trailing / (e.g. /models); an "
        "absolute model.base_model must lie under it.",
    )
    read_only: bool = Field(default=True, description="Mount it read-only: the trainer only reads base models.")
    sub_path: NonEmptyStr | None = Field(
        default=None, pattern=RELATIVE_PATH, description="A folder of the claim to mount instead of its root, relative to it "
        "(no leading /, e.g. llama-3-8b)."
    )

    _paths = field_validator("mount_path", "sub_path")(_no_dot_segments)


class ModelCacheSpec(Section):
    """A ReadWriteMany PersistentVolumeClaim every pod of the job mounts (at /model-cache): global
    rank 0 fetches the base model into it once for the whole job while every pod waits. Without
    it each pod fetches into its own emptyDir."""

    claim_name: NonEmptyStr = Field(
        pattern=DNS_SUBDOMAIN, description=f"ReadWriteMany PersistentVolumeClaim, mounted at {c.MODEL_CACHE_MOUNT}."
    )


class EnvVar(Section):
    """An extra environment variable for the trainer pods (plain value)."""

    name: NonEmptyStr = Field(pattern=ENV_NAME, description="Variable name.")
    value: str = Field(default="", description="Variable value.")


class FineTuneJobSpec(FineTuneConfig):
    """spec of a FineTuneJob: the seed's sections plus run settings."""

    image: NonEmptyStr | None = Field(
        default=None, description="Trainer image. Default: the operator's configured trainer image."
    )
    nodes: int = Field(default=1, ge=1, description="Number of pods (nodes); 1 Master plus nodes-1 Workers.")
    gpus_per_node: int = Field(default=1, ge=0, description="GPUs per pod; also the processes per pod (nprocPerNode).")
    resources: dict[str, Any] = Field(
        default_factory=dict, description="Container resources (requests/limits) beyond the GPUs."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node selector for the training pods.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Tolerations for the training pods.")
    affinity: dict[str, Any] = Field(default_factory=dict, description="Affinity for the training pods.")
    priority_class_name: NonEmptyStr | None = Field(default=None, description="PriorityClass of the training pods.")
    storage: StorageSpec | None = Field(default=None, description="Checkpoint and result storage.")
    hf_token_secret: SecretKeyRef | None = Field(
        default=None, description="Secret key holding a Hugging Face token (HF_TOKEN), for gated models and push_to_hub."
    )
    model_volume: ModelVolumeSpec | None = Field(
        default=None, description="A PersistentVolumeClaim of base models mounted in every pod (read-only by default)."
    )
    model_cache: ModelCacheSpec | None = Field(
        default=None, description="A ReadWriteMany PersistentVolumeClaim all pods share as the base-model cache: "
        "fetched once per job. Default: a pod-local cache, fetched once per pod.",
    )
    tracking: TrackingSpec | None = Field(
        default=None, description="Experiment trackers' endpoints and Secrets (output.report_to names the trackers)."
    )
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment variables for the trainer.")
    suspend: bool = Field(default=False, description="Suspend the job: no pods run until it is set to false.")
    queue_name: NonEmptyStr | None = Field(
        default=None, description="Kueue LocalQueue name (kueue.x-k8s.io/queue-name label)."
    )
    backend: BackendName | None = Field(
        default=None,
        description="Workload API the pods run under: pytorchjob (Kubeflow Training Operator v1), trainjob "
        "(Kubeflow Trainer v2), jobset (JobSet), or auto (API discovery picks TrainJob, then JobSet, then "
        "PyTorchJob). Default: the operator's --default-backend (chart value backend.default). The choice "
        "is recorded in status.backend when the job starts and never changes for that job.",
    )
    training_runtime: NonEmptyStr | None = Field(
        default=None,
        pattern=DNS_SUBDOMAIN,
        description="trainjob backend: the ClusterTrainingRuntime the TrainJob references. Default: the "
        "operator's --trainjob-runtime (torch-distributed, the runtime Kubeflow Trainer v2 installs).",
    )
    termination_grace_period_seconds: int = Field(
        default=300, ge=30, description="Time the trainer gets on SIGTERM to save and upload a checkpoint."
    )

    @field_validator("resources")
    @classmethod
    def _only_requests_and_limits(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = set(value) - {"requests", "limits"}
        if unknown:
            raise ValueError(f"may only hold 'requests' and 'limits' (got {', '.join(sorted(unknown))})")
        return value
