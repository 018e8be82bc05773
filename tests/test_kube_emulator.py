"""The emulator's own contract (finetune_operator.testing.kube_emulator), over real HTTP.

tests/test_operator_emulator.py checks the semantics the operator leans on most (server
fields on create, generation on spec changes, the status subresource, a failed JSON-patch
test, stale merge patches, garbage collection, finalizers, selectors on list). This file
checks the rest of what the module's docstring promises, and the answers it gives to what
it does not emulate, so that the docstring stays true. Plain urllib where the raw answer
(status code, Status body, a watch stream) is the point; the operator's client elsewhere.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPConnection
from typing import Any

import pytest

from finetune_operator.kube import JSON_PATCH, MERGE_PATCH, ApiError
from finetune_operator.testing.kube_emulator import names, wait_for

FTJ = ("finetune.dev/v1alpha1", "FineTuneJob")
CM = ("v1", "ConfigMap")
CM_PATH = "/api/v1/namespaces/default/configmaps"
FTJ_PATH = "/apis/finetune.dev/v1alpha1/namespaces/default/finetunejobs"


def http(emulator, method: str, path: str, body: Any = None, content_type: str = "application/json") -> tuple[int, Any]:
    """(HTTP status, decoded JSON body) of one raw request."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(emulator.url + path, method=method, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def rv(obj: dict) -> int:
    return int(obj["metadata"]["resourceVersion"])


def configmap(cluster, name: str = "c", **meta: Any) -> dict:
    return cluster.kube.create({"apiVersion": "v1", "kind": "ConfigMap", "data": {"k": "v"},
                                "metadata": {"name": name, "namespace": "default", **meta}})


def job(cluster, name: str = "j", **meta: Any) -> dict:
    return cluster.kube.create({"apiVersion": FTJ[0], "kind": FTJ[1], "spec": {"x": 1},
                                "metadata": {"name": name, "namespace": "default", **meta}})


def owned_by(owner: dict) -> dict:
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"]}


def list_rv(emulator, path: str = CM_PATH) -> int:
    return int(http(emulator, "GET", path)[1]["metadata"]["resourceVersion"])


class Watch:
    """A raw watch stream read in a thread: `events` fills with (type, name) as they arrive.
    The emulator never ends a watch: `close()` shuts the socket, which ends the reader at once."""

    def __init__(self, emulator, path: str):
        url = urllib.parse.urlsplit(emulator.url)
        self.connection = HTTPConnection(url.hostname, url.port, timeout=30)
        self.connection.request("GET", path)
        self.response = self.connection.getresponse()
        assert self.response.status == 200
        self.events: list[tuple[str, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            for line in self.response:
                if line.strip():
                    event = json.loads(line)
                    self.events.append((event["type"], event["object"]["metadata"]["name"]))
        except (OSError, ValueError):
            pass  # closed by the test or by the emulator's shutdown

    def wait(self, count: int) -> list[tuple[str, str]]:
        return wait_for(lambda: len(self.events) >= count and list(self.events), what=f"{count} watch events")

    def close(self) -> None:
        self.connection.sock.shutdown(socket.SHUT_RDWR)
        self.reader.join(5)
        self.connection.close()


# ------------------------------------------------------------------ the kmock fix stays inside the emulator


def test_kmock_is_not_patched_and_namespace_requests_are_recorded_right(cluster, emulator):
    from kmock._internal import parsing

    cluster.kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}})
    assert names(cluster.kube.list("v1", "Namespace", None)) == ["team-a"]
    status, ns = http(emulator, "PATCH", "/api/v1/namespaces/team-a/status", {"status": {"phase": "Active"}}, MERGE_PATCH)
    assert status == 200 and ns["status"] == {"phase": "Active"}
    assert parsing.parse_path.__code__.co_filename.endswith("kmock/_internal/parsing.py")  # kmock's own, untouched
    recorded = [r for r in emulator.requests() if r.url.path.startswith("/api/v1/namespaces")]
    assert [(r.action.name.lower(), r.resource.plural, r.namespace, r.name, r.subresource) for r in recorded] == [
        ("create", "namespaces", None, None, None), ("list", "namespaces", None, None, None),
        ("update", "namespaces", None, "team-a", "status")]


def test_discovery_names_the_core_group_version_v1_and_subresources(emulator):
    status, core = http(emulator, "GET", "/api/v1")
    assert status == 200 and core["groupVersion"] == "v1"
    assert {"name": "namespaces", "namespaced": False}.items() <= next(
        r for r in core["resources"] if r["name"] == "namespaces").items()
    served = {r["name"] for r in http(emulator, "GET", "/apis/finetune.dev/v1alpha1")[1]["resources"]}
    assert {"finetunejobs", "finetunejobs/status"} <= served


# ------------------------------------------------------------------ resourceVersion and generation


def test_resource_version_is_one_counter_moved_by_every_write_and_only_by_writes(cluster, emulator):
    first = configmap(cluster, "a")
    second = job(cluster, "b")  # another kind: the same counter
    assert rv(second) > rv(first)
    labelled = cluster.kube.patch(*CM, "default", "a", {"metadata": {"labels": {"l": "1"}}})
    assert rv(labelled) > rv(second) and list_rv(emulator) == rv(labelled)
    with pytest.raises(ApiError):
        configmap(cluster, "a")  # a refused write
    cluster.kube.patch(*CM, "default", "a", {"metadata": {"labels": {"l": "1"}}})  # a no-op
    cluster.kube.get(*CM, "default", "a")
    assert list_rv(emulator) == rv(labelled)
    configmap(cluster, "f", finalizers=["example.com/keep"])
    before = list_rv(emulator)
    cluster.kube.delete(*CM, "default", "f")  # marking the deletion is a write too
    marked = cluster.kube.get(*CM, "default", "f")
    assert marked["metadata"]["deletionTimestamp"] and rv(marked) == before + 1 == list_rv(emulator)


def test_generation_counts_changes_outside_metadata_and_status(cluster):
    assert configmap(cluster)["metadata"]["generation"] == 1
    meta_only = cluster.kube.patch(*CM, "default", "c", {"metadata": {"annotations": {"a": "1"}, "finalizers": ["x/y"]}})
    assert meta_only["metadata"]["generation"] == 1
    data = cluster.kube.patch(*CM, "default", "c", {"data": {"k": "w"}})  # not `spec`: anything outside the two
    assert data["metadata"]["generation"] == 2
    forged = cluster.kube.patch(*CM, "default", "c", {"metadata": {"generation": 9, "uid": "forged", "name": "other"}})
    assert forged["metadata"]["generation"] == 2 and forged["metadata"]["uid"] == data["metadata"]["uid"]
    assert forged["metadata"]["name"] == "c"


# ------------------------------------------------------------------ the status subresource


def test_a_plain_patch_of_status_alone_writes_nothing(cluster):
    created = job(cluster)
    cluster.kube.patch(*FTJ, "default", "j", {"status": {"phase": "Running"}}, subresource="status")
    current = cluster.kube.get(*FTJ, "default", "j")
    ignored = cluster.kube.patch(*FTJ, "default", "j", {"status": {"phase": "Hacked"}})
    assert ignored["status"] == {"phase": "Running"} and rv(ignored) == rv(current) > rv(created)


def test_status_patches_change_nothing_but_status(cluster):
    job(cluster)
    ops = [{"op": "replace", "path": "/spec/x", "value": 2}, {"op": "add", "path": "/metadata/labels", "value": {"l": "1"}},
           {"op": "add", "path": "/status", "value": {"phase": "Ok"}}]
    patched = cluster.kube.patch(*FTJ, "default", "j", ops, content_type=JSON_PATCH, subresource="status")
    assert patched["spec"] == {"x": 1} and "labels" not in patched["metadata"] and patched["status"] == {"phase": "Ok"}
    assert patched["metadata"]["generation"] == 1


def test_status_of_a_kind_without_the_subresource_and_other_subresources_are_404(cluster, emulator):
    configmap(cluster)
    job(cluster)
    assert http(emulator, "PATCH", f"{CM_PATH}/c/status", {"status": {}}, MERGE_PATCH)[0] == 404
    assert http(emulator, "PATCH", f"{FTJ_PATH}/j/scale", {"spec": {}}, MERGE_PATCH)[0] == 404


# ------------------------------------------------------------------ patches


def test_json_patch_applies_rfc6902_and_a_failing_op_is_422_writing_nothing(cluster, emulator):
    before = configmap(cluster)
    ops = [{"op": "add", "path": "/metadata/labels", "value": {"app.kubernetes.io/name": "x"}},
           {"op": "replace", "path": "/metadata/labels/app.kubernetes.io~1name", "value": "y"},
           {"op": "copy", "from": "/data/k", "path": "/data/k2"}]
    after = cluster.kube.patch(*CM, "default", "c", ops, content_type=JSON_PATCH)
    assert after["metadata"]["labels"] == {"app.kubernetes.io/name": "y"} and after["data"] == {"k": "v", "k2": "v"}
    assert rv(after) > rv(before)
    status, body = http(emulator, "PATCH", f"{CM_PATH}/c",
                        [{"op": "replace", "path": "/data/k", "value": "z"}, {"op": "remove", "path": "/data/missing"}],
                        JSON_PATCH)
    assert status == 422 and body["reason"] == "Invalid" and body["details"]["causes"]
    assert cluster.kube.get(*CM, "default", "c") == after  # the first op did not land either


def test_merge_patch_is_rfc7386(cluster):
    cluster.kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "m", "namespace": "default"},
                         "data": {"keep": "1", "drop": "2", "nested": "x"}})
    patched = cluster.kube.patch(*CM, "default", "m", {"data": {"drop": None, "new": "3"},
                                                       "metadata": {"finalizers": ["a/b", "c/d"]}})
    assert patched["data"] == {"keep": "1", "nested": "x", "new": "3"}
    replaced = cluster.kube.patch(*CM, "default", "m", {"metadata": {"finalizers": ["c/d"]}, "data": "scalar"},
                                  content_type="application/strategic-merge-patch+json")  # applied as a merge patch
    assert replaced["metadata"]["finalizers"] == ["c/d"] and replaced["data"] == "scalar"


def test_what_is_not_emulated_answers_with_an_error_and_writes_nothing(cluster, emulator):
    before = configmap(cluster)
    assert http(emulator, "PATCH", f"{CM_PATH}/c", {"data": {"k": "w"}}, "application/apply-patch+yaml")[0] == 415
    assert http(emulator, "PUT", f"{CM_PATH}/c", {**before, "data": {"k": "w"}})[0] == 405
    assert http(emulator, "DELETE", CM_PATH)[0] == 405
    assert http(emulator, "PATCH", f"{CM_PATH}/c", "a string", MERGE_PATCH)[0] == 400
    assert cluster.kube.get(*CM, "default", "c") == before


def test_errors_are_status_objects_with_details(cluster, emulator):
    configmap(cluster)
    for (method, path, body), code, reason in [
        (("GET", f"{CM_PATH}/missing", None), 404, "NotFound"),
        (("POST", CM_PATH, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}), 409, "AlreadyExists"),
        (("POST", CM_PATH, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}), 422, "Invalid"),
        (("GET", "/api/v1/namespaces/default/widgets", None), 404, "NotFound"),
    ]:
        status, answer = http(emulator, method, path, body)
        assert status == code, (method, path)
        assert answer["kind"] == "Status" and answer["status"] == "Failure" and answer["code"] == code
        assert answer["reason"] == reason and answer["message"] and answer["details"]["causes"][0]["reason"] == reason


# ------------------------------------------------------------------ deletion and garbage collection


def test_deleting_an_owner_deletes_dependents_whose_owners_are_all_gone(cluster, emulator):
    first, second = job(cluster, "one"), job(cluster, "two")
    configmap(cluster, "shared", ownerReferences=[owned_by(first), owned_by(second)])
    configmap(cluster, "only-first", ownerReferences=[owned_by(first)])
    cluster.kube.delete(*FTJ, "default", "one")
    assert names(emulator.objects("configmaps")) == ["shared"]  # its other owner lives
    cluster.kube.delete(*FTJ, "default", "two")
    assert emulator.objects("configmaps") == []


def test_orphan_propagation_keeps_dependents_and_takes_the_owner_out_of_their_references(cluster, emulator):
    owner, other = job(cluster, "owner"), job(cluster, "other")
    configmap(cluster, "kept", ownerReferences=[owned_by(owner), owned_by(other)])
    configmap(cluster, "solo", ownerReferences=[owned_by(owner)])
    status, _ = http(emulator, "DELETE", f"{FTJ_PATH}/owner", {"propagationPolicy": "Orphan"})
    assert status == 200 and cluster.kube.get(*FTJ, "default", "owner") is None
    kept, solo = (cluster.kube.get(*CM, "default", n) for n in ("kept", "solo"))
    assert kept["metadata"]["ownerReferences"] == [owned_by(other)] and "ownerReferences" not in solo["metadata"]
    configmap(cluster, "unrelated")
    cluster.kube.delete(*CM, "default", "unrelated")  # a later collection takes no orphan
    assert names(emulator.objects("configmaps")) == ["kept", "solo"]


def test_finalizers_hold_owners_and_dependents_alike(cluster, emulator):
    owner = job(cluster, "owner", finalizers=["example.com/owner"])
    configmap(cluster, "child", ownerReferences=[owned_by(owner)], finalizers=["example.com/child"])
    cluster.kube.delete(*FTJ, "default", "owner")
    assert cluster.kube.get(*CM, "default", "child")["metadata"].get("deletionTimestamp") is None  # owner still there
    cluster.kube.patch(*FTJ, "default", "owner", {"metadata": {"finalizers": None}})  # the owner goes now
    assert cluster.kube.get(*FTJ, "default", "owner") is None
    child = cluster.kube.get(*CM, "default", "child")
    assert child["metadata"]["deletionTimestamp"]  # collected, but held by its own finalizer
    cluster.kube.patch(*CM, "default", "child", {"metadata": {"finalizers": None}})
    assert emulator.objects("configmaps") == []


# ------------------------------------------------------------------ watches


def test_watch_sends_the_snapshot_then_every_write_of_the_selected_objects(cluster, emulator):
    configmap(cluster, "x1", labels={"app": "x"})
    configmap(cluster, "y1", labels={"app": "y"})
    watch = Watch(emulator, f"{CM_PATH}?watch=true&labelSelector=app%3Dx")
    assert watch.wait(1) == [("ADDED", "x1")]
    configmap(cluster, "x2", labels={"app": "x"})
    configmap(cluster, "y2", labels={"app": "y"})  # not selected
    cluster.kube.create({"apiVersion": "v1", "kind": "ConfigMap", "data": {},  # another namespace
                         "metadata": {"name": "x3", "namespace": "other", "labels": {"app": "x"}}})
    cluster.kube.patch(*CM, "default", "x1", {"data": {"k": "w"}})
    cluster.kube.patch(*CM, "default", "x1", {"data": {"k": "w"}})  # a no-op: no event
    cluster.kube.delete(*CM, "default", "x2")
    configmap(cluster, "x4", labels={"app": "x"})  # the last: every event before it has arrived
    assert watch.wait(5) == [("ADDED", "x1"), ("ADDED", "x2"), ("MODIFIED", "x1"), ("DELETED", "x2"), ("ADDED", "x4")]
    watch.close()


def test_watch_of_namespaces_and_of_an_undeclared_resource(cluster, emulator):
    cluster.kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}})
    watch = Watch(emulator, "/api/v1/namespaces?watch=true")
    cluster.kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-b"}})
    assert watch.wait(2) == [("ADDED", "team-a"), ("ADDED", "team-b")]
    watch.close()
    assert http(emulator, "GET", "/apis/example.com/v1/widgets?watch=true")[0] == 404


# ------------------------------------------------------------------ fault injection


def test_injected_failures_answer_the_next_matching_writes_and_write_nothing(cluster, emulator):
    left = emulator.fail(lambda r: r.resource is not None and r.resource.plural == "configmaps", times=2)
    for _ in range(2):
        with pytest.raises(ApiError) as err:
            configmap(cluster)
        assert err.value.status == 503
    assert left == [0] and emulator.objects("configmaps") == []
    assert configmap(cluster)["metadata"]["name"] == "c"
