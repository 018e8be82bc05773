"""The operator's Prometheus metrics, served at /metrics in the text format (prometheus_client).

    operator-wide   finetune_jobs{phase,backend}: live FineTuneJobs per phase (from status);
                    finetune_reconcile_duration_seconds{handler}: histogram of handler time;
                    finetune_api_errors_total{code}: Kubernetes API calls that failed (0: no answer);
                    finetune_events_total{type,reason}: Events posted on FineTuneJobs
    per job         finetune_job_{step,total_steps,loss,tokens_per_second,eta_seconds,
                    checkpoint_age_seconds,restarts}{namespace,name} and finetune_job_phase
                    {namespace,name,phase} (1): what `status` says, for live jobs only

Per-job series are computed at scrape time from one LIST of the FineTuneJobs the operator
watches (a scrape every 30 s is one cheap read), so they are exactly what status says, label
cardinality is the live jobs, and a deleted job's series disappear with it. A LIST that fails is
counted in finetune_api_errors_total and that scrape shows no per-job series. `job_families` is
pure: status in, metric families out.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

JOBS = "finetune_jobs"
RECONCILE_SECONDS = "finetune_reconcile_duration_seconds"
API_ERRORS = "finetune_api_errors_total"
EVENTS = "finetune_events_total"
JOB_PHASE = "finetune_job_phase"
UNKNOWN = "unknown"


def _seconds_since(stamp: Any, now: float) -> float | None:
    if not isinstance(stamp, str):
        return None
    try:
        when = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(now - when.timestamp(), 0.0)


def restarts(status: Mapping[str, Any]) -> int:
    workload = status.get("workload") or status.get("pytorchJob") or {}
    if "restarts" in workload:
        return int(workload.get("restarts") or 0)
    return sum(int((r or {}).get("failed") or 0) for r in (workload.get("replicaStatuses") or {}).values())


@dataclass(frozen=True)
class JobGauge:
    """A per-job gauge's help text and `read(status, now)`: its value, or None where status has none."""

    help: str
    read: Callable[[Mapping[str, Any], float], Any]


def _progress(what: str, key: str, value: Callable[[Any, float], Any] = lambda v, now: v) -> JobGauge:
    """A gauge of status.progress.<key> (its help names the field it reads)."""
    return JobGauge(f"{what} (status.progress.{key}).",
                    lambda status, now: value((status.get("progress") or {}).get(key), now))


# The per-job gauges, by name: the one table job_families declares them from and job_values reads them by.
JOB_GAUGES: dict[str, JobGauge] = {
    "finetune_job_step": _progress("Optimizer steps done", "step"),
    "finetune_job_total_steps": _progress("Optimizer steps the run will take", "totalSteps"),
    "finetune_job_loss": _progress("Latest training loss", "loss"),
    "finetune_job_tokens_per_second": _progress("Training throughput", "tokensPerSecond"),
    "finetune_job_eta_seconds": _progress("Time to the end of training at the current pace",
                                          "estimatedRemainingSeconds"),
    "finetune_job_checkpoint_age_seconds": _progress("Seconds since the newest checkpoint reached storage",
                                                     "checkpointTime", _seconds_since),
    "finetune_job_restarts": JobGauge("Times the workload restarted (JobSet restarts, or failed pods of a PyTorchJob).",
                                      lambda status, now: restarts(status)),
}
# every metric name a scrape can show (the dashboard's queries are checked against it)
EXPORTED = (JOBS, RECONCILE_SECONDS, API_ERRORS, EVENTS, JOB_PHASE, *JOB_GAUGES)


def job_values(status: Mapping[str, Any], now: float) -> dict[str, float]:
    """The per-job gauges a status shows (a value missing from status is left out, not 0)."""
    raw = {name: gauge.read(status, now) for name, gauge in JOB_GAUGES.items()}
    return {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def job_families(jobs: Mapping[tuple[str, str], Mapping[str, Any]], now: float) -> list[Any]:
    """Metric families for the live jobs: {(namespace, name): status}."""
    from prometheus_client.core import GaugeMetricFamily

    counts = GaugeMetricFamily(JOBS, "FineTuneJobs by phase and backend (status.phase, status.backend).",
                               labels=["phase", "backend"])
    tally: dict[tuple[str, str], int] = {}
    phase = GaugeMetricFamily(JOB_PHASE, "1 for the phase each FineTuneJob is in.", labels=["namespace", "name", "phase"])
    gauges = {n: GaugeMetricFamily(n, g.help, labels=["namespace", "name"]) for n, g in JOB_GAUGES.items()}
    for (namespace, name), status in sorted(jobs.items()):
        key = (str(status.get("phase") or UNKNOWN), str(status.get("backend") or UNKNOWN))
        tally[key] = tally.get(key, 0) + 1
        phase.add_metric([namespace, name, key[0]], 1)
        for metric, value in job_values(status, now).items():
            gauges[metric].add_metric([namespace, name], value)
    for (p, b), n in sorted(tally.items()):
        counts.add_metric([p, b], n)
    return [counts, phase, *gauges.values()]


@dataclass
class OperatorMetrics:
    """The registry one operator serves; `list_jobs` reads the live FineTuneJobs at scrape time."""

    list_jobs: Callable[[], Iterable[Mapping[str, Any]]] = lambda: ()
    registry: Any = None

    def __post_init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = self.registry or CollectorRegistry()
        self.reconcile_seconds = Histogram(RECONCILE_SECONDS, "Time a handler took, by handler.", ["handler"],
                                           registry=self.registry)
        self.api_errors = Counter(API_ERRORS, "Kubernetes API calls that failed, by HTTP status (0: no answer).",
                                  ["code"], registry=self.registry)
        self.events = Counter(EVENTS, "Events posted on FineTuneJobs, by type and reason.", ["type", "reason"],
                              registry=self.registry)
        self.registry.register(_JobCollector(self))

    def jobs(self) -> dict[tuple[str, str], dict[str, Any]]:
        """{(namespace, name): status} of the live jobs; {} when the API cannot be read."""
        try:
            items = list(self.list_jobs())
        except Exception:  # noqa: BLE001 - the client counted it; a scrape never fails on it
            return {}
        return {(str((j.get("metadata") or {}).get("namespace") or ""), str((j.get("metadata") or {}).get("name") or "")):
                dict(j.get("status") or {}) for j in items}

    def timed(self, handler: str) -> Any:
        return self.reconcile_seconds.labels(handler=handler).time()

    def api_error(self, code: int) -> None:
        self.api_errors.labels(code=str(code)).inc()

    def event(self, event_type: str, reason: str) -> None:
        self.events.labels(type=event_type, reason=reason).inc()


class _JobCollector:
    def __init__(self, metrics: OperatorMetrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        yield from job_families(self.metrics.jobs(), time.time())

    def describe(self) -> Iterable[Any]:
        return []  # computed at scrape time; nothing to check at registration


def parse_address(address: str) -> tuple[str, int]:
    """'0.0.0.0:8081' (or ':8081', or '8081') -> (host, port); ValueError naming the form otherwise,
    so `--metrics-address` is checked when it is parsed, not when the server starts."""
    host, _, port = address.rpartition(":")
    if not (port.isascii() and port.isdigit() and int(port) <= 65535) or any(ch.isspace() for ch in host):
        raise ValueError(f"{address!r}: expected HOST:PORT with a PORT from 0 to 65535")
    return host or "0.0.0.0", int(port)


def serve(metrics: OperatorMetrics, address: str) -> Any:
    """Start /metrics on `address` in a daemon thread; returns the server (.server_port, .shutdown())."""
    from prometheus_client import start_http_server

    host, port = parse_address(address)
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server
