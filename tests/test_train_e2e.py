"""`finetune train` end to end on the tiny Llama, one process: every method really trains,
the loss falls, and every output is there and loads back."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from finetune_trainer.cli import main
from finetune_trainer.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Four short answers, repeated: a high learning rate makes the loss fall within a few steps.
# The tiny random Llama's logits span ~1 nat (0.02-scale tied embeddings), so adapters on the
# projections alone barely move the loss; an adapter on lm_head lets LoRA learn in 8 steps.
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "lm_head"]}
PAIRS = [("Say the first word.", "apple"), ("Say the second word.", "banana"),
         ("Say the third word.", "cherry"), ("Say the fourth word.", "date")]


def write_data(tmp_path, repeat=4):
    rows = [{"instruction": q, "output": a} for q, a in PAIRS] * repeat
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluation.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in PAIRS))
    return train, evaluation


def tiny_config(tmp_path, model_dir, method="lora", **sections):
    train, evaluation = write_data(tmp_path)
    cfg = {
        "model": {"base_model": str(model_dir)},
        "fine_tuning": {"method": method, "lora": LORA},
        "training": {
            "max_steps": 8, "micro_batch_size": 4, "learning_rate": 1e-2, "lr_scheduler_type": "constant",
            "warmup_ratio": 0.0, "mixed_precision": "no", "max_seq_length": 64,
        },
        "dataset": {"format": "alpaca", "train_path": str(train), "eval_path": str(evaluation)},
        "output": {"output_dir": str(tmp_path / "out"), "logging_steps": 1, "save_steps": 4, "save_total_limit": 2},
        "evaluation": {"do_eval": True, "eval_steps": 4, "eval_batch_size": 4},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def run_train(tmp_path, cfg, *overrides, name="config.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return main(["train", "--config", str(path), *overrides])


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_loss_fell(out):
    losses = [r["loss"] for r in metrics(out) if r["loss"] is not None]
    assert len(losses) >= 4
    assert losses[-1] < losses[0] - 0.5, losses


def assert_common_outputs(out, tokenizer_dir):
    from transformers import AutoTokenizer

    for name in ("config.yaml", "metrics.jsonl", "loss.png", "train_results.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    reloaded = load_config(out / "config.yaml", mode="train").config  # self-contained, re-validates
    assert reloaded.output.output_dir == str(out)
    tok, ref = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tok("Say the word") == ref("Say the word")
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 8 and results["train_tokens_per_second"] > 0
    before, after = results["eval_before"], results["eval_after"]
    assert after["eval_loss"] < before["eval_loss"]
    assert after["perplexity"] == pytest.approx(math.exp(after["eval_loss"]))
    evals = [r for r in metrics(out) if r["eval_loss"] is not None]
    assert [r["step"] for r in evals] == [0, 4, 8]  # before training, then every eval_steps
    assert all(r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"])) for r in evals)
    return results


def changed(base_dir, state_dict):
    """Names of the base model's tensors that differ in `state_dict`."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    return {name for name, t in state_dict.items() if name in base and not base[name].equal(t)}


def test_lora_trains_saves_an_adapter_that_reloads(tmp_path, tiny_model_dir, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rc = run_train(tmp_path, tiny_config(tmp_path, tiny_model_dir))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = tmp_path / "out"
    assert_loss_fell(out)
    assert_common_outputs(out, tiny_model_dir)
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) > 0 for p in lora_b)  # B starts at zero: it trained
    # save_total_limit 2 with saves at 4 and 8
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert "Eval loss before:" in captured.out and "Eval loss after:" in captured.out
    assert "Sample answer:" in captured.out


def test_full_from_a_manifest_trains_every_weight(tmp_path, tiny_model_dir, capsys):
    from safetensors.torch import load_file

    spec = tiny_config(tmp_path, tiny_model_dir, method="full", training={"learning_rate": 2e-3})
    spec |= {"nodes": 1, "gpus_per_node": 0}
    job = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "tiny-full"}, "spec": spec}
    rc = run_train(tmp_path, job, name="job.yaml")
    assert rc == 0, capsys.readouterr().err
    out = tmp_path / "out"
    assert_loss_fell(out)
    assert_common_outputs(out, tiny_model_dir)
    assert "nodes" not in yaml.safe_load((out / "config.yaml").read_text())  # the seed sections only
    weights = load_file(out / "model.safetensors")
    assert {n for n in weights if n.endswith("q_proj.weight")} <= changed(tiny_model_dir, weights)


@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "adamw_8bit"])
def test_qlora_on_4bit_nf4(tmp_path, tiny_model_dir, capsys, optimizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(
        tmp_path, tiny_model_dir, method="qlora",
        training={"optimizer": optimizer, "mixed_precision": "bf16"},
        fine_tuning={"method": "qlora", "lora": LORA,
                     "quantization": {"bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"}},
    )
    rc = run_train(tmp_path, cfg)
    assert rc == 0, capsys.readouterr().err
    out = tmp_path / "out"
    assert_loss_fell(out)
    assert_common_outputs(out, tiny_model_dir)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["load_in_4bit"] is True and saved["training"]["optimizer"] == optimizer
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)


@pytest.fixture(scope="module")
def roomy_tiny_dir(tmp_path_factory, tiny_model_dir):
    """The tiny Llama with 5x larger (tied) embeddings, so its logits can move several nats
    when only projections train (as with fine_tuning.spectrum.train_embeddings: false)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("roomy-tiny")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(5.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_spectrum_trains_only_the_selected_modules(tmp_path, roomy_tiny_dir, capsys):
    from safetensors.torch import load_file

    tiny_model_dir = roomy_tiny_dir
    cfg = tiny_config(tmp_path, tiny_model_dir, method="spectrum", training={"learning_rate": 5e-3})
    cfg["fine_tuning"] = {"method": "spectrum", "spectrum": {"snr_threshold": 0.5}}
    rc = run_train(tmp_path, cfg)
    assert rc == 0, capsys.readouterr().err
    out = tmp_path / "out"
    assert_loss_fell(out)
    assert_common_outputs(out, tiny_model_dir)
    assert (out / "spectrum_selection.json").is_file()
    weights = load_file(out / "model.safetensors")
    moved = changed(tiny_model_dir, weights)
    projections = {n for n in weights if n.endswith("_proj.weight")}
    assert moved & projections and projections - moved  # some projections trained, some frozen
    assert "model.embed_tokens.weight" in moved  # the (tied) embeddings and head train by default


def test_a_plugin_stops_with_its_exit_code_and_the_next_run_resumes(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """The preemption path: a callback (train()'s `callbacks`) saves and stops at step 4 and
    asks for exit 143; the retried run resumes from checkpoint-4."""
    from transformers import TrainerCallback

    from finetune_trainer.config import load_config
    from finetune_trainer.train import run_command

    class StopAt4(TrainerCallback):
        exit_code = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                control.should_save = control.should_training_stop = True
                self.exit_code = 143

    cfg = tiny_config(tmp_path, tiny_model_dir, output={"save_steps": 100})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run_command(load_config(path, mode="train").config, base_dir=tmp_path, callbacks=[StopAt4()]) == 143
    out = tmp_path / "out"
    assert (out / "checkpoint-4").is_dir()
    manifest = json.loads((out / "checkpoint-4" / "manifest.json").read_text())  # no storage: written locally
    assert manifest["step"] == 4 and manifest["config"]["output"]["output_dir"] == str(out)
    assert not (out / "train_results.json").exists() and not (out / "adapter_model.safetensors").exists()

    rc = run_train(tmp_path, cfg)
    assert rc == 0, capsys.readouterr().err
    results = json.loads((out / "train_results.json").read_text())
    assert results["resumed_from"] == str(out / "checkpoint-4") and results["global_step"] == 8
    assert results["train_tokens"] > 0 and results["eval_before"] is not None  # evaluated at step 4
    steps = [r["step"] for r in metrics(out) if r["loss"] is not None]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == 8  # no step logged twice


def test_diverging_loss_stops_with_exit_1(tmp_path, tiny_model_dir, capsys):
    cfg = tiny_config(tmp_path, tiny_model_dir, method="full", training={"learning_rate": 1e12, "max_grad_norm": 1e12})
    cfg["evaluation"] = {"do_eval": False}
    rc = run_train(tmp_path, cfg)
    err = capsys.readouterr().err
    assert rc == 1
    assert "training diverged" in err and "training.learning_rate" in err


def test_bad_config_exits_1_naming_the_field(tmp_path, tiny_model_dir, capsys):
    rc = run_train(tmp_path, tiny_config(tmp_path, tiny_model_dir), "--training.learning_rate", "-1")
    assert rc == 1
    assert "training.learning_rate: must be greater than 0" in capsys.readouterr().err


def test_missing_data_exits_1_naming_the_file(tmp_path, tiny_model_dir, capsys):
    cfg = tiny_config(tmp_path, tiny_model_dir, dataset={"train_path": str(tmp_path / "nope.jsonl")})
    rc = run_train(tmp_path, cfg)
    err = capsys.readouterr().err
    assert rc == 1
    assert "dataset.train_path" in err and "nope.jsonl" in err


def test_missing_deepspeed_file_exits_1(tmp_path, tiny_model_dir, capsys):
    cfg = tiny_config(tmp_path, tiny_model_dir, distributed={"use_deepspeed": True, "deepspeed_config": "ds/none.json"})
    assert run_train(tmp_path, cfg) == 1
    assert "distributed.deepspeed_config: file 'ds/none.json' not found" in capsys.readouterr().err


def test_progress_reporters_get_steps_and_eta(tmp_path, tiny_model_dir):
    """The hook the operator's status updates use: a callable per log, on the main process."""
    from finetune_trainer.train import train

    cfg = tiny_config(tmp_path, tiny_model_dir, training={"max_steps": 4}, evaluation={"do_eval": False})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    updates = []
    result = train(load_config(path, mode="train").config, base_dir=tmp_path, reporters=[updates.append])
    assert result.exit_code == 0
    steps = [u for u in updates if u["loss"] is not None]
    assert [u["step"] for u in steps] == [1, 2, 3, 4] and all(u["total_steps"] == 4 for u in updates)
    assert steps[0]["eta_seconds"] >= steps[-1]["eta_seconds"] == 0  # rounded to 0.1 s: a fast step may show 0
    assert all(u["tokens_per_second"] > 0 for u in steps[1:])
    assert [u["eval_loss"] is not None for u in updates].count(True) == 2  # before and after (do_eval off)


def test_sample_packing_trains_on_packed_rows_and_reports_them(tmp_path, tiny_model_dir, capsys):
    """training.sample_packing: 16 short samples share a few rows of 256 tokens; the run counts
    steps in packed rows, learns (eval loss, computed unpacked, falls), and says how well it packed."""
    cfg = tiny_config(tmp_path, tiny_model_dir, training={"sample_packing": True, "micro_batch_size": 1,
                                                          "max_seq_length": 256})
    rc = run_train(tmp_path, cfg)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = tmp_path / "out"
    data = metrics(out)[0]["data"]["train"]
    assert data["samples"] == 16 and 0 < data["packed_rows"] < 16
    assert data["packing_efficiency"] == pytest.approx(data["tokens"] / (data["packed_rows"] * 256), abs=1e-3)
    assert_loss_fell(out)
    results = json.loads((out / "train_results.json").read_text())
    assert results["eval_after"]["eval_loss"] < results["eval_before"]["eval_loss"]
    assert results["epoch"] == pytest.approx(8 / data["packed_rows"], rel=0.01)  # an epoch is the packed rows


def test_group_by_length_trains(tmp_path, tiny_model_dir, capsys):
    cfg = tiny_config(tmp_path, tiny_model_dir, training={"group_by_length": True})
    assert run_train(tmp_path, cfg) == 0, capsys.readouterr().err
    assert_loss_fell(tmp_path / "out")


def test_sample_packing_counts_every_real_token_and_no_padding(tmp_path, tiny_model_dir, capsys):
    """Packed batches have no attention_mask, and SmolLM2's pad id (<|im_end|>) ends every turn
    of every sample: tokens/s must count by the rows' shape, not by the pad id. Two rows a step
    (so the shorter is padded), two whole epochs: the tokens trained are the data's, twice."""
    cfg = tiny_config(tmp_path, tiny_model_dir, training={"sample_packing": True, "micro_batch_size": 2,
                                                          "max_seq_length": 128, "max_steps": None, "epochs": 2},
                      evaluation={"do_eval": False})
    rc = run_train(tmp_path, cfg)
    assert rc == 0, capsys.readouterr().err
    out = tmp_path / "out"
    data = metrics(out)[0]["data"]["train"]
    assert data["packed_rows"] >= 3  # so some step pads
    results = json.loads((out / "train_results.json").read_text())
    assert results["train_tokens"] == 2 * data["tokens"]
