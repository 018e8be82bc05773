"""The operator's /metrics (finetune_operator/metrics.py): scraped over HTTP from the real
operator while jobs run against the API emulator, parsed with prometheus_client's own parser.
(Per-job series come from a LIST at scrape time: the emulator's watch does not bring kopf the
DELETED events, so a watch-fed table could not be shown to drop deleted jobs here.)

Phase counts follow jobs Running -> Succeeded, per-job gauges equal what status says (the
trainer's reporter writes status.progress over HTTP as it does in a pod), a deleted job's
series disappear, and reconcile durations, API errors and Events are counted. The mapping from
status to samples is also checked as the pure function it is."""

from __future__ import annotations

import datetime
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from finetune_operator import metrics as m
from finetune_operator.testing.kube_emulator import pytorchjob_conditions, wait_for
from finetune_trainer.status_reporter import StatusReporter
from test_operator_integration import spec

FTJ = ("finetune.dev/v1alpha1", "FineTuneJob")


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} from one GET of /metrics."""
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def scrape_until(url: str, holds, what: str) -> dict[str, dict[tuple, float]]:
    """Scrape until `holds(samples)`: the table follows the watch, a moment after the API."""
    return wait_for(lambda: (lambda samples: samples if holds(samples) else None)(scrape(url)), what=what)


def job_labels(name: str, namespace: str = "default") -> tuple:
    return (("name", name), ("namespace", namespace))


def phase_count(samples, phase: str) -> float:
    return sum(v for labels, v in samples.get(m.JOBS, {}).items() if dict(labels)["phase"] == phase)


def report(emulator, tmp_path: Path, name: str, update: dict, checkpoint: str | None = None) -> None:
    token = tmp_path / "token"
    token.write_text("test-token\n")
    url = f"{emulator.url}/apis/finetune.dev/v1alpha1/namespaces/default/finetunejobs/{name}/status"
    reporter = StatusReporter.from_env({"FINETUNE_STATUS_URL": url, "FINETUNE_STATUS_TOKEN_FILE": str(token)},
                                       min_interval=0.0)
    if checkpoint:
        reporter.set_checkpoint(checkpoint)
    reporter(update)
    reporter.close()
    # set_checkpoint wakes the sender: it may go out alone, a patch before the update's
    assert reporter.failed == 0 and reporter.sent in (1, 2), (reporter.sent, reporter.failed, reporter.last_error)


def test_phases_gauges_and_deletion_as_scraped(cluster, emulator, operator, tmp_path):
    url = operator.metrics_url
    for name in ("alpha", "beta"):
        cluster.apply_job(name, spec(tmp_path))
        wait_for(lambda n=name: cluster.pytorchjob(n), what=f"the PyTorchJob {name}")
    for name in ("alpha", "beta"):
        cluster.set_pytorchjob_status(name, pytorchjob_conditions("Created", "Running"))
        cluster.wait_condition(name, "Running", "True")
    samples = scrape_until(url, lambda s: phase_count(s, "Running") == 2, "2 Running")
    assert samples[m.JOBS][(("backend", "pytorchjob"), ("phase", "Running"))] == 2

    report(emulator, tmp_path, "alpha", {"step": 7, "total_steps": 20, "loss": 1.25, "tokens_per_second": 512.0,
                                         "eta_seconds": 91.0},
           checkpoint=f"file://{tmp_path}/store/default/alpha/checkpoints/checkpoint-5")
    progress = cluster.job("alpha")["status"]["progress"]
    samples = scrape_until(url, lambda s: s.get("finetune_job_step", {}).get(job_labels("alpha")) == 7,
                           "alpha's step in /metrics")
    assert samples["finetune_job_step"][job_labels("alpha")] == progress["step"]
    assert samples["finetune_job_total_steps"][job_labels("alpha")] == progress["totalSteps"]
    assert samples["finetune_job_loss"][job_labels("alpha")] == progress["loss"]
    assert samples["finetune_job_tokens_per_second"][job_labels("alpha")] == progress["tokensPerSecond"]
    assert samples["finetune_job_eta_seconds"][job_labels("alpha")] == progress["estimatedRemainingSeconds"]
    assert 0 <= samples["finetune_job_checkpoint_age_seconds"][job_labels("alpha")] < 60
    assert job_labels("beta") not in samples.get("finetune_job_step", {})  # nothing reported: no made-up 0
    assert samples[m.JOB_PHASE][(("name", "alpha"), ("namespace", "default"), ("phase", "Running"))] == 1

    cluster.set_pytorchjob_status("alpha", pytorchjob_conditions("Created", "Succeeded"))
    cluster.wait_condition("alpha", "Succeeded", "True", reason="Completed")
    samples = scrape_until(url, lambda s: phase_count(s, "Succeeded") == 1, "1 Succeeded")
    assert phase_count(samples, "Running") == 1
    assert samples[m.JOB_PHASE][(("name", "alpha"), ("namespace", "default"), ("phase", "Succeeded"))] == 1

    cluster.kube.delete(*FTJ, "default", "alpha")
    samples = scrape_until(url, lambda s: job_labels("alpha") not in s.get("finetune_job_step", {})
                           and phase_count(s, "Succeeded") == 0, "alpha's series gone")
    assert not [labels for name in m.EXPORTED for labels in samples.get(name, {}) if ("name", "alpha") in labels]
    assert phase_count(samples, "Running") == 1  # beta is still there

    reconciles = samples[f"{m.RECONCILE_SECONDS}_count"][(("handler", "reconcile"),)]
    assert reconciles >= 2
    assert samples[f"{m.RECONCILE_SECONDS}_count"][(("handler", "workload_event"),)] >= 1
    posted = {(dict(labels)["type"], dict(labels)["reason"]): v for labels, v in samples[m.EVENTS].items()}
    assert posted[("Normal", "BackendSelected")] == 2, posted
    # counted what was posted; kopf sends Events from its own queue, a moment after counting them
    def seen():
        return {(e["type"], e["reason"]) for name in ("alpha", "beta") for e in cluster.events(name)}

    wait_for(lambda: set(posted) <= seen() | {("Normal", "BackendSelected")}, what=f"the Events {sorted(posted)}")


def test_api_errors_are_counted_by_code_and_a_missing_object_is_none(cluster, emulator, tmp_path):
    from finetune_operator.kube import ApiError
    from finetune_operator.testing.kube_emulator import OperatorThread, is_create

    op = OperatorThread(emulator.url).start()
    try:
        kube = op.memo.kube

        def errors() -> dict[tuple, float]:
            return scrape(op.metrics_url).get(m.API_ERRORS, {})

        before = errors()
        # a 404 that get and delete answer with (None: not there) is no API error
        assert kube.get(*FTJ, "default", "nosuchjob") is None
        kube.delete(*FTJ, "default", "nosuchjob")
        assert errors().get((("code", "404"),), 0) == before.get((("code", "404"),), 0)
        # a 404 a call fails with, and any other status, is
        with pytest.raises(ApiError) as not_served:
            kube.discover("nosuch.finetune.dev/v1")
        emulator.fail(is_create("configmaps"), times=1, status=503)
        with pytest.raises(ApiError) as unavailable:
            kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "default"}})
        assert (not_served.value.status, unavailable.value.status) == (404, 503)
        after = errors()
        for code in ("404", "503"):
            assert after[(("code", code),)] == before.get((("code", code),), 0) + 1, (code, before, after)
    finally:
        op.stop()


# ------------------------------------------------------------------ the pure mapping


def test_job_families_map_status_to_samples_and_leave_missing_values_out():
    now = datetime.datetime(2026, 12, 1, 12, 0, 30, tzinfo=datetime.UTC).timestamp()
    jobs = {
        ("team-a", "one"): {"phase": "Running", "backend": "jobset",
                            "progress": {"step": 3, "totalSteps": 10, "loss": 2.0, "checkpointTime": "2026-12-01T12:00:00Z"},
                            "workload": {"restarts": 2}},
        ("team-a", "two"): {"phase": "Running", "backend": "jobset",
                            "workload": {"replicaStatuses": {"Master": {"failed": 1}, "Worker": {"failed": 2}}}},
        ("team-b", "three"): {},
    }
    families = {f.name: f for f in m.job_families(jobs, now)}
    jobs_by = {tuple(s.labels.values()): s.value for s in families[m.JOBS].samples}
    assert jobs_by == {("Running", "jobset"): 2, (m.UNKNOWN, m.UNKNOWN): 1}
    values = {(n, s.labels["name"]): s.value for n in m.JOB_GAUGES for s in families[n].samples}
    assert values[("finetune_job_checkpoint_age_seconds", "one")] == 30
    assert values[("finetune_job_restarts", "one")] == 2 and values[("finetune_job_restarts", "two")] == 3
    assert ("finetune_job_loss", "two") not in values and ("finetune_job_step", "three") not in values
    assert set(families) == set(m.EXPORTED) - {m.RECONCILE_SECONDS, m.API_ERRORS, m.EVENTS}
