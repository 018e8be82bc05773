"""Structural schemas of the TrainJob and JobSet fields the operator renders, written from the
upstream Go types (kubeflow/trainer pkg/apis/trainer/v1alpha1/trainjob_types.go at 8c0f505,
kubernetes-sigs/jobset api/jobset/v1alpha2 at 08dfbdf): the fields we use, their types, the
required ones and the enums, every object closed, so a misspelt or misplaced field fails.
Kubernetes' own types inside them (the pod template, a Job spec, env vars, volumes) are
checked against the real Kubernetes schemas (kubernetes-validate) by the tests instead.
"""

from __future__ import annotations

from typing import Any


def obj(required: list[str] | None = None, **props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required or [], "additionalProperties": False}


STRING, BOOL, INT, OPEN = {"type": "string"}, {"type": "boolean"}, {"type": "integer"}, {"type": "object"}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
META_PATCH = obj(labels=LABELS, annotations=LABELS)  # "only labels and annotations are allowed"
METADATA = {"type": "object", "required": ["name", "namespace"],
            "properties": {"name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                           "namespace": STRING, "labels": LABELS, "annotations": LABELS,
                           "ownerReferences": {"type": "array"}}}


def array(items: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "array", "items": items, **extra}


def resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A namespaced object of one kind: apiVersion and kind fixed, ObjectMeta, this spec."""
    return obj(["apiVersion", "kind", "metadata", "spec"], apiVersion={"enum": [api_version]}, kind={"enum": [kind]},
               metadata=METADATA, spec=spec)


# ------------------------------------------------------------------------------ TrainJob

CONTAINER_PATCH = obj(["name"], name=STRING, env=array(OPEN), volumeMounts=array(OPEN), securityContext=OPEN)
POD_SPEC_PATCH = obj(  # PodSpecPatch: the fields managers are permitted to set
    serviceAccountName=STRING, volumes=array(obj(["name"], name=STRING, configMap=OPEN, emptyDir=OPEN,
                                                persistentVolumeClaim=OPEN)),
    initContainers=array(CONTAINER_PATCH), containers=array(CONTAINER_PATCH), securityContext=OPEN,
    affinity=OPEN, tolerations=array(OPEN), nodeSelector=LABELS, schedulingGates=array(OPEN),
    imagePullSecrets=array(OPEN), terminationGracePeriodSeconds=INT,
)
RUNTIME_PATCH = obj(
    ["manager"],
    manager={"type": "string", "minLength": 1, "maxLength": 253},
    time=STRING,
    trainingRuntimeSpec=obj(template=obj(
        metadata=META_PATCH,
        spec=obj(replicatedJobs=array(obj(
            ["name"],
            name={"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
            template=obj(metadata=META_PATCH, spec=obj(template=obj(metadata=META_PATCH, spec=POD_SPEC_PATCH))),
        ), maxItems=100)),
    )),
)
TRAINJOB = resource(
    "trainer.kubeflow.org/v1alpha1", "TrainJob",
    obj(
        ["runtimeRef"],
        runtimeRef=obj(["name"], name={"type": "string", "minLength": 1, "maxLength": 253},
                       apiGroup=STRING, kind={"enum": ["ClusterTrainingRuntime", "TrainingRuntime"]}),
        initializer=OPEN,
        trainer=obj(
            image={"type": "string", "maxLength": 500},
            command=array(STRING, maxItems=128), args=array(STRING, maxItems=128),
            env=array(OPEN, maxItems=128),
            numNodes={"type": "integer", "minimum": 0},
            numProcPerNode={"type": "integer", "minimum": 1},
            resourcesPerNode=obj(limits=OPEN, requests=OPEN, claims=array(OPEN)),
        ),
        runtimePatches=array(RUNTIME_PATCH, maxItems=16),
        suspend=BOOL,
        activeDeadlineSeconds={"type": "integer", "minimum": 1},
        managedBy={"enum": ["trainer.kubeflow.org/trainjob-controller", "kueue.x-k8s.io/multikueue"]},
    ),
)

# -------------------------------------------------------------------------------- JobSet

FAILURE_RULE = obj(
    ["action"],
    name={"type": "string", "pattern": "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"},
    action={"enum": ["FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts", "RestartJob",
                     "RestartJobAndIgnoreMaxRestarts"]},
    onJobFailureReasons=array({"enum": ["BackoffLimitExceeded", "DeadlineExceeded", "PodFailurePolicy",
                                        "MaxFailedIndexesExceeded", "FailedIndexes"]}),
    onJobFailureMessagePatterns=array(STRING),
    targetReplicatedJobs=array(STRING),
)
JOBSET = resource(
    "jobset.x-k8s.io/v1alpha2", "JobSet",
    obj(
        ["replicatedJobs"],
        suspend=BOOL,
        managedBy=STRING,
        ttlSecondsAfterFinished=INT,
        network=obj(enableDNSHostnames=BOOL, publishNotReadyAddresses=BOOL, subdomain=STRING),
        failurePolicy=obj(maxRestarts={"type": "integer", "minimum": 0},
                          restartStrategy={"enum": ["Recreate", "BlockingRecreate", "InPlaceRestart"]},
                          rules=array(FAILURE_RULE)),
        successPolicy=obj(["operator"], operator={"enum": ["All", "Any"]}, targetReplicatedJobs=array(STRING)),
        startupPolicy=obj(["startupPolicyOrder"], startupPolicyOrder={"enum": ["AnyOrder", "InOrder"]}),
        replicatedJobs=array(obj(
            ["name", "template"],
            name={"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
            replicas={"type": "integer", "minimum": 0},
            groupName=STRING,
            dependsOn=array(OPEN),
            template=obj(["spec"], metadata=META_PATCH, spec=OPEN),  # a batch/v1 JobTemplateSpec: checked by k8s
        ), minItems=1),
    ),
)
