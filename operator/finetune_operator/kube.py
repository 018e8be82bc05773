"""The few Kubernetes API calls the handlers make, over the official client's ApiClient.

Generic by (apiVersion, kind), so one code path applies every child the way `kubectl create`
would, and the pure helpers below (paths, drift, status JSON patches) are testable alone.
No kopf here: the handlers classify `ApiError` into kopf's temporary/permanent errors.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finetune_trainer import contract as c

from .spec import API_VERSION, KIND, PLURAL

RETRY_DELAY = 10.0  # seconds before kopf runs a handler again after an API hiccup

# (apiVersion, kind) -> plural: the kinds this operator reads or writes.
PLURALS: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "Pod"): "pods",
    ("v1", "Event"): "events",
    ("v1", "Namespace"): "namespaces",
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): "customresourcedefinitions",
    ("rbac.authorization.k8s.io/v1", "Role"): "roles",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    (c.PYTORCHJOB_API_VERSION, c.PYTORCHJOB_KIND): c.PYTORCHJOB_PLURAL,
    (c.TRAINJOB_API_VERSION, c.TRAINJOB_KIND): c.TRAINJOB_PLURAL,
    (c.JOBSET_API_VERSION, c.JOBSET_KIND): c.JOBSET_PLURAL,
    (API_VERSION, KIND): PLURAL,
}
CLUSTER_SCOPED = {("v1", "Namespace"), ("apiextensions.k8s.io/v1", "CustomResourceDefinition")}

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


def api_base(api_version: str) -> str:
    """/api/v1 for the core group, /apis/<group>/<version> for the others."""
    return "/api/v1" if api_version == "v1" else f"/apis/{api_version}"


def resource_path(
    api_version: str, kind: str, namespace: str | None = None, name: str | None = None, subresource: str | None = None
) -> str:
    """/api/v1/namespaces/ns/configmaps/name, /apis/group/version/..., + /status."""
    plural = PLURALS[(api_version, kind)]
    base = api_base(api_version)
    scope = "" if (api_version, kind) in CLUSTER_SCOPED or namespace is None else f"/namespaces/{namespace}"
    path = f"{base}{scope}/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


# ------------------------------------------------------------------ pure helpers


def contains(existing: Any, desired: Any) -> bool:
    """Whether `existing` already holds everything in `desired` (server defaults may add more).

    Dicts: every desired key equal (recursively); lists: same length, items pairwise."""
    if isinstance(desired, Mapping):
        return isinstance(existing, Mapping) and all(k in existing and contains(existing[k], v) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(existing, list)
            and len(existing) == len(desired)
            and all(contains(e, d) for e, d in zip(existing, desired, strict=True))
        )
    return existing == desired


def drift_patch(desired: Mapping[str, Any], existing: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch that brings `existing` back to `desired`, or None when nothing drifted.

    We own our labels, annotations, owner references and every top-level field we render
    (spec, data, rules, subjects, ...); status and fields others add are left alone."""
    patch: dict[str, Any] = {}
    want_meta, have_meta = desired.get("metadata") or {}, existing.get("metadata") or {}
    meta = {key: want_meta[key] for key in ("labels", "annotations", "ownerReferences")
            if key in want_meta and not contains(have_meta.get(key), want_meta[key])}
    if meta:
        patch["metadata"] = meta
    for key, value in desired.items():
        if key in ("apiVersion", "kind", "metadata", "status"):
            continue
        if not contains(existing.get(key), value):
            patch[key] = _merge_diff(existing.get(key), value)
    return patch or None


def _merge_diff(existing: Any, desired: Any) -> Any:
    """The smallest merge patch turning `existing` into a superset of `desired`
    (nested dicts are diffed key by key; lists and scalars are replaced whole)."""
    if isinstance(desired, Mapping) and isinstance(existing, Mapping):
        return {k: _merge_diff(existing.get(k), v) for k, v in desired.items() if not contains(existing.get(k), v)}
    return desired


def without(manifest: Mapping[str, Any], paths: Sequence[tuple[str, ...]]) -> dict[str, Any]:
    """A copy of `manifest` without the fields at `paths` (absent ones are fine)."""
    out = copy.deepcopy(dict(manifest))
    for path in paths:
        node: Any = out
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return out


def status_json_patch(body: Mapping[str, Any], fields: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A JSON patch for the /status subresource that sets `fields` of status, guarded by a
    resourceVersion test so a concurrent writer makes it fail (422) instead of being lost."""
    ops: list[dict[str, Any]] = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": (body.get("metadata") or {}).get("resourceVersion")}
    ]
    if not isinstance(body.get("status"), Mapping):
        return ops + [{"op": "add", "path": "/status", "value": dict(fields)}]
    return ops + [{"op": "add", "path": f"/status/{key}", "value": value} for key, value in fields.items()]


# ------------------------------------------------------------------ errors


@dataclass
class ApiError(Exception):
    """An API call that failed: HTTP status (0 when no answer came) and the server's reason."""

    status: int
    reason: str
    message: str

    def __str__(self) -> str:
        return f"HTTP {self.status} {self.reason}: {self.message}" if self.status else f"{self.reason}: {self.message}"

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def invalid(self) -> bool:
        """The request itself is wrong (a render bug or a rule only the server knows): no retry fixes it."""
        return self.status in (400, 422)


def _api_error(exc: Exception) -> ApiError:
    status = int(getattr(exc, "status", 0) or 0)
    if status:
        body = getattr(exc, "body", None) or ""
        try:
            parsed = json.loads(body) if body else {}
        except ValueError:
            parsed = {}
        return ApiError(status, str(parsed.get("reason") or getattr(exc, "reason", "") or ""), str(parsed.get("message") or body)[:500])
    return ApiError(0, type(exc).__name__, str(exc)[:500])


# ------------------------------------------------------------------ the client


class Kube:
    """Thin JSON-in/JSON-out calls over `kubernetes.client.ApiClient` (thread-safe)."""

    def __init__(self, configuration: Any, *, timeout: float = 30.0):
        from kubernetes.client import ApiClient

        self.configuration = configuration
        self.api = ApiClient(configuration)
        self.timeout = timeout
        self.on_error: Callable[[int], None] | None = None  # told each failed call's HTTP status (metrics)

    def _call(self, method: str, path: str, *, answers: Collection[int] = (), **kwargs: Any) -> dict[str, Any]:
        """`_request`, telling `on_error` of each failure except the statuses in `answers`: those the
        caller reads as an answer (a GET's 404: not there yet), not as an error."""
        try:
            return self._request(method, path, **kwargs)
        except ApiError as err:
            if self.on_error is not None and err.status not in answers:
                self.on_error(err.status)
            raise

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Sequence[tuple[str, str]] = (),
        content_type: str | None = None,
    ) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        try:
            method, url, headers, body, _ = self.api.param_serialize(
                method, path, query_params=list(query), header_params=headers, body=body, auth_settings=["BearerToken"]
            )
            response = self.api.call_api(method, url, header_params=headers, body=body, _request_timeout=self.timeout)
            response.read()
        except ApiException as exc:
            raise _api_error(exc) from exc
        except Exception as exc:  # urllib3: refused, reset, timed out -- no answer at all
            raise _api_error(exc) from exc
        text = (response.data or b"").decode("utf-8")
        if not 200 <= response.status <= 299:
            raise _api_error(ApiException(status=response.status, reason=response.reason, body=text))
        return json.loads(text) if text else {}

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", resource_path(api_version, kind, namespace, name), answers=(404,))
        except ApiError as err:
            if err.not_found:
                return None
            raise

    def list(
        self, api_version: str, kind: str, namespace: str | None, *, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        query = [("labelSelector", label_selector)] if label_selector else []
        return list(self._call("GET", resource_path(api_version, kind, namespace), query=query).get("items") or [])

    def discover(self, api_version: str) -> list[dict[str, Any]]:
        """The resources one group/version serves (its APIResourceList); 404: not served."""
        return list(self._call("GET", api_base(api_version)).get("resources") or [])

    def create(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        meta = manifest.get("metadata") or {}
        path = resource_path(manifest["apiVersion"], manifest["kind"], meta.get("namespace"))
        return self._call("POST", path, body=dict(manifest))

    def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        body: Any,
        *,
        content_type: str = MERGE_PATCH,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        path = resource_path(api_version, kind, namespace, name, subresource)
        return self._call("PATCH", path, body=body, content_type=content_type)

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> None:
        try:
            self._call("DELETE", resource_path(api_version, kind, namespace, name), answers=(404,))
        except ApiError as err:
            if not err.not_found:
                raise

    def apply(
        self, manifest: Mapping[str, Any], *, ignore: Sequence[tuple[str, ...]] = (), exists: bool = False
    ) -> tuple[str, dict[str, Any]]:
        """Create, or on 409 read and patch what drifted: ("created"|"unchanged"|"patched", object).

        Safe to repeat: deterministic names make a retry find its own earlier write. `ignore`
        lists fields another controller owns once the object exists (Kueue's runPolicy.suspend);
        `exists`: a create already answered 409, go straight to the read."""
        if not exists:
            try:
                return "created", self.create(manifest)
            except ApiError as err:
                if not err.conflict:
                    raise
        meta = manifest["metadata"]
        existing = self.get(manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"])
        if existing is None:  # deleted between our create and get: create again on the next attempt
            raise ApiError(409, "Conflict", f"{manifest['kind']} {meta['name']} vanished after AlreadyExists")
        patch = drift_patch(without(manifest, ignore), existing)
        if patch is None:
            return "unchanged", existing
        patched = self.patch(manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"], patch)
        return "patched", patched
