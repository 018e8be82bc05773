"""A Kubernetes API server emulator for the operator's tests: kmock, taught the semantics we rely on.

A documented fake in the spirit of `kopf.testing`, not part of the operator's runtime (its
modules never import it; it needs the `dev` extra: kmock). Tests get it through the pytest
plugin `finetune_operator.testing.fixtures`; benchmarks/operator_scale.py imports it by name.

`KubeEmulator` is kmock 0.8's `KubernetesEmulator` (objects in memory, real HTTP, discovery)
with the writes, reads and watches reimplemented. `EmulatorThread` runs it on a loopback port
in its own thread and event loop, so synchronous tests, the official client and a kopf
operator in another thread (`OperatorThread`) or process talk to it over real HTTP.
`Cluster` plays kubectl and the training operator through the official client.

Implemented (and checked in tests/test_kube_emulator.py and tests/test_operator_emulator.py):

- resources: those in RESOURCES (more with `KubeEmulator.declare`), namespaced or cluster
  scoped, with or without the status subresource; discovery at /api, /api/v1 (groupVersion
  "v1"), /apis, /apis/<group>[/<version>] and /version; Namespaces at /api/v1/namespaces[/<name>];
- server-set metadata: uid and creationTimestamp on create; resourceVersion, one counter for
  the whole server, bumped on every real write (create, changing patch, deletion mark); a
  patch that changes nothing writes nothing, keeps the resourceVersion and sends no watch
  event; a list's metadata.resourceVersion is the counter's current value; generation 1 on
  create, bumped when anything outside metadata and status changes (spec, data, ...);
  generateName (a random suffix, collisions retried); a patch cannot change uid,
  creationTimestamp, generation, name, namespace, deletionTimestamp or resourceVersion;
- create (POST): 409 AlreadyExists for an existing name, 422 Invalid without a name; status
  dropped for kinds with the status subresource, deletionTimestamp dropped;
- get/patch/delete of a missing object: 404 NotFound; list/watch of an undeclared resource: 404;
- PATCH: JSON patch (RFC 6902; application/json-patch+json, or a JSON list) with a failed
  `test` op answered 422 Invalid and nothing written (kopf's optimistic concurrency), any other
  op that cannot apply 422 too; JSON merge patch (RFC 7386: objects merge, null deletes,
  anything else, lists included, replaces) for application/merge-patch+json, where a
  metadata.resourceVersion that is not the current one answers 409 Conflict; a body that
  is not an object 400;
- the status subresource, for kinds declared with it: PATCH .../status changes only status,
  a plain PATCH cannot change status; /status of other kinds, and any other subresource, 404;
- DELETE: an object with finalizers gets deletionTimestamp (a MODIFIED event) and goes when
  a patch removes its last finalizer; propagationPolicy=Orphan (DeleteOptions body or query)
  keeps the dependents and takes the owner's uid out of their ownerReferences; otherwise
  garbage collection: the objects whose every ownerReference uid names no live object are
  deleted, recursively (grandchildren too), each honouring its own finalizers;
- label selectors on list and watch: =, ==, !=, exists, !exists, in, notin;
- list and watch in one namespace or across all of them;
- watch (?watch=true): ADDED for every live matching object, then ADDED/MODIFIED/DELETED as
  writes happen, with nothing lost between the snapshot and the live events; the stream
  stays open until the client closes it;
- errors as a real server sends them: a Status object (kind Status, code, reason, message,
  details.causes) with the HTTP code;
- fault injection (for tests, no real server has it): hooks awaited before every write
  (`KubeEmulator.hooks`, `EmulatorThread.gate/fail/sever`); every request recorded
  (`EmulatorThread.requests`).

Not implemented (so not proven by any test that runs against it):

- CRD schema validation, defaulting, pruning, CEL (x-kubernetes-validations) rules: a stored
  CustomResourceDefinition serves nothing, resources are declared in code; no OpenAPI document
  (/openapi/v2, /openapi/v3), so kubectl needs --validate=false;
- authentication and RBAC (any token or none is accepted), admission webhooks and
  ValidatingAdmissionPolicy, ResourceQuota, LimitRange;
- PUT (replace, and its optimistic concurrency), collection deletes and POSTs to a name or a
  subresource (all 405); server-side apply (415); strategic merge patch semantics
  (application/strategic-merge-patch+json is applied as a JSON merge patch: lists are
  replaced, never merged by key); dryRun (a dry run is a real write); managedFields;
  DeleteOptions preconditions and gracePeriodSeconds;
- resourceVersion on get/list/watch (always the current state: every watch starts from a
  snapshot, whatever resourceVersion it asks for), resourceVersionMatch, limit/continue
  pagination, fieldSelector, watch bookmarks, 410 Gone, watch timeoutSeconds; a watch with
  a labelSelector sees no DELETED when an object's labels leave the selection (nor ADDED
  when they enter it: it sees MODIFIED);
- foreground deletion and blockOwnerDeletion (background collection always, and done
  before the DELETE answers, where a real collector is asynchronous); Orphan on an object
  with finalizers (its dependents are collected when it goes); ownerReference checks (kind,
  namespace, controller uniqueness);
- namespace lifecycle: objects may live in namespaces that do not exist, and deleting a
  Namespace deletes nothing in it;
- every controller: no kubelet, no Pods run, no training operator (tests play it by writing
  PyTorchJob status through /status), no Event aggregation.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import re
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import jsonpatch
import kmock

# The one private name left: kmock's wrapper for an error inside a started stream, which
# KubeEmulator.__call__ unwraps exactly as kmock's own RawHandler.__call__ does.
from kmock._internal.rendering import StreamingError

from finetune_operator import spec as crd

if TYPE_CHECKING:
    import aiohttp.web

# Resources the operator and its tests use: (group/version/plural, kind, namespaced, status subresource)
RESOURCES = [
    (f"{crd.GROUP}/{crd.VERSION}/{crd.PLURAL}", crd.KIND, True, True),
    ("v1/configmaps", "ConfigMap", True, False),
    ("v1/serviceaccounts", "ServiceAccount", True, False),
    ("v1/pods", "Pod", True, True),
    ("v1/events", "Event", True, False),
    ("v1/namespaces", "Namespace", False, True),
    ("rbac.authorization.k8s.io/v1/roles", "Role", True, False),
    ("rbac.authorization.k8s.io/v1/rolebindings", "RoleBinding", True, False),
    ("apiextensions.k8s.io/v1/customresourcedefinitions", "CustomResourceDefinition", False, True),
    ("kopf.dev/v1/clusterkopfpeerings", "ClusterKopfPeering", False, False),
    ("kopf.dev/v1/kopfpeerings", "KopfPeering", True, False),
]
VERBS = ["get", "list", "watch", "create", "update", "patch", "delete"]
# The workload kinds a FineTuneJob can run on, by backend name: served only when asked
# (`EmulatorThread(workloads=...)`, `serve`/`unserve`), as a cluster serves only the CRDs installed.
WORKLOADS = {
    "pytorchjob": ("kubeflow.org/v1/pytorchjobs", "PyTorchJob"),
    "trainjob": ("trainer.kubeflow.org/v1alpha1/trainjobs", "TrainJob"),
    "jobset": ("jobset.x-k8s.io/v1alpha2/jobsets", "JobSet"),
}

Hook = Callable[[kmock.Request], Awaitable[None]]


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _error(status: int, reason: str, message: str) -> kmock.KubernetesError:
    # Non-empty details as a real API server sends; empty ones make kmock format a traceback
    # into every error response (a tenth of the emulator's time under the scale benchmark).
    return kmock.KubernetesError(status=status, reason=reason, message=message,
                                 details={"causes": [{"reason": reason, "message": message}]})


# ------------------------------------------------------------------ label selectors


_SET_TERM = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(selector: str) -> list[str]:
    """Split on commas outside parentheses: 'a in (x,y),b=c' -> ['a in (x,y)', 'b=c']."""
    terms, depth, current = [], 0, ""
    for char in selector:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    return [t.strip() for t in terms + [current] if t.strip()]


def matches_selector(labels: Mapping[str, str], selector: str | None) -> bool:
    """Kubernetes label selector semantics for the forms kubectl and clients send."""
    for term in _split_selector(selector or ""):
        if m := _SET_TERM.match(term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            ok = labels.get(key) in values if op == "in" else labels.get(key) not in values
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            ok = labels.get(key) != value
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            ok = labels.get(key) == value
        elif term.startswith("!"):
            ok = term[1:].strip() not in labels
        else:
            ok = term in labels
        if not ok:
            return False
    return True


# ------------------------------------------------------------------ patches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, null deletes a key, anything
    else (lists and scalars included) replaces. `target` is not changed."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# ------------------------------------------------------------------ the paths kmock 0.8 misreads

NAMESPACES = kmock.resource(group="", version="v1", plural="namespaces")


def namespace_path(path: str) -> tuple[str | None, str | None] | None:
    """(name, subresource) when `path` addresses Namespace objects, else None.

    kmock 0.8's path parser reads /api/v1/namespaces[/<name>[/status|/finalize]] as "inside a
    namespace" and fails (500) on the namespace list kopf needs to run namespaced: these paths
    are parsed by `KubeEmulator.__call__` instead."""
    parts = path.strip("/").split("/")
    if parts[:3] != ["api", "v1", "namespaces"] or len(parts) > 5:
        return None
    if len(parts) == 5 and parts[4] not in ("status", "finalize"):
        return None  # /api/v1/namespaces/<ns>/<plural>: kmock reads those right
    return (parts[3] or None if len(parts) > 3 else None), (parts[4] if len(parts) > 4 else None)


def _action(method: str, name: str | None, query: Mapping[str, str]) -> kmock.action | None:
    """The Kubernetes verb of a request, as kmock guesses it for every other path."""
    if method == "GET" and query.get("watch") == "true":
        return kmock.action.WATCH
    if name is None:
        return {"GET": kmock.action.LIST, "POST": kmock.action.CREATE}.get(method)
    return {"GET": kmock.action.FETCH, "PATCH": kmock.action.UPDATE, "DELETE": kmock.action.DELETE}.get(method)


# ------------------------------------------------------------------ the emulator


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's KubernetesEmulator with the API server semantics listed in the module docstring."""

    keep_history: bool = False  # kmock keeps every version of every object; benchmarks need not
    hooks: list[Hook] = attrs.field(factory=list)  # awaited before a write (gates, injected faults)
    _counter: itertools.count = attrs.field(factory=lambda: itertools.count(1), init=False)
    _rv: int = attrs.field(default=0, init=False)
    _with_status: set[tuple[str, str, str]] = attrs.field(factory=set, init=False)
    _direct: dict[kmock.action, Any] = attrs.field(factory=dict, init=False)
    writes: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # kmock finds a request's reaction by filtering every request it ever recorded, so each
        # request costs O(requests so far). The Kubernetes verbs go straight to their reactions.
        self._direct = {
            action: self.fallback[action] << serve
            for action, serve in [
                (kmock.action.LIST, self._serve_list), (kmock.action.WATCH, self._serve_watch),
                (kmock.action.FETCH, self._serve_fetch), (kmock.action.CREATE, self._serve_create),
                (kmock.action.UPDATE, self._serve_update), (kmock.action.DELETE, self._serve_delete),
            ]
        }

    def declare(self, key: str, kind: str, *, namespaced: bool = True, status: bool = False) -> None:
        self.resources[key] = kmock.ResourceInfo(
            kind=kind, namespaced=namespaced, verbs=VERBS, subresources={"status"} if status else set()
        )
        if status:
            res = kmock.resource(key)
            self._with_status.add((res.group, res.version, res.plural))

    def declare_defaults(self) -> None:
        for key, kind, namespaced, status in RESOURCES:
            self.declare(key, kind, namespaced=namespaced, status=status)

    def undeclare(self, key: str) -> None:
        """Stop serving a resource (its discovery entry, list and watch answer 404 again)."""
        del self.resources[key]

    # ---------------------------------------------------------------- bookkeeping

    def _next_rv(self) -> str:
        self._rv = next(self._counter)
        return str(self._rv)

    def _has_status(self, resource: kmock.resource) -> bool:
        return (resource.group, resource.version, resource.plural) in self._with_status

    def _store(self, key: tuple, body: dict[str, Any]) -> None:
        if key in self._objects:
            self._objects[key].history.append(body)
            if not self.keep_history:
                del self._objects[key].history[:-1]
        else:
            self._objects[key] = body
        self.writes += 1

    def _live(self, key: tuple) -> dict[str, Any] | None:
        if key not in self._objects or self._objects[key].deleted:
            return None
        return self._objects[key].raw

    # ---------------------------------------------------------------- writes

    @staticmethod
    def _content(obj: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in obj.items() if k not in ("metadata", "status")}

    def _create(self, request: kmock.Request) -> list[tuple[kmock.resource, dict]]:
        body = copy.deepcopy(request.data) if isinstance(request.data, dict) else {}
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):  # the API server retries collisions itself
            namespace = request.namespace or meta.get("namespace")
            while self._live((request.resource, namespace, name := meta["generateName"] + uuid.uuid4().hex[:8])):
                pass
            meta["name"] = name
            request.data.setdefault("metadata", {})["name"] = name  # kmock's response lookup
        if not meta.get("name"):
            raise _error(422, "Invalid", "metadata.name: Required value")
        namespace = request.namespace or meta.get("namespace")
        key = (request.resource, namespace, meta["name"])
        if self._live(key) is not None:
            raise _error(409, "AlreadyExists", f'{request.resource.plural} "{meta["name"]}" already exists')
        if namespace:
            meta["namespace"] = namespace
        meta.update(uid=str(uuid.uuid4()), resourceVersion=self._next_rv(), generation=1,
                    creationTimestamp=now_rfc3339())
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(field, None)
        if self._has_status(request.resource):
            body.pop("status", None)
        self._store(key, body)
        return [(request.resource, {"type": "ADDED", "object": body})]

    def _patched(self, old: dict[str, Any], request: kmock.Request) -> dict[str, Any]:
        content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip()
        data = request.data
        if content_type == "application/json-patch+json" or isinstance(data, list):
            try:
                return jsonpatch.apply_patch(old, data, in_place=False)
            except jsonpatch.JsonPatchTestFailed as exc:
                raise _error(422, "Invalid", f"the JSON patch test failed: {exc}") from None
            except (jsonpatch.JsonPatchConflict, jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise _error(422, "Invalid", f"the JSON patch cannot apply: {exc}") from None
        if content_type == "application/apply-patch+yaml":
            raise _error(415, "UnsupportedMediaType", "server-side apply is not emulated")
        if not isinstance(data, dict):
            raise _error(400, "BadRequest", "the patch body must be a JSON object")
        wanted_rv = (data.get("metadata") or {}).get("resourceVersion")
        if wanted_rv is not None and wanted_rv != old["metadata"].get("resourceVersion"):
            raise _error(409, "Conflict", "the object has been modified; please apply your changes to the latest version")
        return merge_patch(old, data)  # application/strategic-merge-patch+json too: lists replaced

    def _update(self, request: kmock.Request) -> list[tuple[kmock.resource, dict]]:
        key = (request.resource, request.namespace, request.name)
        old = self._live(key)
        if old is None:
            raise _error(404, "NotFound", f'{request.resource.plural} "{request.name}" not found')
        if request.subresource and (request.subresource != "status" or not self._has_status(request.resource)):
            raise _error(404, "NotFound", f'{request.resource.plural} "{request.name}": no subresource {request.subresource}')
        new = self._patched(copy.deepcopy(old), request)
        if request.subresource == "status":  # only status moves through /status
            new = {**copy.deepcopy(old), "status": new.get("status")}
            if new["status"] is None:
                del new["status"]
        elif self._has_status(request.resource):  # a plain patch cannot change status
            new.pop("status", None)
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
        meta = new.setdefault("metadata", {})
        for field in ("uid", "creationTimestamp", "generation", "namespace", "name", "deletionTimestamp"):
            if field in old["metadata"]:
                meta[field] = old["metadata"][field]
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return []  # a no-op: no write, no new resourceVersion, no watch event
        if self._content(new) != self._content(old):
            meta["generation"] = int(old["metadata"].get("generation") or 0) + 1
        meta["resourceVersion"] = self._next_rv()
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._remove(key, new)
        self._store(key, new)
        return [(request.resource, {"type": "MODIFIED", "object": new})]

    def _remove(self, key: tuple, last: dict[str, Any], *, cascade: bool = True) -> list[tuple[kmock.resource, dict]]:
        # The API server's DELETED event carries the deletion's own resourceVersion (kopf, which
        # waits for a version newer than its last patch, drops a DELETED that reuses an old one).
        last = {**last, "metadata": {**(last.get("metadata") or {}), "resourceVersion": self._next_rv()}}
        if key in self._objects and not self._objects[key].deleted:
            self._objects[key].history.append(last)
            self._objects[key].delete()
            if not self.keep_history:
                del self._objects[key].history[:-2]
        events = [(key[0], {"type": "DELETED", "object": last})]
        return events + (self._collect_garbage() if cascade else [])

    def _delete(self, key: tuple, *, orphan: bool = False) -> list[tuple[kmock.resource, dict]]:
        obj = self._live(key)
        if obj is None:
            raise _error(404, "NotFound", f'{key[0].plural} "{key[2]}" not found')
        meta = obj["metadata"]
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return []
            obj = copy.deepcopy(obj)
            obj["metadata"].update(deletionTimestamp=now_rfc3339(), resourceVersion=self._next_rv())
            self._store(key, obj)
            return [(key[0], {"type": "MODIFIED", "object": obj})]
        if orphan:
            return self._remove(key, obj, cascade=False) + self._orphan(meta.get("uid"))
        return self._remove(key, obj)

    def _orphan(self, uid: str | None) -> list[tuple[kmock.resource, dict]]:
        """propagationPolicy=Orphan: the dependents lose their ownerReference to `uid` (one write
        each, as the garbage collector does), so no later collection takes them."""
        events: list[tuple[kmock.resource, dict]] = []
        for key, obj in self._all_live_items():
            refs = obj["metadata"].get("ownerReferences") or []
            if not any(ref.get("uid") == uid for ref in refs):
                continue
            obj = copy.deepcopy(obj)
            kept = [ref for ref in refs if ref.get("uid") != uid]
            if kept:
                obj["metadata"]["ownerReferences"] = kept
            else:
                del obj["metadata"]["ownerReferences"]
            obj["metadata"]["resourceVersion"] = self._next_rv()
            self._store(key, obj)
            events.append((key[0], {"type": "MODIFIED", "object": obj}))
        return events

    def _collect_garbage(self) -> list[tuple[kmock.resource, dict]]:
        """Background propagation: dependents whose every owner is gone are deleted, recursively."""
        events: list[tuple[kmock.resource, dict]] = []
        while True:
            alive = {obj["metadata"].get("uid") for obj in self._all_live()}
            orphans = [
                key for key, obj in self._all_live_items()
                if (refs := obj["metadata"].get("ownerReferences"))
                and not any(ref.get("uid") in alive for ref in refs)
                and not obj["metadata"].get("deletionTimestamp")
            ]
            if not orphans:
                return events
            for key in orphans:
                events += self._delete(key)

    def _all_live_items(self) -> list[tuple[tuple, dict[str, Any]]]:
        return [(key, obj.raw) for key, obj in self._objects.items() if not obj.deleted]

    def _all_live(self) -> list[dict[str, Any]]:
        return [obj for _, obj in self._all_live_items()]

    # ---------------------------------------------------------------- the request path

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """kmock's entry point for every HTTP request, where it parses the path into the
        request's resource, namespace, name and subresource. Namespace paths, which kmock 0.8
        misreads (see `namespace_path`), are parsed here and then served as kmock serves every
        other request: the error handling below is RawHandler.__call__'s. This override, rather
        than replacing kmock's module-level parser for the whole process, keeps the fix to this
        emulator: any other kmock handler in the process parses as kmock does."""
        where = namespace_path(raw_request.path)
        if where is None:
            return await super().__call__(raw_request)
        raw_response: aiohttp.web.StreamResponse | None = None
        try:
            if self.limit is not None and len(self._requests) >= self.limit:
                raise kmock.KMockError("Too many requests have been served so far.")
            request = await self._namespace_request(raw_request, *where)
            self._requests.append(request)
            try:
                return await self._handle(request)
            except StreamingError as exc:  # the stream has started: its response carries the error
                raw_response = exc.args[0]
                raise exc.__cause__ or exc
        except Exception as exc:
            if not self._errors:  # outside `async with`: kmock lets the server see it
                raise
            self._errors[-1].append(exc)
            if raw_response is None or not raw_response.prepared:
                return await self._render_error(exc)
            await self._stream_error(exc, raw_response)
            await raw_response.write_eof()
            return raw_response

    async def _namespace_request(self, raw_request: aiohttp.web.BaseRequest, name: str | None,
                                 subresource: str | None) -> kmock.Request:
        """A request on Namespace objects, recorded with the fields kmock's parser would give it."""
        body = await raw_request.read()
        text = await raw_request.text()
        try:
            data = await raw_request.json()
        except ValueError:
            data = None
        params = dict(raw_request.query)
        return kmock.Request(
            id=len(self._requests), raw_request=raw_request, url=raw_request.url, method=raw_request.method,
            params=params, headers=dict(raw_request.headers), cookies=dict(raw_request.cookies),
            data=data, body=body, text=text, action=_action(raw_request.method, name, params),
            resource=NAMESPACES, namespace=None, name=name, subresource=subresource,
        )

    async def _serve_version(self, request: kmock.Request) -> kmock.Payload:
        """kmock 0.8 names the core group's version "/v1" in /api/v1; a real server (and kubectl,
        which maps no core kind otherwise) says "v1"."""
        payload = await super()._serve_version(request)
        if isinstance(payload, dict) and request.resource is not None and request.resource.group == "":
            payload = {**payload, "groupVersion": request.resource.version}
        return payload

    async def _handle(self, request: kmock.Request):  # type: ignore[override]
        writes = (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE)
        if request.resource is not None and request.resource.plural and request.action is None:
            # PUT, DELETE of a collection, POST to a name: kmock finds no verb, we emulate none.
            raise _error(405, "MethodNotAllowed", f"{request.method.value} {request.url.path} is not emulated")
        if request.resource is not None and request.action in writes:
            for hook in list(self.hooks):
                await hook(request)
            async with self._lock:
                if request.action == kmock.action.CREATE:
                    events = self._create(request)
                elif request.action == kmock.action.UPDATE and request.name:
                    events = self._update(request)
                elif request.action == kmock.action.DELETE and request.name:
                    options = request.data if isinstance(request.data, dict) else {}
                    orphan = options.get("propagationPolicy") == "Orphan" or request.params.get("propagationPolicy") == "Orphan"
                    events = self._delete((request.resource, request.namespace, request.name), orphan=orphan)
                else:
                    raise _error(405, "MethodNotAllowed", "collection writes are not emulated")
                for resource, event in events:
                    await self._buses[resource].put(event)
        # Serve the response (the stored object) through kmock's reactions.
        resource = request.resource
        direct = self._direct.get(request.action) if resource is not None and resource.plural else None
        if direct is not None and (request.action != kmock.action.DELETE or request.name):
            return await direct(request)
        return await kmock.RawHandler._handle(self, request)  # discovery and anything unusual

    def _last(self, key: tuple) -> dict[str, Any]:
        if key not in self._objects:
            raise _error(404, "NotFound", f'{key[0].plural} "{key[2]}" not found')
        return self._objects[key].last.raw

    async def _serve_fetch(self, request: kmock.Request) -> kmock.Payload:
        obj = self._live((request.resource, request.namespace, request.name))
        if obj is None:
            raise _error(404, "NotFound", f'{request.resource.plural} "{request.name}" not found')
        return obj

    async def _serve_create(self, request: kmock.Request) -> kmock.Payload:
        meta = request.data.get("metadata") or {}
        return self._last((request.resource, request.namespace or meta.get("namespace"), meta.get("name")))

    async def _serve_update(self, request: kmock.Request) -> kmock.Payload:
        return self._last((request.resource, request.namespace, request.name))

    async def _serve_delete(self, request: kmock.Request) -> kmock.Payload:
        return self._last((request.resource, request.namespace, request.name))

    def _selected(self, request: kmock.Request, key: tuple, obj: Mapping[str, Any]) -> bool:
        resource, namespace, name = key
        if resource != request.resource:
            return False
        if request.namespace is not None and namespace != request.namespace:
            return False
        if request.name is not None and name != request.name:
            return False
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return matches_selector(labels, request.params.get("labelSelector"))

    def _check_declared(self, request: kmock.Request) -> None:
        if not any(res == request.resource for res in self._get_resources()):
            raise _error(404, "NotFound", "the server could not find the requested resource")

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        self._check_declared(request)
        async with self._lock:
            items = [obj for key, obj in self._all_live_items() if self._selected(request, key, obj)]
            return {"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    async def _serve_watch(self, request: kmock.Request):
        self._check_declared(request)  # before the first chunk: answered as a plain 404
        yield b""  # send the headers now: the client sees the stream open
        bus = self._buses[request.resource]
        async with self._lock:  # snapshot and bus position taken together: no event falls between
            mark = await bus.mark()
            snapshot = [obj for key, obj in self._all_live_items() if self._selected(request, key, obj)]
        try:
            for obj in snapshot:
                yield {"type": "ADDED", "object": obj}
            async for event in bus.stream(since=mark):
                obj = event.get("object") or {}
                meta = obj.get("metadata") or {}
                if self._selected(request, (request.resource, meta.get("namespace"), meta.get("name")), obj):
                    yield event
        finally:
            await bus.unmark(mark)


# ------------------------------------------------------------------ running it in a thread


class Gate:
    """Holds the first write matching `predicate` until released (an operator dies meanwhile).
    Released, the write either lands (`release()`) or is lost with the dead process's
    connection (`release(lost=True)`: the server never applies it)."""

    def __init__(self, predicate: Callable[[kmock.Request], bool]):
        self.predicate = predicate
        self.hit = threading.Event()
        self.released = threading.Event()
        self.lost = False
        self.used = False

    async def __call__(self, request: kmock.Request) -> None:
        if self.used or not self.predicate(request):
            return
        self.used = True
        self.hit.set()
        # bounded: a test that failed before releasing it must not keep the emulator from stopping
        await asyncio.get_running_loop().run_in_executor(None, self.released.wait, 120)
        if self.lost:
            raise _error(503, "ServiceUnavailable", "the client's connection died with it")

    def release(self, *, lost: bool = False) -> None:
        self.lost = lost
        self.released.set()


class EmulatorThread:
    """`with EmulatorThread() as emu:` -> emu.url serves the Kubernetes API on 127.0.0.1."""

    def __init__(self, *, keep_history: bool = False, port: int | None = None,
                 workloads: Iterable[str] = ("pytorchjob",)):
        self.workloads = tuple(workloads)
        self.keep_history = keep_history
        self.port = port
        self.url = ""
        self.emulator: KubeEmulator | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._extra_servers: list[kmock.Server] = []
        self._thread = threading.Thread(target=self._main, name="kube-emulator", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced in __enter__
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with KubeEmulator(keep_history=self.keep_history) as emulator:
            emulator.declare_defaults()
            for name in self.workloads:
                key, kind = WORKLOADS[name]
                emulator.declare(key, kind, namespaced=True, status=True)
            server_kwargs = {"port": self.port} if self.port else {}
            async with kmock.Server(emulator, **server_kwargs) as server:
                self.emulator = emulator
                self.url = str(server.url).rstrip("/")
                self._ready.set()
                await self._stop.wait()
                for extra in reversed(self._extra_servers):  # kmock's DNS interceptors unwind LIFO
                    await extra.__aexit__(None, None, None)

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        if not self._ready.wait(60) and self._error is None:
            raise RuntimeError("the Kubernetes emulator did not start within 60 s")
        if self._error is not None:
            raise RuntimeError("the Kubernetes emulator did not start") from self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the emulator's loop (objects are not thread-safe) and return its result."""
        assert self._loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(30)

    def serve(self, *backends: str) -> None:
        """Install workload CRDs: the kinds become served, and a CustomResourceDefinition
        object appears for each (what kopf follows to start watching a new kind)."""
        for name in backends:
            key, kind = WORKLOADS[name]
            self.call(lambda key=key, kind=kind: self.emulator.declare(key, kind, namespaced=True, status=True))
            group, version, plural = key.split("/")
            self._post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", {
                "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": f"{plural}.{group}"},
                "spec": {"group": group, "scope": "Namespaced",
                         "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                         "versions": [{"name": version, "served": True, "storage": True}]}})

    def unserve(self, *backends: str) -> None:
        """Uninstall workload kinds (discovery stops listing them)."""
        for name in backends:
            key, _ = WORKLOADS[name]
            self.call(lambda key=key: self.emulator.undeclare(key))

    def _post(self, path: str, body: dict[str, Any]) -> None:
        import json as _json
        import urllib.request

        request = urllib.request.Request(self.url + path, data=_json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10):
            pass

    def add_server(self) -> str:
        """Another port onto the same API (one per operator process, to tell their writes apart)."""

        async def start() -> str:
            server = kmock.Server(self.emulator)
            await server.__aenter__()
            self._extra_servers.append(server)
            return str(server.url).rstrip("/")

        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(start(), self._loop).result(30)

    def sever(self, url: str) -> None:
        """The process behind `url` is dead: writes it had in flight still arrive, new ones never do."""
        port = int(url.rsplit(":", 1)[1])
        cutoff = self.call(lambda: len(self.emulator._requests))

        async def hook(request: kmock.Request) -> None:
            if request.id >= cutoff and request.url.port == port:
                raise _error(503, "ServiceUnavailable", "this client is dead")

        self.call(lambda: self.emulator.hooks.append(hook))

    def gate(self, predicate: Callable[[kmock.Request], bool]) -> Gate:
        gate = Gate(predicate)
        self.call(lambda: self.emulator.hooks.append(gate))
        return gate

    def fail(self, predicate: Callable[[kmock.Request], bool], *, times: int, status: int = 503) -> list[int]:
        """The next `times` writes matching `predicate` fail with `status` (an API hiccup)."""
        left = [times]

        async def hook(request: kmock.Request) -> None:
            if left[0] > 0 and predicate(request):
                left[0] -= 1
                raise _error(status, "ServiceUnavailable", "injected by the test")

        self.call(lambda: self.emulator.hooks.append(hook))
        return left

    def requests(self) -> list[kmock.Request]:
        """Every request served so far (kmock records them), in order."""
        return self.call(lambda: list(self.emulator._requests))

    def objects(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Live objects of a resource, read on the emulator's loop (for counting twins)."""

        def read() -> list[dict[str, Any]]:
            return [
                copy.deepcopy(obj.raw)
                for (res, ns, _), obj in self.emulator.objects.items()
                if res.plural == plural and not obj.deleted and (namespace is None or ns == namespace)
            ]

        return self.call(read)


def is_create(plural: str) -> Callable[[kmock.Request], bool]:
    return lambda r: r.action == kmock.action.CREATE and r.resource is not None and r.resource.plural == plural


def names(objs: Iterable[Mapping[str, Any]]) -> list[str]:
    return sorted(o["metadata"]["name"] for o in objs)


# ------------------------------------------------------------------ the operator and a client


def api_configuration(url: str) -> Any:
    from kubernetes.client import Configuration

    configuration = Configuration(host=url)
    configuration.connection_pool_maxsize = 32
    return configuration


def wait_for(predicate: Callable[[], Any], *, timeout: float = 20.0, what: str = "a condition") -> Any:
    """Poll `predicate` until it returns something truthy (waiting on state, not on time)."""
    import time

    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        threading.Event().wait(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value: {last!r}")


class OperatorThread:
    """The real operator (kopf + our handlers + the official client) in a thread of its own."""

    def __init__(self, url: str, *, render_settings: Any = None, retry_delay: float = 0.5, workers: int = 8,
                 namespaces: list[str] | None = None, metrics_address: str | None = "127.0.0.1:0"):
        from finetune_operator.kube import Kube
        from finetune_operator.render import RenderSettings
        from finetune_operator.runner import operator_kwargs

        self.kwargs = operator_kwargs(
            kube=Kube(api_configuration(url)),
            render_settings=render_settings or RenderSettings(trainer_image="registry.test/trainer:1"),
            standalone=True,
            retry_delay=retry_delay,
            workers=workers,
            namespaces=namespaces,
            metrics_address=metrics_address,
        )
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="operator", daemon=True)

    def _main(self) -> None:
        import kopf

        try:
            asyncio.run(kopf.operator(**self.kwargs, stop_flag=self.stop_flag, ready_flag=self.ready_flag))
        except BaseException as exc:
            self.error = exc

    def start(self) -> OperatorThread:
        self._thread.start()
        if not self.ready_flag.wait(30):
            raise RuntimeError(f"the operator did not start: {self.error!r}")
        return self

    def stop(self) -> None:
        self.stop_flag.set()
        self.join()

    def kill(self) -> None:
        """Stop now, mid-request: kopf stops watching and handling at once; a handler blocked on
        the API (it runs in a thread) ends when its request does, and nothing follows it."""
        self.stop_flag.set()

    def join(self, timeout: float = 30) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the operator did not stop"

    @property
    def memo(self) -> Any:
        return self.kwargs["memo"]

    @property
    def metrics_url(self) -> str:
        """/metrics of this operator (an ephemeral loopback port, bound at startup)."""
        server = self.memo.metrics_server
        assert server is not None, "the operator serves no metrics (metrics_address=None)"
        return f"http://127.0.0.1:{server.server_port}/metrics"


class Cluster:
    """What a user (kubectl) and the training operator do, through the official client."""

    def __init__(self, emulator: EmulatorThread):
        from finetune_operator.kube import Kube

        self.emulator = emulator
        self.kube = Kube(api_configuration(emulator.url))

    def apply_job(self, name: str, spec: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
        return self.kube.create(
            {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": name, "namespace": namespace}, "spec": spec}
        )

    def job(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return self.kube.get(crd.API_VERSION, crd.KIND, namespace, name)

    def pytorchjob(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return self.kube.get("kubeflow.org/v1", "PyTorchJob", namespace, name)

    def condition(self, name: str, ctype: str, namespace: str = "default") -> dict[str, Any] | None:
        job = self.job(name, namespace) or {}
        return next((c for c in (job.get("status") or {}).get("conditions") or [] if c["type"] == ctype), None)

    def wait_condition(self, name: str, ctype: str, status: str, *, reason: str | None = None, timeout: float = 20.0,
                       namespace: str = "default") -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            cond = self.condition(name, ctype, namespace)
            ok = cond and cond["status"] == status and (reason is None or cond.get("reason") == reason)
            return cond if ok else None

        return wait_for(check, timeout=timeout, what=f"{name}: {ctype}={status} ({reason or 'any reason'})")

    def set_pytorchjob_status(self, name: str, status: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
        """Play the training operator: write the PyTorchJob's status through /status."""
        return self.kube.patch("kubeflow.org/v1", "PyTorchJob", namespace, name, {"status": status}, subresource="status")

    def events(self, name: str, namespace: str = "default") -> list[dict[str, Any]]:
        return [e for e in self.kube.list("v1", "Event", namespace) if (e.get("involvedObject") or {}).get("name") == name]


def pytorchjob_conditions(*types: str, message: str = "") -> dict[str, Any]:
    """A PyTorchJob status as the training operator writes it: the named conditions True."""
    return {"conditions": [
        {"type": t, "status": "True", "reason": f"PyTorchJob{t}", "message": message or f"PyTorchJob is {t.lower()}.",
         "lastTransitionTime": now_rfc3339(), "lastUpdateTime": now_rfc3339()}
        for t in types
    ]}
