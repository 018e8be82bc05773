"""A Kubernetes API emulator for the operator's tests: kmock, taught the semantics we rely on.

kmock 0.8 stores objects and serves list/watch/get/create/patch/delete over real HTTP, but
merges dicts naively. `KubeEmulator` adds what a real API server does and the operator's
correctness depends on:

- metadata.uid, creationTimestamp, resourceVersion (one counter, bumped on every real write;
  a no-op patch writes nothing and sends no watch event), generation (bumped on changes
  outside metadata and status only), generateName;
- 409 AlreadyExists on create of an existing name; 404 on patch/delete of a missing one;
- JSON patch (RFC 6902) with a failed `test` answered 422 (kopf's optimistic concurrency),
  merge patch (RFC 7386), a merge patch carrying a stale resourceVersion answered 409;
- the status subresource: a PATCH to /status changes only status, a plain PATCH cannot
  change status (for resources declared with the `status` subresource), create drops status;
- label selectors on list and watch (=, ==, !=, exists, !exists, in, notin);
- watch streams that lose nothing between their snapshot and their live events;
- background garbage collection: deleting an owner deletes (recursively) the objects whose
  every ownerReference pointed at deleted owners, unless propagationPolicy is Orphan;
  finalizers block deletion until removed.

Still not emulated (and so not proven by the tests): schema validation, defaulting and CEL
rules of the CRD, admission webhooks, RBAC, strategic merge patch (treated as a merge
patch), server-side apply, field selectors, watch bookmarks and 410 Gone, namespace
lifecycle, the training operator itself (tests play its part by writing PyTorchJob status).

`EmulatorThread` runs the emulator on a loopback port in its own thread and event loop,
so synchronous tests and a kopf operator in another thread talk to it over real HTTP.
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
from typing import Any

import attrs
import jsonpatch
import kmock
from kmock._internal import apps, dicts, enums, parsing, rendering

from finetune_operator import spec as crd

# Resources the operator and its tests use: (group/version/plural, kind, namespaced, status subresource)
RESOURCES = [
    (f"{crd.GROUP}/{crd.VERSION}/{crd.PLURAL}", crd.KIND, True, True),
    ("kubeflow.org/v1/pytorchjobs", "PyTorchJob", True, True),
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

Hook = Callable[[rendering.Request], Awaitable[None]]


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _error(status: int, reason: str, message: str) -> kmock.KubernetesError:
    # Non-empty details as a real API server sends; empty ones make kmock format a traceback
    # into every error response (a tenth of the emulator's time under the scale benchmark).
    return kmock.KubernetesError(status=status, reason=reason, message=message,
                                 details={"causes": [{"reason": reason, "message": message}]})


# ------------------------------------------------------------------ a kmock 0.8 parsing bug

_parse_path = parsing.parse_path


def _parse_path_with_namespaces(path: str) -> parsing.ParsedPath:
    """kmock 0.8 reads /api/v1/namespaces[/<name>] as "inside a namespace" and fails (500) on
    the namespace list that kopf needs for namespaced operation; those paths are Namespace objects."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and (len(parts) <= 4 or parts[4:] in (["status"], ["finalize"])):
        return parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) > 3 else None,
                                  parts[4] if len(parts) > 4 else None)
    return _parse_path(path)


parsing.parse_path = _parse_path_with_namespaces


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


# ------------------------------------------------------------------ the emulator


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's KubernetesEmulator with the API server semantics listed in the module docstring."""

    keep_history: bool = False  # kmock keeps every version of every object; benchmarks need not
    hooks: list[Hook] = attrs.field(factory=list)  # awaited before a write (gates, injected faults)
    _counter: itertools.count = attrs.field(factory=lambda: itertools.count(1), init=False)
    _rv: int = attrs.field(default=0, init=False)
    _with_status: set[tuple[str, str, str]] = attrs.field(factory=set, init=False)
    _direct: dict[enums.action, Any] = attrs.field(factory=dict, init=False)
    writes: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # kmock finds a request's reaction by filtering every request it ever recorded, so each
        # request costs O(requests so far). The Kubernetes verbs go straight to their reactions.
        self._direct = {
            action: self.fallback[action] << serve
            for action, serve in [
                (enums.action.LIST, self._serve_list), (enums.action.WATCH, self._serve_watch),
                (enums.action.FETCH, self._serve_fetch), (enums.action.CREATE, self._serve_create),
                (enums.action.UPDATE, self._serve_update), (enums.action.DELETE, self._serve_delete),
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

    def _create(self, request: rendering.Request) -> list[tuple[kmock.resource, dict]]:
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

    def _patched(self, old: dict[str, Any], request: rendering.Request) -> dict[str, Any]:
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
        try:
            return dict(dicts.merge_patch_dict(old, data))
        except ValueError as exc:
            raise _error(422, "Invalid", str(exc)) from None

    def _update(self, request: rendering.Request) -> list[tuple[kmock.resource, dict]]:
        key = (request.resource, request.namespace, request.name)
        old = self._live(key)
        if old is None:
            raise _error(404, "NotFound", f'{request.resource.plural} "{request.name}" not found')
        new = self._patched(copy.deepcopy(old), request)
        if request.subresource == "status":  # only status moves through /status
            new = {**copy.deepcopy(old), "status": new.get("status")}
            if new["status"] is None:
                del new["status"]
        elif request.subresource:
            raise _error(404, "NotFound", f"subresource {request.subresource} is not emulated")
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
        return self._remove(key, obj, cascade=not orphan)

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

    async def _handle(self, request: rendering.Request):  # type: ignore[override]
        writes = (enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE)
        if request.resource is not None and request.action in writes:
            for hook in list(self.hooks):
                await hook(request)
            async with self._lock:
                if request.action == enums.action.CREATE:
                    events = self._create(request)
                elif request.action == enums.action.UPDATE and request.name:
                    events = self._update(request)
                elif request.action == enums.action.DELETE and request.name:
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
        if direct is not None and (request.action != enums.action.DELETE or request.name):
            return await direct(request)
        return await apps.RawHandler._handle(self, request)  # discovery and anything unusual

    def _last(self, key: tuple) -> dict[str, Any]:
        if key not in self._objects:
            raise _error(404, "NotFound", f'{key[0].plural} "{key[2]}" not found')
        return self._objects[key].last.raw

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        obj = self._live((request.resource, request.namespace, request.name))
        if obj is None:
            raise _error(404, "NotFound", f'{request.resource.plural} "{request.name}" not found')
        return obj

    async def _serve_create(self, request: rendering.Request) -> rendering.Payload:
        meta = request.data.get("metadata") or {}
        return self._last((request.resource, request.namespace or meta.get("namespace"), meta.get("name")))

    async def _serve_update(self, request: rendering.Request) -> rendering.Payload:
        return self._last((request.resource, request.namespace, request.name))

    async def _serve_delete(self, request: rendering.Request) -> rendering.Payload:
        return self._last((request.resource, request.namespace, request.name))

    def _selected(self, request: rendering.Request, key: tuple, obj: Mapping[str, Any]) -> bool:
        resource, namespace, name = key
        if resource != request.resource:
            return False
        if request.namespace is not None and namespace != request.namespace:
            return False
        if request.name is not None and name != request.name:
            return False
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return matches_selector(labels, request.params.get("labelSelector"))

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        if not any(res == request.resource for res in self._get_resources()):
            raise kmock.KubernetesResourceNotFoundError()
        async with self._lock:
            items = [obj for key, obj in self._all_live_items() if self._selected(request, key, obj)]
            return {"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    async def _serve_watch(self, request: rendering.Request):
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

    def __init__(self, predicate: Callable[[rendering.Request], bool]):
        self.predicate = predicate
        self.hit = threading.Event()
        self.released = threading.Event()
        self.lost = False
        self.used = False

    async def __call__(self, request: rendering.Request) -> None:
        if self.used or not self.predicate(request):
            return
        self.used = True
        self.hit.set()
        await asyncio.get_running_loop().run_in_executor(None, self.released.wait)
        if self.lost:
            raise _error(503, "ServiceUnavailable", "the client's connection died with it")

    def release(self, *, lost: bool = False) -> None:
        self.lost = lost
        self.released.set()


class EmulatorThread:
    """`with EmulatorThread() as emu:` -> emu.url serves the Kubernetes API on 127.0.0.1."""

    def __init__(self, *, keep_history: bool = False, port: int | None = None):
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
        self._ready.wait(30)
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

        async def hook(request: rendering.Request) -> None:
            if request.id >= cutoff and request.url.port == port:
                raise _error(503, "ServiceUnavailable", "this client is dead")

        self.call(lambda: self.emulator.hooks.append(hook))

    def gate(self, predicate: Callable[[rendering.Request], bool]) -> Gate:
        gate = Gate(predicate)
        self.call(lambda: self.emulator.hooks.append(gate))
        return gate

    def fail(self, predicate: Callable[[rendering.Request], bool], *, times: int, status: int = 503) -> list[int]:
        """The next `times` writes matching `predicate` fail with `status` (an API hiccup)."""
        left = [times]

        async def hook(request: rendering.Request) -> None:
            if left[0] > 0 and predicate(request):
                left[0] -= 1
                raise _error(status, "ServiceUnavailable", "injected by the test")

        self.call(lambda: self.emulator.hooks.append(hook))
        return left

    def requests(self) -> list[rendering.Request]:
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


def is_create(plural: str) -> Callable[[rendering.Request], bool]:
    return lambda r: r.action == enums.action.CREATE and r.resource is not None and r.resource.plural == plural


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
                 namespaces: list[str] | None = None):
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


# ------------------------------------------------------------------ pytest fixtures
# Import them into a test module: `from kube_emulator import cluster, emulator, operator`.

import pytest  # noqa: E402


@pytest.fixture
def emulator() -> Iterable[EmulatorThread]:
    with EmulatorThread() as emu:
        yield emu


@pytest.fixture
def cluster(emulator: EmulatorThread) -> Cluster:
    return Cluster(emulator)


@pytest.fixture
def operator(emulator: EmulatorThread) -> Iterable[OperatorThread]:
    op = OperatorThread(emulator.url).start()
    yield op
    if not op.stop_flag.is_set():
        op.stop()
