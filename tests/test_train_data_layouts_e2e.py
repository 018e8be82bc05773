"""`finetune train` on the built-in SmolLM2 with a tool-calling dataset (OpenAI's layout) and
with raw text (`format: text`): the loss falls, metrics.jsonl's first line says what the
data stage did, and `finetune preview` of the same config shows the tool call as learned."""

from __future__ import annotations

import json

import pytest
import yaml

from finetune_trainer.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CITIES = [("Oslo", 3), ("Lima", 19), ("Cairo", 31), ("Quito", 14)]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current temperature of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def tool_row(city: str, temp: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"How warm is it in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
            {"role": "tool", "tool_call_id": "c1", "content": json.dumps({"celsius": temp})},
            {"role": "assistant", "content": f"It is {temp} degrees in {city}."},
        ],
        "tools": TOOLS,
    }


def config(tmp_path, fmt: str, data: list[dict], max_seq_length: int) -> str:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    cfg = {
        "model": {"base_model": "builtin:SmolLM2-135M-Instruct"},
        "fine_tuning": {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
        "training": {"max_steps": 6, "micro_batch_size": 2, "learning_rate": 2e-3, "lr_scheduler_type": "constant",
                     "warmup_ratio": 0.0, "mixed_precision": "bf16", "max_seq_length": max_seq_length},
        "dataset": {"format": fmt, "train_path": str(path)},
        "output": {"output_dir": str(tmp_path / "out"), "logging_steps": 1, "save_steps": 100},
    }
    out = tmp_path / "config.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return str(out)


def losses(tmp_path) -> tuple[list[float], dict]:
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["loss"] is not None], records[0]


def test_tool_calling_dataset_trains_and_the_preview_shows_the_call_learned(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    path = config(tmp_path, "sharegpt", [tool_row(c, t) for c, t in CITIES] * 3, 384)
    assert main(["preview", "--config", path, "-n", "1", "--color", "never"]) == 0
    shown = capsys.readouterr().out
    assert '[[<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>]]' in shown
    assert "[[It is 3 degrees in Oslo.<|im_end|>]]" in shown
    assert '<tool_response>\n{"celsius": 3}\n</tool_response>' in shown and "[[<tool_response>" not in shown

    assert main(["train", "--config", path]) == 0
    loss, first = losses(tmp_path)
    print("tool-calling losses", [round(x, 3) for x in loss])
    assert len(loss) == 6 and loss[-1] < loss[0] - 0.3, loss
    assert first["data"]["train"]["tool_calls"] == 12 and first["data"]["train"]["samples"] == 12


def test_raw_text_dataset_trains_on_every_token(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    document = " ".join(f"The reactor coolant loop {i} is inspected every {i + 2} weeks by the night shift." for i in range(40))
    path = config(tmp_path, "text", [{"text": document}, {"text": "Short maintenance note: valve 7 replaced."}] * 2, 96)
    assert main(["train", "--config", path]) == 0
    loss, first = losses(tmp_path)
    data = first["data"]["train"]
    assert data["rows"] == 4 and data["samples"] > 4  # the long document became several pieces
    assert data["learned_tokens"] == data["tokens"]  # every token learned
    print("raw-text losses", [round(x, 3) for x in loss], data)
    assert loss[-1] < loss[0] - 0.3, loss
