"""output.report_to: [mlflow] against a real MLflow tracking server (its own server on
loopback, SQLite): the run, its params and tags, the loss series; a killed trainer's
resumed attempt continues the same run; a tracker that hangs never holds training up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_trainer import contract as c
from finetune_trainer.config import load_config
from test_checkpoint_resume_single import (
    Bucket,
    kill_pod,
    new_pod_disk,
    no_pod_outlives_its_test,  # noqa: F401 - the autouse fixture: no trainer outlives its test
    output_dir,
    run_to_end,
    start_train,
    trainer_env,
    wait_until,
    write_config,
)
from test_train_e2e import metrics, run_train, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
JOB = {c.ENV_JOB_NAME: "chat-tune", c.ENV_JOB_NAMESPACE: "team-a", c.ENV_JOB_UID: "3f2c-uid"}


def client(server):
    from mlflow import MlflowClient

    return MlflowClient(server.uri)


def runs_named(server, experiment: str, name: str):
    mlflow = client(server)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return []
    return [r for r in mlflow.search_runs([found.experiment_id]) if r.info.run_name == name]


def history(server, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(server).get_metric_history(run_id, key)]


def test_run_holds_params_tags_and_the_falling_loss(tmp_path, tiny_model_dir, mlflow_server, monkeypatch):
    monkeypatch.setenv(c.ENV_MLFLOW_TRACKING_URI, mlflow_server.uri)
    monkeypatch.setenv(c.ENV_MLFLOW_EXPERIMENT_NAME, "team-a")
    for key, value in JOB.items():
        monkeypatch.setenv(key, value)
    cfg = tiny_config(tmp_path, tiny_model_dir, output={"report_to": ["mlflow"], "run_name": "lora-r8"},
                      evaluation={"benchmarks": ["domain-specific-eval"], "domain_eval_max_new_tokens": 4, "evaluate_base_model": True,
                                  "domain_eval_path": str(FIXTURES / "domain.jsonl")})
    assert run_train(tmp_path, cfg) == 0

    (run,) = runs_named(mlflow_server, "team-a", "lora-r8")
    assert run.info.status == "FINISHED"
    resolved = load_config(tmp_path / "out" / "config.yaml", mode="validate").config
    params = run.data.params
    assert params["training.learning_rate"] == str(resolved.training.learning_rate)
    assert params["model.base_model"] == resolved.model.base_model
    assert json.loads(params["fine_tuning.lora.target_modules"]) == ["q_proj", "v_proj", "lm_head"]
    assert len(params) >= 60  # the whole resolved config, flattened
    assert {k: run.data.tags.get(k) for k in ("finetune.dev/job-name", "finetune.dev/job-namespace",
                                               "finetune.dev/job-uid", "finetune.dev/method")} == {
        "finetune.dev/job-name": "chat-tune", "finetune.dev/job-namespace": "team-a",
        "finetune.dev/job-uid": "3f2c-uid", "finetune.dev/method": "lora"}

    out = tmp_path / "out"
    logged = [(r["step"], r["loss"]) for r in metrics(out) if r.get("loss") is not None]
    series = history(mlflow_server, run.info.run_id)
    assert [s for s, _ in series] == [s for s, _ in logged] == list(range(1, 9))
    assert [v for _, v in series] == pytest.approx([v for _, v in logged], rel=1e-6)
    assert series[-1][1] < series[0][1]  # it learned
    # The before -> after benchmark table, as the run printed it (evaluation.json's rows).
    from finetune_trainer.evaluation.report import metric_rows

    local = client(mlflow_server).download_artifacts(run.info.run_id, "evaluation/table.json", str(tmp_path))
    table = json.loads(open(local).read())["rows"]
    assert table == metric_rows(json.loads((out / "evaluation.json").read_text()))
    assert {r["metric"] for r in table} >= {"exact_match", "token_f1"} and all(r["before"] is not None for r in table)
    evals = history(mlflow_server, run.info.run_id, "eval_loss")
    assert [s for s, _ in evals] == [r["step"] for r in metrics(out) if r.get("eval_loss") is not None]


def test_a_resumed_attempt_continues_the_same_run(tmp_path, tiny_model_dir, mlflow_server, s3_bucket, s3_endpoint):
    """SIGKILL once a checkpoint is complete in storage (a node lost), a new pod with an empty
    disk: the run id comes back with the checkpoint and the losses go on in the same MLflow run."""
    bucket = Bucket(s3_endpoint, s3_bucket, "team-a/chat-tune")
    max_steps = 400  # long enough that the run is created (an import, two calls) well before the end
    config = write_config(tmp_path, tiny_model_dir, bucket.uri, max_steps=max_steps, save_steps=4,
                          output={"report_to": ["mlflow"], "run_name": "resumed-run"})
    env = trainer_env(**JOB, **{c.ENV_MLFLOW_TRACKING_URI: mlflow_server.uri, c.ENV_MLFLOW_EXPERIMENT_NAME: "resume"})
    log = tmp_path / "attempt-1.log"
    proc = start_train(config, log, env)

    def a_checkpoint_complete_and_the_run_created():
        runs = runs_named(mlflow_server, "resume", "resumed-run") if bucket.complete() else []
        return runs and runs[0]

    # Killed whatever MLflow has received by then: the resumed attempt replays metrics.jsonl up to
    # its checkpoint (MLflow keeps identical points once), so no step is missing from the run.
    first = wait_until(a_checkpoint_complete_and_the_run_created, proc, log, "a complete checkpoint and the MLflow run")
    kill_pod(proc)
    newest = bucket.complete()[-1]
    assert newest < max_steps, "the first attempt finished before it was killed"
    new_pod_disk(config)

    results = run_to_end(config, tmp_path / "attempt-2.log", env)
    assert results["resumed_from"].endswith(f"checkpoint-{newest}")
    runs = runs_named(mlflow_server, "resume", "resumed-run")
    assert [r.info.run_id for r in runs] == [first.info.run_id], "the resumed attempt started a second MLflow run"
    assert runs[0].info.status == "FINISHED"
    series = history(mlflow_server, first.info.run_id)
    assert {s for s, _ in series} == set(range(1, max_steps + 1))  # both attempts' steps, in one run
    resumed = {s: v for s, v in series if s > newest}
    logged = {r["step"]: r["loss"] for r in metrics(output_dir(config)) if r.get("loss") is not None and r["step"] > newest}
    assert resumed == pytest.approx(logged, rel=1e-6)


def test_a_hanging_tracker_neither_fails_nor_holds_training(tmp_path, tiny_model_dir, black_hole, monkeypatch):
    """The tracking server accepts connections and never answers. Training finishes, every
    figure is in metrics.jsonl, progress says the tracker is degraded, and the end of the run
    waits only FINETUNE_TRACKER_FLUSH_SECONDS for it."""
    from finetune_trainer.config import load_config as load
    from finetune_trainer.train import train

    monkeypatch.setenv(c.ENV_MLFLOW_TRACKING_URI, black_hole.uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    monkeypatch.setenv(c.ENV_TRACKER_FLUSH_SECONDS, "1")
    cfg = tiny_config(tmp_path, tiny_model_dir, output={"report_to": ["mlflow"]})
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    updates: list[dict] = []
    result = train(load(tmp_path / "c.yaml", mode="train").config, base_dir=tmp_path, reporters=[updates.append])

    assert result.exit_code == 0
    assert [r["step"] for r in metrics(tmp_path / "out") if r.get("loss") is not None] == list(range(1, 9))
    assert black_hole.connections >= 1  # it did try
    degraded = [u for u in updates if u.get("tracker_degraded")]
    assert degraded and "mlflow" in degraded[-1]["tracker_error"]


def test_a_checkpoint_older_than_the_run_id_resumes_the_run_found_by_the_job_uid(mlflow_server, monkeypatch):
    """MLflow's run id comes from the server: a checkpoint saved before the run was created has
    none. The attempt resuming from it finds the run by the FineTuneJob's uid tag (the newest of
    that job, never another job's); an attempt that starts from scratch makes a new run."""
    from finetune_trainer.tracking.records import JOB_UID_TAG
    from finetune_trainer.tracking.trackers import MlflowTracker

    monkeypatch.setenv(c.ENV_MLFLOW_TRACKING_URI, mlflow_server.uri)
    monkeypatch.setenv(c.ENV_MLFLOW_EXPERIMENT_NAME, "by-uid")
    earlier = MlflowTracker(run_name="job-7", tags={JOB_UID_TAG: "uid-7"})
    earlier.start(None)  # then SIGKILLed: the run stays RUNNING, no checkpoint knows its id
    other_job = MlflowTracker(run_name="job-8", tags={JOB_UID_TAG: "uid-8"})
    other_job.start(None)

    resumed = MlflowTracker(run_name="job-7", tags={JOB_UID_TAG: "uid-7"}, resuming=True)
    assert resumed.start(None) == {"run_id": earlier.run_id} and resumed.resumed
    assert client(mlflow_server).get_run(earlier.run_id).info.status == "RUNNING"
    from_scratch = MlflowTracker(run_name="job-7", tags={JOB_UID_TAG: "uid-7"})
    assert from_scratch.start(None)["run_id"] not in (earlier.run_id, other_job.run_id)
    no_uid = MlflowTracker(run_name="local", tags={}, resuming=True)  # a local run: nothing to find it by
    assert no_uid.start(None)["run_id"] not in (earlier.run_id, other_job.run_id)
