"""The workload object per backend: PyTorchJob, TrainJob, JobSet. Pure, like render.py.

Each builder takes render's context and reuses its shared parts (pod template, container,
env, resources), so the three kinds run the same pods: same config volume, same ServiceAccount
(whose Role lets rank 0 patch the job's status), same Secrets by reference, same security
context, same grace period. What differs is how each kind is told to restart:

- PyTorchJob: restartPolicy ExitCode (1-127 fail, 128+ retried up to runPolicy.backoffLimit);
- JobSet: the Job's podFailurePolicy fails the Job on 1-127 and the JobSet's failurePolicy fails
  the whole set on that; any other failure (128+, a lost node) restarts the whole group, up to
  failurePolicy.maxRestarts;
- TrainJob: the ClusterTrainingRuntime owns the JobSet template, so its failure policy is the
  runtime's (torch-distributed has none: a failed pod fails the run); what the operator may
  set goes through spec.runtimePatches under its own manager name.
"""

from __future__ import annotations

from typing import Any

from finetune_trainer import contract as c

from .backends import JOBSET, PYTORCHJOB, TRAINJOB
from .render import _Context, container, env, pod_template, resources

def workload(ctx: _Context) -> dict[str, Any]:
    return BUILDERS[ctx.backend.name](ctx)


def _queued(ctx: _Context) -> bool:
    """Kueue admits a queued job by unsuspending it, so a queued job starts suspended."""
    return ctx.spec.suspend or ctx.spec.queue_name is not None


def _queue_label(ctx: _Context) -> dict[str, str]:
    return {c.LABEL_KUEUE_QUEUE: ctx.spec.queue_name} if ctx.spec.queue_name else {}


# ------------------------------------------------------------------------------ PyTorchJob


def pytorch_job(ctx: _Context) -> dict[str, Any]:
    """Master (1) + Worker (nodes - 1). restartPolicy ExitCode: the trainer's 1-127 fail the
    job, 128+ (preempted after saving) are retried up to backoffLimit."""
    spec = ctx.spec
    replicas = {"Master": _replica(ctx, 1)}
    if spec.nodes > 1:
        replicas["Worker"] = _replica(ctx, spec.nodes - 1)
    return {
        "apiVersion": c.PYTORCHJOB_API_VERSION,
        "kind": c.PYTORCHJOB_KIND,
        "metadata": ctx.metadata(ctx.name, _queue_label(ctx)),
        "spec": {
            "nprocPerNode": str(ctx.nproc_per_node),
            "runPolicy": {"suspend": _queued(ctx), "backoffLimit": ctx.settings.backoff_limit},
            "pytorchReplicaSpecs": replicas,
        },
    }


def _replica(ctx: _Context, count: int) -> dict[str, Any]:
    return {"replicas": count, "restartPolicy": "ExitCode", "template": pod_template(ctx)}


# ---------------------------------------------------------------------------------- JobSet


def job_set(ctx: _Context) -> dict[str, Any]:
    """One replicated Job ("node") of `nodes` Indexed pods; JobSet's DNS hostnames (and the
    headless Service it creates for them) give the rendezvous its address."""
    template = pod_template(ctx)
    template["spec"]["restartPolicy"] = "Never"  # a Job with a podFailurePolicy requires it
    job_spec = {
        "parallelism": ctx.spec.nodes,
        "completions": ctx.spec.nodes,
        "completionMode": "Indexed",
        "backoffLimit": 0,  # a failed pod fails its Job; the JobSet then fails or restarts the group
        "podFailurePolicy": {"rules": [
            {"action": "FailJob",
             "onExitCodes": {"containerName": c.CONTAINER_NAME, "operator": "In", "values": list(c.PERMANENT_EXIT_CODES)}},
        ]},
        "template": template,
    }
    return {
        "apiVersion": c.JOBSET_API_VERSION,
        "kind": c.JOBSET_KIND,
        "metadata": ctx.metadata(ctx.name, _queue_label(ctx)),
        "spec": {
            "suspend": _queued(ctx),
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "failurePolicy": {
                "maxRestarts": ctx.settings.backoff_limit,
                "rules": [
                    # 1-127 from the trainer (bad data, bad config, NaN loss): a restart cannot fix it.
                    {"name": "PermanentExitCode", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]},
                    # Anything else (128+: preempted after saving; a lost node) restarts the group,
                    # which resumes from the newest checkpoint in storage (JobSet's default action).
                    {"name": "Retryable", "action": "RestartJobSet"},
                ],
            },
            "replicatedJobs": [{
                "name": c.JOBSET_REPLICATED_JOB,
                "replicas": 1,
                "template": {"metadata": {"labels": ctx.labels()}, "spec": job_spec},
            }],
        },
    }


# -------------------------------------------------------------------------------- TrainJob


def train_job(ctx: _Context) -> dict[str, Any]:
    """A TrainJob on a ClusterTrainingRuntime: the trainer (image, command, env, nodes,
    processes, resources) in spec.trainer, the rest of the pod through spec.runtimePatches.
    The runtime's torch plug-in injects PET_* (contract.py), which `finetune launch` reads."""
    spec = ctx.spec
    pod = pod_template(ctx)
    box = container(ctx)
    pod_spec = pod["spec"]
    patch_spec: dict[str, Any] = {
        "serviceAccountName": pod_spec["serviceAccountName"],
        "securityContext": pod_spec["securityContext"],
        "terminationGracePeriodSeconds": pod_spec["terminationGracePeriodSeconds"],
        "volumes": pod_spec["volumes"],
        "containers": [{
            "name": c.TRAINJOB_CONTAINER,
            "volumeMounts": box["volumeMounts"],
            "securityContext": box["securityContext"],
        }],
    }
    for key in ("nodeSelector", "tolerations", "affinity"):
        if key in pod_spec:
            patch_spec[key] = pod_spec[key]
    trainer: dict[str, Any] = {
        "image": box["image"],
        "command": box["command"],
        "env": env(ctx),
        "numNodes": spec.nodes,
        "numProcPerNode": ctx.nproc_per_node,
    }
    if box["resources"]:
        trainer["resourcesPerNode"] = resources(spec)
    return {
        "apiVersion": c.TRAINJOB_API_VERSION,
        "kind": c.TRAINJOB_KIND,
        "metadata": ctx.metadata(ctx.name, _queue_label(ctx)),
        "spec": {
            "runtimeRef": {"apiGroup": c.TRAINJOB_GROUP, "kind": c.TRAINJOB_RUNTIME_KIND,
                           "name": spec.training_runtime or ctx.settings.trainjob_runtime},
            "suspend": _queued(ctx),
            "trainer": trainer,
            "runtimePatches": [{
                "manager": c.TRAINJOB_PATCH_MANAGER,
                "trainingRuntimeSpec": {"template": {
                    "metadata": {"labels": ctx.labels()},
                    "spec": {"replicatedJobs": [{
                        "name": c.TRAINJOB_REPLICATED_JOB,
                        "template": {"spec": {"template": {"metadata": pod["metadata"], "spec": patch_spec}}},
                    }]},
                }},
            }],
        },
    }


BUILDERS = {PYTORCHJOB.name: pytorch_job, JOBSET.name: job_set, TRAINJOB.name: train_job}
