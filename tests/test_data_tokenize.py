"""Tokenisation with the real SmolLM2 tokenizer (ChatML template): loss masks checked token
by token against sequences built independently, segment by segment; BOS/EOS; truncation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_trainer.config.schema import FineTuneConfig
from finetune_trainer.data import (
    IGNORE_INDEX,
    DataError,
    data_collator,
    prepare_data,
    read_rows,
    to_conversations,
    tokenize_conversation,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
CUSTOM = {
    "system_template": "Topic: {context}",
    "prompt_template": "Question: {question}",
    "response_template": "{answer}",
}


@pytest.fixture(scope="module")
def tokenizer(builtin_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_tokenizer_dir)


@pytest.fixture
def fresh_tokenizer(builtin_tokenizer_dir):
    """A copy a test may change (its chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_tokenizer_dir)


def config(fmt: str = "alpaca", *, max_seq_length: int = 2048, custom=None, **pre) -> FineTuneConfig:
    return FineTuneConfig(
        model={"base_model": "x"},
        training={"max_seq_length": max_seq_length},
        dataset={"format": fmt, "preprocessing": pre, "custom": custom or {}},
    )


def fixture_conversation(name: str, fmt: str, index: int, **custom) -> list[dict]:
    rows = read_rows(str(FIXTURES / name), field="dataset.train_path")
    return to_conversations(rows, config(fmt, custom=custom), source=name)[index]


def expected(segments: list[tuple[str, bool]], tokenizer) -> tuple[list[int], list[int]]:
    """The oracle: each segment tokenized on its own, labelled when learned."""
    ids, labels = [], []
    for text, learned in segments:
        part = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if learned else [IGNORE_INDEX] * len(part)
    return ids, labels


def chatml(turns: list[dict], *, eos_last: bool = True) -> list[tuple[str, bool]]:
    """SmolLM2's template by hand: the assistant's content and its <|im_end|> are learned."""
    segments = [] if turns[0]["role"] == "system" else [(DEFAULT_SYSTEM, False)]
    for i, turn in enumerate(turns):
        learned = turn["role"] == "assistant"
        segments += [(f"<|im_start|>{turn['role']}\n", False), (turn["content"], learned), ("<|im_end|>", learned)]
        if not (eos_last and i == len(turns) - 1):
            segments.append(("\n", False))
    return segments


def assert_tokens(sample: dict, segments: list[tuple[str, bool]], tokenizer) -> None:
    ids, labels = expected(segments, tokenizer)
    assert sample["input_ids"] == ids
    for position, (token, label, want) in enumerate(zip(sample["input_ids"], sample["labels"], labels)):
        assert label == want, f"token {position} {tokenizer.decode([token])!r}: label {label}, expected {want}"
    assert sample["attention_mask"] == [1] * len(ids)


@pytest.mark.parametrize(
    ("name", "fmt", "index", "custom"),
    [
        ("alpaca.jsonl", "alpaca", 1, {}),  # instruction + input
        ("sharegpt.json", "sharegpt", 1, {}),  # two assistant turns
        ("oasst_tree.jsonl", "oasst", 0, {}),  # flattened tree, two assistant turns
        ("oasst_text.jsonl", "oasst", 1, {}),  # "### Human: ... ### Assistant: ..." column
        ("custom.jsonl", "custom", 1, CUSTOM),  # system + prompt + response templates
    ],
)
def test_chat_template_masks_all_but_responses(tokenizer, name, fmt, index, custom):
    turns = fixture_conversation(name, fmt, index, **custom)
    sample = tokenize_conversation(turns, tokenizer, config(fmt))
    assert_tokens(sample, chatml(turns), tokenizer)
    learned = [t for t, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE_INDEX]
    responses = "".join(t["content"] + "<|im_end|>" for t in turns if t["role"] == "assistant")
    assert tokenizer.decode(learned) == responses


def test_plain_format_with_bos_and_eos(tokenizer):
    turns = fixture_conversation("custom.jsonl", "custom", 1, **CUSTOM)
    sample = tokenize_conversation(turns, tokenizer, config(use_chat_template=False, add_bos_token=True))
    prompt = "### System:\nTopic: arithmetic\n\n### Instruction:\nQuestion: What is 10 / 4?\n\n### Response:\n"
    segments = [("<|im_start|>", False), (prompt, False), ("10 / 4 = 2.5. Answer: 2.5", True), ("<|im_end|>", True)]
    assert_tokens(sample, segments, tokenizer)
    assert sample["input_ids"][0] == tokenizer.bos_token_id and sample["input_ids"][-1] == tokenizer.eos_token_id


def test_plain_format_multi_turn_ends_each_response_with_eos(tokenizer):
    turns = fixture_conversation("sharegpt.json", "sharegpt", 1)
    sample = tokenize_conversation(turns, tokenizer, config(use_chat_template=False, add_eos_token=False))
    segments = [
        ("### Instruction:\nName a planet.\n\n### Response:\n", False),
        ("Answer: Mars", True),
        ("<|im_end|>", True),
        ("\n\n### Instruction:\nAnother one?\n\n### Response:\n", False),
        ("Answer: Venus", True),  # add_eos_token false: the sample ends with the content
    ]
    assert_tokens(sample, segments, tokenizer)


def test_tokenizer_without_template_falls_back_to_plain(fresh_tokenizer):
    fresh_tokenizer.chat_template = None
    turns = fixture_conversation("alpaca.jsonl", "alpaca", 0)
    sample = tokenize_conversation(turns, fresh_tokenizer, config(use_chat_template=True))
    segments = [
        ("### Instruction:\nConvert 3 km to metres.\n\n### Response:\n", False),
        ("3 km × 1000 = 3000 m. Answer: 3000 m", True),
        ("<|im_end|>", True),
    ]
    assert_tokens(sample, segments, fresh_tokenizer)


def test_add_eos_false_keeps_template_ending(tokenizer):
    turns = fixture_conversation("alpaca.jsonl", "alpaca", 0)
    sample = tokenize_conversation(turns, tokenizer, config(add_eos_token=False))
    assert_tokens(sample, chatml(turns, eos_last=False), tokenizer)
    assert tokenizer.decode(sample["input_ids"][-2:]) == "<|im_end|>\n"


def test_add_bos_is_not_doubled(tokenizer):
    """SmolLM2's BOS is <|im_start|>, which the template already starts with."""
    turns = fixture_conversation("alpaca.jsonl", "alpaca", 0)
    with_bos = tokenize_conversation(turns, tokenizer, config(add_bos_token=True))
    without = tokenize_conversation(turns, tokenizer, config(add_bos_token=False))
    assert with_bos == without and with_bos["input_ids"][0] == tokenizer.bos_token_id != with_bos["input_ids"][1]


def test_train_on_inputs_learns_every_token(tokenizer):
    turns = fixture_conversation("sharegpt.json", "sharegpt", 1)
    sample = tokenize_conversation(turns, tokenizer, config(train_on_inputs=True))
    assert sample["labels"] == sample["input_ids"]
    assert sample["input_ids"] == expected(chatml(turns), tokenizer)[0]


def test_template_that_rewrites_history_is_refused_with_a_fix(fresh_tokenizer):
    fresh_tokenizer.chat_template = "{{ messages[-1]['content'] }}"  # shows only the last turn
    turns = fixture_conversation("sharegpt.json", "sharegpt", 1)
    with pytest.raises(DataError, match="use_chat_template: false"):
        tokenize_conversation(turns, fresh_tokenizer, config())


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_template_error_names_row(fresh_tokenizer, tmp_path):
    fresh_tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "b", "system": "s"}]
    cfg = config()
    cfg.dataset.train_path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError, match=r"t\.jsonl row 2: the tokenizer's chat template rejected this conversation \(no system role\)"):
        prepare_data(cfg, fresh_tokenizer)


def test_truncation_and_dropping_are_counted(tokenizer, tmp_path):
    long = " ".join(["word"] * 200)
    rows = [
        {"instruction": "Say hi.", "output": "Answer: hi"},  # fits
        {"instruction": long, "output": "Answer: ok"},  # response beyond the limit: dropped
        {"instruction": "Repeat it.", "output": long},  # response cut: truncated, kept
    ]
    cfg = config(max_seq_length=64)
    cfg.dataset.train_path = write_jsonl(tmp_path / "train.jsonl", rows)
    data = prepare_data(cfg, tokenizer)
    stats = data.stats["train"]
    assert (stats.rows, stats.samples, stats.truncated, stats.dropped) == (3, 2, 1, 1)
    lengths = [len(ids) for ids in data.train["input_ids"]]
    assert max(lengths) == 64 and stats.tokens == sum(lengths)
    assert data.train[1]["input_ids"][-1] != tokenizer.eos_token_id  # a cut response does not learn to stop
    assert "1 of 3 samples truncated at 64 tokens, 1 dropped" in stats.summary("train", 64)
    assert data.eval is None


def test_nothing_left_to_learn_is_an_error(tokenizer, tmp_path):
    cfg = config(max_seq_length=8)
    cfg.dataset.train_path = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "Say hi.", "output": "hi"}])
    with pytest.raises(DataError, match=r"^dataset\.train_path: none of the 1 samples .* training\.max_seq_length \(8\)"):
        prepare_data(cfg, tokenizer)


@pytest.mark.parametrize(
    ("name", "fmt", "custom"),
    [
        ("alpaca.jsonl", "alpaca", {}),
        ("sharegpt.json", "sharegpt", {}),
        ("oasst_tree.jsonl", "oasst", {}),
        ("oasst_text.jsonl", "oasst", {}),
        ("custom.jsonl", "custom", CUSTOM),
    ],
)
def test_prepare_data_labels_are_ids_or_ignored(tokenizer, name, fmt, custom):
    cfg = config(fmt, custom=custom)
    cfg.dataset.train_path = str(FIXTURES / name)
    cfg.dataset.eval_path = str(FIXTURES / name)
    data = prepare_data(cfg, tokenizer)
    assert set(data.stats) == {"train", "eval"} and len(data.eval) == len(data.train) == data.stats["train"].samples
    for row in data.train:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"])
        assert all(label in (token, IGNORE_INDEX) for token, label in zip(row["input_ids"], row["labels"]))
        assert row["labels"][-1] == tokenizer.eos_token_id


def test_missing_eval_file_names_the_field(tokenizer):
    cfg = config()
    cfg.dataset.train_path = str(FIXTURES / "alpaca.jsonl")
    cfg.dataset.eval_path = "data/nope.jsonl"
    with pytest.raises(DataError, match=r"^dataset\.eval_path: file not found: data/nope\.jsonl"):
        prepare_data(cfg, tokenizer)


def test_collator_pads_right_with_pad_id_and_ignored_labels(tokenizer):
    turns = [fixture_conversation("alpaca.jsonl", "alpaca", i) for i in (0, 1)]
    samples = [tokenize_conversation(t, tokenizer, config()) for t in turns]
    batch = data_collator(tokenizer)(samples)
    short, long = sorted(range(2), key=lambda i: len(samples[i]["input_ids"]))
    n, width = len(samples[short]["input_ids"]), len(samples[long]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    assert batch["input_ids"][short, n:].tolist() == [tokenizer.pad_token_id] * (width - n)
    assert batch["attention_mask"][short].tolist() == [1] * n + [0] * (width - n)
    assert batch["labels"][short].tolist() == samples[short]["labels"] + [IGNORE_INDEX] * (width - n)
    assert batch["labels"][long].tolist() == samples[long]["labels"]
