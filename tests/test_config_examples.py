"""The seed's own examples are the spec: each one validates, as shipped and as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune_trainer.cli import main
from finetune_trainer.config import load_config

REPO = Path(__file__).resolve().parent.parent
SEED = REPO.parent / "shared" / "seed" / "configuration-guide.md"
SEED_EXAMPLES = sorted((REPO / "examples" / "config").glob("*.yaml"))


def test_all_four_seed_examples_are_shipped():
    assert {p.name for p in SEED_EXAMPLES} >= {
        "comprehensive.yaml",
        "qlora-16gb.yaml",
        "spectrum.yaml",
        "multi-gpu-full-zero3.yaml",
    }


@pytest.mark.parametrize("path", SEED_EXAMPLES, ids=lambda p: p.name)
def test_seed_example_validates(path, capsys):
    assert main(["validate", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "valid." in out and "Effective batch size" in out


@pytest.mark.skipif(not SEED.exists(), reason="the seed guide lives in ../shared, beside the checkout")
def test_shipped_examples_are_the_seeds_verbatim():
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", SEED.read_text(), re.S)]
    shipped = [yaml.safe_load(p.read_text()) for p in SEED_EXAMPLES]
    assert len(blocks) == 4
    for block in blocks:
        assert block in shipped


def test_seed_comprehensive_values_survive():
    cfg = load_config(REPO / "examples" / "config" / "comprehensive.yaml").config
    assert cfg.fine_tuning.method == "qlora" and cfg.model.load_in_4bit
    assert cfg.training.optimizer == "paged_adamw_8bit"
    assert cfg.distributed.zero_stage == 2 and cfg.training.gradient_accumulation_steps == 16
    assert cfg.evaluation.benchmarks == ["lm-evaluation-harness", "domain-specific-eval", "human-eval"]
    assert cfg.effective_eval_steps() == 200


def test_seed_defaults_hold():
    """The seed's model-section defaults, and qlora turning 4-bit on when unset."""
    from finetune_trainer.config import validate_data

    cfg = validate_data({"model": {"base_model": "m"}}).config
    assert cfg.model.tokenizer is None  # same as base_model
    assert (cfg.model.load_in_8bit, cfg.model.load_in_4bit) == (False, False)
    assert cfg.model.trust_remote_code is True and cfg.model.use_flash_attention is True
    assert cfg.model.use_liger_kernels is False
    qlora = validate_data({"model": {"base_model": "m"}, "fine_tuning": {"method": "qlora"}}).config
    assert qlora.model.load_in_4bit and qlora.fine_tuning.quantization.bits == 4


def test_deepspeed_file_missing_warns_in_validate_fails_in_train(tmp_path):
    from finetune_trainer.config import ConfigError

    config = tmp_path / "c.yaml"
    config.write_text(
        "model: {base_model: m}\ndataset: {train_path: d.jsonl}\n"
        "distributed: {use_deepspeed: true, zero_stage: 3, deepspeed_config: ds/ds.json}\n"
    )
    loaded = load_config(config)
    assert any("ds/ds.json" in str(w) and "not found" in str(w) for w in loaded.warnings)
    with pytest.raises(ConfigError, match="distributed.deepspeed_config"):
        load_config(config, mode="train")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    with pytest.raises(ConfigError, match="zero_optimization.stage 2"):
        load_config(config)  # resolved against the config file's folder, parsed and compared
    (tmp_path / "ds" / "ds.json").write_text('{"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}')
    assert load_config(config, mode="train").config.distributed.zero_stage == 3
    (tmp_path / "ds" / "ds.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(config)


def test_missing_train_path_warns_in_validate_fails_in_train(tmp_path):
    from finetune_trainer.config import ConfigError

    config = tmp_path / "c.yaml"
    config.write_text("model: {base_model: m}\n")
    assert any(w.path == "dataset.train_path" for w in load_config(config).warnings)
    with pytest.raises(ConfigError, match="dataset.train_path"):
        load_config(config, mode="train")


def test_fp16_with_bf16_compute_warns(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: {base_model: m, load_in_4bit: true}\nfine_tuning: {method: qlora}\ntraining: {mixed_precision: fp16}\n")
    warnings = [str(w) for w in load_config(config).warnings]
    assert any(w.startswith("fine_tuning.quantization.bnb_4bit_compute_dtype") for w in warnings)


def test_validate_imports_nothing_heavy():
    """`finetune validate` must answer in well under a second: it may not import torch,
    transformers or kopf. Checked in a fresh interpreter, whose module table is the truth."""
    code = (
        "import sys; from finetune_trainer.cli import main; "
        f"rc = main(['validate', '--config', {str(SEED_EXAMPLES[0])!r}]); "
        "heavy = [m for m in ('torch', 'transformers', 'kopf', 'peft', 'datasets', 'kubernetes', 'numpy') if m in sys.modules]; "
        "print('HEAVY', heavy); sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
