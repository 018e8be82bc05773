"""The workload APIs a FineTuneJob runs on, and which one a job gets. Pure, but for `served`.

    Backend            the facts of one kind: identity, what to install, where its suspend
                       and Kueue's label live, how its pods are found and which container
                       holds the trainer, and how its status reads (status.summarize_child)
    choose(...)        spec.backend (or the operator's default) + what discovery found +
                       what this operator may use + what status recorded -> Choice or Refusal
    served(kube)       API discovery: which of the kinds the cluster serves (the one edge)

A job's choice is recorded (status.backend) when its child is first created, and also on
the ConfigMap (annotation), which is created before the workload: a reconcile that died
between the two finds it there, so the retry never creates a TrainJob beside a PyTorchJob
because Trainer v2 was installed in between. A recorded choice is final: it is not
re-checked against discovery or the operator's flags, the job keeps its kind until deleted.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from finetune_trainer import contract as c

from . import status as st


@dataclass(frozen=True)
class Backend:
    """One workload kind, as data."""

    name: str  # spec.backend's value
    group: str
    version: str
    kind: str
    plural: str
    install: str  # what a cluster admin installs to serve it (the Accepted=False message)
    suspend_path: tuple[str, ...]  # the child's suspend flag (Kueue admits by clearing it)
    pod_label: str  # label on every pod of the child, valued with the child's name
    container: str  # the trainer's container in those pods

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    def pod_selector(self, child_name: str) -> str:
        return f"{self.pod_label}={child_name}"


PYTORCHJOB = Backend(
    c.BACKEND_PYTORCHJOB, c.PYTORCHJOB_GROUP, c.PYTORCHJOB_VERSION, c.PYTORCHJOB_KIND, c.PYTORCHJOB_PLURAL,
    install="the Kubeflow Training Operator v1 (PyTorchJob CRD pytorchjobs.kubeflow.org, release v1.9)",
    suspend_path=("spec", "runPolicy", "suspend"), pod_label=c.TRAINING_JOB_LABEL, container=c.CONTAINER_NAME,
)
TRAINJOB = Backend(
    c.BACKEND_TRAINJOB, c.TRAINJOB_GROUP, c.TRAINJOB_VERSION, c.TRAINJOB_KIND, c.TRAINJOB_PLURAL,
    install="Kubeflow Trainer v2 (TrainJob CRD trainjobs.trainer.kubeflow.org, with its ClusterTrainingRuntimes "
            "and JobSet)",
    suspend_path=("spec", "suspend"), pod_label=c.JOBSET_NAME_LABEL, container=c.TRAINJOB_CONTAINER,
)
JOBSET = Backend(
    c.BACKEND_JOBSET, c.JOBSET_GROUP, c.JOBSET_VERSION, c.JOBSET_KIND, c.JOBSET_PLURAL,
    install="the JobSet controller (JobSet CRD jobsets.jobset.x-k8s.io, v1alpha2)",
    suspend_path=("spec", "suspend"), pod_label=c.JOBSET_NAME_LABEL, container=c.CONTAINER_NAME,
)
BACKENDS: dict[str, Backend] = {b.name: b for b in (PYTORCHJOB, TRAINJOB, JOBSET)}
BY_KIND: dict[tuple[str, str], Backend] = {(b.api_version, b.kind): b for b in BACKENDS.values()}
assert tuple(BACKENDS) == c.BACKENDS


def backend_of(manifest: Mapping[str, Any]) -> Backend | None:
    """The backend whose kind `manifest` is, or None (a ConfigMap, a Role, ...)."""
    return BY_KIND.get((str(manifest.get("apiVersion")), str(manifest.get("kind"))))


# ------------------------------------------------------------------ the choice (pure)

REASON_NOT_INSTALLED = st.REASON_BACKEND_NOT_INSTALLED
REASON_NOT_ENABLED = st.REASON_BACKEND_NOT_ENABLED


@dataclass(frozen=True)
class Choice:
    backend: Backend
    how: str  # for status and the Event: "recorded", "spec.backend", "the operator's default", "auto: ..."


@dataclass(frozen=True)
class Refusal:
    """No backend can run this job now: Accepted=False with this reason and message."""

    reason: str
    message: str


def recorded_backend(job: Mapping[str, Any]) -> str | None:
    """The choice in status; a job started by an operator without backends (status.pytorchJob,
    no status.backend) ran on a PyTorchJob and keeps it."""
    status = job.get("status") or {}
    if status.get("backend") in BACKENDS:
        return str(status["backend"])
    if status.get("pytorchJob"):
        return c.BACKEND_PYTORCHJOB
    return None


def choose(
    requested: str | None,
    *,
    default: str,
    enabled: Collection[str],
    served: Callable[[], Collection[str]],
    recorded: str | None = None,
) -> Choice | Refusal:
    """The backend for a job. `requested`: spec.backend (None: the operator's `default`);
    `enabled`: what this operator may create (its RBAC); `served`: discovery, asked only when
    needed (a recorded choice asks nothing); `recorded`: the choice a previous reconcile made."""
    if recorded is not None:
        return Choice(BACKENDS[recorded], f"recorded when the job started ({recorded})")
    wanted = requested or default
    source = "spec.backend" if requested else "the operator's default backend"
    if wanted != c.BACKEND_AUTO:
        if wanted not in enabled:
            return Refusal(REASON_NOT_ENABLED, (
                f"{source} is {wanted}, which this operator is not allowed to use (enabled: "
                f"{', '.join(sorted(enabled))}); set spec.backend to one of those or auto, or have the "
                f"cluster admin add it to the chart's backend.enabled"))
        if wanted not in served():
            return Refusal(REASON_NOT_INSTALLED, (
                f"{source} is {wanted}, but this cluster does not serve {BACKENDS[wanted].kind} "
                f"({BACKENDS[wanted].api_version}): install {BACKENDS[wanted].install}, or set spec.backend "
                f"to one the cluster serves; the job starts by itself once the CRD appears"))
        return Choice(BACKENDS[wanted], source)
    candidates = [name for name in c.AUTO_PREFERENCE if name in enabled]
    available = set(served())
    for name in candidates:
        if name in available:
            return Choice(BACKENDS[name], f"auto: the cluster serves {BACKENDS[name].kind}; preferred order "
                                          f"{', '.join(candidates)}")
    needed = "; or ".join(BACKENDS[name].install for name in candidates)
    return Refusal(REASON_NOT_INSTALLED, (
        f"backend auto found none of {', '.join(BACKENDS[n].kind for n in candidates)} served by this cluster: "
        f"install {needed}; the job starts by itself once one of them is installed"))


def parse_enabled(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """--backends pytorchjob,jobset -> ("pytorchjob", "jobset"); unknown names are an error."""
    if value is None:
        return c.BACKENDS
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise ValueError(f"backends must be a comma-separated list of {', '.join(c.BACKENDS)} (got {value!r})")
    return tuple(dict.fromkeys(names))


# ------------------------------------------------------------------ discovery (the edge)


def served(kube: Any, backends: Iterable[Backend] = BACKENDS.values()) -> set[str]:
    """The backends whose kind this API server serves, by API discovery of each group/version
    (GET /apis/<group>/<version>: 404 when the CRD is not installed). Other errors propagate:
    an unreachable API server is retried, never read as "not installed"."""
    from .kube import ApiError

    out = set()
    for backend in backends:
        try:
            resources = kube.discover(backend.api_version)
        except ApiError as err:
            if err.not_found:
                continue
            raise
        if any(r.get("name") == backend.plural for r in resources):
            out.add(backend.name)
    return out


class Discovery:
    """`served`, remembered for `ttl` seconds when it found something (kinds rarely go away);
    an empty answer is never remembered, so a job waiting for a CRD sees it on its next retry.
    One per operator (the handlers' memo); thread-safe enough: a race asks discovery twice."""

    def __init__(self, ttl: float = 30.0, clock: Callable[[], float] | None = None):
        import time

        self.ttl = ttl
        self.clock = clock or time.monotonic
        self._found: tuple[float, frozenset[str]] | None = None

    def served(self, kube: Any) -> frozenset[str]:
        now = self.clock()
        if self._found is not None and now - self._found[0] < self.ttl:
            return self._found[1]
        found = frozenset(served(kube))
        self._found = (now, found) if found else None
        return found

    def forget(self) -> None:
        self._found = None
