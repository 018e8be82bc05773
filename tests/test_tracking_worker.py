"""The tracker worker and the records, without a tracker library: a recording tracker whose
calls can fail or hang on purpose, a real thread, a fake clock only where backoff would wait."""

from __future__ import annotations

import threading

import pytest

from finetune_trainer.config import ConfigError, FineTuneConfig
from finetune_trainer.tracking import Tracking, missing_packages, open_tracking, read_state
from finetune_trainer.tracking.records import evaluation_markdown, figures, flatten, job_tags, run_name
from finetune_trainer.tracking.worker import TrackerWorker, backoff


class Recorder:
    """A tracker that records its calls; `fail` maps a method to how many calls of it fail."""

    name = "recorder"
    replays_history = False

    def __init__(self, fail: dict[str, int] | None = None, hang: threading.Event | None = None):
        self.calls: list[tuple] = []
        self.fail = dict(fail or {})
        self.hang = hang
        self.done = threading.Event()

    def _call(self, method, *args):
        if self.hang is not None:
            self.hang.wait()
        if self.fail.get(method, 0) > 0:
            self.fail[method] -= 1
            raise ConnectionError(f"{method} refused")
        self.calls.append((method, *args))
        if method == "finish":
            self.done.set()

    def start(self, state):
        self._call("start", state)
        return {"run_id": "r-1"}

    def __getattr__(self, method):
        return lambda *args: self._call(method, *args)


def test_calls_arrive_in_order_and_start_state_is_kept():
    tracker = Recorder()
    worker = TrackerWorker(tracker)
    worker.submit("start", None)
    for step in (1, 2, 3):
        worker.submit("log_metrics", {"loss": 1.0 / step}, step, 0.0)
    worker.submit("finish", True)
    status = worker.close(timeout=30)
    assert [c[0] for c in tracker.calls] == ["start", "log_metrics", "log_metrics", "log_metrics", "finish"]
    assert [c[2] for c in tracker.calls if c[0] == "log_metrics"] == [1, 2, 3]
    assert worker.state == {"run_id": "r-1"}
    assert (status.started, status.degraded, status.pending, status.dropped) == (True, False, 0, 0)


def test_start_is_retried_until_it_works_and_nothing_queued_is_lost():
    tracker = Recorder(fail={"start": 2})
    worker = TrackerWorker(tracker, retry_first=0.01)
    worker.submit("start", None)
    worker.submit("log_metrics", {"loss": 2.0}, 1, 0.0)
    worker.submit("finish", True)
    assert tracker.done.wait(30)
    status = worker.close(timeout=5)
    assert [c[0] for c in tracker.calls] == ["start", "log_metrics", "finish"]
    assert not status.degraded and status.last_error is None  # recovered


def test_a_call_that_keeps_failing_is_dropped_and_counted(caplog):
    tracker = Recorder(fail={"log_evaluation": 99})
    worker = TrackerWorker(tracker, retry_first=0.001)
    worker.submit("start", None)
    worker.submit("log_evaluation", [])
    worker.submit("finish", True)
    assert tracker.done.wait(30)
    status = worker.close(timeout=5)
    assert [c[0] for c in tracker.calls] == ["start", "finish"]
    assert status.dropped == 1
    assert "log_evaluation failed (ConnectionError: log_evaluation refused)" in caplog.text


def test_a_full_queue_drops_the_oldest_metrics_not_the_start():
    gate = threading.Event()
    tracker = Recorder(hang=gate)
    worker = TrackerWorker(tracker, max_pending=3)
    worker.submit("start", None)  # taken by the thread, which now hangs in it
    for step in range(1, 7):
        worker.submit("log_metrics", {"loss": 1.0}, step, 0.0)
    worker.submit("finish", True)
    gate.set()
    assert tracker.done.wait(30)
    status = worker.close(timeout=5)
    kept = [c[2] for c in tracker.calls if c[0] == "log_metrics"]
    assert kept[-1] == 6 and len(kept) < 6 and status.dropped == 6 - len(kept)
    assert tracker.calls[0][0] == "start" and tracker.calls[-1][0] == "finish"


def test_the_call_on_its_way_is_never_dropped_nor_another_lost_for_it():
    """A hanging tracker holds one metrics call while the queue overflows: that call is delivered
    once it returns, and every other call is delivered or counted dropped, none lost uncounted."""
    gate, entered = threading.Event(), threading.Event()
    tracker = Recorder()

    def log_metrics(metrics, step, epoch):
        if step == 1:
            entered.set()
            assert gate.wait(30)
        tracker.calls.append(("log_metrics", metrics, step, epoch))

    tracker.log_metrics = log_metrics
    worker = TrackerWorker(tracker, max_pending=3)
    worker.submit("start", None)
    worker.submit("log_metrics", {"loss": 1.0}, 1, 0.0)
    assert entered.wait(30)  # step 1 is on its way, the head of the queue
    worker.submit("log_evaluation", [])  # metrics go first when the queue is full: this one stays
    for step in range(2, 9):
        worker.submit("log_metrics", {"loss": 1.0}, step, 0.0)
    worker.submit("finish", True)
    gate.set()
    assert tracker.done.wait(30)
    status = worker.close(timeout=5)
    assert [c[0] for c in tracker.calls if c[0] != "log_metrics"] == ["start", "log_evaluation", "finish"]
    kept = [c[2] for c in tracker.calls if c[0] == "log_metrics"]
    assert kept[0] == 1 and kept == sorted(kept)
    assert status.dropped == 8 - len(kept), (kept, status.dropped)


def test_close_gives_a_hanging_tracker_only_its_timeout(caplog):
    gate = threading.Event()
    worker = TrackerWorker(Recorder(hang=gate))
    worker.submit("start", None)
    worker.submit("log_metrics", {"loss": 1.0}, 1, 0.0)
    status = worker.close(timeout=0.2)  # returns although the tracker never answers
    assert status.pending >= 1 and not status.started
    assert "calls not delivered" in caplog.text
    gate.set()


def test_backoff_doubles_to_a_cap():
    assert [backoff(n, 2, 60) for n in (1, 2, 3, 4, 5, 6, 7)] == [2, 4, 8, 16, 32, 60, 60]


def test_tracking_reports_degraded_and_then_the_loss_at_the_end():
    gate = threading.Event()
    tracker = Recorder(fail={"start": 99})
    tracker.name = "mlflow"
    worker = TrackerWorker(tracker, retry_first=0.01)
    tracking = Tracking([worker], params={"a": "1"}, config={"a": 1}, resume_state=None, flush_seconds=0.2)
    tracking.record({"step": 1, "time": 0.0, "loss": 3.0, "eval_loss": None})
    deadline = threading.Event()
    for _ in range(300):
        if tracking.progress_fields().get("tracker_degraded"):
            break
        deadline.wait(0.01)
    fields = tracking.progress_fields()
    assert fields["tracker_degraded"] is True and "mlflow: start: ConnectionError" in fields["tracker_error"]
    updates = []
    tracking.finish(ok=True)
    tracking.report_end([updates.append])
    assert updates and updates[0]["tracker_degraded"] and "calls not delivered" in updates[0]["tracker_error"]
    gate.set()


def test_run_ids_go_into_each_checkpoint_and_come_back(tmp_path):
    tracker = Recorder()
    worker = TrackerWorker(tracker)
    tracking = Tracking([worker], params={}, config={}, resume_state={"recorder": {"run_id": "r-0"}})
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    for _ in range(300):
        if worker.state is not None:
            break
        threading.Event().wait(0.01)

    class Args:
        output_dir = str(tmp_path)

    class State:
        global_step = 4

    tracking.on_save(Args, State, None)
    assert read_state(checkpoint) == {"recorder": {"run_id": "r-1"}}
    assert tracker.calls[0] == ("start", {"run_id": "r-0"})  # the saved state reached start
    tracking.finish(ok=True)
    assert read_state(tmp_path / "nothing") is None


# ------------------------------------------------------------------------ the records


def test_flatten_the_config_for_params():
    flat = flatten({"training": {"seed": 42, "learning_rate": 2e-4}, "fine_tuning": {"lora": {"r": 8,
                    "target_modules": ["q_proj", "v_proj"]}}, "model": {"base_model": "x", "tokenizer": None}})
    assert flat == {"training.seed": "42", "training.learning_rate": "0.0002", "fine_tuning.lora.r": "8",
                    "fine_tuning.lora.target_modules": '["q_proj", "v_proj"]', "model.base_model": "x",
                    "model.tokenizer": "null"}


def test_figures_named_per_tracker_and_only_finite():
    record = {"step": 3, "time": 1.0, "loss": 2.5, "eval_loss": None, "grad_norm": float("nan"), "learning_rate": 1e-3}
    assert figures(record, sectioned=False) == {"loss": 2.5, "learning_rate": 1e-3}
    assert figures(record, sectioned=True) == {"train/loss": 2.5, "train/learning_rate": 1e-3}


def test_job_tags_and_run_name(tmp_path):
    env = {"FINETUNE_JOB_NAME": "j", "FINETUNE_JOB_NAMESPACE": "ns", "FINETUNE_JOB_UID": "u"}
    assert job_tags(env) == {"finetune.dev/job-name": "j", "finetune.dev/job-namespace": "ns", "finetune.dev/job-uid": "u"}
    assert job_tags({}) == {}
    assert run_name("mine", env, tmp_path) == "mine"
    assert run_name(None, env, tmp_path) == "j"
    assert run_name(None, {}, tmp_path / "runs" / "demo") == "demo"


def test_evaluation_markdown():
    text = evaluation_markdown([{"benchmark": "b", "metric": "m", "before": 0.5, "after": 0.75, "delta": 0.25}])
    assert text.splitlines()[-1] == "| b | m | 0.5000 | 0.7500 | 0.2500 |"


def test_report_to_accepts_one_name_or_none_and_refuses_repeats():
    def out(value):
        return FineTuneConfig.model_validate({"model": {"base_model": "m"}, "output": {"report_to": value}}).output

    assert out("mlflow").report_to == ["mlflow"]
    assert out("none").report_to == [] and out([]).report_to == []
    with pytest.raises(ValueError, match="twice"):
        out(["mlflow", "mlflow"])
    with pytest.raises(ValueError):
        out(["neptune"])


def test_a_missing_tracker_package_is_a_config_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    (issue,) = missing_packages(["tensorboard", "wandb"])
    assert issue.path == "output.report_to" and "pip install wandb" in issue.message
    cfg = FineTuneConfig.model_validate({"model": {"base_model": "m"}, "output": {"report_to": ["wandb"]}})
    with pytest.raises(ConfigError):
        open_tracking(cfg, __import__("pathlib").Path("/tmp"), resume=None, environ={})


def test_only_the_main_process_reports(tmp_path):
    cfg = FineTuneConfig.model_validate({"model": {"base_model": "m"}, "output": {"report_to": ["tensorboard"]}})
    tracking = open_tracking(cfg, tmp_path, resume=None, environ={"RANK": "1", "WORLD_SIZE": "2"})
    assert tracking.names == [] and tracking.progress_fields() == {}


def test_tensorboard_publishes_event_files_at_checkpoints_and_as_they_grow(tmp_path):
    """Storage gets the event files during training (each checkpoint, and every publish_every
    seconds of logging), not only at the end; an unchanged file is not copied again."""
    from finetune_trainer.storage.stores import open_store
    from finetune_trainer.tracking.trackers import TensorBoardTracker

    store = open_store(f"file://{tmp_path / 'storage'}")
    now = [0.0]
    tracker = TensorBoardTracker(tmp_path / "tb", store=store, publish_every=30, clock=lambda: now[0])
    tracker.start(None)
    tracker.log_metrics({"train/loss": 2.0}, 1, 1.0)
    assert not store.list("tensorboard/")  # not yet due
    tracker.checkpoint(1)
    (first,) = store.list("tensorboard/")
    tracker.checkpoint(1)
    assert store.list("tensorboard/") == [first]
    now[0] = 31.0
    tracker.log_metrics({"train/loss": 1.0}, 2, 2.0)  # due: the grown file goes out
    (second,) = store.list("tensorboard/")
    assert second.size > first.size
    tracker.finish(True)


def test_a_resumed_run_replays_the_kept_history_to_trackers_that_dedupe():
    """MLflow stores an identical point once, so a resume refills what a killed attempt never sent;
    trackers without that property get no replay."""
    replaying, plain = Recorder(), Recorder()
    replaying.name, replaying.replays_history = "mlflow", True
    workers = [TrackerWorker(replaying), TrackerWorker(plain)]
    kept = [{"step": 0, "time": 1.0, "loss": None, "data": {}}, {"step": 1, "time": 2.0, "loss": 3.0},
            {"step": 2, "time": 3.0, "loss": 2.5, "eval_loss": 2.7}]
    tracking = Tracking(workers, params={}, config={}, resume_state={"mlflow": {"run_id": "r"}}, history=kept)
    tracking.finish(ok=True)
    (replay,) = [c for c in replaying.calls if c[0] == "log_history"]
    assert replay[1] == [({"loss": 3.0}, 1, 2.0), ({"loss": 2.5, "eval_loss": 2.7}, 2, 3.0)]
    assert not [c for c in plain.calls if c[0] == "log_history"]


def test_tensorboard_replays_the_history_under_its_own_names_from_the_purge_step():
    """A resumed TensorBoard event file hides every earlier point from its purge_step on, so it
    must carry the history from there: the first kept step with figures, or the step after the
    checkpoint when none was kept (that step itself was logged by the earlier attempt)."""
    from finetune_trainer.tracking import purge_step

    kept = [{"step": 0, "time": 1.0, "loss": None, "data": {}}, {"step": 1, "time": 2.0, "loss": 3.0},
            {"step": 2, "time": 3.0, "loss": 2.5, "eval_loss": 2.7}]
    assert purge_step("/out/checkpoint-2", kept) == 1
    assert purge_step("/out/checkpoint-40", []) == 41
    assert purge_step(None, kept) is None
    board = Recorder()
    board.name, board.replays_history = "tensorboard", True
    tracking = Tracking([TrackerWorker(board)], params={}, config={}, resume_state=None, history=kept)
    tracking.finish(ok=True)
    (replay,) = [c for c in board.calls if c[0] == "log_history"]
    assert replay[1] == [({"train/loss": 3.0}, 1, 2.0), ({"train/loss": 2.5, "eval/loss": 2.7}, 2, 3.0)]


def test_a_tracker_whose_id_is_ours_has_it_in_the_first_checkpoint(tmp_path):
    """W&B's run id is chosen before wandb.init returns (seconds): a checkpoint saved while it is
    still starting carries the id, so a resume from it continues that run, not a new one."""
    from types import SimpleNamespace

    class Planned(Recorder):
        name = "wandb"

        def plan(self, state):
            return {"run_id": (state or {}).get("run_id") or "ours-123"}

    hang = threading.Event()
    fresh, resumed = Planned(hang=hang), Planned(hang=hang)
    try:
        first = Tracking([TrackerWorker(fresh)], params={}, config={}, resume_state=None)
        again = Tracking([TrackerWorker(resumed)], params={}, config={}, resume_state={"wandb": {"run_id": "w-1"}})
        for tracking, step in ((first, 4), (again, 8)):
            (tmp_path / f"checkpoint-{step}").mkdir()
            tracking.on_save(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=step), None)
        assert read_state(tmp_path / "checkpoint-4") == {"wandb": {"run_id": "ours-123"}}  # start still hangs
        assert read_state(tmp_path / "checkpoint-8") == {"wandb": {"run_id": "w-1"}}
    finally:
        hang.set()
        first.finish(ok=True)
        again.finish(ok=True)
