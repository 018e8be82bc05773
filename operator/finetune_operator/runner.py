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


def operator_settings(*, peering: str | None, standalone: bool, workers: int = WORKERS) -> kopf.OperatorSettings:
    """kopf's knobs, each for a reason."""
    settings = kopf.OperatorSettings()
    # Handler progress and the last-handled spec live in our annotations, never in status:
    # status belongs to the conditions (and to the trainer's progress).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
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


def make_memo(kube: Kube, render_settings: RenderSettings, *, retry_delay: float = RETRY_DELAY) -> kopf.Memo:
    """What every handler gets as `memo` (kopf gives each object a shallow copy, so the
    counters live in a shared dict): the API client, the render settings, counters."""
    return kopf.Memo(kube=kube, render_settings=render_settings, retry_delay=retry_delay,
                     stats=collections.Counter())


def operator_kwargs(
    *,
    kube: Kube,
    render_settings: RenderSettings,
    namespaces: list[str] | None = None,
    peering: str | None = None,
    standalone: bool = False,
    liveness: str | None = None,
    priority: int | None = None,
    retry_delay: float = RETRY_DELAY,
    workers: int = WORKERS,
) -> dict[str, Any]:
    """Arguments for kopf.run / kopf.operator: the handlers' registry, scope, peering, memo."""
    from . import handlers  # noqa: F401  (importing registers the handlers on kopf's default registry)

    return dict(
        registry=kopf.get_default_registry(),
        settings=operator_settings(peering=peering, standalone=standalone, workers=workers),
        memo=make_memo(kube, render_settings, retry_delay=retry_delay),
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
        priority=getattr(args, "priority", None),
    )
    kopf.run(**kwargs)
    return 0
