"""Config -> TrainingArguments kwargs and DeepSpeed JSON: one table row per key, then the
kwargs are fed to the installed transformers to prove it accepts them."""

from __future__ import annotations

import json
import logging

import pytest

from finetune_trainer.config import FineTuneConfig
from finetune_trainer.training.arguments import installed_argument_names, precision_flags, training_arguments
from finetune_trainer.training.deepspeed import deepspeed_config, generated_config

V5 = {"warmup_steps", "activation_checkpointing", "activation_checkpointing_kwargs", "train_sampling_strategy"}
V4 = {"warmup_ratio", "warmup_steps", "gradient_checkpointing", "gradient_checkpointing_kwargs", "group_by_length"}


def config(**sections) -> FineTuneConfig:
    return FineTuneConfig.model_validate({"model": {"base_model": "m"}, **sections})


def kwargs(cfg: FineTuneConfig, *, use_cpu=True, world_size=1, accepted=V5, **extra):
    return training_arguments(cfg, output_dir="out", world_size=world_size, use_cpu=use_cpu, accepted=accepted, **extra)


@pytest.mark.parametrize(
    "sections,expected",
    [
        ({"training": {"epochs": 4}}, {"num_train_epochs": 4, "max_steps": -1}),
        ({"training": {"max_steps": 7}}, {"max_steps": 7}),
        ({"training": {"micro_batch_size": 3}}, {"per_device_train_batch_size": 3}),
        ({"training": {"gradient_accumulation_steps": 16}}, {"gradient_accumulation_steps": 16}),
        ({"distributed": {"gradient_accumulation_steps": 8}}, {"gradient_accumulation_steps": 8}),
        ({"training": {"learning_rate": 1.5e-5}}, {"learning_rate": 1.5e-5}),
        ({"training": {"lr_scheduler_type": "constant_with_warmup"}}, {"lr_scheduler_type": "constant_with_warmup"}),
        ({"training": {"warmup_ratio": 0.1}}, {"warmup_steps": 0.1}),
        ({"training": {"max_grad_norm": 0.3}}, {"max_grad_norm": 0.3}),
        ({"training": {"optimizer": "paged_adamw_8bit"}}, {"optim": "paged_adamw_8bit"}),
        ({"training": {"optimizer": "adamw_8bit"}}, {"optim": "adamw_8bit"}),
        ({"training": {"optimizer": "adamw_torch"}}, {"optim": "adamw_torch"}),
        ({"training": {"weight_decay": 0.01}}, {"weight_decay": 0.01}),
        (
            {"training": {"gradient_checkpointing": True}},
            {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}},
        ),
        ({"training": {"gradient_checkpointing": False}}, {"activation_checkpointing": False}),
        ({"training": {"seed": 7}}, {"seed": 7, "data_seed": 7}),
        ({"training": {"group_by_length": True}}, {"train_sampling_strategy": "group_by_length"}),
        ({"training": {"group_by_length": False}}, {"train_sampling_strategy": "<absent>"}),
        ({"training": {"mixed_precision": "no"}}, {"bf16": False, "fp16": False}),
        ({"output": {"output_dir": "ignored-here"}}, {"output_dir": "out"}),
        ({"output": {"logging_steps": 3}}, {"logging_steps": 3, "logging_strategy": "steps"}),
        ({"output": {"save_steps": 50}}, {"save_steps": 50, "save_strategy": "steps"}),
        ({"output": {"save_total_limit": 2}}, {"save_total_limit": 2}),
        ({"output": {"save_total_limit": None}}, {"save_total_limit": None}),
        ({"output": {"push_to_hub": False}}, {"push_to_hub": False}),
        ({}, {"report_to": "none", "use_cpu": True, "do_eval": False, "eval_strategy": "no", "eval_on_start": False}),
        ({"evaluation": {"eval_batch_size": 16}}, {"per_device_eval_batch_size": 16}),
        (
            {"dataset": {"eval_path": "e.jsonl"}, "evaluation": {"do_eval": True, "eval_steps": 20}},
            {"do_eval": True, "eval_strategy": "steps", "eval_steps": 20, "eval_on_start": True},
        ),
        (  # evaluation.eval_steps falls back to output.eval_steps
            {"dataset": {"eval_path": "e.jsonl"}, "evaluation": {"do_eval": True}, "output": {"eval_steps": 30}},
            {"eval_steps": 30},
        ),
        (
            {"dataset": {"eval_path": "e.jsonl"}, "evaluation": {"do_eval": True, "eval_strategy": "epoch"}},
            {"eval_strategy": "epoch", "do_eval": True},
        ),
        (  # an eval set without do_eval: evaluated before and after, not during
            {"dataset": {"eval_path": "e.jsonl"}, "evaluation": {"do_eval": False}},
            {"eval_strategy": "no", "do_eval": False, "eval_on_start": True},
        ),
        (
            {"dataset": {"eval_path": "e.jsonl"}, "evaluation": {"do_eval": True, "eval_strategy": "no"}},
            {"eval_strategy": "no", "do_eval": False},
        ),
    ],
)
def test_each_key_maps(sections, expected):
    got = kwargs(config(**sections))
    assert {k: got.get(k, "<absent>") for k in expected} == expected


def test_eval_steps_absent_unless_evaluating_by_steps():
    got = kwargs(config(dataset={"eval_path": "e"}, evaluation={"do_eval": True, "eval_strategy": "epoch"}))
    assert "eval_steps" not in got


def test_hub_push_takes_model_id_and_token():
    cfg = config(output={"push_to_hub": True, "hub_model_id": "me/model"})
    got = kwargs(cfg, hub_token="hf_x")
    assert got["push_to_hub"] and got["hub_model_id"] == "me/model" and got["hub_token"] == "hf_x"
    assert got["hub_strategy"] == "end"


def test_older_transformers_spellings():
    got = kwargs(config(training={"warmup_ratio": 0.05, "gradient_checkpointing": True}), accepted=V4)
    assert got["warmup_ratio"] == 0.05 and "warmup_steps" not in got
    assert got["gradient_checkpointing"] is True
    assert got["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert kwargs(config(training={"group_by_length": True}), accepted=V4)["group_by_length"] is True


@pytest.mark.parametrize(
    "precision,use_cpu,bf16_ok,flags,fell_back",
    [
        ("bf16", True, False, {"bf16": True, "fp16": False}, False),  # CPU autocast
        ("bf16", False, True, {"bf16": True, "fp16": False}, False),
        ("bf16", False, False, {"bf16": False, "fp16": False}, True),  # pre-Ampere GPU
        ("fp16", False, True, {"bf16": False, "fp16": True}, False),
        ("fp16", True, False, {"bf16": False, "fp16": False}, True),  # no fp16 autocast on CPU
        ("no", True, False, {"bf16": False, "fp16": False}, False),
    ],
)
def test_precision_with_fallbacks(precision, use_cpu, bf16_ok, flags, fell_back):
    got, note = precision_flags(precision, use_cpu=use_cpu, bf16_supported=bf16_ok)
    assert got == flags
    assert (note is not None) == fell_back
    if note:
        assert "training.mixed_precision" in note and "fp32" in note


def test_fp16_on_cpu_logs_the_fallback(caplog):
    with caplog.at_level(logging.WARNING):
        got = kwargs(config(training={"mixed_precision": "fp16"}), use_cpu=True)
    assert not got["fp16"] and not got["bf16"]
    assert "training in fp32" in caplog.text


def test_multi_process_skips_unused_parameter_search():
    assert kwargs(config(), world_size=2)["ddp_find_unused_parameters"] is False
    assert kwargs(config(), world_size=1)["ddp_find_unused_parameters"] is None


def test_installed_transformers_accepts_every_mapping(tmp_path):
    """The real TrainingArguments takes the kwargs, with the names this transformers uses."""
    from transformers import TrainingArguments

    cfg = config(
        training={"max_steps": 5, "warmup_ratio": 0.2, "gradient_checkpointing": True, "optimizer": "adamw_8bit",
                  "group_by_length": True},
        dataset={"eval_path": "e"},
        evaluation={"do_eval": True, "eval_steps": 2},
        output={"save_total_limit": 1},
    )
    ds = deepspeed_config(config(distributed={"use_deepspeed": True, "zero_stage": 2}), base_dir=tmp_path)
    args = TrainingArguments(
        **training_arguments(cfg, output_dir=tmp_path, world_size=1, use_cpu=True, deepspeed=ds, accepted=None)
    )
    assert args.get_warmup_steps(100) == 20
    assert args.optim == "adamw_8bit" and args.bf16 and args.eval_steps == 2 and args.save_total_limit == 1
    assert args.train_sampling_strategy == "group_by_length"
    names = installed_argument_names()
    assert ("activation_checkpointing" in names) == hasattr(args, "activation_checkpointing")


@pytest.mark.parametrize("optimizer", FineTuneConfig.model_fields["training"].annotation.model_fields["optimizer"].annotation.__args__)
def test_every_schema_optimizer_is_a_transformers_optim(optimizer):
    from transformers.training_args import OptimizerNames

    assert OptimizerNames(optimizer).value == optimizer


# ------------------------------------------------------------------------------ DeepSpeed


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_generated_deepspeed_config_leaves_numbers_to_training(stage):
    ds = generated_config(config(distributed={"use_deepspeed": True, "zero_stage": stage}))
    assert ds["zero_optimization"]["stage"] == stage
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto"
    assert "optimizer" not in ds and "scheduler" not in ds  # training.optimizer / lr_scheduler_type apply
    assert ds["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)


@pytest.mark.parametrize(
    "precision,bf16,fp16",
    [("bf16", "auto", False), ("fp16", False, "auto"), ("no", False, False)],
)
def test_deepspeed_precision_agrees_with_mixed_precision(precision, bf16, fp16):
    ds = generated_config(config(training={"mixed_precision": precision}, distributed={"use_deepspeed": True, "zero_stage": 2}))
    assert ds["bf16"]["enabled"] == bf16 and ds["fp16"]["enabled"] == fp16


def test_deepspeed_off_gives_none(tmp_path):
    assert deepspeed_config(config(), base_dir=tmp_path) is None


def test_user_deepspeed_file_is_read_relative_to_the_config(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "z.json").write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}))
    cfg = config(distributed={"use_deepspeed": True, "deepspeed_config": "ds/z.json"})
    assert deepspeed_config(cfg, base_dir=tmp_path) == {"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}


def test_inline_deepspeed_mapping_gets_zero_stage_when_it_has_none(tmp_path):
    inline = {"train_micro_batch_size_per_gpu": "auto"}
    cfg = config(distributed={"use_deepspeed": True, "deepspeed_config": inline, "zero_stage": 1})
    got = deepspeed_config(cfg, base_dir=tmp_path)
    assert got["zero_optimization"] == {"stage": 1}
    assert "zero_optimization" not in cfg.distributed.deepspeed_config  # the config is not mutated


@pytest.mark.parametrize("key,value", [("training.mixed_precision", "no"), ("evaluation.eval_strategy", "no")])
def test_command_line_no_is_the_word_not_yaml_false(key, value):
    """`finetune train ... --training.mixed_precision no` must mean "no" (YAML 1.1 reads false)."""
    from finetune_trainer.config import apply_overrides, parse_overrides

    data = apply_overrides({"model": {"base_model": "m"}}, parse_overrides([f"--{key}", value]))
    section, name = key.split(".")
    assert getattr(getattr(FineTuneConfig.model_validate(data), section), name) == "no"
