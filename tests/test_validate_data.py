"""`finetune validate` reads the data too: every bad row, per-file counts, the share of
samples truncated; data errors exit 1 like config errors; a Hub dataset is not downloaded."""

from __future__ import annotations

import json

import yaml

from finetune_trainer.cli import main

GOOD = {"instruction": "Say hi.", "output": "hi"}


def write(tmp_path, rows, *, name="train.jsonl", **dataset):
    data = tmp_path / name
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def config(tmp_path, model_dir, **dataset) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"model": {"base_model": str(model_dir)}, "training": {"max_seq_length": 64},
                                    "dataset": dataset}))
    return str(path)


def test_every_bad_row_is_listed_and_exits_1(tmp_path, tiny_model_dir, capsys):
    data = write(tmp_path, [GOOD, {"instruction": "x"}, GOOD, [1], {"output": "y"}])
    assert main(["validate", "--config", config(tmp_path, tiny_model_dir, train_path=str(data))]) == 1
    err = capsys.readouterr().err
    assert f"{data}: 3 bad rows:" in err
    assert "row 2: missing field 'output'" in err and "row 4: expected a JSON object" in err
    assert "row 5: missing field 'instruction'" in err and "the config is valid, but 1 data file has errors" in err


def test_counts_truncation_and_the_skip_bound(tmp_path, tiny_model_dir, capsys):
    long = {"instruction": "Repeat: " + "word " * 80, "output": "word"}
    data = write(tmp_path, [GOOD, GOOD, long, {"instruction": "x"}])
    path = config(tmp_path, tiny_model_dir, train_path=str(data), skip_bad_rows=1)
    assert main(["validate", "--config", path]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("dataset.train_path"))
    assert "4 rows -> 2 samples" in line and "1 dropped" in line and "truncated at 64 tokens" in line, line
    assert "row 4: missing field 'output'" in out and "skipped in training: dataset.skip_bad_rows is 1" in out


def test_missing_files_warn_and_hub_datasets_are_not_downloaded(tmp_path, tiny_model_dir, capsys):
    path = config(tmp_path, tiny_model_dir, train_path="org/some-dataset", eval_path=str(tmp_path / "nope.jsonl"))
    assert main(["validate", "--config", path]) == 0
    captured = capsys.readouterr()
    assert "dataset.train_path: org/some-dataset is a Hugging Face dataset ID; not downloaded by validate" in captured.out
    assert "dataset.eval_path" in captured.err and "not found here" in captured.err


def test_no_sample_left_within_max_seq_length_is_an_error(tmp_path, tiny_model_dir, capsys):
    data = write(tmp_path, [{"instruction": "Repeat: " + "word " * 80, "output": "word"}])
    assert main(["validate", "--config", config(tmp_path, tiny_model_dir, train_path=str(data))]) == 1
    assert "has a response token left within training.max_seq_length (64)" in capsys.readouterr().err


def test_no_data_checks_only_the_config(tmp_path, tiny_model_dir, capsys):
    data = write(tmp_path, [[1]])
    assert main(["validate", "--config", config(tmp_path, tiny_model_dir, train_path=str(data)), "--no-data"]) == 0
