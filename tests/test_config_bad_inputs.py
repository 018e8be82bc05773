"""Every bad input gets exit 1 and a message that names the field to fix.

Each case is a seed-format config (as YAML text, or a dict merged onto a valid base)
run through the real CLI entry point; the assertion is on the exit code and on the
`dotted.path: message` line the user reads."""

from __future__ import annotations

import copy

import pytest
import yaml

from finetune_trainer.cli import main

BASE = {"model": {"base_model": "org/model"}, "dataset": {"train_path": "data/train.jsonl"}}
DROP = object()  # a patch value that removes the key


def merged(patch: dict) -> dict:
    out = copy.deepcopy(BASE)
    for section, values in patch.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section] = {**out[section], **values}
        else:
            out[section] = values
        if isinstance(out[section], dict):
            out[section] = {k: v for k, v in out[section].items() if v is not DROP}
    return out


# (id, config patch, path the message must name, words the message must contain)
CASES = [
    ("unknown-section", {"trainig": {"epochs": 1}}, "trainig", "did you mean 'training'"),
    ("unknown-key", {"training": {"lerning_rate": 1e-4}}, "training.lerning_rate", "did you mean 'learning_rate'"),
    ("unknown-nested-key", {"fine_tuning": {"lora": {"rank": 8}}}, "fine_tuning.lora.rank", "unknown key"),
    ("missing-base-model", {"model": {"tokenizer": "x", "base_model": DROP}}, "model.base_model", "required"),
    ("empty-base-model", {"model": {"base_model": ""}}, "model.base_model", "at least 1"),
    ("model-not-mapping", {"model": "llama"}, "model", "mapping"),
    ("bad-method", {"fine_tuning": {"method": "adapter"}}, "fine_tuning.method", "'qlora'"),
    ("lora-r-zero", {"fine_tuning": {"lora": {"r": 0}}}, "fine_tuning.lora.r", "greater than or equal to 1"),
    ("lora-alpha-negative", {"fine_tuning": {"lora": {"alpha": -2}}}, "fine_tuning.lora.alpha", "greater than 0"),
    ("lora-dropout-one", {"fine_tuning": {"lora": {"dropout": 1.0}}}, "fine_tuning.lora.dropout", "less than 1"),
    ("lora-bias", {"fine_tuning": {"lora": {"bias": "some"}}}, "fine_tuning.lora.bias", "lora_only"),
    ("lora-task-type", {"fine_tuning": {"lora": {"task_type": "SEQ_CLS"}}}, "fine_tuning.lora.task_type", "CAUSAL_LM"),
    ("lora-targets-empty", {"fine_tuning": {"lora": {"target_modules": []}}}, "fine_tuning.lora.target_modules", "non-empty"),
    ("lora-targets-string", {"fine_tuning": {"lora": {"target_modules": "q_proj"}}}, "fine_tuning.lora.target_modules", "all-linear"),
    ("snr-above-one", {"fine_tuning": {"spectrum": {"snr_threshold": 1.5}}}, "fine_tuning.spectrum.snr_threshold", "less than or equal to 1"),
    ("snr-negative", {"fine_tuning": {"spectrum": {"snr_threshold": -0.1}}}, "fine_tuning.spectrum.snr_threshold", "greater than or equal to 0"),
    ("layers-word", {"fine_tuning": {"spectrum": {"layers_to_finetune": "all"}}}, "fine_tuning.spectrum.layers_to_finetune", '"auto" or a list'),
    ("layers-negative", {"fine_tuning": {"spectrum": {"layers_to_finetune": [0, -1]}}}, "fine_tuning.spectrum.layers_to_finetune", "integers >= 0"),
    ("bits-six", {"fine_tuning": {"quantization": {"bits": 6}}}, "fine_tuning.quantization.bits", "one of 4, 8"),
    ("quant-type", {"fine_tuning": {"quantization": {"bnb_4bit_quant_type": "int4"}}}, "fine_tuning.quantization.bnb_4bit_quant_type", "'nf4'"),
    ("compute-dtype", {"fine_tuning": {"quantization": {"bnb_4bit_compute_dtype": "half"}}}, "fine_tuning.quantization.bnb_4bit_compute_dtype", "'bfloat16'"),
    ("qlora-4bit-off", {"fine_tuning": {"method": "qlora"}, "model": {"base_model": "m", "load_in_4bit": False}}, "model.load_in_4bit", "requires 4-bit"),
    ("qlora-8bit", {"fine_tuning": {"method": "qlora"}, "model": {"base_model": "m", "load_in_8bit": True}}, "model.load_in_8bit", "4-bit"),
    ("4bit-and-8bit", {"model": {"base_model": "m", "load_in_4bit": True, "load_in_8bit": True}}, "model.load_in_8bit", "exclusive"),
    ("bits-vs-4bit", {"model": {"base_model": "m", "load_in_4bit": True}, "fine_tuning": {"quantization": {"bits": 8}}}, "fine_tuning.quantization.bits", "set bits: 4"),
    ("bits-unquantized", {"fine_tuning": {"quantization": {"bits": 4}}}, "fine_tuning.quantization.bits", "loads unquantized"),
    ("full-on-4bit", {"model": {"base_model": "m", "load_in_4bit": True}, "fine_tuning": {"method": "full"}}, "model.load_in_4bit", "full fine-tuning"),
    ("full-on-8bit", {"model": {"base_model": "m", "load_in_8bit": True}, "fine_tuning": {"method": "full"}}, "model.load_in_8bit", "full fine-tuning"),
    ("epochs-zero", {"training": {"epochs": 0}}, "training.epochs", "greater than or equal to 1"),
    ("epochs-text", {"training": {"epochs": "three"}}, "training.epochs", "integer"),
    ("micro-batch-zero", {"training": {"micro_batch_size": 0}}, "training.micro_batch_size", "greater than or equal to 1"),
    ("lr-zero", {"training": {"learning_rate": 0}}, "training.learning_rate", "greater than 0"),
    ("warmup-one", {"training": {"warmup_ratio": 1}}, "training.warmup_ratio", "less than 1"),
    ("grad-norm-zero", {"training": {"max_grad_norm": 0}}, "training.max_grad_norm", "greater than 0"),
    ("weight-decay-negative", {"training": {"weight_decay": -0.1}}, "training.weight_decay", "greater than or equal to 0"),
    ("optimizer", {"training": {"optimizer": "adam"}}, "training.optimizer", "paged_adamw_8bit"),
    ("scheduler", {"training": {"lr_scheduler_type": "step"}}, "training.lr_scheduler_type", "'cosine'"),
    ("precision", {"training": {"mixed_precision": "fp32"}}, "training.mixed_precision", "'bf16'"),
    ("seq-len-tiny", {"training": {"max_seq_length": 0}}, "training.max_seq_length", "greater than or equal to 8"),
    ("checkpointing-word", {"training": {"gradient_checkpointing": "maybe"}}, "training.gradient_checkpointing", "boolean"),
    ("format", {"dataset": {"format": "csv", "train_path": "x"}}, "dataset.format", "'sharegpt'"),
    ("custom-no-templates", {"dataset": {"format": "custom", "train_path": "x"}}, "dataset.custom.prompt_template", "format string"),
    ("preprocessing-key", {"dataset": {"train_path": "x", "preprocessing": {"add_eos": True}}}, "dataset.preprocessing.add_eos", "did you mean 'add_eos_token'"),
    ("accumulation-disagree", {"training": {"gradient_accumulation_steps": 8}, "distributed": {"gradient_accumulation_steps": 16}}, "distributed.gradient_accumulation_steps", "make them equal"),
    ("zero-stage-four", {"distributed": {"use_deepspeed": True, "zero_stage": 4}}, "distributed.zero_stage", "less than or equal to 3"),
    ("deepspeed-unconfigured", {"distributed": {"use_deepspeed": True}}, "distributed.zero_stage", "neither zero_stage nor deepspeed_config"),
    ("deepspeed-config-number", {"distributed": {"use_deepspeed": True, "deepspeed_config": 2}}, "distributed.deepspeed_config", "inline mapping"),
    ("deepspeed-inline-stage", {"distributed": {"use_deepspeed": True, "zero_stage": 2, "deepspeed_config": {"zero_optimization": {"stage": 3}}}}, "distributed.zero_stage", "zero_optimization.stage 3"),
    ("deepspeed-inline-batch", {"distributed": {"use_deepspeed": True, "deepspeed_config": {"train_micro_batch_size_per_gpu": 4}}}, "distributed.deepspeed_config", "training.micro_batch_size"),
    ("deepspeed-inline-fp16", {"distributed": {"use_deepspeed": True, "deepspeed_config": {"fp16": {"enabled": True}}}}, "distributed.deepspeed_config", "training.mixed_precision"),
    ("push-without-id", {"output": {"push_to_hub": True}}, "output.hub_model_id", "username/model-name"),
    ("hub-id-shape", {"output": {"hub_model_id": "just-a-name"}}, "output.hub_model_id", "pattern"),
    ("save-steps-zero", {"output": {"save_steps": 0}}, "output.save_steps", "greater than or equal to 1"),
    ("save-limit-zero", {"output": {"save_total_limit": 0}}, "output.save_total_limit", "greater than or equal to 1"),
    ("eval-without-set", {"evaluation": {"do_eval": True}}, "dataset.eval_path", "no evaluation set"),
    ("eval-strategy", {"evaluation": {"eval_strategy": "always"}}, "evaluation.eval_strategy", "'epoch'"),
    ("eval-batch-zero", {"evaluation": {"eval_batch_size": 0}}, "evaluation.eval_batch_size", "greater than or equal to 1"),
    ("benchmark-name", {"evaluation": {"benchmarks": ["mmlu"]}}, "evaluation.benchmarks[0]", "'human-eval'"),
    ("benchmarks-not-list", {"evaluation": {"benchmarks": "human-eval"}}, "evaluation.benchmarks", "list"),
]


@pytest.mark.parametrize("patch,path,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_refused_naming_the_field(tmp_path, capsys, patch, path, words):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(merged(patch)))
    rc = main(["validate", "--config", str(config)])
    err = capsys.readouterr().err
    assert rc == 1, err
    lines = [line.strip() for line in err.splitlines() if line.strip().startswith(f"{path}:")]
    assert lines, f"no error names {path!r}:\n{err}"
    assert any(words in line for line in lines), f"{words!r} not in:\n{err}"


def test_the_table_is_large():
    assert len(CASES) >= 30


def test_every_error_is_listed_at_once(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(merged({"training": {"epochs": 0, "learning_rate": -1}, "output": {"push_to_hub": True}}))
    )
    assert main(["validate", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "3 errors" in err
    for path in ("training.epochs:", "training.learning_rate:", "output.hub_model_id:"):
        assert path in err


# Files that are not configs at all: (id, file text, words of the one message)
FILE_CASES = [
    ("yaml-syntax", "model:\n  base_model: [unclosed\ntraining: {}\n", "invalid YAML"),
    ("tab-indent", "model:\n\tbase_model: x\n", "invalid YAML"),
    ("a-list", "- model\n- training\n", "must be a YAML mapping"),
    ("a-string", "just some words\n", "must be a YAML mapping"),
    ("empty", "", "empty"),
    ("duplicate-section", "model:\n  base_model: a\nmodel:\n  base_model: b\n", "duplicate key 'model'"),
]


@pytest.mark.parametrize("text,words", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_unreadable_file_is_refused(tmp_path, capsys, text, words):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    assert main(["validate", "--config", str(config)]) == 1
    assert words in capsys.readouterr().err


def test_yaml_error_reports_line_and_column(tmp_path, capsys):
    """Where the problem starts (the bracket that opened), and where the parser gave up."""
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  base_model: x\ntraining:\n  epochs: [1\n  micro_batch_size: 2\n")
    assert main(["validate", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{config}:4:11: invalid YAML: while parsing a flow sequence that starts here" in err, err
    assert "at line 5, column" in err


def test_an_unterminated_quote_is_named_where_it_opens_not_at_the_end(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text('model:\n  base_model: "SmolLM2\ntraining:\n  learning_rate: 1e-4\n\n\n')
    assert main(["validate", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{config}:2:15: invalid YAML: while scanning a quoted scalar that starts here" in err, err


def test_a_missing_section_does_not_hide_the_other_sections_errors(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"output": {"push_to_hub": True}, "training": {"epochs": 0}}))
    assert main(["validate", "--config", str(config), "--no-data"]) == 1
    err = capsys.readouterr().err
    assert "3 errors" in err, err
    for path in ("model: required key is missing", "training.epochs:", "output.hub_model_id:"):
        assert path in err
    assert "stand-in" not in err  # the placeholder that lets the rules run is never reported


def test_missing_file(tmp_path, capsys):
    assert main(["validate", "--config", str(tmp_path / "nope.yaml")]) == 1
    assert "no such file" in capsys.readouterr().err
