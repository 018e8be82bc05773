"""output.report_to: tensorboard and wandb, for real.

TensorBoard: the event files reach the job's storage (moto_server) as training goes, and
TensorBoard's own reader, pointed at the s3:// prefix as `tensorboard --logdir s3://...`
would be, gives the loss series metrics.jsonl has. W&B, offline (no network): the run
directory wandb-core wrote holds the same losses, the API key came from the environment
(a Secret's env var in a pod) and is written nowhere."""

from __future__ import annotations

import glob
import json
import struct
import subprocess
import sys

import pytest
import yaml

from finetune_trainer import contract as c
from test_checkpoint_resume_single import Bucket, kill_pod, new_pod_disk, output_dir, run_to_end, start_train
from test_checkpoint_resume_single import no_pod_outlives_its_test  # noqa: F401 - autouse: no trainer outlives its test
from test_checkpoint_resume_single import trainer_env, wait_until, write_config
from test_train_e2e import metrics, run_train, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out) if r.get("loss") is not None}


def test_tensorboard_events_in_storage_read_back_as_the_loss_series(tmp_path, tiny_model_dir, s3_endpoint, s3_bucket,
                                                                   monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    storage = f"s3://{s3_bucket}/team-a/chat-tune"
    cfg = tiny_config(tmp_path, tiny_model_dir, output={"report_to": ["tensorboard"], "storage_uri": storage})
    assert run_train(tmp_path, cfg) == 0

    # TensorBoard's S3 file system (boto3) takes the endpoint from S3_ENDPOINT.
    monkeypatch.setenv("S3_ENDPOINT", s3_endpoint)
    events = EventAccumulator(f"{storage}/{c.TENSORBOARD_KEY}", size_guidance={"scalars": 0})
    events.Reload()
    scalars = {e.step: e.value for e in events.Scalars("train/loss")}
    assert scalars == pytest.approx(losses(tmp_path / "out"), rel=1e-6)
    assert sorted(scalars) == list(range(1, 9))
    evals = {e.step: e.value for e in events.Scalars("eval/loss")}
    assert evals == pytest.approx({r["step"]: r["eval_loss"] for r in metrics(tmp_path / "out")
                                   if r.get("eval_loss") is not None}, rel=1e-6)
    assert "config/text_summary" in events.Tags()["tensors"]  # the resolved config, as a text table


# ----------------------------------------------------------------------------------- W&B


def wandb_records(run_dir):
    """The records of an offline run's .wandb file: wandb-core writes a LevelDB-style log
    (32 KiB blocks of checksum, length, type, data) after a 7-byte W&B header."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(f"{run_dir}/run-*.wandb")
    raw = open(path, "rb").read()
    assert raw[:4] == b":W&B"
    block, pos, chunk, records = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pos += 7
        if length == 0 and kind == 0:
            pos += left - 7
            continue
        chunk += raw[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def wandb_losses(records) -> dict[int, float]:
    """train/loss per step of a run's history records."""
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "train/loss" in items:
                history[items["_step"]] = items["train/loss"]
    return history


def test_wandb_offline_run_holds_the_losses_and_the_key_stays_in_the_env(tmp_path, tiny_model_dir):
    """As a pod runs it: the operator renders WANDB_API_KEY from the Secret (secretKeyRef) and
    the W&B settings as plain env; the trainer gets that env, never the key in its config."""
    from finetune_operator.render import RenderSettings, render

    key = "wandb-secret-0123456789abcdef0123456789abcdef"
    job = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": "chat-tune", "namespace": "team-a", "uid": "u1"},
           "spec": {"model": {"base_model": "builtin:SmolLM2-135M-Instruct", "trust_remote_code": False},
                    "dataset": {"train_path": "s3://d/train.jsonl"}, "storage": {"uri": "s3://ckpt/runs"},
                    "output": {"report_to": ["wandb"]},
                    "tracking": {"wandb": {"project": "llm", "mode": "offline",
                                           "api_key_secret": {"name": "wandb", "key": "api-key"}}}}}
    manifests = render(job, RenderSettings(trainer_image="registry.example/trainer:1"))
    container = next(m for m in manifests if m["kind"] == "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Master"][
        "template"]["spec"]["containers"][0]
    env = {}
    for var in container["env"]:
        if var["name"] == c.ENV_WANDB_API_KEY:
            assert var["valueFrom"] == {"secretKeyRef": {"name": "wandb", "key": "api-key"}}
            env[var["name"]] = key  # what the kubelet resolves the reference to
        elif var["name"].startswith("WANDB_"):
            env[var["name"]] = var["value"]
    assert env == {c.ENV_WANDB_PROJECT: "llm", c.ENV_WANDB_MODE: "offline", c.ENV_WANDB_API_KEY: key}
    config_map = next(m for m in manifests if m["kind"] == "ConfigMap")
    assert key not in json.dumps(config_map) and "api-key" not in json.dumps(config_map)

    cfg = tiny_config(tmp_path, tiny_model_dir, output={"report_to": ["wandb"], "run_name": "offline-run"})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    import os

    proc = subprocess.run([sys.executable, "-m", "finetune_trainer.cli", "train", "--config", str(tmp_path / "config.yaml")],
                          env={**os.environ, **env, c.ENV_JOB_NAME: "chat-tune", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "out"
    (run_dir,) = glob.glob(f"{out}/wandb-runs/wandb/offline-run-*")
    records = wandb_records(run_dir)
    assert wandb_losses(records) == pytest.approx(losses(out), rel=1e-6)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "offline-run" and run.project == "llm"
    config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for i in r.config.update}
    assert config["training"]["learning_rate"] == pytest.approx(1e-2)
    # The key reached W&B through the env only: in no file of the run, the config or the logs.
    for path in out.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
    assert key not in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------- resumed


def offline_run_id(out) -> str:
    """The id in the offline run folder's name (offline-run-<time>-<id>): there once the run
    starts, whatever a SIGKILL left unflushed in its .wandb file."""
    (run_dir,) = glob.glob(f"{out}/wandb-runs/wandb/offline-run-*")
    return run_dir.rsplit("-", 1)[-1]


def wandb_run_and_history(out) -> tuple[str, dict[int, float]]:
    """The offline run's id (its run record's) and its train/loss per step."""
    (run_dir,) = glob.glob(f"{out}/wandb-runs/wandb/offline-run-*")
    records = wandb_records(run_dir)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_dir.endswith(f"-{run.run_id}")
    return run.run_id, wandb_losses(records)


def event_files(bucket: Bucket) -> list[str]:
    return [key for key in bucket.objects() if key.startswith(f"{c.TENSORBOARD_KEY}/")]


def test_a_resumed_attempt_continues_tensorboard_and_the_wandb_run(tmp_path, tiny_model_dir, s3_bucket, s3_endpoint,
                                                                   monkeypatch):
    """SIGKILL once a checkpoint is complete (whatever TensorBoard had published by then), a new
    pod with an empty disk: TensorBoard, read from storage as `tensorboard --logdir s3://` would,
    holds every step once (the new event file purges and replays from the kept history), and
    W&B goes on under the same run id, from the step after the checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bucket = Bucket(s3_endpoint, s3_bucket, "team-a/chat-tune")
    max_steps = 400  # long enough that W&B's start (an import and a run folder) comes well before the end
    config = write_config(tmp_path, tiny_model_dir, bucket.uri, max_steps=max_steps, save_steps=4,
                          output={"report_to": ["tensorboard", "wandb"], "run_name": "resumed-run"})
    env = trainer_env(**{c.ENV_WANDB_MODE: "offline", c.ENV_WANDB_PROJECT: "llm", c.ENV_JOB_NAME: "chat-tune"})
    log = tmp_path / "attempt-1.log"
    proc = start_train(config, log, env)
    wait_until(lambda: bucket.complete() and event_files(bucket)
               and glob.glob(f"{output_dir(config)}/wandb-runs/wandb/offline-run-*"), proc, log,
               "a complete checkpoint, an event file in storage and the W&B run folder")
    kill_pod(proc)
    newest = bucket.complete()[-1]
    assert newest < max_steps, "the first attempt finished before it was killed"
    first_id = offline_run_id(output_dir(config))
    saved = json.loads(bucket.read(f"checkpoints/checkpoint-{newest}/{c.TRACKING_STATE_FILE}"))
    assert saved["wandb"] == {"run_id": first_id}  # the id travels with the checkpoint
    killed = new_pod_disk(config)

    results = run_to_end(config, tmp_path / "attempt-2.log", env)
    assert results["resumed_from"].endswith(f"checkpoint-{newest}")
    out = output_dir(config)
    before = {s: v for s, v in losses(killed).items() if s <= newest}
    after = {s: v for s, v in losses(out).items() if s > newest}

    monkeypatch.setenv("S3_ENDPOINT", s3_endpoint)
    prefix = f"{bucket.uri}/{c.TENSORBOARD_KEY}"
    assert len(event_files(bucket)) == 2, "one event file per attempt"
    events = EventAccumulator(prefix, size_guidance={"scalars": 0})
    events.Reload()
    points = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in points] == list(range(1, max_steps + 1)), "a step missing or shown twice"
    assert dict(points) == pytest.approx({**before, **after}, rel=1e-6)

    resumed_id, history = wandb_run_and_history(out)
    assert resumed_id == first_id, "the resumed attempt started a second W&B run"
    assert history == pytest.approx(after, rel=1e-6)  # W&B keeps the earlier attempt's steps itself
