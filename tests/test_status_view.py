"""`finetune status`: the table drawn from status (pure), and the real command reading the API
emulator through a kubeconfig while the trainer's real reporter writes progress over HTTP."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import yaml

from finetune_operator.status_view import progress_bar, show, sparkline, status_lines
from finetune_operator.testing.kube_emulator import pytorchjob_conditions, wait_for
from finetune_trainer.status_reporter import StatusReporter
from test_operator_integration import spec


def test_sparkline_spans_the_series_and_the_bar_fills_with_the_steps():
    assert sparkline([3.0, 2.0, 1.0, 2.0]) == "█▄▁▄"
    assert sparkline([1.0, 1.0]) == "▁▁" and sparkline([]) == ""
    assert progress_bar(5, 20, width=10) == "[###-------]  25%"
    assert progress_bar(None, None, width=4) == "[    ]    -"


def test_the_table_has_a_row_per_job_sorted_and_says_when_there_are_none():
    jobs = [
        {"metadata": {"namespace": "b", "name": "two"}, "status": {"phase": "Succeeded", "progress": {
            "step": 20, "totalSteps": 20, "loss": 0.5, "lossHistory": [2.0, 1.0, 0.5], "eta": "0s"}}},
        {"metadata": {"namespace": "a", "name": "one"}},
    ]
    header, first, second = status_lines(jobs)
    assert header.split()[:3] == ["NAMESPACE", "NAME", "PHASE"]
    assert first.split()[:3] == ["a", "one", "Pending"]
    assert "20/20" in second and "0.5000" in second and "█▃▁" in second and "100%" in second
    assert status_lines([]) == ["No FineTuneJobs found."]


def _kubeconfig(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "me", "user": {"token": "t"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "me"}}],
    }))
    return path


def _finetune(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    finetune = Path(sys.executable).parent / "finetune"
    return subprocess.run([str(finetune), "status", *args], env=env, capture_output=True, text=True, timeout=60)


def test_degraded_uploads_and_trackers_are_said_under_the_table():
    job = {"metadata": {"namespace": "a", "name": "j"}, "status": {"phase": "Running", "progress": {
        "step": 3, "totalSteps": 10, "trackerDegraded": True, "trackerError": "mlflow: start: ConnectionError",
        "storageDegraded": False}}}
    lines = status_lines([job])
    assert lines[-1] == "! a/j: experiment tracker not reachable: mlflow: start: ConnectionError"
    assert len(lines) == 3  # header, row, one warning (storage is fine)


def test_finetune_status_reads_the_cluster(cluster, emulator, operator, tmp_path):
    cluster.apply_job("demo", spec(tmp_path))
    cluster.apply_job("idle", spec(tmp_path))
    wait_for(lambda: cluster.pytorchjob("demo"), what="the PyTorchJob")
    cluster.set_pytorchjob_status("demo", pytorchjob_conditions("Created", "Running"))
    cluster.wait_condition("demo", "Running", "True")
    token = tmp_path / "token"
    token.write_text("t\n")
    url = f"{emulator.url}/apis/finetune.dev/v1alpha1/namespaces/default/finetunejobs/demo/status"
    reporter = StatusReporter.from_env({"FINETUNE_STATUS_URL": url, "FINETUNE_STATUS_TOKEN_FILE": str(token)},
                                       min_interval=0.0)
    for step, loss in [(1, 2.5), (2, 2.1), (3, 1.8), (4, 1.9), (7, 1.2)]:
        reporter({"step": step, "total_steps": 20, "loss": loss, "tokens_per_second": 250.0,
                  "eta_seconds": 52.0 * (20 - step) / 13})
    reporter.close()
    assert wait_for(lambda: (cluster.job("demo")["status"].get("progress") or {}).get("step") == 7, what="step 7")
    assert cluster.job("demo")["status"]["progress"]["lossHistory"][-1] == 1.2

    kubeconfig = _kubeconfig(tmp_path, emulator.url)
    done = _finetune(kubeconfig)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    (demo,) = [line for line in lines if " demo " in f" {line} "]
    assert "Running" in demo and "7/20" in demo and "1.2000" in demo and "250.0" in demo and " 35%" in demo
    assert any(c in demo for c in "▁▂▃▄▅▆▇█")
    assert any(line.split()[1] == "idle" for line in lines[1:])

    one = _finetune(kubeconfig, "demo")
    assert one.returncode == 0 and len(one.stdout.splitlines()) == 2
    missing = _finetune(kubeconfig, "nosuch")
    assert missing.returncode == 1 and "default/nosuch not found" in missing.stderr

    drawn = io.StringIO()
    from finetune_operator.kube import Kube
    from finetune_operator.testing.kube_emulator import api_configuration

    assert show(Kube(api_configuration(emulator.url)), namespace="default", name=None, watch=True, interval=0.0,
                out=drawn, rounds=2) == 0
    assert drawn.getvalue().count("\x1b[H\x1b[2J") == 1 and drawn.getvalue().count("NAMESPACE") == 2
    (Path(os.environ.get("FINETUNE_STATUS_CAPTURE", tmp_path / "capture.txt"))).write_text(done.stdout)
