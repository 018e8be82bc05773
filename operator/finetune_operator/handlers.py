"""kopf handlers: a FineTuneJob becomes its children; its workload's state becomes its status.

Thin edges over pure code (backends.py, render.py, workloads.py, status.py, kube.py's helpers):

1. reconcile (create / resume / spec update): choose the backend (backends.choose: recorded,
   spec.backend, the operator's default, discovery for auto), validate and render; on an
   invalid spec write Accepted=False with every `path: message`, post a Warning Event, create
   nothing; when no backend can run it (its CRD is not served) the same, and retry until it
   is. Otherwise apply each child idempotently (create; 409 -> read, patch what drifted), then
   write the status derived from what was applied, with the backend it ran on.
2. workload_event: every event of a labelled PyTorchJob, TrainJob or JobSet recomputes the
   owner's status. The exit code comes from the pods when the job failed or restarts.
Both write through `write_status`, the one writer (a succeeded job's status also lists the URIs of
its results, status.outputs: outputs.py): derive on the freshest body at hand,
JSON-patch /status guarded by its resourceVersion, on 422 re-read and derive again; the
Events posted (one per condition transition) are computed from what was written.

Spec edits after start are REJECTED, except spec.suspend: a training run cannot change its
model, data or hyper-parameters mid-way and still resume from its checkpoints, and silently
restarting hours of GPU time is worse than saying no. The run keeps its original spec,
Accepted=False (reason SpecChangeRejected) and a Warning Event say so; reverting the edit
makes the job Accepted again; delete and re-create to change it (checkpoints stay in storage).
"After start" means: the workload (PyTorchJob, TrainJob or JobSet) exists. Before that (e.g. after an invalid spec) edits apply.

Deletion: no finalizer. Every child carries an ownerReference to the FineTuneJob, so the
API server's garbage collector deletes them (and the PyTorchJob's pods) when the job goes;
the operator never touches object storage, so checkpoints survive. A finalizer would only
add a way to get stuck (an operator down = a job that cannot be deleted) for no gain.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from finetune_trainer.config import ConfigError

from . import backends as bk
from . import status as st
from finetune_trainer.contract import ANNOTATION_BACKEND, ANNOTATION_SPEC_HASH, BACKEND_AUTO, LABEL_JOB_NAME
from .kube import JSON_PATCH, RETRY_DELAY, ApiError, Kube, status_json_patch
from .outputs import job_outputs
from .render import config_map_name, render, spec_hash
from .spec import API_VERSION, GROUP, KIND, PLURAL, VERSION, StorageSpec

FINETUNEJOBS = (GROUP, VERSION, PLURAL)
MAX_STATUS_CONFLICTS = 5  # re-reads when another writer moved the resourceVersion first
REASON_BACKEND_SELECTED = "BackendSelected"  # the Normal Event that says which backend a job got


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------ edges (side effects)


@contextlib.contextmanager
def api_errors(delay: float) -> Iterator[None]:
    """Classify API failures at the edge: a refused object (400/422) is permanent, the rest
    (unreachable, 5xx, 429, 403 until RBAC is fixed, 404 until a CRD exists) is temporary."""
    try:
        yield
    except ApiError as err:
        if err.invalid:
            raise kopf.PermanentError(f"the API server refused a rendered object: {err}") from err
        raise kopf.TemporaryError(f"Kubernetes API: {err}", delay=delay) from err


def summarize(kube: Kube, backend: bk.Backend, child: Mapping[str, Any]) -> dict[str, Any]:
    """The child's summary (status.workload), with the trainer's last non-zero exit read from
    its pods when it failed or restarts."""
    summary = st.summarize_child(backend.name, child)
    if not st.needs_pods(summary):
        return summary
    meta = child["metadata"]
    pods = kube.list("v1", "Pod", meta["namespace"], label_selector=backend.pod_selector(meta["name"]))
    return st.summarize_child(backend.name, child, st.exit_from_pods(pods, backend.container))


def suspend_only_change(existing_hash: str | None, spec: Mapping[str, Any]) -> bool:
    """Whether the running child's spec hash is this spec's, up to spec.suspend."""
    if not existing_hash:
        return True  # rendered before hashes existed: nothing to compare, keep it applied
    variants = [dict(spec), {**spec, "suspend": True}, {**spec, "suspend": False}]
    variants.append({k: v for k, v in spec.items() if k != "suspend"})
    return existing_hash in {spec_hash(v) for v in variants}


def owned_by_others(manifest: Mapping[str, Any], spec: Mapping[str, Any]) -> tuple[tuple[str, ...], ...]:
    """A queued job's suspend flag (runPolicy.suspend of a PyTorchJob, spec.suspend of a
    TrainJob or JobSet) belongs to Kueue (it admits by unsuspending) unless the user suspends
    it; never re-suspend what Kueue admitted."""
    backend = bk.backend_of(manifest)
    queued = backend is not None and spec.get("queue_name") and spec.get("suspend") is not True
    return (backend.suspend_path,) if queued else ()


@dataclass(frozen=True)
class Outcome:
    """What one reconcile decided and saw: the verdict, the workload's summary, the backend."""

    acceptance: st.Acceptance
    workload: dict[str, Any] | None
    applied: tuple[tuple[str, str, str], ...] = ()  # (kind, name, created|unchanged|patched)
    choice: bk.Choice | None = None
    waiting: bool = False  # no backend can run it yet: retry (the CRD may be installed any time)


class _EarlierChoice(Exception):
    """The ConfigMap an interrupted reconcile created names another backend: use that one."""

    def __init__(self, backend: str):
        self.backend = backend


def configmap_backend(kube: Kube, job: Mapping[str, Any]) -> str | None:
    """The backend an earlier reconcile wrote on the job's ConfigMap (created before the
    workload), if it got that far and no status records it."""
    meta = job["metadata"]
    existing = kube.get("v1", "ConfigMap", meta["namespace"], config_map_name(meta["name"]))
    name = ((existing or {}).get("metadata", {}).get("annotations") or {}).get(ANNOTATION_BACKEND)
    return name if name in bk.BACKENDS else None


def choose_backend(kube: Kube, job: Mapping[str, Any], settings: Any, discovery: Any,
                   recorded: str | None) -> bk.Choice | bk.Refusal:
    spec = job.get("spec") if isinstance(job.get("spec"), dict) else {}
    requested = spec.get("backend") if spec.get("backend") in (*bk.BACKENDS, BACKEND_AUTO) else None
    return bk.choose(requested, default=settings.default_backend, enabled=settings.enabled_backends,
                     served=lambda: discovery.served(kube), recorded=recorded)


def reconcile_job(kube: Kube, job: Mapping[str, Any], settings: Any, discovery: Any = None) -> Outcome:
    """1 choose the backend, validate + render, 2 never restart a finished run, 3 refuse a spec
    change after start, 4 apply the children in order (RBAC before the pods that use it).

    A job with no conditions yet was never reconciled, so it has no run to protect: its
    children are created with no read first, and 2 and 3 are checked only if one of them
    turns out to exist already (an earlier reconcile got that far before it wrote status;
    then the backend it wrote on the ConfigMap wins over a new choice)."""
    discovery = discovery or bk.Discovery()
    checked = bool((job.get("status") or {}).get("conditions"))
    recorded = bk.recorded_backend(job)
    if recorded is None and checked:
        recorded = configmap_backend(kube, job)
    try:
        outcome = _reconcile(kube, job, settings, choose_backend(kube, job, settings, discovery, recorded), checked)
    except _EarlierChoice as earlier:
        outcome = _reconcile(kube, job, settings, choose_backend(kube, job, settings, discovery, earlier.backend), True)
    if outcome.waiting:
        discovery.forget()  # the retry asks the API server again: the CRD may be there by then
    return outcome


def _reconcile(kube: Kube, job: Mapping[str, Any], settings: Any, choice: bk.Choice | bk.Refusal,
               checked: bool) -> Outcome:
    meta = job["metadata"]
    generation = int(meta.get("generation") or 1)
    chosen = choice.backend.name if isinstance(choice, bk.Choice) else None
    try:
        manifests = render(dict(job), settings, chosen)  # a refused job's spec is still checked
    except ConfigError as exc:
        return Outcome(st.Acceptance.invalid(generation, [str(issue) for issue in exc.errors]), None)
    if isinstance(choice, bk.Refusal):
        return Outcome(st.Acceptance.refused(generation, choice.reason, choice.message), None,
                       waiting=choice.reason == st.REASON_BACKEND_NOT_INSTALLED)
    backend = choice.backend
    if checked and (refusal := refuse_to_apply(kube, job, generation, backend)):
        return refusal
    applied, workload = [], None
    for manifest in manifests:
        ignore = owned_by_others(manifest, job.get("spec") or {})
        if checked:
            action, obj = kube.apply(manifest, ignore=ignore)
        else:
            try:
                action, obj = "created", kube.create(manifest)
            except ApiError as err:
                if not err.conflict:
                    raise
                checked = True
                if manifest["kind"] == "ConfigMap":
                    earlier = configmap_backend(kube, job)
                    if earlier is not None and earlier != backend.name:
                        raise _EarlierChoice(earlier) from None
                if refusal := refuse_to_apply(kube, job, generation, backend):
                    return refusal
                action, obj = kube.apply(manifest, ignore=ignore, exists=True)
        applied.append((manifest["kind"], manifest["metadata"]["name"], action))
        if bk.backend_of(manifest) is backend:
            workload = obj
    summary = summarize(kube, backend, workload) if workload else None
    return Outcome(st.Acceptance.valid(generation), summary, tuple(applied), choice)


@dataclass(frozen=True)
class Refusal:
    """Why a valid spec is not applied: the verdict, and whether the child's state is wanted."""

    acceptance: st.Acceptance
    summarize_child: bool


def refusal(job: Mapping[str, Any], generation: int, existing: Mapping[str, Any] | None) -> Refusal | None:
    """The pure decision (2 and 3 above) on the job and the workload read for it; None: apply."""
    if existing is None and st.finished((job.get("status") or {}).get("conditions")):
        # The run ended and its workload was cleaned up: re-creating it would train again.
        return Refusal(st.Acceptance.valid(generation), summarize_child=False)
    if existing is not None:
        running_hash = (existing["metadata"].get("annotations") or {}).get(ANNOTATION_SPEC_HASH)
        if not suspend_only_change(running_hash, job.get("spec") or {}):
            return Refusal(st.Acceptance.change_rejected(generation), summarize_child=True)
    return None


def refuse_to_apply(kube: Kube, job: Mapping[str, Any], generation: int, backend: bk.Backend) -> Outcome | None:
    """Read the workload once, decide (`refusal`), and say why not to apply; None: go on."""
    meta = job["metadata"]
    existing = kube.get(backend.api_version, backend.kind, meta["namespace"], meta["name"])
    decided = refusal(job, generation, existing)
    if decided is None:
        return None
    summary = None
    if decided.summarize_child and existing is not None:
        summary = summarize(kube, backend, existing)
    return Outcome(decided.acceptance, summary)


def reconcile_fields(outcome: Outcome, spec_suspend: bool, when: str,
                     default_storage: StorageSpec | None = None) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """What a reconcile writes, derived on whichever body `write_status` has (the handler's,
    or a re-read after a conflict). The workload summary already in status wins over the
    one this reconcile read: it is written by the workload's own event handler, which sees
    every later change."""

    def fields(body: Mapping[str, Any]) -> dict[str, Any]:
        status = body.get("status") or {}
        return derive(body, outcome.acceptance, spec_suspend, child_summary(status, outcome), when, default_storage)

    return fields


Derivation = Callable[[Mapping[str, Any]], "dict[str, Any] | None"]


def write_status(kube: Kube, owner: Mapping[str, Any], fields_for: Derivation,
                 logger: logging.Logger) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The one status writer. Derive the fields on `owner` (the freshest body at hand),
    JSON-patch /status with a resourceVersion test; on 422 (someone wrote first) read the
    owner again and derive again. Returns (status before, fields written); None when the
    derivation wants nothing written, nothing changed, or the owner is gone."""
    meta = owner["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    for attempt in range(MAX_STATUS_CONFLICTS):
        if attempt:
            owner = kube.get(API_VERSION, KIND, namespace, name)
            if owner is None:
                return None
        status = dict(owner.get("status") or {})
        new = fields_for(owner)
        if new is None or not st.status_changed(status, new):
            return None
        try:
            kube.patch(API_VERSION, KIND, namespace, name, status_json_patch(owner, new),
                       content_type=JSON_PATCH, subresource="status")
        except ApiError as err:
            if err.status == 422:
                continue
            raise
        return status, new
    logger.warning(f"status of {namespace}/{name} kept changing under us; the next event retries")
    return None


def child_summary(status: Mapping[str, Any] | None, outcome: Outcome) -> dict[str, Any] | None:
    """The workload summary already recorded in status (status.pytorchJob: by an operator
    before backends), else the one this reconcile read."""
    status = status or {}
    return status.get("workload") or status.get("pytorchJob") or outcome.workload


def derive(
    body: Mapping[str, Any], acceptance: st.Acceptance, spec_suspend: bool, workload: Any, when: str,
    default_storage: StorageSpec | None = None,
) -> dict[str, Any]:
    """The status fields we own; a succeeded job's also list its results (status.outputs)."""
    status = body.get("status") or {}
    fields = st.conditions_for(
        generation=int(body["metadata"].get("generation") or 1),
        acceptance=acceptance,
        suspend=spec_suspend,
        workload=workload,
        progress=status.get("progress"),
        previous=status.get("conditions"),
        now=when,
    )
    if fields["phase"] == st.PHASE_SUCCEEDED:
        outputs = job_outputs(body, default_storage)
        if outputs:
            fields["outputs"] = outputs
    return fields


def announce(owner: Mapping[str, Any], events: list[st.Transition], metrics: Any = None) -> None:
    """One Kubernetes Event per condition transition, on the FineTuneJob (counted in metrics)."""
    ref = {"apiVersion": API_VERSION, "kind": KIND, "metadata": owner["metadata"]}
    for event in events:
        kopf.event(ref, type=event.event_type, reason=event.reason, message=event.event_message())
        if metrics is not None:
            metrics.event(event.event_type, event.reason)


def owner_events(before: Mapping[str, Any] | None, after: Mapping[str, Any], acceptance: st.Acceptance) -> list[st.Transition]:
    """Transitions, plus a Warning for every rejected generation (not only the first)."""
    events = st.transitions((before or {}).get("conditions"), after.get("conditions") or [])
    if acceptance.status == st.FALSE and not any(e.type == st.ACCEPTED for e in events):
        events.append(st.Transition(st.ACCEPTED, st.FALSE, acceptance.reason, acceptance.message))
    return events


def sync_owner_status(kube: Kube, child: Mapping[str, Any], logger: logging.Logger, metrics: Any = None,
                      default_storage: StorageSpec | None = None) -> None:
    """A workload (any backend's kind) -> its FineTuneJob's status, through `write_status`."""
    meta = child["metadata"]
    backend = bk.backend_of(child)
    if backend is None:
        return
    namespace, owner_name = meta["namespace"], meta["labels"][LABEL_JOB_NAME]
    summary = summarize(kube, backend, child)
    owner = kube.get(API_VERSION, KIND, namespace, owner_name)
    if owner is None:
        return  # the owner is gone (GC follows)

    def fields(owner: Mapping[str, Any]) -> dict[str, Any] | None:
        owner_uid = owner["metadata"].get("uid")
        if not any(ref.get("uid") == owner_uid for ref in meta.get("ownerReferences") or []):
            return None  # not this owner's child (a namesake re-created since)
        recorded = bk.recorded_backend(owner)
        if recorded is not None and recorded != backend.name:
            return None  # not the kind this job runs on (it never has two)
        status = owner.get("status") or {}
        if st.find(status.get("conditions"), st.ACCEPTED) is None:
            # The reconcile that created this child has not written status yet; it will, from
            # its own read of the child, or from a newer summary recorded here (which it prefers).
            if st.blank_summary(summary) or status.get("workload") == summary:
                return None
            return {"workload": summary, "backend": backend.name}
        acceptance = st.Acceptance.from_conditions(status.get("conditions"), int(owner["metadata"].get("generation") or 1))
        return derive(owner, acceptance, (owner.get("spec") or {}).get("suspend") is True, summary, now(),
                      default_storage)

    written = write_status(kube, owner, fields, logger)
    if written is not None:
        before, new = written
        announce(owner, st.transitions(before.get("conditions"), new.get("conditions", [])), metrics)


def fresh_child(child: Mapping[str, Any]) -> bool:
    """A workload just created and not suspended, that nobody has reported on yet: its
    ADDED event carries nothing its creator did not see (relists arrive with no type, and a
    queued, suspended one still goes through: its owner must say Suspended)."""
    backend = bk.backend_of(child)
    if backend is None:
        return False
    summary = st.summarize_child(backend.name, child)
    return st.blank_summary(summary) and not summary["suspend"]


def as_job(body: Mapping[str, Any]) -> dict[str, Any]:
    """A plain, private copy of the FineTuneJob (render must not see kopf's views)."""
    return {key: copy.deepcopy(value) for key, value in body.items()}


# ------------------------------------------------------------------ handlers


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo | None:
    """kopf talks to the same API server, with the same credentials, as our client."""
    kube: Kube | None = getattr(memo, "kube", None)
    return connection_info(kube.configuration) if kube else kopf.login_via_client(**_)


UPGRADE_CRD_HINT = ("kubectl apply --server-side --force-conflicts -f helm/finetune-operator/crds/ "
                    "(or: helm show crds <chart> | kubectl apply --server-side --force-conflicts -f -)")


def stale_crd_fields(crds: list[Mapping[str, Any]]) -> list[str]:
    """The spec fields this operator reads that the installed FineTuneJob CRD lacks: an API
    server prunes them from every job, so spec.backend would vanish without a word. Helm does
    not upgrade CRDs, so this is what a `helm upgrade` without the CRD step leaves behind."""
    from .crd import CRD_NAME

    ours = next((c for c in crds if (c.get("metadata") or {}).get("name") == CRD_NAME), None)
    if ours is None:
        return []  # not installed (or not readable): kopf itself says it cannot watch the kind
    for version in (ours.get("spec") or {}).get("versions") or []:
        if version.get("name") == VERSION:
            schema = ((version.get("schema") or {}).get("openAPIV3Schema") or {})
            spec = ((schema.get("properties") or {}).get("spec") or {}).get("properties") or {}
            return [f"spec.{name}" for name in ("backend", "training_runtime") if name not in spec]
    return []


@kopf.on.startup()
def check_installed_crd(memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Say at start, loudly, when the cluster's FineTuneJob CRD is older than this operator."""
    kube: Kube | None = getattr(memo, "kube", None)
    if kube is None:
        return
    try:
        missing = stale_crd_fields(kube.list("apiextensions.k8s.io/v1", "CustomResourceDefinition", None))
    except ApiError as err:
        logger.warning(f"could not read the FineTuneJob CRD to check its version: {err}")
        return
    if missing:
        logger.error(f"the installed FineTuneJob CRD predates this operator: it has no {', '.join(missing)}, so the "
                     f"API server drops those fields from every job (they run on the default backend). "
                     f"Apply the new CRD: {UPGRADE_CRD_HINT}")


@kopf.on.probe(id="reconciles")
def reconciles(memo: kopf.Memo, **_: Any) -> int:
    """Liveness detail: reconciles done since start (kopf answers the endpoint itself)."""
    return int(memo.stats["reconciles"]) if "stats" in memo else 0


@kopf.on.resume(*FINETUNEJOBS)
@kopf.on.create(*FINETUNEJOBS)
@kopf.on.update(*FINETUNEJOBS, field="spec")
def reconcile(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Read (kopf's body) -> decide (reconcile_job: render, checks, apply) -> write status once,
    and post the Events of what was written."""
    metrics = operator_metrics(memo)
    with timed(metrics, "reconcile"):
        _reconcile_handler(body, memo, logger, metrics)


def _reconcile_handler(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, metrics: Any) -> None:
    job, when = as_job(body), now()
    delay = getattr(memo, "retry_delay", RETRY_DELAY)
    with api_errors(delay):
        outcome = reconcile_job(memo.kube, job, memo.render_settings, getattr(memo, "discovery", None))
        spec_suspend = (job.get("spec") or {}).get("suspend") is True
        fields = reconcile_fields(outcome, spec_suspend, when, operator_default_storage(memo))
        written = write_status(memo.kube, job, fields, logger)
    before, after = written if written is not None else (job.get("status") or {}, job.get("status") or {})
    events = owner_events(before, {**before, **after}, outcome.acceptance)
    if outcome.choice is not None and after.get("backend") and not before.get("backend"):
        events.insert(0, st.Transition("Backend", st.TRUE, REASON_BACKEND_SELECTED,
                                       f"runs as a {outcome.choice.backend.kind} ({outcome.choice.how})"))
    announce(job, events, metrics)
    if "stats" in memo:
        memo.stats["reconciles"] += 1
    if outcome.waiting:  # kopf retries; the job proceeds once the CRD is served
        raise kopf.TemporaryError(outcome.acceptance.message, delay=delay)
    logger.info(f"{outcome.acceptance.reason}: " + ", ".join(f"{k} {n} {a}" for k, n, a in outcome.applied))


def owner_needs_sync(type: str | None, body: kopf.Body, **_: Any) -> bool:
    """kopf's filter, run on its event loop: the events with nothing to mirror never take a
    handler thread. A deleted child has no state left; a just-created one's state is recorded
    by its creator's reconcile (no read, no write)."""
    return type != "DELETED" and not (type == "ADDED" and fresh_child(body))


def workload_event(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Mirror the workload's state onto its FineTuneJob (a relist every watch restart resyncs)."""
    metrics = operator_metrics(memo)
    try:
        with timed(metrics, "workload_event"):
            sync_owner_status(memo.kube, as_job(body), logger, metrics, operator_default_storage(memo))
    except ApiError as err:
        logger.warning(f"could not update the FineTuneJob's status: {err}")


def operator_metrics(memo: kopf.Memo) -> Any:
    """The operator's Prometheus metrics (None: a memo without them, as in tests of one handler)."""
    return getattr(memo, "metrics", None)


def timed(metrics: Any, handler: str) -> Any:
    """The handler's time into the reconcile histogram (no metrics: not timed)."""
    return metrics.timed(handler) if metrics is not None else contextlib.nullcontext()


def operator_default_storage(memo: kopf.Memo) -> StorageSpec | None:
    """The operator's storage for jobs without spec.storage (status.outputs names it too)."""
    return getattr(getattr(memo, "render_settings", None), "default_storage", None)


@kopf.on.startup()
def serve_metrics(memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """/metrics in the Prometheus text format, from start to cleanup (memo.metrics_address)."""
    address = getattr(memo, "metrics_address", None)
    if address and operator_metrics(memo) is not None:
        from .metrics import serve

        memo.metrics_server = serve(memo.metrics, address)
        logger.info(f"serving Prometheus metrics at http://{address.rpartition(':')[0] or '0.0.0.0'}:"
                    f"{memo.metrics_server.server_port}/metrics")


@kopf.on.cleanup()
def stop_metrics(memo: kopf.Memo, **_: Any) -> None:
    server = getattr(memo, "metrics_server", None)
    if server is not None:
        server.shutdown()
        server.server_close()
        memo.metrics_server = None


# One watch per backend kind, all labelled children. kopf watches a kind only while the API
# serves it (it follows CustomResourceDefinitions), so a CRD installed later is picked up.
for _backend in bk.BACKENDS.values():
    kopf.on.event(_backend.group, _backend.version, _backend.plural, id=f"{_backend.name}_event",
                  labels={LABEL_JOB_NAME: kopf.PRESENT}, when=owner_needs_sync)(workload_event)


def connection_info(configuration: Any) -> kopf.ConnectionInfo:
    """kubernetes.client.Configuration -> kopf.ConnectionInfo (host, token, TLS files)."""
    header = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0] if parts else None)
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme,
        token=token,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )
