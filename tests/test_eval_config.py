"""The evaluation keys: defaults, bounds, and the rule that a selected benchmark has its inputs."""

from __future__ import annotations

import pytest

from finetune_trainer.config import ConfigError, load_config, validate_data

BASE = {"model": {"base_model": "m"}, "dataset": {"train_path": "d.jsonl"}}


def _cfg(evaluation: dict, **kwargs):
    return validate_data({**BASE, "evaluation": evaluation}, **kwargs)


def test_defaults():
    ev = _cfg({}).config.evaluation
    assert ev.evaluate_base_model is False and ev.domain_eval_path is None
    assert ev.domain_eval_max_new_tokens == 128
    assert ev.lm_eval.tasks == ["hellaswag", "arc_easy"] and ev.lm_eval.num_fewshot is None
    assert ev.lm_eval.limit is None and ev.lm_eval.include_path is None and ev.lm_eval.apply_chat_template is False
    assert ev.human_eval.problems_path == "openai/openai_humaneval:test"
    assert (ev.human_eval.max_new_tokens, ev.human_eval.timeout_seconds, ev.human_eval.memory_mb) == (384, 10.0, 1024)


@pytest.mark.parametrize(
    "evaluation, path, text",
    [
        ({"lm_eval": {"tasks": []}}, "evaluation.lm_eval.tasks", "at least 1"),
        ({"lm_eval": {"num_fewshot": -1}}, "evaluation.lm_eval.num_fewshot", "greater than or equal to 0"),
        ({"lm_eval": {"limit": 0}}, "evaluation.lm_eval.limit", "greater than 0"),
        ({"lm_eval": {"taks": ["x"]}}, "evaluation.lm_eval.taks", "did you mean 'tasks'"),
        ({"human_eval": {"timeout_seconds": 0}}, "evaluation.human_eval.timeout_seconds", "greater than 0"),
        ({"human_eval": {"memory_mb": 8}}, "evaluation.human_eval.memory_mb", "greater than or equal to 64"),
        ({"domain_eval_max_new_tokens": 0}, "evaluation.domain_eval_max_new_tokens", "greater than or equal to 1"),
    ],
)
def test_bounds_name_the_field(evaluation, path, text):
    with pytest.raises(ConfigError) as info:
        _cfg(evaluation)
    assert any(issue.path == path and text in issue.message for issue in info.value.errors), info.value.errors


def _write(tmp_path, body: str):
    config = tmp_path / "c.yaml"
    config.write_text("model: {base_model: m}\ndataset: {train_path: d.jsonl}\n" + body)
    return config


def test_domain_eval_without_path_warns_in_validate_fails_in_train(tmp_path):
    config = _write(tmp_path, "evaluation: {benchmarks: [domain-specific-eval]}\n")
    loaded = load_config(config)
    assert [w.path for w in loaded.warnings] == ["evaluation.domain_eval_path"]
    with pytest.raises(ConfigError) as info:
        load_config(config, mode="train")
    [issue] = info.value.errors
    assert issue.path == "evaluation.domain_eval_path" and "domain-specific-eval" in issue.message


def test_missing_local_inputs_fail_in_train(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _write(
        tmp_path,
        "evaluation:\n"
        "  benchmarks: [domain-specific-eval, lm-evaluation-harness, human-eval]\n"
        "  domain_eval_path: eval/domain.jsonl\n"
        "  lm_eval: {tasks: [local_qa], include_path: eval/tasks}\n"
        "  human_eval: {problems_path: ./eval/problems.jsonl}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(config, mode="train")
    assert sorted(i.path for i in info.value.errors) == [
        "evaluation.domain_eval_path",
        "evaluation.human_eval.problems_path",
        "evaluation.lm_eval.include_path",
    ]
    assert all("not found" in i.message for i in info.value.errors)
    (tmp_path / "eval" / "tasks").mkdir(parents=True)
    (tmp_path / "eval" / "domain.jsonl").write_text('{"prompt": "a", "reference": "b"}\n')
    (tmp_path / "eval" / "problems.jsonl").write_text("{}\n")
    assert load_config(config, mode="train").config.evaluation.lm_eval.include_path == "eval/tasks"


def test_remote_inputs_are_not_checked_locally(tmp_path):
    config = _write(
        tmp_path,
        "evaluation:\n  benchmarks: [domain-specific-eval, human-eval]\n"
        "  domain_eval_path: s3://bucket/domain.jsonl\n  human_eval: {problems_path: openai/openai_humaneval:test}\n",
    )
    assert load_config(config, mode="train").warnings == []


def test_unselected_benchmark_inputs_are_ignored(tmp_path):
    config = _write(tmp_path, "evaluation: {domain_eval_path: missing.jsonl}\n")
    assert load_config(config, mode="train").warnings == []


def test_before_without_benchmarks_warns():
    assert [w.path for w in _cfg({"evaluate_base_model": True}).warnings] == ["evaluation.evaluate_base_model"]
