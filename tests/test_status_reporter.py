"""The trainer's StatusReporter against the API emulator (real HTTP): what it sends, how often,
and that nothing the API server does can raise into training."""

from __future__ import annotations

import math
import threading

import pytest

from finetune_operator.testing.kube_emulator import wait_for
from finetune_trainer.status_reporter import StatusReporter, human_duration, progress_status

NOW = "2026-01-01T00:00:00Z"


def status_url(emulator, name="demo"):
    return f"{emulator.url}/apis/finetune.dev/v1alpha1/namespaces/default/finetunejobs/{name}/status"


def make_job(cluster, name="demo"):
    return cluster.apply_job(name, {"model": {"base_model": "x"}})


def progress_patches(emulator, name="demo"):
    return [r for r in emulator.requests()
            if r.subresource == "status" and r.name == name and str(r.method).upper().endswith("PATCH")]


@pytest.mark.parametrize(
    "update, expected",
    [
        ({"step": 5, "total_steps": 20, "epoch": 0.25, "loss": 1.5, "eval_loss": None, "learning_rate": 2e-4,
          "tokens_per_second": 900.0, "eta_seconds": 3900.0},
         {"step": 5, "totalSteps": 20, "epoch": 0.25, "loss": 1.5, "learningRate": 2e-4, "tokensPerSecond": 900.0,
          "estimatedRemainingSeconds": 3900.0, "eta": "1h05m", "progressPercentage": 25.0, "lastUpdatedTime": NOW}),
        ({"step": 25, "total_steps": 20}, {"step": 25, "totalSteps": 20, "progressPercentage": 100.0, "lastUpdatedTime": NOW}),
        ({"step": 1, "total_steps": 0}, {"step": 1, "totalSteps": 0, "lastUpdatedTime": NOW}),
        ({"loss": math.nan, "eval_loss": math.inf}, {"lastUpdatedTime": NOW}),
        ({}, {"lastUpdatedTime": NOW}),
    ],
    ids=["full", "past the end", "no total", "diverged loss", "empty"],
)
def test_progress_mapping(update, expected):
    assert progress_status(update, now=NOW) == expected


def test_checkpoint_and_human_eta():
    assert progress_status({}, now=NOW, checkpoint_uri="s3://b/c")["checkpointUri"] == "s3://b/c"
    assert [human_duration(s) for s in (0, 59, 61, 3600, 3661)] == ["0s", "59s", "1m01s", "1h00m", "1h01m"]


def test_from_env_is_off_outside_a_pod_or_off_rank_zero(tmp_path):
    assert StatusReporter.from_env({}) is None
    assert StatusReporter.from_env({"FINETUNE_STATUS_URL": "http://x", "RANK": "1"}) is None
    assert StatusReporter.from_env({"FINETUNE_STATUS_URL": "http://x",
                                    "FINETUNE_STATUS_TOKEN_FILE": str(tmp_path / "missing")}) is None


def test_throttled_newest_wins_last_always_sent(cluster, emulator, tmp_path):
    make_job(cluster)
    token = tmp_path / "token"
    token.write_text("tok")
    clock = [0.0]
    reporter = StatusReporter(status_url(emulator), token_file=str(token), min_interval=30.0, clock=lambda: clock[0])
    reporter({"step": 1, "total_steps": 100})  # sent at once: nothing sent before
    wait_for(lambda: reporter.sent == 1, what="the first patch")
    for step in range(2, 50):  # within the interval: held back, newest kept
        reporter({"step": step, "total_steps": 100})
    assert reporter.sent == 1 and reporter.coalesced == 47
    reporter.close()  # the last figures go out at the end regardless of the throttle
    assert reporter.sent == 2 and reporter.failed == 0
    assert cluster.job("demo")["status"]["progress"]["step"] == 49
    assert len(progress_patches(emulator)) == 2
    assert all(r.headers.get("Authorization") == "Bearer tok" for r in progress_patches(emulator))
    assert all(r.headers.get("Content-Type") == "application/merge-patch+json" for r in progress_patches(emulator))


def test_interval_elapsed_sends_again(cluster, emulator):
    make_job(cluster)
    clock = [0.0]
    reporter = StatusReporter(status_url(emulator), min_interval=10.0, clock=lambda: clock[0])
    reporter({"step": 1})
    wait_for(lambda: reporter.sent == 1, what="the first patch")
    clock[0] = 11.0
    reporter({"step": 2})
    wait_for(lambda: reporter.sent == 2, what="the second patch")
    reporter.close()
    assert cluster.job("demo")["status"]["progress"]["step"] == 2


def test_the_model_goes_out_as_status_model(cluster, emulator):
    """set_model (train.py, once the model is fetched): status.model, beside the progress."""
    make_job(cluster)
    reporter = StatusReporter(status_url(emulator), min_interval=0.0)
    reporter.set_model({"source": "org/model", "revision": "0123456789abcdef0123456789abcdef01234567"})
    wait_for(lambda: reporter.sent == 1, what="the model's patch")
    reporter({"step": 3})
    reporter.close()
    status = cluster.job("demo")["status"]
    assert status["model"] == {"source": "org/model", "revision": "0123456789abcdef0123456789abcdef01234567"}
    assert status["progress"]["step"] == 3 and reporter.failed == 0


def test_api_errors_never_reach_training(emulator):
    # No such job: the API answers 404 to every patch; the trainer's calls still return at once.
    reporter = StatusReporter(status_url(emulator, "missing"), min_interval=0.0)
    for step in range(5):
        reporter({"step": step})
    reporter.close()
    assert reporter.sent == 0 and reporter.failed >= 1 and "404" in reporter.last_error


def test_unreachable_api_and_bad_token_file_never_raise(tmp_path):
    reporter = StatusReporter("http://127.0.0.1:9/apis/x/status", token_file=str(tmp_path / "gone"),
                              min_interval=0.0, timeout=1.0)
    reporter({"step": 1})
    reporter.close()
    assert reporter.failed == 1 and reporter.sent == 0


def test_a_hanging_api_does_not_block_the_trainer(emulator):
    hold = threading.Event()

    async def slow(request):
        if request.subresource == "status":
            import asyncio
            await asyncio.get_running_loop().run_in_executor(None, hold.wait, 120)

    emulator.call(lambda: emulator.emulator.hooks.append(slow))
    reporter = StatusReporter(status_url(emulator, "missing"), min_interval=0.0, timeout=60)
    try:
        for step in range(100):
            reporter({"step": step})
        # all 100 queued while the API had answered nothing at all: queuing never waits for the network
        assert (reporter.sent, reporter.failed) == (0, 0)
    finally:
        hold.set()
        reporter.close(timeout=60)
    assert reporter.failed >= 1  # the job is missing: refused once the API answers
