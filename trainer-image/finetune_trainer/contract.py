"""The ground floor: every name the operator and the training pods must agree on, in one place.

The operator writes these (render.py), the training pods read them (the trainer, its
storage and status reporters), and `finetune run` reproduces them on a laptop (local.py):
the FineTuneJob API identity, mount paths and file names, environment variables, labels,
exit codes and the retryable rule, and `world()` for a process's place in the job. It
imports only the standard library, so both programs (and `finetune validate`) can stand on it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

# ------------------------------------------------------------------- the FineTuneJob API
GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SHORT_NAME = "ftj"

# --------------------------------------------------------------------------- mount paths
CONFIG_DIR = "/etc/finetune"
CONFIG_FILE = "config.yaml"  # key in the ConfigMap and file name in CONFIG_DIR
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
WORK_DIR = "/workspace"  # emptyDir: pod-local scratch, writable by the non-root trainer
OUTPUT_DIR = f"{WORK_DIR}/output"  # output.output_dir in the pods; results go to storage
HF_HOME = f"{WORK_DIR}/.cache/huggingface"  # downloads land in the emptyDir, not the image
TMP_DIR = "/tmp"  # an emptyDir: the trainer's root filesystem is read-only
SHM_DIR = "/dev/shm"  # a Memory emptyDir: NCCL and DataLoader workers need more than 64 MiB

# ------------------------------------------------------------------------------ the pods
CONTAINER_NAME = "pytorch"  # the training operator injects its env only into this container
MASTER_PORT = 23456  # the training operator's default; its port must be named:
MASTER_PORT_NAME = "pytorchjob-port"
TRAINER_UID = 1000  # the trainer image's non-root user (runAsUser/runAsGroup/fsGroup)
TRAINER_COMMAND = ("finetune", "train", "--config", CONFIG_PATH)
# More than one process in a pod: `finetune launch` runs torchrun (which reads the PET_*
# variables below) and keeps the trainer's exit code, which torchrun alone would turn into 1.
TORCHRUN_COMMAND = ("finetune", "launch", "--config", CONFIG_PATH)

# ------------------------------------------------------- env the operator sets (render.py)
ENV_JOB_NAME = "FINETUNE_JOB_NAME"
ENV_JOB_NAMESPACE = "FINETUNE_JOB_NAMESPACE"
ENV_JOB_UID = "FINETUNE_JOB_UID"
ENV_CONFIG = "FINETUNE_CONFIG"  # path of the resolved config (CONFIG_PATH in a pod)
# Where rank 0 PATCHes status.progress: the job's /status URL, a bearer-token file and a CA
# file (the ServiceAccount's projected token). Unset (local runs): progress is only printed.
ENV_STATUS_URL = "FINETUNE_STATUS_URL"
ENV_STATUS_TOKEN_FILE = "FINETUNE_STATUS_TOKEN_FILE"
ENV_STATUS_CA_FILE = "FINETUNE_STATUS_CA_FILE"
ENV_S3_ADDRESSING = "FINETUNE_S3_ADDRESSING"  # "path" when spec.storage.path_style is true
ENV_DUMP_STACKS_AFTER = "FINETUNE_DUMP_STACKS_AFTER"  # seconds: then every thread's stack to stderr, repeatedly (hangs)
S3_PATH_STYLE = "path"  # the value of ENV_S3_ADDRESSING that asks for path-style addressing
ENV_HF_TOKEN = "HF_TOKEN"  # from spec.hf_token_secret, by reference
ENV_HF_HOME = "HF_HOME"
ENV_AWS_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"  # both from spec.storage.credentials_secret,
ENV_AWS_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"  # keys of the same names, by reference
ENV_AWS_ENDPOINT_URL = "AWS_ENDPOINT_URL"
ENV_AWS_REGION = "AWS_REGION"
ENV_LOCAL_RANK = "LOCAL_RANK"  # one process per pod: set to 0 (torchrun sets it otherwise)
ENV_LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
# torchrun waits this long for its workers after SIGTERM before SIGKILL (default 30 s: too
# short for a checkpoint upload); render sets it from the termination grace period.
ENV_TORCHRUN_SHUTDOWN_TIMEOUT = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"

# Base models fetched once per job (model/fetch.py): into FINETUNE_MODEL_CACHE (a pod-local emptyDir
# under WORK_DIR, or the mount of spec.model_cache, a ReadWriteMany claim every pod shares). With a
# shared cache (FINETUNE_MODEL_CACHE_SHARED=1) global rank 0 fetches and every rank waits for it;
# otherwise each node's local rank 0 fetches into its own pod's cache and its local ranks wait.
# A fetched model is complete only once its manifest (files, sizes, sha256) is written, as for
# checkpoints. A Hub model is mirrored once to <storage>/<ns>/<job>/MODEL_KEY/ for the other nodes.
ENV_MODEL_CACHE = "FINETUNE_MODEL_CACHE"
ENV_MODEL_CACHE_SHARED = "FINETUNE_MODEL_CACHE_SHARED"  # "1": every pod of the job sees the same cache
MODEL_CACHE_DIR = f"{WORK_DIR}/model-cache"  # the pods' default (pod-local)
MODEL_VOLUME_DIR = "/models"  # where spec.model_volume's claim is mounted unless it says otherwise
MODEL_CACHE_MOUNT = "/model-cache"  # where spec.model_cache's shared claim is mounted
MODEL_KEY = "model"  # <storage>/<ns>/<job>/model/: the job's mirror of a Hub model
MODEL_MANIFEST_FILE = "model-manifest.json"  # in a fetched model's cache directory, written last
ENV_HF_HUB_OFFLINE = "HF_HUB_OFFLINE"  # "1" (chart value hub.offline): nothing calls the Hub

# Experiment trackers (spec.tracking -> the pods' env; the libraries' own variable names, so a
# local `finetune train` is configured the way users of transformers already do it).
ENV_MLFLOW_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_MLFLOW_EXPERIMENT_NAME = "MLFLOW_EXPERIMENT_NAME"
ENV_MLFLOW_TRACKING_TOKEN = "MLFLOW_TRACKING_TOKEN"  # from spec.tracking.mlflow.token_secret
ENV_MLFLOW_TRACKING_USERNAME = "MLFLOW_TRACKING_USERNAME"  # both from spec.tracking.mlflow.basic_auth_secret,
ENV_MLFLOW_TRACKING_PASSWORD = "MLFLOW_TRACKING_PASSWORD"  # keys of the same names
ENV_WANDB_API_KEY = "WANDB_API_KEY"  # from spec.tracking.wandb.api_key_secret
ENV_WANDB_PROJECT = "WANDB_PROJECT"
ENV_WANDB_ENTITY = "WANDB_ENTITY"
ENV_WANDB_BASE_URL = "WANDB_BASE_URL"
ENV_WANDB_MODE = "WANDB_MODE"
# A tracker that is down is given this long at the end of the run to take what is queued.
ENV_TRACKER_FLUSH_SECONDS = "FINETUNE_TRACKER_FLUSH_SECONDS"
TRACKER_FLUSH_SECONDS = 30.0
# Storage layout: TensorBoard event files under <storage>/<ns>/<job>/TENSORBOARD_KEY/.
TENSORBOARD_KEY = "tensorboard"
TRACKING_STATE_FILE = "tracking.json"  # in each checkpoint: the trackers' run ids, for resume

# Every variable the operator fills from a Secret (secretKeyRef). The trainer treats their
# values as secrets: redacted from anything a sandboxed program printed (secret_env.py).
SECRET_ENV = (ENV_HF_TOKEN, ENV_AWS_ACCESS_KEY_ID, ENV_AWS_SECRET_ACCESS_KEY, ENV_MLFLOW_TRACKING_TOKEN,
              ENV_MLFLOW_TRACKING_USERNAME, ENV_MLFLOW_TRACKING_PASSWORD, ENV_WANDB_API_KEY)

SECRETS_MOUNT_ROOT = "/var/run/secrets"  # where the kubelet mounts the ServiceAccount token
SERVICE_ACCOUNT_DIR = f"{SECRETS_MOUNT_ROOT}/kubernetes.io/serviceaccount"
IN_CLUSTER_API_URL = "https://kubernetes.default.svc"

# ------------------------------ the Kubeflow training operator v1 (the PyTorchJob backend)
PYTORCHJOB_GROUP = "kubeflow.org"
PYTORCHJOB_VERSION = "v1"
PYTORCHJOB_API_VERSION = f"{PYTORCHJOB_GROUP}/{PYTORCHJOB_VERSION}"
PYTORCHJOB_KIND = "PyTorchJob"
PYTORCHJOB_PLURAL = "pytorchjobs"
TRAINING_JOB_LABEL = "training.kubeflow.org/job-name"  # the training operator's label on the job's pods
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"

# -------------------------------- Kubeflow Trainer v2 (the TrainJob backend) and JobSet
TRAINJOB_GROUP = "trainer.kubeflow.org"
TRAINJOB_VERSION = "v1alpha1"
TRAINJOB_API_VERSION = f"{TRAINJOB_GROUP}/{TRAINJOB_VERSION}"
TRAINJOB_KIND = "TrainJob"
TRAINJOB_PLURAL = "trainjobs"
TRAINJOB_RUNTIME_KIND = "ClusterTrainingRuntime"
DEFAULT_TRAINING_RUNTIME = "torch-distributed"  # the ClusterTrainingRuntime Trainer v2 installs
TRAINJOB_CONTAINER = "node"  # the trainer container of Trainer v2's torch runtimes
TRAINJOB_REPLICATED_JOB = "node"  # their replicated Job (trainer.kubeflow.org/trainjob-ancestor-step: trainer)
TRAINJOB_MASTER_PORT = 29400  # the port Trainer v2's torch plug-in puts in PET_MASTER_PORT
TRAINJOB_PATCH_MANAGER = f"{GROUP}/finetune-operator"  # our entry in spec.runtimePatches (keyed by manager)

JOBSET_GROUP = "jobset.x-k8s.io"
JOBSET_VERSION = "v1alpha2"
JOBSET_API_VERSION = f"{JOBSET_GROUP}/{JOBSET_VERSION}"
JOBSET_KIND = "JobSet"
JOBSET_PLURAL = "jobsets"
JOBSET_REPLICATED_JOB = "node"  # one replicated Job of `nodes` Indexed pods
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"  # on every pod of a JobSet (and of a TrainJob's)
# The Job controller's annotation on an Indexed Job's pods: the pod's index, 0..completions-1.
JOB_COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
ENV_JOB_COMPLETION_INDEX = "JOB_COMPLETION_INDEX"  # the same index, as the Job controller's env

# The backends a FineTuneJob can run on (spec.backend; `auto` asks API discovery).
BACKEND_AUTO = "auto"
BACKEND_PYTORCHJOB = "pytorchjob"
BACKEND_TRAINJOB = "trainjob"
BACKEND_JOBSET = "jobset"
BACKENDS = (BACKEND_PYTORCHJOB, BACKEND_TRAINJOB, BACKEND_JOBSET)
AUTO_PREFERENCE = (BACKEND_TRAINJOB, BACKEND_JOBSET, BACKEND_PYTORCHJOB)  # what `auto` picks first

# The torch.distributed env contract, per backend: every backend ends in the same PET_*
# variables, which torchrun (`finetune launch`) reads, so the trainer sees one world.
# - pytorchjob: the training operator sets MASTER_ADDR/PORT, WORLD_SIZE, RANK and PET_*.
# - trainjob: Trainer v2's torch plug-in sets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
#   PET_MASTER_ADDR (<job>-node-0-0.<job>) and PET_MASTER_PORT (29400).
# - jobset: the operator sets them itself from what JobSet guarantees: PET_MASTER_ADDR is the
#   first pod's DNS name (JobSet's hostnames <jobset>-<replicatedJob>-<jobIndex>-<podIndex>
#   under the subdomain <jobset>), PET_NODE_RANK the pod's Job completion index (downward API
#   of JOB_COMPLETION_INDEX_ANNOTATION); PET_NNODES, PET_NPROC_PER_NODE, PET_MASTER_PORT fixed.


def jobset_master_addr(jobset_name: str, replicated_job: str = JOBSET_REPLICATED_JOB) -> str:
    """The DNS name of a JobSet's first pod (replicated Job 0, pod 0), within its namespace."""
    return f"{jobset_name}-{replicated_job}-0-0.{jobset_name}"


# ----------------------------------- env the Kubeflow training operator injects (PyTorchJob)
ENV_MASTER_ADDR = "MASTER_ADDR"
ENV_MASTER_PORT = "MASTER_PORT"
ENV_WORLD_SIZE = "WORLD_SIZE"  # replicas x nprocPerNode
ENV_RANK = "RANK"  # the pod's index: Master 0, Worker i -> i + 1
ENV_PET_NNODES = "PET_NNODES"
ENV_PET_NPROC_PER_NODE = "PET_NPROC_PER_NODE"
ENV_PET_NODE_RANK = "PET_NODE_RANK"
ENV_PET_MASTER_ADDR = "PET_MASTER_ADDR"
ENV_PET_MASTER_PORT = "PET_MASTER_PORT"
ENV_PYTHONUNBUFFERED = "PYTHONUNBUFFERED"
TRAINING_OPERATOR_ENV = (
    ENV_MASTER_ADDR,
    ENV_MASTER_PORT,
    ENV_WORLD_SIZE,
    ENV_RANK,
    ENV_PET_NNODES,
    ENV_PET_NPROC_PER_NODE,
    ENV_PET_NODE_RANK,
    ENV_PET_MASTER_ADDR,
    ENV_PET_MASTER_PORT,
    ENV_PYTHONUNBUFFERED,
)

# --------------------------------------------------- names a user's spec.env may not use
# Why each is reserved, so the error says what to do instead.
RESERVED_ENV: dict[str, str] = {
    **{name: "set by the operator" for name in (
        ENV_JOB_NAME, ENV_JOB_NAMESPACE, ENV_JOB_UID, ENV_CONFIG, ENV_STATUS_URL, ENV_STATUS_TOKEN_FILE,
        ENV_STATUS_CA_FILE, ENV_HF_HOME, ENV_LOCAL_RANK, ENV_LOCAL_WORLD_SIZE, ENV_TORCHRUN_SHUTDOWN_TIMEOUT,
    )},
    **{name: "set by the Kubeflow training operator for torch.distributed" for name in TRAINING_OPERATOR_ENV},
    ENV_JOB_COMPLETION_INDEX: "set by the Job controller (the pod's index under the jobset backend)",
    ENV_HF_TOKEN: "comes from a Secret: set spec.hf_token_secret (name, key) so the token never sits in the spec",
    ENV_AWS_ACCESS_KEY_ID: "comes from a Secret: set spec.storage.credentials_secret",
    ENV_AWS_SECRET_ACCESS_KEY: "comes from a Secret: set spec.storage.credentials_secret",
    ENV_AWS_ENDPOINT_URL: "set from spec.storage.endpoint_url",
    ENV_AWS_REGION: "set from spec.storage.region",
    ENV_S3_ADDRESSING: "set from spec.storage.path_style",
    ENV_MODEL_CACHE: "set by the operator (spec.model_cache names a shared cache)",
    ENV_MODEL_CACHE_SHARED: "set by the operator (spec.model_cache names a shared cache)",
    ENV_MLFLOW_TRACKING_URI: "set from spec.tracking.mlflow.tracking_uri",
    ENV_MLFLOW_EXPERIMENT_NAME: "set from spec.tracking.mlflow.experiment",
    ENV_MLFLOW_TRACKING_TOKEN: "comes from a Secret: set spec.tracking.mlflow.token_secret (name, key)",
    ENV_MLFLOW_TRACKING_USERNAME: "comes from a Secret: set spec.tracking.mlflow.basic_auth_secret",
    ENV_MLFLOW_TRACKING_PASSWORD: "comes from a Secret: set spec.tracking.mlflow.basic_auth_secret",
    ENV_WANDB_API_KEY: "comes from a Secret: set spec.tracking.wandb.api_key_secret (name, key)",
    ENV_WANDB_PROJECT: "set from spec.tracking.wandb.project",
    ENV_WANDB_ENTITY: "set from spec.tracking.wandb.entity",
    ENV_WANDB_BASE_URL: "set from spec.tracking.wandb.base_url",
    ENV_WANDB_MODE: "set from spec.tracking.wandb.mode",
}
RESERVED_ENV_PREFIXES = ("FINETUNE_", "PET_")


def reserved_env_reason(name: str) -> str | None:
    """Why a user may not set `name` in spec.env, or None when it is free."""
    if name in RESERVED_ENV:
        return RESERVED_ENV[name]
    if name.startswith(RESERVED_ENV_PREFIXES):
        return f"names starting with {' or '.join(RESERVED_ENV_PREFIXES)} are reserved for the operator and torchrun"
    return None


def status_url(api_url: str, namespace: str, name: str) -> str:
    """The job's status subresource, the one URL the trainer's token may GET and PATCH."""
    return f"{api_url.rstrip('/')}/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"


# --------------------------------------------------------------- labels and annotations
LABEL_JOB_NAME = f"{GROUP}/job-name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "finetune-operator"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_SPEC_HASH = f"{GROUP}/spec-hash"  # on every child: the spec it was rendered from
ANNOTATION_BACKEND = f"{GROUP}/backend"  # on every child: the backend the job was given (see backends.py)

# ----------------------------------------------------------------- object storage layout
# <storage.uri>/<namespace>/<job>/ holds checkpoints/, metrics.jsonl and final/.


def job_storage_uri(base_uri: str, namespace: str, name: str) -> str:
    return f"{base_uri.rstrip('/')}/{namespace}/{name}"


# final/: what a finished run publishes. Its top holds the adapter (lora, qlora) or the full
# weights (full, spectrum), the tokenizer and the files below; merged/ (output.merge_adapter)
# the adapter merged into 16-bit base weights. The trainer writes them; the operator lists
# their URIs in status.outputs when the job succeeds (final_outputs).
FINAL_KEY = "final"
MERGED_DIR = "merged"  # final/merged/: full weights, tokenizer; loads in plain transformers
METRICS_FILE = "metrics.jsonl"  # beside final/, not in it
RESULTS_FILE = "train_results.json"
EVALUATION_FILE = "evaluation.json"  # only when evaluation.benchmarks ran
SERVING_FILE = "serving.md"  # how to serve the result, for people
KSERVE_FILE = "inferenceservice.yaml"  # a KServe InferenceService (Hugging Face runtime)
VLLM_FILE = "vllm-serve.sh"  # the `vllm serve` command line
ADAPTER_METHODS = ("lora", "qlora")  # methods whose final/ holds an adapter, not full weights


def final_outputs(job_uri: str, *, adapter: bool, merged: bool, evaluation: bool) -> dict[str, str]:
    """status.outputs: the URI of each thing a finished run published under `job_uri` (a folder
    ends in "/"). `model` is what a server loads as a whole model: the merged weights, or the
    full weights of a full/spectrum run; an adapter run without merging has `adapter` only."""
    root = job_uri.rstrip("/")
    final = f"{root}/{FINAL_KEY}/"
    out = {"final": final}
    if adapter:
        out["adapter"] = final
    if merged or not adapter:
        out["model"] = f"{final}{MERGED_DIR}/" if merged else final
    if merged:
        out["merged"] = f"{final}{MERGED_DIR}/"
    out |= {"config": final + CONFIG_FILE, "results": final + RESULTS_FILE}
    if evaluation:
        out["evaluation"] = final + EVALUATION_FILE
    out |= {"metrics": f"{root}/{METRICS_FILE}", "serving": final + SERVING_FILE,
            "inferenceService": final + KSERVE_FILE, "vllmCommand": final + VLLM_FILE}
    return out


# ------------------------------------------------------------------------- exit codes
# The PyTorchJob uses restartPolicy: ExitCode: 1-127 fail the job for good, 128-255 are
# retried (up to runPolicy.backoffLimit). The trainer exits accordingly (ARCHITECTURE.md).
EXIT_OK = 0
EXIT_PERMANENT = 1  # bad config, missing data, NaN loss: a retry cannot fix it
EXIT_PREEMPTED = 143  # 128 + SIGTERM: saved a checkpoint on SIGTERM; resume on retry
# Storage or the model's source did not answer within the retry budget, or a peer fetching the
# model never finished: an outage, not the user's mistake, so retried (no signal uses 170).
EXIT_UNAVAILABLE = 170
RETRYABLE_EXIT_CODES = range(128, 256)
PERMANENT_EXIT_CODES = range(EXIT_PERMANENT, RETRYABLE_EXIT_CODES.start)  # 1-127


def exit_code_is_retryable(code: int) -> bool:
    return code in RETRYABLE_EXIT_CODES



# ------------------------------------------------------------------ a process's place
ENV_NODE_RANK = "GROUP_RANK"  # torchrun's name for the node (pod) index
ENV_NODES = "GROUP_WORLD_SIZE"  # torchrun's name for the number of nodes


@dataclass(frozen=True)
class World:
    """Where this process is in the job, from what torchrun or the training operator sets."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    nodes: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def world(environ: Mapping[str, str] | None = None) -> World:
    """This process's World (a plain process: rank 0 of 1). Node rank and count fall back
    from torchrun's names to the training operator's PET_* and plain NODE_RANK / NNODES."""
    env = os.environ if environ is None else environ

    def number(*names: str, default: int) -> int:
        for name in names:
            value = env.get(name)
            if value not in (None, ""):
                try:
                    return int(value)
                except ValueError:
                    continue
        return default

    world_size = number(ENV_WORLD_SIZE, default=1)
    local_world = number(ENV_LOCAL_WORLD_SIZE, default=0)
    nodes = number(ENV_NODES, default=0) or (max(1, world_size // local_world) if local_world else 0) \
        or number(ENV_PET_NNODES, "NNODES", default=1)
    return World(rank=number(ENV_RANK, default=0), local_rank=number(ENV_LOCAL_RANK, default=0), world_size=world_size,
                 local_world_size=local_world or 1,
                 node_rank=number(ENV_NODE_RANK, "NODE_RANK", ENV_PET_NODE_RANK, ENV_JOB_COMPLETION_INDEX, default=0),
                 nodes=nodes)


# A location that starts with one of these is a local path, never a Hub id or a dataset name.
PATH_PREFIXES = ("/", "./", "../", "~")
