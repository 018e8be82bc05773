"""The emulator's API-server semantics, over HTTP with the official client.

The operator's tests lean on these (optimistic concurrency, the status subresource,
garbage collection), so each is checked here against what a real API server does.
"""

from __future__ import annotations

import pytest

from finetune_operator.kube import JSON_PATCH, ApiError
from finetune_operator.testing.kube_emulator import matches_selector, names

FTJ = ("finetune.dev/v1alpha1", "FineTuneJob")


def make(cluster, name="a", spec=None, **meta):
    return cluster.kube.create({"apiVersion": FTJ[0], "kind": FTJ[1],
                                "metadata": {"name": name, "namespace": "default", **meta},
                                "spec": spec or {"x": 1}, "status": {"phase": "ignored on create"}})


def test_create_sets_server_fields_and_drops_status(cluster):
    obj = make(cluster)
    meta = obj["metadata"]
    assert meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1 and meta["resourceVersion"]
    assert "status" not in obj
    with pytest.raises(ApiError) as err:
        make(cluster)
    assert err.value.status == 409 and err.value.reason == "AlreadyExists"


def test_generation_moves_on_spec_changes_only_and_rv_on_every_write(cluster):
    rv0 = make(cluster)["metadata"]["resourceVersion"]
    labelled = cluster.kube.patch(*FTJ, "default", "a", {"metadata": {"labels": {"k": "v"}}})
    assert labelled["metadata"]["generation"] == 1 and labelled["metadata"]["resourceVersion"] != rv0
    same = cluster.kube.patch(*FTJ, "default", "a", {"metadata": {"labels": {"k": "v"}}})
    assert same["metadata"]["resourceVersion"] == labelled["metadata"]["resourceVersion"]  # a no-op writes nothing
    edited = cluster.kube.patch(*FTJ, "default", "a", {"spec": {"x": 2}})
    assert edited["metadata"]["generation"] == 2
    status = cluster.kube.patch(*FTJ, "default", "a", {"status": {"phase": "Running"}}, subresource="status")
    assert status["metadata"]["generation"] == 2 and status["status"] == {"phase": "Running"}


def test_status_subresource_is_separate(cluster):
    make(cluster)
    plain = cluster.kube.patch(*FTJ, "default", "a", {"spec": {"x": 3}, "status": {"phase": "Hacked"}})
    assert "status" not in plain and plain["spec"] == {"x": 3}
    via_status = cluster.kube.patch(*FTJ, "default", "a", {"spec": {"x": 4}, "status": {"phase": "Ok"}}, subresource="status")
    assert via_status["spec"] == {"x": 3} and via_status["status"] == {"phase": "Ok"}


def test_json_patch_test_failure_is_422_and_writes_nothing(cluster):
    obj = make(cluster)
    rv = obj["metadata"]["resourceVersion"]
    ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv},
           {"op": "add", "path": "/status", "value": {"phase": "One"}}]
    assert cluster.kube.patch(*FTJ, "default", "a", ops, content_type=JSON_PATCH, subresource="status")["status"] == {"phase": "One"}
    with pytest.raises(ApiError) as err:  # same test again: the resourceVersion moved on
        cluster.kube.patch(*FTJ, "default", "a", ops[:1] + [{"op": "add", "path": "/status/phase", "value": "Two"}],
                           content_type=JSON_PATCH, subresource="status")
    assert err.value.status == 422
    assert cluster.job("a")["status"] == {"phase": "One"}


def test_merge_patch_with_stale_resource_version_conflicts(cluster):
    rv = make(cluster)["metadata"]["resourceVersion"]
    cluster.kube.patch(*FTJ, "default", "a", {"spec": {"x": 5}})
    with pytest.raises(ApiError) as err:
        cluster.kube.patch(*FTJ, "default", "a", {"metadata": {"resourceVersion": rv}, "spec": {"x": 6}})
    assert err.value.status == 409


def test_missing_objects_are_404(cluster):
    with pytest.raises(ApiError) as err:
        cluster.kube.patch(*FTJ, "default", "nope", {"spec": {}})
    assert err.value.status == 404
    assert cluster.kube.get(*FTJ, "default", "nope") is None


def test_garbage_collection_follows_owner_references(cluster, emulator):
    owner = make(cluster)
    ref = {"apiVersion": FTJ[0], "kind": FTJ[1], "name": "a", "uid": owner["metadata"]["uid"]}
    cluster.kube.create({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": "child", "namespace": "default", "ownerReferences": [ref]}})
    job = cluster.kube.create({"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
                               "metadata": {"name": "a", "namespace": "default", "ownerReferences": [ref]}})
    pj_ref = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": "a", "uid": job["metadata"]["uid"]}
    cluster.kube.create({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": "a-master-0", "namespace": "default", "ownerReferences": [pj_ref]}})
    cluster.kube.create({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": "unrelated", "namespace": "default"}})
    cluster.kube.delete(*FTJ, "default", "a")
    assert names(emulator.objects("configmaps")) == ["unrelated"]
    assert emulator.objects("pytorchjobs") == [] and emulator.objects("pods") == []  # grandchildren too


def test_finalizers_block_deletion_until_removed(cluster):
    make(cluster, finalizers=["example.com/keep"])
    cluster.kube.delete(*FTJ, "default", "a")
    assert cluster.job("a")["metadata"]["deletionTimestamp"]
    cluster.kube.patch(*FTJ, "default", "a", {"metadata": {"finalizers": None}})
    assert cluster.job("a") is None


def test_label_selectors_on_list(cluster):
    for name, labels in [("p1", {"app": "x", "tier": "a"}), ("p2", {"app": "x"}), ("p3", {"app": "y"})]:
        cluster.kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default",
                                                                             "labels": labels}})
    listed = lambda sel: names(cluster.kube.list("v1", "Pod", "default", label_selector=sel))  # noqa: E731
    assert listed("app=x") == ["p1", "p2"]
    assert listed("app=x,tier") == ["p1"]
    assert listed("app!=x") == ["p3"]
    assert listed("!tier") == ["p2", "p3"]
    assert listed("app in (x, y),tier notin (a)") == ["p2", "p3"]


@pytest.mark.parametrize("selector, labels, ok", [
    ("", {}, True), ("a=1", {"a": "1"}, True), ("a==1", {"a": "2"}, False), ("a", {}, False),
    ("!a", {"b": "1"}, True), ("a in (1,2),b notin (3)", {"a": "2", "b": "4"}, True),
])
def test_selector_parser(selector, labels, ok):
    assert matches_selector(labels, selector) is ok


def test_generate_name(cluster):
    first = cluster.kube.create({"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": "e.", "namespace": "default"}})
    second = cluster.kube.create({"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": "e.", "namespace": "default"}})
    assert first["metadata"]["name"].startswith("e.") and first["metadata"]["name"] != second["metadata"]["name"]


def test_namespace_objects_are_addressable(cluster):
    """kmock 0.8 misreads /api/v1/namespaces; kopf needs it to run namespaced."""
    cluster.kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}})
    assert cluster.kube.get("v1", "Namespace", None, "team-a")["metadata"]["name"] == "team-a"
    assert names(cluster.kube.list("v1", "Namespace", None)) == ["team-a"]
    cluster.kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "team-a"}})
    assert names(cluster.kube.list("v1", "ConfigMap", "team-a")) == ["c"]
