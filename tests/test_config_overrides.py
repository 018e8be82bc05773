"""`--section.key value` overrides: YAML-typed values, exactly the named key, unknown keys refused."""

from __future__ import annotations

import pytest
import yaml

from finetune_trainer.cli import main
from finetune_trainer.config import ConfigError, apply_overrides, parse_overrides
from finetune_trainer.config.loader import parse_yaml

BASE = "model:\n  base_model: org/model\ntraining:\n  learning_rate: 2.0e-4\ndataset:\n  train_path: d.jsonl\n"


def resolved(tmp_path, capsys, *overrides: str) -> dict:
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    assert main(["config", "--config", str(path), *overrides]) == 0
    return parse_yaml(capsys.readouterr().out)


def test_seed_command_line_example(tmp_path, capsys):
    """The seed's own example: --model.base_model ... --training.learning_rate 1e-4."""
    before = resolved(tmp_path, capsys)
    after = resolved(
        tmp_path, capsys, "--model.base_model", "mistralai/Mistral-7B-Instruct-v0.2", "--training.learning_rate", "1e-4"
    )
    assert after["model"]["base_model"] == "mistralai/Mistral-7B-Instruct-v0.2"
    assert after["training"]["learning_rate"] == 1e-4
    # exactly those two keys changed
    diff = {
        (s, k)
        for s in before
        for k in before[s]
        if before[s][k] != after[s][k]
    }
    assert diff == {("model", "base_model"), ("training", "learning_rate")}


@pytest.mark.parametrize(
    "args,path,value",
    [
        (["--training.epochs", "5"], ("training", "epochs"), 5),
        (["--model.load_in_4bit=true"], ("model", "load_in_4bit"), True),
        (["--fine_tuning.lora.target_modules", "[q_proj, v_proj]"], ("fine_tuning", "lora", "target_modules"), ["q_proj", "v_proj"]),
        (["--fine_tuning.spectrum.layers_to_finetune", "[0, 3]"], ("fine_tuning", "spectrum", "layers_to_finetune"), [0, 3]),
        (["--output.hub_model_id", "null"], ("output", "hub_model_id"), None),
        (["--dataset.eval_path", "data/eval 1.json"], ("dataset", "eval_path"), "data/eval 1.json"),
        # text-only keys keep the text as typed, though YAML would read a bool or a number
        (["--model.tokenizer", "yes"], ("model", "tokenizer"), "yes"),
        (["--model.base_model", "1.5"], ("model", "base_model"), "1.5"),
        (["--distributed.deepspeed_config", "{zero_optimization: {stage: 2}}"], ("distributed", "deepspeed_config"), {"zero_optimization": {"stage": 2}}),
    ],
)
def test_override_values_are_yaml(tmp_path, capsys, args, path, value):
    out = resolved(tmp_path, capsys, *args)
    node = out
    for part in path:
        node = node[part]
    assert node == value


def test_override_with_wrong_type_names_the_key(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    assert main(["config", "--config", str(path), "--training.epochs", "many"]) == 1
    assert "training.epochs:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "key,words",
    [
        ("--training.lerning_rate", "did you mean 'learning_rate'"),
        ("--trainng.epochs", "did you mean 'training'"),
        ("--training.epochs.value", "is a value, not a section"),
        ("--fine_tuning.lora", "is a section"),
    ],
)
def test_unknown_override_is_refused(tmp_path, capsys, key, words):
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    assert main(["config", "--config", str(path), key, "1"]) == 1
    assert words in capsys.readouterr().err


def test_override_without_value(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    assert main(["config", "--config", str(path), "--training.epochs"]) == 1
    assert "has no value" in capsys.readouterr().err


def test_override_creates_missing_section():
    data = apply_overrides({"model": {"base_model": "m"}}, parse_overrides(["--fine_tuning.lora.r=8"]))
    assert data == {"model": {"base_model": "m"}, "fine_tuning": {"lora": {"r": 8}}}


def test_stray_argument_is_refused():
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["extra"])


def test_config_prints_resolved_yaml(tmp_path, capsys):
    out = resolved(tmp_path, capsys)
    assert out["fine_tuning"]["method"] == "lora"  # default filled
    assert out["training"]["learning_rate"] == 2.0e-4
    assert yaml.safe_dump(out)  # plain YAML, no python tags
