"""Dataset formats -> conversations, and the messages malformed rows produce (file, row, field).
Pure: no tokenizer, no network."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_trainer.config.schema import FineTuneConfig
from finetune_trainer.data import DataError, read_rows, to_conversations

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"


def config(fmt: str, **custom: str) -> FineTuneConfig:
    return FineTuneConfig(model={"base_model": "x"}, dataset={"format": fmt, "custom": custom})


def conversations(name: str, fmt: str, **custom: str) -> list[list[dict]]:
    rows = read_rows(str(FIXTURES / name), field="dataset.train_path")
    return to_conversations(rows, config(fmt, **custom), source=f"data/{name}")


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


CUSTOM = {
    "system_template": "Topic: {context}",
    "prompt_template": "Question: {question}",
    "response_template": "{answer}",
}


def test_alpaca_builds_user_turn_from_instruction_and_input():
    convs = conversations("alpaca.jsonl", "alpaca")
    assert convs == [
        [turn("user", "Convert 3 km to metres."), turn("assistant", "3 km × 1000 = 3000 m. Answer: 3000 m")],
        [
            turn("user", "Sort the words alphabetically.\n\npear, apple, fig"),
            turn("assistant", "Answer: apple, fig, pear"),
        ],
        [
            turn("system", "You answer in one line."),
            turn("user", "Say hello."),
            turn("assistant", "Answer: hello"),
        ],
    ]


def test_sharegpt_maps_roles_and_drops_trailing_user_turn():
    convs = conversations("sharegpt.json", "sharegpt")
    assert convs[0] == [turn("system", "You are terse."), turn("user", "What is 2 + 2?"), turn("assistant", "Answer: 4")]
    assert [t["role"] for t in convs[1]] == ["user", "assistant", "user", "assistant"]
    assert convs[2] == [turn("user", "Spell cat backwards."), turn("assistant", "Answer: tac")]


def test_sharegpt_accepts_openai_style_messages():
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    assert to_conversations(rows, config("sharegpt"), source="x") == [[turn("user", "Hi"), turn("assistant", "Hello")]]


def test_oasst_tree_follows_best_ranked_reply_to_a_leaf():
    convs = conversations("oasst_tree.jsonl", "oasst")
    assert convs == [
        [
            turn("user", "What is the boiling point of water?"),
            turn("assistant", "Answer: 100 °C at sea level"),  # rank 0 beats rank 1
            turn("user", "And in Fahrenheit?"),
            turn("assistant", "Answer: 212 °F"),
        ],
        [turn("user", "Name a prime number."), turn("assistant", "Answer: 7")],  # unranked: first wins
        # the unanswered prompt (r1) teaches nothing and is left out
    ]


def test_oasst_rank_beats_file_order_and_deleted_branches_vanish():
    rows = [
        {"message_id": "p", "parent_id": None, "role": "prompter", "text": "Q"},
        {"message_id": "a", "parent_id": "p", "role": "assistant", "text": "bad", "rank": 2},
        {"message_id": "b", "parent_id": "p", "role": "assistant", "text": "good", "rank": 0, "deleted": True},
        {"message_id": "b2", "parent_id": "b", "role": "prompter", "text": "under a deleted reply"},
        {"message_id": "c", "parent_id": "p", "role": "assistant", "text": "ok", "rank": 1},
    ]
    assert to_conversations(rows, config("oasst"), source="x") == [[turn("user", "Q"), turn("assistant", "ok")]]


def test_oasst_text_column_splits_turns():
    convs = conversations("oasst_text.jsonl", "oasst")
    assert convs == [
        [turn("user", "What is 5 + 3?"), turn("assistant", "Answer: 8")],
        [
            turn("user", "Name a colour."),
            turn("assistant", "Answer: red"),
            turn("user", "Another?"),
            turn("assistant", "Answer: green"),
        ],
    ]


def test_custom_templates_fill_from_row_fields():
    convs = conversations("custom.jsonl", "custom", **CUSTOM)
    assert convs[1] == [
        turn("system", "Topic: arithmetic"),
        turn("user", "Question: What is 10 / 4?"),
        turn("assistant", "10 / 4 = 2.5. Answer: 2.5"),
    ]


@pytest.mark.parametrize(
    ("name", "fmt", "custom", "message"),
    [
        (
            "alpaca_bad.jsonl",
            "alpaca",
            {},
            "data/alpaca_bad.jsonl row 3: missing field 'output' (alpaca rows need instruction and output)",
        ),
        (
            "sharegpt_bad.json",
            "sharegpt",
            {},
            "data/sharegpt_bad.json row 2: conversations[1].from is 'bot'; expected one of human, gpt, system",
        ),
        ("oasst_bad.jsonl", "oasst", {}, "data/oasst_bad.jsonl row 3: missing field 'text' (oasst rows need"),
        (
            "oasst_text_bad.jsonl",
            "oasst",
            {},
            "data/oasst_text_bad.jsonl row 2: field 'text' has no assistant turn to learn from",
        ),
        (
            "custom_bad.jsonl",
            "custom",
            CUSTOM,
            "data/custom_bad.jsonl row 4: missing field 'context' (dataset.custom.system_template names it)",
        ),
    ],
)
def test_bad_row_names_file_row_and_field(name, fmt, custom, message):
    with pytest.raises(DataError) as caught:
        conversations(name, fmt, **custom)
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize(
    ("fmt", "row", "message"),
    [
        ("alpaca", {"instruction": "x", "output": 3}, "row 1: field 'output' must be a string, got a number"),
        ("alpaca", {"instruction": " ", "output": "y"}, "row 1: field 'instruction' is empty"),
        ("alpaca", ["instruction", "output"], "row 1: expected a JSON object, got a list"),
        ("sharegpt", {"conversations": []}, "row 1: field 'conversations' must be a non-empty list"),
        ("sharegpt", {"conversations": [{"from": "human"}]}, "row 1: conversations[0]: missing field 'value'"),
        ("sharegpt", {"conversations": [{"from": "human", "value": "hi"}]}, "row 1: field 'conversations' has no assistant turn"),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": "a"}, {"from": "system", "value": "b"}]},
            "row 1: conversations[1]: a system turn must come first",
        ),
        ("oasst", {"message_id": "m", "role": "bot", "text": "x"}, "row 1: field 'role' is 'bot'; expected 'prompter' or 'assistant'"),
        ("oasst", {"message_id": "m", "role": "assistant", "text": "x"}, "row 1: a conversation must start with a prompter message"),
        ("oasst", {"message_id": "m", "parent_id": "nope", "role": "assistant", "text": "x"}, "row 1: field 'parent_id' is 'nope', which matches no message_id"),
        ("oasst", {"text": "Hello ### Assistant: hi"}, "row 1: field 'text' must start with '### Human:'"),
        ("oasst", {"text": "### Human: q ### Assistant:   "}, "row 1: field 'text': turn 2 ('### Assistant:') is empty"),
        ("oasst", {"title": "x"}, "row 1: missing field 'text'"),
    ],
)
def test_invalid_values_are_reported_by_field(fmt, row, message):
    with pytest.raises(DataError) as caught:
        to_conversations([row], config(fmt), source="data/t.jsonl")
    assert str(caught.value).startswith("data/t.jsonl " + message), str(caught.value)


def test_oasst_duplicate_message_id_names_both_rows():
    rows = [
        {"message_id": "m", "parent_id": None, "role": "prompter", "text": "q"},
        {"message_id": "m", "parent_id": None, "role": "prompter", "text": "q2"},
    ]
    with pytest.raises(DataError, match=r"t row 2: message_id 'm' appears twice \(also row 1\)"):
        to_conversations(rows, config("oasst"), source="t")


@pytest.mark.parametrize(
    ("custom", "message"),
    [
        ({"prompt_template": "{question", "response_template": "{answer}"}, "dataset.custom.prompt_template: not a valid format string"),
        ({"prompt_template": "{}", "response_template": "{answer}"}, "dataset.custom.prompt_template: uses a positional field"),
        ({"prompt_template": "{question}"}, "dataset.custom.response_template is not set"),
    ],
)
def test_bad_custom_templates_name_the_config_key(custom, message):
    with pytest.raises(DataError, match="^" + message.replace(".", r"\.")):
        to_conversations([{"question": "q", "answer": "a"}], config("custom", **custom), source="t")


def test_custom_null_field_is_missing():
    cfg = config("custom", prompt_template="{question}", response_template="{answer}")
    with pytest.raises(DataError, match=r"^t row 1: missing field 'answer' \(dataset.custom.response_template names it\)"):
        to_conversations([{"question": "q", "answer": None}], cfg, source="t")
