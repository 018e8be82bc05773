"""The layouts users bring, token by token: which tokens are learned.

Rows are written here in each public layout (OpenAI chat with tools, LLaMA-Factory sharegpt
with function_call/observation, content parts, alpaca history, weight 0, raw text) and run
through the real tokenizer (SmolLM2's ChatML template, which ignores tools, and a template
written here that renders them natively). The learned text is decoded from the labels."""

from __future__ import annotations

import json

import pytest

from finetune_trainer.config.schema import FineTuneConfig
from finetune_trainer.data import DataError, encode_split, read_rows
from finetune_trainer.data.formats import parse_rows
from finetune_trainer.data.preview import PreviewSample, learned_text, segments
from finetune_trainer.data.sources import Rows
from finetune_trainer.data.tokenize import encode, encode_document, template_renders_tools

SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
END = "<|im_end|>"

# A template that renders tools, calls and results itself (Qwen2.5's layout, written here).
NATIVE_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n{% endif %}"
    "TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}{% if not tools %}<|im_start|>system\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- elif m.role == 'tool' %}<|im_start|>tool\nRESULT {{ m.content }}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
    "<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def smol(builtin_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_tokenizer_dir)


@pytest.fixture(scope="module")
def native(builtin_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(builtin_tokenizer_dir)
    tokenizer.chat_template = NATIVE_TEMPLATE
    return tokenizer


def cfg(fmt: str = "sharegpt", max_seq_length: int = 1024, **dataset) -> FineTuneConfig:
    return FineTuneConfig(model={"base_model": "x"}, training={"max_seq_length": max_seq_length},
                          dataset={"format": fmt, **dataset})


def samples(rows, tokenizer, config) -> list[PreviewSample]:
    conversations, problems = parse_rows(Rows(rows, source="t.jsonl"), config, source="t.jsonl")
    assert not problems, problems
    out = []
    for number, conversation in conversations:
        if config.dataset.format == "text":
            pieces = encode_document(conversation[0]["content"], tokenizer, config.dataset.preprocessing,
                                     config.training.max_seq_length)
        else:
            pieces = [encode(conversation, tokenizer, config.dataset.preprocessing, config.training.max_seq_length)]
        out += [PreviewSample(number, p.input_ids, p.labels, p.truncated) for p in pieces]
    return out


def one(row, tokenizer, config=None):
    [sample] = samples([row], tokenizer, config or cfg())
    text = "".join(t for _, t in segments(sample, tokenizer))
    masked = "".join(t for learned, t in segments(sample, tokenizer) if not learned)
    return learned_text(sample, tokenizer), text, masked


OPENAI_TOOLS = {
    "messages": [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 3}'},
        {"role": "assistant", "content": "It is 3 degrees in Oslo."},
    ],
    "tools": [WEATHER],
}
LLAMA_FACTORY_TOOLS = {
    "conversations": [
        {"from": "human", "value": "Weather in Oslo?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
        {"from": "observation", "value": '{"temp": 3}'},
        {"from": "gpt", "value": "It is 3 degrees in Oslo."},
    ],
    "system": "You are a weather bot.",
    "tools": json.dumps([WEATHER["function"]]),  # LLaMA-Factory: a JSON string of bare schemas
}


@pytest.mark.parametrize("row", [OPENAI_TOOLS, LLAMA_FACTORY_TOOLS], ids=["openai", "llama-factory"])
def test_tool_calls_are_learned_results_and_schemas_are_not_with_a_template_that_ignores_tools(smol, row):
    assert not template_renders_tools(smol)  # SmolLM2's ChatML drops tools: the Hermes text form is used
    learned, text, masked = one(row, smol)
    assert learned == [CALL + END, "It is 3 degrees in Oslo." + END]
    assert '"name": "get_weather", "description": "Weather for a city"' in masked  # the schema: input
    assert "<tools>" in masked and "<tool_response>\n{\"temp\": 3}\n</tool_response>" in masked  # the result: input
    assert text.startswith("<|im_start|>system\nYou are a weather bot.\n\n# Tools")  # the row's system prompt
    assert SMOL_DEFAULT_SYSTEM not in text


@pytest.mark.parametrize("row", [OPENAI_TOOLS, LLAMA_FACTORY_TOOLS], ids=["openai", "llama-factory"])
def test_a_template_that_renders_tools_gets_them_natively(native, row):
    assert template_renders_tools(native)
    learned, text, masked = one(row, native)
    assert learned == ['CALL get_weather {"city": "Oslo"}' + END, "It is 3 degrees in Oslo." + END]
    assert "TOOLS:get_weather;" in masked and 'RESULT {"temp": 3}' in masked
    assert "<tool_call>" not in text  # the template's own form, not the fallback


def test_the_plain_format_renders_tools_as_text(smol):
    config = cfg(preprocessing={"use_chat_template": False})
    learned, text, masked = one(OPENAI_TOOLS, smol, config)
    assert learned == [CALL + END, "It is 3 degrees in Oslo." + END]
    assert text.startswith("### System:\nYou are a weather bot.\n\n# Tools") and "<tool_response>" in masked


def test_a_rows_system_prompt_wins_over_the_templates_default(smol):
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "system": "Be brief."}
    learned, text, _ = one(row, smol)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and SMOL_DEFAULT_SYSTEM not in text
    assert learned == ["Hello" + END]
    both = {**row, "conversations": [{"from": "system", "value": "x"}, *row["conversations"]]}
    with pytest.raises(DataError, match=r"row 1: the row has both a field 'system' and a system turn"):
        encode_split(Rows([both], source="t.jsonl"), cfg(), smol, source="t.jsonl")


def test_text_content_parts_are_joined(smol):
    row = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Both read."}]},
    ]}
    learned, text, _ = one(row, smol)
    assert "Part one.\nPart two." in text and learned == ["Both read." + END]


@pytest.mark.parametrize("row, field", [
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                 {"type": "image_url", "image_url": {"url": "x.png"}}]},
                   {"role": "assistant", "content": "A cat."}]}, "messages[0].content[1] is an 'image_url' part"),
    ({"messages": [{"role": "user", "content": "<image>What is this?"}, {"role": "assistant", "content": "A cat."}],
      "images": ["cat.png"]}, "field 'images': this trainer trains text-only models"),
    ({"instruction": "<audio>Transcribe.", "output": "hello", "audios": ["a.wav"]}, "field 'audios'"),
])
def test_images_and_audio_are_refused_never_trained_as_text(smol, row, field):
    config = cfg("alpaca" if "instruction" in row else "sharegpt")
    with pytest.raises(DataError) as caught:
        encode_split(Rows([row], source="t.jsonl"), config, smol, source="t.jsonl")
    assert f"t.jsonl row 1: {field}" in str(caught.value) and "text-only" in str(caught.value)


def test_alpaca_history_becomes_the_earlier_turns(smol):
    row = {"instruction": "And 3 + 3?", "output": "6", "history": [["What is 1 + 1?", "2"], ["And 2 + 2?", "4"]],
           "system": "Answer with a number."}
    learned, text, _ = one(row, smol, cfg("alpaca"))
    assert learned == ["2" + END, "4" + END, "6" + END]
    assert text.index("What is 1 + 1?") < text.index("And 2 + 2?") < text.index("And 3 + 3?")
    assert text.startswith("<|im_start|>system\nAnswer with a number.")


def test_weight_zero_turns_are_masked(smol):
    row = {"messages": [
        {"role": "user", "content": "Say a bad word."}, {"role": "assistant", "content": "Darn.", "weight": 0},
        {"role": "user", "content": "Be polite."}, {"role": "assistant", "content": "Sorry, friend.", "weight": 1},
    ]}
    learned, text, masked = one(row, smol)
    assert learned == ["Sorry, friend." + END] and "Darn." in masked
    none = {"messages": [row["messages"][0], row["messages"][1]]}
    with pytest.raises(DataError, match="every assistant turn has weight 0"):
        encode_split(Rows([none], source="t.jsonl"), cfg(), smol, source="t.jsonl")
    with pytest.raises(DataError, match=r"messages\[1\]\.weight must be 0 \(not learned\) or 1"):
        encode_split(Rows([{"messages": [row["messages"][0], {**row["messages"][1], "weight": 0.5}]}], source="t.jsonl"),
                     cfg(), smol, source="t.jsonl")


def test_raw_text_is_learned_whole_in_max_seq_length_pieces(smol):
    document = " ".join(f"Sentence number {i} of a long domain document." for i in range(60))
    config = cfg("text", max_seq_length=64)
    pieces = samples([{"text": document}, {"text": "A short note."}], smol, config)
    ids = smol(document, add_special_tokens=False)["input_ids"] + [smol.eos_token_id]
    long_pieces = [p for p in pieces if p.row == 1]
    assert [len(p.input_ids) for p in long_pieces[:-1]] == [64] * (len(long_pieces) - 1)
    assert sum((p.input_ids for p in long_pieces), []) == ids  # nothing cut away
    assert all(p.labels == p.input_ids for p in pieces)  # every token learned
    assert smol.decode(pieces[-1].input_ids) == "A short note." + END


def test_every_bad_row_is_listed_and_the_skip_bound_holds(smol, tmp_path):
    good = {"instruction": "Say hi.", "output": "hi"}
    rows = [good, {"instruction": "x"}, good, {"output": "y"}, [1], good]
    with pytest.raises(DataError) as caught:
        encode_split(Rows(rows, source="t.jsonl"), cfg("alpaca"), smol, source="t.jsonl")
    message = str(caught.value)
    assert message.startswith("t.jsonl: 3 bad rows:")
    for row, what in ((2, "missing field 'output'"), (4, "missing field 'instruction'"), (5, "expected a JSON object")):
        assert f"  row {row}: {what}" in message
    assert "set dataset.skip_bad_rows" in message
    _, stats = encode_split(Rows(rows, source="t.jsonl"), cfg("alpaca", skip_bad_rows=3), smol, source="t.jsonl")
    assert (stats.rows, stats.samples, stats.skipped) == (6, 3, 3)
    with pytest.raises(DataError, match=r"3 bad rows is more than dataset.skip_bad_rows \(2\)"):
        encode_split(Rows(rows, source="t.jsonl"), cfg("alpaca", skip_bad_rows=2), smol, source="t.jsonl")
    many = [{"output": "y"}] * 25 + [good]
    with pytest.raises(DataError) as caught:
        encode_split(Rows(many, source="t.jsonl"), cfg("alpaca"), smol, source="t.jsonl")
    assert str(caught.value).count("\n  row ") == 20 and "... and 5 more bad rows" in str(caught.value)


def test_bad_tool_rows_name_row_and_field(smol):
    cases = [
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None,
                        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
         "messages[1].tool_calls[0].arguments: not valid JSON"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": '{"arguments": {}}'}]},
         "conversations[1].value: a tool call needs the function's name"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "[{]"},
         "field 'tools': not valid JSON"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": [{"description": "x"}]},
         "field 'tools'[0]: a function schema needs a name"),
        ({"messages": [{"role": "user", "content": "q", "tool_calls": [{"name": "f"}]}, {"role": "assistant", "content": "a"}]},
         "messages[0]: only an assistant turn can make tool calls"),
    ]
    for row, message in cases:
        with pytest.raises(DataError) as caught:
            encode_split(Rows([row], source="t.jsonl"), cfg(), smol, source="t.jsonl")
        assert str(caught.value).startswith(f"t.jsonl row 1: {message}"), (message, str(caught.value))


def test_counts_in_the_stats(smol):
    rows = [OPENAI_TOOLS, LLAMA_FACTORY_TOOLS, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    _, stats = encode_split(Rows(rows, source="t.jsonl"), cfg(), smol, source="t.jsonl")
    assert (stats.rows, stats.samples, stats.tool_calls, stats.turns) == (3, 3, 2, 5 + 5 + 2)
    assert 0 < stats.learned_tokens < stats.tokens
    assert "2 tool calls" in stats.summary("train", 1024)


def test_read_rows_keeps_a_bom_file_usable_end_to_end(smol, tmp_path):
    path = tmp_path / "chat.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(OPENAI_TOOLS).encode())  # one conversation, one object, a BOM
    rows = read_rows(str(path), field="dataset.train_path")
    samples_, stats = encode_split(rows, cfg(), smol, source=rows.source)
    assert stats.samples == 1 and stats.tool_calls == 1
