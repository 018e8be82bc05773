"""Table tests of the operator's small pure pieces: API paths, drift patches, status JSON
patches, the spec-change rule, Kueue ownership, and kopf's settings."""

from __future__ import annotations

import logging

import kopf
import pytest

from finetune_operator import handlers, kube, runner
from finetune_operator import status as st
from finetune_operator.render import spec_hash


@pytest.mark.parametrize(
    "args, path",
    [
        (("v1", "ConfigMap", "ns", "c"), "/api/v1/namespaces/ns/configmaps/c"),
        (("v1", "Pod", "ns"), "/api/v1/namespaces/ns/pods"),
        (("v1", "Namespace", "ignored", "ns"), "/api/v1/namespaces/ns"),
        (("rbac.authorization.k8s.io/v1", "Role", "ns", "r"), "/apis/rbac.authorization.k8s.io/v1/namespaces/ns/roles/r"),
        (("kubeflow.org/v1", "PyTorchJob", "ns", "j"), "/apis/kubeflow.org/v1/namespaces/ns/pytorchjobs/j"),
        (("finetune.dev/v1alpha1", "FineTuneJob", "ns", "j", "status"),
         "/apis/finetune.dev/v1alpha1/namespaces/ns/finetunejobs/j/status"),
        (("finetune.dev/v1alpha1", "FineTuneJob", None), "/apis/finetune.dev/v1alpha1/finetunejobs"),
    ],
)
def test_resource_paths(args, path):
    assert kube.resource_path(*args) == path


@pytest.mark.parametrize(
    "existing, desired, ok",
    [
        ({"a": 1, "b": 2}, {"a": 1}, True),  # server defaults add keys
        ({"a": 1}, {"a": 2}, False),
        ({"a": {"b": {"c": 1, "d": 2}}}, {"a": {"b": {"c": 1}}}, True),
        ({"l": [{"x": 1, "y": 2}]}, {"l": [{"x": 1}]}, True),  # defaulted list items
        ({"l": [{"x": 1}, {"x": 2}]}, {"l": [{"x": 1}]}, False),  # a list item too many
        ({"l": [1, 2]}, {"l": [2, 1]}, False),
        (None, {"a": 1}, False),
        ({"a": None}, {"a": None}, True),
    ],
)
def test_contains(existing, desired, ok):
    assert kube.contains(existing, desired) is ok


def manifest(**over):
    base = {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "namespace": "ns", "labels": {"a": "1"}, "annotations": {"h": "x"},
                         "ownerReferences": [{"uid": "u"}]},
            "data": {"k": "v"}}
    base.update(over)
    return base


@pytest.mark.parametrize(
    "existing, patch",
    [
        (manifest(), None),
        ({**manifest(), "metadata": {**manifest()["metadata"], "resourceVersion": "9", "labels": {"a": "1", "x": "y"}}},
         None),  # extra labels and server fields are not ours
        (manifest(data={"k": "old"}), {"data": {"k": "v"}}),
        ({**manifest(), "metadata": {"name": "c", "namespace": "ns"}},
         {"metadata": {"labels": {"a": "1"}, "annotations": {"h": "x"}, "ownerReferences": [{"uid": "u"}]}}),
        ({**manifest(), "status": {"whatever": 1}}, None),
    ],
    ids=["same", "server additions", "data drifted", "adopt: labels and owner", "status is not ours"],
)
def test_drift_patch(existing, patch):
    assert kube.drift_patch(manifest(), existing) == patch


def test_drift_patch_is_minimal_and_can_ignore_fields():
    desired = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "j"},
               "spec": {"runPolicy": {"suspend": True, "backoffLimit": 3}, "pytorchReplicaSpecs": {"Master": {"replicas": 1}}}}
    existing = {"metadata": {"name": "j"},
                "spec": {"runPolicy": {"suspend": False, "backoffLimit": 3}, "pytorchReplicaSpecs": {"Master": {"replicas": 1}}}}
    assert kube.drift_patch(desired, existing) == {"spec": {"runPolicy": {"suspend": True}}}
    assert kube.drift_patch(kube.without(desired, [("spec", "runPolicy", "suspend")]), existing) is None
    assert kube.without(desired, [("spec", "absent", "x")]) == desired


def test_status_json_patch_guards_the_resource_version():
    body = {"metadata": {"resourceVersion": "7"}}
    assert kube.status_json_patch(body, {"phase": "Running"}) == [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
        {"op": "add", "path": "/status", "value": {"phase": "Running"}},
    ]
    body["status"] = {"progress": {"step": 1}}
    assert kube.status_json_patch(body, {"phase": "Running", "conditions": []})[1:] == [
        {"op": "add", "path": "/status/phase", "value": "Running"},
        {"op": "add", "path": "/status/conditions", "value": []},
    ]


@pytest.mark.parametrize(
    "running_spec, new_spec, allowed",
    [
        ({"a": 1}, {"a": 1}, True),
        ({"a": 1}, {"a": 1, "suspend": True}, True),
        ({"a": 1, "suspend": True}, {"a": 1}, True),
        ({"a": 1, "suspend": True}, {"a": 1, "suspend": False}, True),
        ({"a": 1, "suspend": False}, {"a": 1}, True),
        ({"a": 1}, {"a": 2}, False),
        ({"a": 1}, {"a": 2, "suspend": True}, False),  # a combined edit is rejected as a whole
        ({"a": 1}, {"a": 1, "b": 0}, False),  # even a default written out is an edit
    ],
)
def test_only_suspend_may_change_after_start(running_spec, new_spec, allowed):
    assert handlers.suspend_only_change(spec_hash(running_spec), new_spec) is allowed


def test_a_child_without_a_spec_hash_is_kept_applied():
    assert handlers.suspend_only_change(None, {"a": 2}) is True


@pytest.mark.parametrize(
    "api_version, kind, spec, owned",
    [
        ("kubeflow.org/v1", "PyTorchJob", {"queue_name": "q"}, (("spec", "runPolicy", "suspend"),)),
        ("trainer.kubeflow.org/v1alpha1", "TrainJob", {"queue_name": "q"}, (("spec", "suspend"),)),
        ("jobset.x-k8s.io/v1alpha2", "JobSet", {"queue_name": "q"}, (("spec", "suspend"),)),
        ("kubeflow.org/v1", "PyTorchJob", {"queue_name": "q", "suspend": True}, ()),
        ("jobset.x-k8s.io/v1alpha2", "JobSet", {}, ()),
        ("v1", "ConfigMap", {"queue_name": "q"}, ()),
    ],
)
def test_kueue_owns_suspend_of_queued_jobs(api_version, kind, spec, owned):
    assert handlers.owned_by_others({"apiVersion": api_version, "kind": kind}, spec) == owned


def test_every_rejected_generation_is_announced():
    rejected = st.Acceptance.change_rejected(3)
    before = st.conditions_for(generation=2, acceptance=st.Acceptance.change_rejected(2), suspend=False, workload=None,
                               now="t")
    after = st.conditions_for(generation=3, acceptance=rejected, suspend=False, workload=None,
                              previous=before["conditions"], now="t")
    (event,) = handlers.owner_events(before, after, rejected)
    assert (event.type, event.reason, event.event_type) == ("Accepted", "SpecChangeRejected", "Warning")


def test_reconcile_fields_prefer_the_recorded_child_summary():
    fresh = {"metadata": {"generation": 1}, "status": {"pytorchJob": {"name": "j", "conditions": [
        {"type": "Running", "status": "True"}]}, "progress": {"step": 3}}}
    stale = handlers.Outcome(st.Acceptance.valid(1), {"name": "j", "conditions": []})
    fields = handlers.reconcile_fields(stale, False, "t")(fresh)
    by_type = {c["type"]: c["status"] for c in fields["conditions"]}
    assert by_type["Running"] == "True" and fields["phase"] == "Running"
    assert "progress" not in fields  # the trainer's field is left alone


def test_api_errors_are_classified():
    with pytest.raises(kopf.PermanentError):
        with handlers.api_errors(1.0):
            raise kube.ApiError(422, "Invalid", "spec.x: bad")
    for status in (0, 403, 404, 409, 429, 500, 503):
        with pytest.raises(kopf.TemporaryError) as err:
            with handlers.api_errors(2.5):
                raise kube.ApiError(status, "X", "y")
        assert err.value.delay == 2.5


def test_operator_settings():
    settings = runner.operator_settings(peering=None, standalone=True, workers=3)
    assert isinstance(settings.persistence.progress_storage, runner.MemoryProgressStorage)
    assert isinstance(settings.persistence.diffbase_storage, runner.ObservedGenerationDiffBase)
    assert settings.posting.level == logging.WARNING and settings.posting.enabled
    assert settings.execution.max_workers == 3
    assert settings.peering.standalone is True
    ha = runner.operator_settings(peering="finetune", standalone=False)
    assert ha.peering.name == "finetune" and ha.peering.mandatory and not ha.peering.standalone


def test_kopfs_bookkeeping_stays_out_of_the_object():
    """The last handled state is observedGeneration (or what this process handled), and
    handler progress lives in memory: a reconcile that succeeds writes nothing of kopf's."""
    diffbase, progress = runner.ObservedGenerationDiffBase(), runner.MemoryProgressStorage(prefix="finetune.dev")
    new = {"metadata": {"uid": "u1", "generation": 1}, "spec": {"a": 1}}
    handled = {**new, "status": {"observedGeneration": 1}}
    edited = {"metadata": {"uid": "u1", "generation": 2}, "spec": {"a": 2}, "status": {"observedGeneration": 1}}
    assert diffbase.fetch(body=new) is None  # never handled: kopf reconciles it
    assert diffbase.fetch(body=handled) == {"spec": {"a": 1}}  # handled as it is now
    assert diffbase.fetch(body=edited) is None  # its spec changed since: reconciled again
    patch: dict = {}
    diffbase.store(body=new, patch=patch, essence={"spec": {"a": 1}})
    assert patch == {} and diffbase.fetch(body=new) == {"spec": {"a": 1}}  # an older body of a handled generation
    progress.store(key="reconcile", record={"retries": 1}, body=new, patch=patch)
    assert patch == {} and progress.fetch(key="reconcile", body=new) == {"retries": 1}
    progress.purge(key="reconcile", body=new, patch=patch)
    assert progress.fetch(key="reconcile", body=new) is None and patch == {}


def test_connection_info_from_a_client_configuration():
    from kubernetes.client import Configuration

    config = Configuration(host="https://api.example:6443", api_key={"BearerToken": "abc"},
                           api_key_prefix={"BearerToken": "Bearer"})
    config.ssl_ca_cert = "/ca.crt"
    info = handlers.connection_info(config)
    assert (info.server, info.scheme, info.token, info.ca_path, info.insecure) == (
        "https://api.example:6443", "Bearer", "abc", "/ca.crt", False)


def _pytorchjob(suspend: bool = False, **status) -> dict:
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "j"},
            "spec": {"runPolicy": {"suspend": suspend}}, "status": status}


@pytest.mark.parametrize(
    "pytorchjob, fresh",
    [
        (_pytorchjob(), True),  # just created: the reconcile that created it saw exactly this
        (_pytorchjob(suspend=True), False),  # queued: the owner must say Suspended
        (_pytorchjob(conditions=[{"type": "Created", "status": "True"}]), False),
        (_pytorchjob(replicaStatuses={"Master": {"active": 1}}), False),
    ],
)
def test_fresh_child_events_need_no_status_write(pytorchjob, fresh):
    assert handlers.fresh_child(pytorchjob) is fresh


@pytest.mark.parametrize(
    ("event_type", "pytorchjob", "sync"),
    [
        ("ADDED", _pytorchjob(), False),  # just created: its creator records it
        (None, _pytorchjob(), True),  # a relist after a watch restart: resync
        ("MODIFIED", _pytorchjob(), True),
        ("ADDED", _pytorchjob(conditions=[{"type": "Running", "status": "True"}]), True),
        ("DELETED", _pytorchjob(conditions=[{"type": "Running", "status": "True"}]), False),
    ],
)
def test_owner_needs_sync_filters_events_on_the_loop(event_type, pytorchjob, sync):
    assert handlers.owner_needs_sync(type=event_type, body=pytorchjob) is sync


def _child(spec: dict) -> dict:
    return {"metadata": {"annotations": {"finetune.dev/spec-hash": spec_hash(spec)}}}


FINISHED = [{"type": "Succeeded", "status": "True"}]


@pytest.mark.parametrize("status, child, expected", [
    ({}, None, None),  # never ran: apply
    ({"conditions": FINISHED}, None, ("Valid", False)),  # ended, child cleaned up: never train again
    ({}, _child({"model": {"base_model": "a"}}), None),  # the running spec: apply (idempotent)
    ({}, _child({"model": {"base_model": "a"}, "suspend": True}), None),  # only suspend differs: apply
    ({}, _child({"model": {"base_model": "b"}}), ("SpecChangeRejected", True)),  # edited after start
])
def test_the_refusal_decision_is_pure(status, child, expected):
    job = {"metadata": {"name": "j", "namespace": "n"}, "spec": {"model": {"base_model": "a"}}, "status": status}
    decided = handlers.refusal(job, 2, child)
    assert (None if decided is None else (decided.acceptance.reason, decided.summarize_child)) == expected
