"""lm-evaluation-harness through lm_eval itself, offline, on the shipped local task: the tiny
model, a LoRA-wrapped model (the adapter is what gets scored), and SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_trainer.config import validate_data
from finetune_trainer.evaluation import BenchmarkError, lm_harness

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "examples" / "eval" / "lm_eval_tasks"


def _cfg(model_dir, **lm_eval):
    return validate_data({
        "model": {"base_model": str(model_dir), "use_flash_attention": False},
        "dataset": {"train_path": "unused.jsonl"},
        "training": {"seed": 7},
        "evaluation": {"benchmarks": ["lm-evaluation-harness"], "eval_batch_size": 8,
                       "lm_eval": {"tasks": ["local_qa"], "include_path": str(TASKS), **lm_eval}},
    }).config


@pytest.mark.parametrize("limit, expected", [(None, None), (5, 5), (5.0, 5), (0.25, 0.25)])
def test_evaluate_arguments(limit, expected, tmp_path):
    args = lm_harness.evaluate_arguments(_cfg(tmp_path, limit=limit, num_fewshot=2, apply_chat_template=True))
    assert args["limit"] == expected and type(args["limit"]) is type(expected)
    assert args["tasks"] == ["local_qa"] and args["num_fewshot"] == 2 and args["apply_chat_template"] is True
    assert args["random_seed"] == args["fewshot_random_seed"] == 7


def test_flatten_results():
    output = {
        "results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.75},
                    "gsm8k": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.5}},
        "groups": {"mmlu": {"acc,none": 0.4, "acc_stderr,none": "N/A"}},
    }
    assert lm_harness.flatten_results(output) == {
        "arc_easy/acc": 0.5,
        "arc_easy/acc_norm": 0.75,
        "gsm8k/exact_match[flexible-extract]": 0.5,
        "gsm8k/exact_match[strict-match]": 0.25,
        "mmlu/acc": 0.4,
    }


def _load(cfg):
    from finetune_trainer.model.loading import load_model, load_tokenizer

    return load_model(cfg), load_tokenizer(cfg)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    cfg = _cfg(tiny_model_dir)
    return (*_load(cfg), tiny_model_dir)


def test_local_task_on_the_tiny_model(tiny):
    model, tokenizer, model_dir = tiny
    out = lm_harness.run(model, tokenizer, _cfg(model_dir, limit=8))
    assert set(out["metrics"]) == {"local_qa/acc", "local_qa/acc_norm"}
    assert all(0.0 <= v <= 1.0 for v in out["metrics"].values())
    assert out["details"]["samples"] == {"local_qa": 8}
    assert out["details"]["num_fewshot"] == {"local_qa": 3}  # the task's own default


def test_num_fewshot_from_the_config(tiny):
    model, tokenizer, model_dir = tiny
    out = lm_harness.run(model, tokenizer, _cfg(model_dir, limit=2, num_fewshot=1))
    assert out["details"]["num_fewshot"] == {"local_qa": 1}


def test_the_adapter_is_what_gets_scored(tiny):
    """HFLM wraps the model in memory: with a LoRA adapter applied, lm_eval's forward
    passes go through the adapter's layers."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer, model_dir = tiny
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    calls = []
    lora_layer = next(m for name, m in peft_model.named_modules() if name.endswith("q_proj") and hasattr(m, "lora_A"))
    handle = lora_layer.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = lm_harness.run(peft_model, tokenizer, _cfg(model_dir, limit=2, num_fewshot=0))
    finally:
        handle.remove()
        peft_model.unload()
    assert calls and set(out["metrics"]) == {"local_qa/acc", "local_qa/acc_norm"}


def test_unknown_task_names_the_field(tiny):
    model, tokenizer, model_dir = tiny
    with pytest.raises(BenchmarkError, match=r"evaluation.lm_eval.tasks: unknown lm_eval task\(s\) 'local_q' \(did you mean 'local_qa'"):
        lm_harness.run(model, tokenizer, _cfg(model_dir, tasks=["local_q"]))


def test_missing_include_path_names_the_field(tiny, tmp_path):
    model, tokenizer, model_dir = tiny
    with pytest.raises(BenchmarkError, match="evaluation.lm_eval.include_path: folder not found"):
        lm_harness.run(model, tokenizer, _cfg(model_dir, include_path=str(tmp_path / "nope")))


@pytest.mark.slow
def test_smollm2_answers_the_local_task():
    """A real model knows these: 3-shot SmolLM2-135M-Instruct picks (nearly) every right
    choice, where chance is 0.25."""
    cfg = _cfg("builtin:SmolLM2-135M-Instruct")
    model, tokenizer = _load(cfg)
    out = lm_harness.run(model, tokenizer, cfg)
    assert out["details"]["samples"] == {"local_qa": 20}
    assert out["metrics"]["local_qa/acc_norm"] >= 0.8
