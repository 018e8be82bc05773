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
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "train/loss" in items:
                history[items["_step"]] = items["train/loss"]
    assert history == pytest.approx(losses(out), rel=1e-6)
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
