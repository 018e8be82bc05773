"""`finetune operator`: kopf with the settings this operator needs, and the handlers' memo.

Everything kopf needs is passed explicitly (settings, memo, registry, scope), so the tests and
the benchmark start the very same operator in a thread with `operator_kwargs(...)`.
"""

from __future__ import annotations

import argparse
import collections
import logging
from typing import Any

import kopf

from .kube import RETRY_DELAY, Kube
from .render import RenderSettings
from .spec import GROUP

WORKERS = 16  # threads for the (synchronous) handlers and their API calls
WATCH_SERVER_TIMEOUT = 600  # seconds: each watch restart relists, which resyncs every status


def load_configuration() -> Any:
    """In-cluster ServiceAccount first, then the kubeconfig (the official client's loaders)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    return configuration


class ObservedGenerationDiffBase(kopf.DiffBaseStorage):
    """kopf's "last handled state", kept out of the object: a FineTuneJob whose
    status.observedGeneration (written by every reconcile, with its verdict) equals its
    metadata.generation has been handled as it is now; one that does not (new, or its spec
    changed since) has not, and kopf runs the reconcile for it. What this process handled is
    also remembered (uid -> generation): a watch can still deliver an older body, from before
    the status write, and that generation must not be reconciled twice. The default storage
    wrote the whole spec into an annotation after every reconcile: one more write per job,
    each validated against the whole CRD schema by a real API server."""

    def __init__(self) -> None:
        super().__init__()
        self._handled: dict[str, Any] = {}

    def fetch(self, *, body: Any) -> Any:
        meta = body.get("metadata") or {}
        generation = meta.get("generation")
        observed = (body.get("status") or {}).get("observedGeneration")
        if generation is not None and generation in (observed, self._handled.get(str(meta.get("uid")))):
            return self.build(body=body)
        return None

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        meta = body.get("metadata") or {}  # the reconcile's status write is the durable record
        self._handled[str(meta.get("uid"))] = meta.get("generation")


class MemoryProgressStorage(kopf.AnnotationsProgressStorage):
    """kopf's per-handler progress (retry counts, backoff deadlines) in this process's memory,
    not in the object: a reconcile that succeeds at once writes nothing here. Only `touch`,
    kopf's way to wake itself when a retry is due, still writes its annotation. Lost on a
    restart, which costs a failing reconcile its backoff, nothing else (kopf's own docs call
    the progress a cache of handler state)."""

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix=prefix)
        self._records: dict[tuple[str, str], Any] = {}

    @staticmethod
    def _uid(body: Any) -> str:
        return str((body.get("metadata") or {}).get("uid") or "")

    def fetch(self, *, key: Any, body: Any) -> Any:
        return self._records.get((self._uid(body), str(key)))

    def store(self, *, key: Any, record: Any, body: Any, patch: Any) -> None:
        self._records[(self._uid(body), str(key))] = dict(record)

    def purge(self, *, key: Any, body: Any, patch: Any) -> None:
        self._records.pop((self._uid(body), str(key)), None)


def operator_settings(*, peering: str | None, standalone: bool, workers: int = WORKERS) -> kopf.OperatorSettings:
    """kopf's knobs, each for a reason."""
    settings = kopf.OperatorSettings()
    # kopf's bookkeeping stays out of the object: handler progress in memory, the last-handled
    # spec not stored at all (observedGeneration says it; both classes above). A new job costs
    # one status write, no annotation patch. Status belongs to the conditions and progress.
    settings.persistence.progress_storage = MemoryProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = ObservedGenerationDiffBase()
    # Our Events (one per condition transition) are posted explicitly; kopf's own log lines
    # become Events only from warnings up, so `kubectl describe` is not a log dump.
    settings.posting.enabled = True
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "finetune-operator"
    settings.execution.max_workers = workers
    settings.watching.server_timeout = WATCH_SERVER_TIMEOUT
    settings.watching.client_timeout = WATCH_SERVER_TIMEOUT + 60
    settings.peering.standalone = standalone
    if peering:
        settings.peering.name = peering
        settings.peering.mandatory = True
    return settings


def make_memo(kube: Kube, render_settings: RenderSettings, *, retry_delay: float = RETRY_DELAY,
              metrics_address: str | None = None, namespaces: list[str] | None = None) -> kopf.Memo:
    """What every handler gets as `memo` (kopf gives each object a shallow copy, so the
    counters live in a shared dict): the API client, the render settings, counters, the
    discovery cache `auto` asks which backends the cluster serves, and the Prometheus metrics
    (served at `metrics_address` from startup to cleanup; None: not served)."""
    from .backends import Discovery
    from .metrics import OperatorMetrics

    from .spec import API_VERSION, KIND

    def list_jobs() -> list[dict[str, Any]]:  # the namespaces this operator watches, or all
        return [job for ns in (namespaces or [None]) for job in kube.list(API_VERSION, KIND, ns)]

    metrics = OperatorMetrics(list_jobs=list_jobs)
    kube.on_error = metrics.api_error
    return kopf.Memo(kube=kube, render_settings=render_settings, retry_delay=retry_delay,
                     stats=collections.Counter(), discovery=Discovery(), metrics=metrics,
                     metrics_address=metrics_address, metrics_server=None)


def operator_kwargs(
    *,
    kube: Kube,
    render_settings: RenderSettings,
    namespaces: list[str] | None = None,
    peering: str | None = None,
    standalone: bool = False,
    liveness: str | None = None,
    metrics_address: str | None = None,
    priority: int | None = None,
    retry_delay: float = RETRY_DELAY,
    workers: int = WORKERS,
) -> dict[str, Any]:
    """Arguments for kopf.run / kopf.operator: the handlers' registry, scope, peering, memo."""
    from . import handlers  # noqa: F401  (importing registers the handlers on kopf's default registry)

    return dict(
        registry=kopf.get_default_registry(),
        settings=operator_settings(peering=peering, standalone=standalone, workers=workers),
        memo=make_memo(kube, render_settings, retry_delay=retry_delay, metrics_address=metrics_address,
                       namespaces=namespaces),
        clusterwide=not namespaces,
        namespaces=list(namespaces or []),
        standalone=standalone or None,
        peering_name=peering,
        priority=priority,
        liveness_endpoint=liveness,
    )


def run_operator(args: argparse.Namespace) -> int:
    """The entry point of `finetune operator` (blocks until SIGTERM/SIGINT)."""
    logging.basicConfig(
        level=getattr(logging, str(getattr(args, "log_level", "info")).upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    kwargs = operator_kwargs(
        kube=Kube(load_configuration()),
        render_settings=RenderSettings.from_args(args),
        namespaces=[] if getattr(args, "all_namespaces", False) else list(getattr(args, "namespace", None) or []),
        peering=getattr(args, "peering", None),
        standalone=bool(getattr(args, "standalone", False)),
        liveness=getattr(args, "liveness", None),
        metrics_address=getattr(args, "metrics_address", None) or None,
        priority=getattr(args, "priority", None),
    )
    kopf.run(**kwargs)
    return 0
