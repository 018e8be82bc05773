"""`finetune validate` on a FineTuneJob manifest checks its spec exactly like a config file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune_trainer.cli import main

REPO = Path(__file__).resolve().parent.parent


def manifest(spec, envelope: dict | None = None) -> dict:
    doc = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "demo"}, "spec": spec}
    doc.update(envelope or {})
    return doc


def run(tmp_path, doc, capsys, *extra):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    rc = main(["validate", "-f", str(path), *extra])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_seed_template_pasted_under_spec_validates(tmp_path, capsys):
    spec = yaml.safe_load((REPO / "examples" / "config" / "qlora-16gb.yaml").read_text())
    spec.update({"nodes": 2, "gpus_per_node": 4, "storage": {"uri": "s3://bucket/runs", "credentials_secret": "s3-creds"}})
    rc, out, err = run(tmp_path, manifest(spec), capsys)
    assert rc == 0, err
    assert "QLoRA of meta-llama/Llama-3.1-8B-Instruct" in out
    assert "spec.dataset.train_path" in err  # the warning carries the manifest path


@pytest.mark.parametrize(
    "spec_patch,path",
    [
        ({"training": {"learning_rate": 0}}, "spec.training.learning_rate"),
        ({"fine_tuning": {"method": "qlora"}, "model": {"base_model": "m", "load_in_4bit": False}}, "spec.model.load_in_4bit"),
        ({"nodes": 0}, "spec.nodes"),
        ({"gpus_per_node": -1}, "spec.gpus_per_node"),
        ({"storage": {"uri": "gs://bucket"}}, "spec.storage.uri"),
        ({"storage": {"uri": "s3://b", "credentials": "x"}}, "spec.storage.credentials"),
        ({"hf_token_secret": {"name": "Bad_Name", "key": "token"}}, "spec.hf_token_secret.name"),
        ({"env": [{"name": "1BAD"}]}, "spec.env[0].name"),
        ({"resources": {"requests": {}, "limit": {}}}, "spec.resources"),
        ({"nodez": 2}, "spec.nodez"),
        ({"termination_grace_period_seconds": 5}, "spec.termination_grace_period_seconds"),
        # run settings the operator would refuse: `finetune validate -f` says so first
        ({"output": {"report_to": ["wandb"]}, "tracking": {"wandb": {"project": "p"}}},
         "spec.tracking.wandb.api_key_secret"),
        ({"output": {"report_to": ["mlflow"]}}, "spec.tracking.mlflow"),
        ({"tracking": {"mlflow": {"tracking_uri": "mlflow:5000"}}}, "spec.tracking.mlflow.tracking_uri"),
        ({"env": [{"name": "WANDB_API_KEY", "value": "k"}]}, "spec.env[0].name"),
        ({"model": {"base_model": "/models/llama"}}, "spec.model.base_model"),
        ({"resources": {"limits": {"nvidia.com/gpu": 2}}}, "spec.resources.limits"),
    ],
)
def test_bad_spec_names_the_spec_field(tmp_path, capsys, spec_patch, path):
    spec = {"model": {"base_model": "m"}, "dataset": {"train_path": "d.jsonl"}, **spec_patch}
    rc, _, err = run(tmp_path, manifest(spec), capsys)
    assert rc == 1
    assert f"  {path}:" in err, err


@pytest.mark.parametrize(
    "envelope,path",
    [
        ({"apiVersion": "finetune.dev/v1"}, "apiVersion"),
        ({"metadata": {"name": "Not_A_Name"}}, "metadata.name"),
        ({"metadata": {}}, "metadata.name"),
        ({"spec": "model: m"}, "spec"),
    ],
)
def test_bad_envelope(tmp_path, capsys, envelope, path):
    rc, _, err = run(tmp_path, manifest({"model": {"base_model": "m"}}, envelope), capsys)
    assert rc == 1
    assert f"  {path}:" in err, err


def test_overrides_apply_to_the_spec(tmp_path, capsys):
    rc, out, err = run(tmp_path, manifest({"model": {"base_model": "m"}}), capsys, "--training.epochs", "7")
    assert rc == 0, err
    assert "for 7 epochs" in out


def test_a_malformed_value_says_what_the_field_expects(tmp_path, capsys):
    """A pattern error names the field, the value and what belongs there (its description), not
    only the regex."""
    spec = {"model": {"base_model": "m"}, "dataset": {"train_path": "d.jsonl"}, "output": {"report_to": ["mlflow"]},
            "tracking": {"mlflow": {"tracking_uri": "mlflow:5000"}}}
    rc, _, err = run(tmp_path, manifest(spec), capsys)
    assert rc == 1
    assert ("spec.tracking.mlflow.tracking_uri: must match the pattern ^(https?://.+|databricks(://.*)?)$ (got 'mlflow:5000'); "
            "expected: MLflow tracking server (MLFLOW_TRACKING_URI), e.g. http://mlflow.mlflow.svc:5000.") in err, err
