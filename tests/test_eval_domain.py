"""domain-specific-eval: the scores, the data (local and s3://), the prompts rendered as in
training, and real runs on the tiny model and on SmolLM2."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from finetune_trainer.config import validate_data
from finetune_trainer.data import DataError, tokenize_conversation
from finetune_trainer.evaluation import domain
from finetune_trainer.evaluation.generation import prompt_ids_before_answer
from finetune_trainer.evaluation.metrics import exact_match, normalize_answer, pass_at_k, token_f1

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "eval"
DEMO = REPO / "examples" / "eval" / "domain_demo.jsonl"


@pytest.mark.parametrize(
    "prediction, reference, em, f1",
    [
        ("Paris", "Paris", 1.0, 1.0),
        ("  the Paris. ", "paris", 1.0, 1.0),  # case, articles, punctuation, spaces
        ("Answer: 18.63 mi", "answer 18.63 mi", 1.0, 1.0),
        ("Paris, France", "Paris", 0.0, 2 / 3),  # precision 1/2, recall 1
        ("London", "Paris", 0.0, 0.0),
        ("", "Paris", 0.0, 0.0),
        ("", "", 1.0, 1.0),
    ],
)
def test_exact_match_and_token_f1(prediction, reference, em, f1):
    assert exact_match(prediction, reference) == em
    assert token_f1(prediction, reference) == pytest.approx(f1)


def test_token_f1_counts_repeats():
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))


def test_score_is_corpus_level():
    scores = domain.score(["Paris", "Mars"], ["Paris", "Jupiter"], [(2.0, 2), (6.0, 2)])
    assert scores["exact_match"] == 0.5 and scores["token_f1"] == 0.5
    assert scores["reference_loss"] == pytest.approx(2.0) and scores["perplexity"] == pytest.approx(math.exp(2.0))


def test_examples_and_their_row_numbers():
    examples = domain.load_examples(str(FIXTURES / "domain.jsonl"))
    assert [e.reference for e in examples] == ["Paris", "Jupiter", "Merci"]
    assert examples[2].system == "You are a concise translator."
    assert examples[2].turns()[0] == {"role": "system", "content": "You are a concise translator."}
    with pytest.raises(DataError, match=r"evaluation.domain_eval_path: .*domain_bad.jsonl row 2: field 'reference'"):
        domain.load_examples(str(FIXTURES / "domain_bad.jsonl"))
    with pytest.raises(DataError, match="evaluation.domain_eval_path: file not found"):
        domain.load_examples("missing/domain.jsonl")


def test_examples_from_s3(s3_bucket):
    import boto3

    boto3.client("s3").upload_file(str(FIXTURES / "domain.jsonl"), s3_bucket, "eval/domain.jsonl")
    examples = domain.load_examples(f"s3://{s3_bucket}/eval/domain.jsonl")
    assert [e.prompt for e in examples][:1] == ["What is the capital of France?"]
    with pytest.raises(DataError, match="does not exist"):
        domain.load_examples(f"s3://{s3_bucket}/eval/nothing.jsonl")


def _cfg(model_dir, **evaluation):
    return validate_data({
        "model": {"base_model": str(model_dir), "use_flash_attention": False},
        "dataset": {"train_path": "unused.jsonl"},
        "evaluation": {"benchmarks": ["domain-specific-eval"], "domain_eval_path": str(FIXTURES / "domain.jsonl"),
                       "eval_batch_size": 2, **evaluation},
    }).config


def test_questions_are_tokenized_exactly_as_training_does(builtin_tokenizer_dir):
    """The prompt the model answers is the training sample's prompt, token for token, and
    it ends with the assistant header (ChatML here)."""
    from transformers import AutoTokenizer

    from finetune_trainer.data.tokenize import encode

    tokenizer = AutoTokenizer.from_pretrained(builtin_tokenizer_dir)
    cfg = _cfg(builtin_tokenizer_dir)
    example = domain.load_examples(str(FIXTURES / "domain.jsonl"))[0]
    training = tokenize_conversation(example.turns(), tokenizer, cfg)
    ours = encode(example.turns(), tokenizer, cfg.dataset.preprocessing, 1 << 30)
    assert ours.input_ids == training["input_ids"] and ours.labels == training["labels"]
    prompt = tokenizer.decode(prompt_ids_before_answer(ours.input_ids, ours.labels))
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    learned = tokenizer.decode([t for t in ours.labels if t != -100])
    assert learned == "Paris<|im_end|>"  # the perplexity is over the answer and its end-of-turn


def _load(cfg):
    from finetune_trainer.model.loading import load_model, load_tokenizer

    return load_model(cfg), load_tokenizer(cfg)


def test_tiny_model_end_to_end(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, domain_eval_max_new_tokens=8)
    model, tokenizer = _load(cfg)
    out = domain.run(model, tokenizer, cfg)
    metrics = out["metrics"]
    assert set(metrics) == {"exact_match", "token_f1", "perplexity", "reference_loss"}
    assert metrics["exact_match"] == 0.0 and 0.0 <= metrics["token_f1"] <= 1.0
    # a random model over 49k tokens is about as surprised as a uniform guess
    assert math.log(len(tokenizer)) - 1.5 < metrics["reference_loss"] < math.log(len(tokenizer)) + 1.5
    # each answer and its end-of-turn token
    assert out["details"]["samples"] == 3 and out["details"]["reference_tokens"] >= 6
    assert [e["reference"] for e in out["details"]["examples"]] == ["Paris", "Jupiter", "Merci"]


@pytest.mark.slow
def test_smollm2_knows_more_than_noise():
    """A real model: answers the capital question exactly and is far less surprised by the
    references than the uniform-guess level."""
    cfg = _cfg("builtin:SmolLM2-135M-Instruct", domain_eval_max_new_tokens=16)
    model, tokenizer = _load(cfg)
    out = domain.run(model, tokenizer, cfg)
    first = out["details"]["examples"][0]
    assert "paris" in first["prediction"].lower()
    assert out["metrics"]["token_f1"] > 0.1
    assert out["metrics"]["perplexity"] < len(tokenizer) / 20  # uniform guessing: len(tokenizer)
