"""training.sample_packing under `torchrun --nproc_per_node 2` on loopback (gloo, CPU): plain
DDP with LoRA, DeepSpeed ZeRO-2 (LoRA) and ZeRO-3 (full). The packed rows must be sharded, not
duplicated: a packed dataset is a plain map-style dataset, so nothing but the Trainer's own
sampler keeps the ranks apart, and a rank that trained its peer's rows would still "succeed".

What each rank trains is observed at the model's input: a small launcher hands `train()` one
extra TrainerCallback (its `callbacks` argument) that puts a forward pre-hook on the model and
writes every training batch the rank's model saw, with the packed dataset, to rank<N>.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from s3_server import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

WORDS = ["apple", "banana", "cherry", "date"]
SAMPLES, MAX_SEQ, MICRO_BATCH, RANKS, MAX_STEPS = 24, 128, 2, 2, 8
PACKED_ROWS = 8  # 24 distinct samples of 35-45 tokens, three to a row of 128 (checked below)
STEPS_PER_EPOCH = PACKED_ROWS // (RANKS * MICRO_BATCH)  # 2: the 8 steps are 4 epochs

LAUNCHER = '''
import json, os, sys
from pathlib import Path
from transformers import TrainerCallback
from finetune_trainer.config import load_config
from finetune_trainer.train import run_command


class RecordBatches(TrainerCallback):
    """Every training forward of this rank's model: its input_ids and the keys it was called with."""

    def __init__(self, out):
        self.out, self.calls, self.rows, self.pad = out, [], None, None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, processing_class=None, **kw):
        self.rows = [list(r) for r in train_dataloader.dataset["input_ids"]]  # read, never iterated
        self.pad = processing_class.pad_token_id

        def hook(module, a, kwargs):
            if module.training:
                self.calls.append({"input_ids": kwargs["input_ids"].tolist(),
                                   "keys": sorted(k for k, v in kwargs.items() if v is not None)})

        model.register_forward_pre_hook(hook, with_kwargs=True)

    def on_train_end(self, args, state, control, **kw):
        record = {"rows": self.rows, "pad": self.pad, "calls": self.calls}
        (self.out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(record))


config = sys.argv[sys.argv.index("--config") + 1]
loaded = load_config(config, mode="train")
out = Path(loaded.config.output.output_dir)
sys.exit(run_command(loaded.config, base_dir=Path(config).resolve().parent, callbacks=[RecordBatches(out)]))
'''


def write_config(tmp_path: Path, model_dir: Path, method: str, **distributed) -> Path:
    # distinct samples (so distinct rows) with answers of 1-6 words: rows of three, of unequal length
    rows = [{"instruction": f"Say word {i}.", "output": " ".join([WORDS[i % 4]] * (1 + i * 7 % 6))}
            for i in range(SAMPLES)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "model": {"base_model": str(model_dir)},
        "fine_tuning": {"method": method, "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                                   "target_modules": ["q_proj", "v_proj", "lm_head"]}},
        "training": {
            "max_steps": MAX_STEPS, "micro_batch_size": MICRO_BATCH, "learning_rate": 1e-2 if method == "lora" else 2e-3,
            "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "mixed_precision": "no", "max_seq_length": MAX_SEQ,
            "sample_packing": True,
        },
        "dataset": {"format": "alpaca", "train_path": str(tmp_path / "train.jsonl")},
        "output": {"output_dir": str(tmp_path / "out"), "logging_steps": 1, "save_steps": MAX_STEPS},
        "distributed": distributed,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(tmp_path: Path, config: Path) -> subprocess.CompletedProcess:
    """As test_train_distributed.torchrun: CPU DeepSpeed, its comm op compiled once and kept."""
    from finetune_trainer.model import builtin

    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(builtin.cache_root() / "torch_extensions")),
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(launcher), "train", "--config", str(config),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=800, cwd=tmp_path)


def trained_rows(record: dict) -> list[list[int]]:
    """Per training forward, the indices of the packed rows in its batch (each batch row is a
    packed row followed by padding only)."""
    index = {tuple(r): i for i, r in enumerate(record["rows"])}
    lengths = sorted({len(r) for r in record["rows"]})
    found = []
    for call in record["calls"]:
        batch = []
        for ids in call["input_ids"]:
            matches = [index[tuple(ids[:n])] for n in lengths if n <= len(ids)
                       and tuple(ids[:n]) in index and all(t == record["pad"] for t in ids[n:])]
            assert len(matches) == 1, f"a trained row is not exactly one packed row: {ids}"
            batch.append(matches[0])
        found.append(batch)
    return found


@pytest.mark.parametrize("variant", ["ddp", "zero2", "zero3"])
def test_packed_rows_are_sharded_across_two_ranks_and_the_loss_falls(tmp_path, tiny_model_dir, variant):
    method = "full" if variant == "zero3" else "lora"
    distributed = {"use_deepspeed": True, "zero_stage": int(variant[-1])} if variant.startswith("zero") else {}
    proc = torchrun(tmp_path, write_config(tmp_path, tiny_model_dir, method, **distributed))
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    data = metrics[0]["data"]["train"]
    assert data["samples"] == SAMPLES and data["packed_rows"] == PACKED_ROWS, data
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == MAX_STEPS
    assert results["epoch"] == pytest.approx(MAX_STEPS / STEPS_PER_EPOCH)  # an epoch is half the rows per rank
    curve = [r["loss"] for r in metrics if r["loss"] is not None]
    assert len(curve) == MAX_STEPS and curve[-1] < curve[0] - 0.3, curve
    if distributed:
        import torch

        assert torch.load(out / "training_args.bin", weights_only=False).deepspeed["zero_optimization"]["stage"] == \
            distributed["zero_stage"]

    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(RANKS)]
    assert records[0]["rows"] == records[1]["rows"] and len(records[0]["rows"]) == PACKED_ROWS
    assert len({tuple(r) for r in records[0]["rows"]}) == PACKED_ROWS  # distinct, so a row is identifiable
    per_rank = [trained_rows(r) for r in records]
    for rank, record in enumerate(records):
        assert len(per_rank[rank]) == MAX_STEPS, f"rank {rank} ran {len(per_rank[rank])} training forwards"
        assert all(len(batch) == MICRO_BATCH for batch in per_rank[rank])
        for call in record["calls"]:  # packed batches: positions restart per sample, no padding mask
            assert "position_ids" in call["keys"] and "attention_mask" not in call["keys"], call["keys"]
    for epoch in range(MAX_STEPS // STEPS_PER_EPOCH):
        steps = slice(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH)
        mine = [sorted(i for batch in per_rank[rank][steps] for i in batch) for rank in range(RANKS)]
        assert not set(mine[0]) & set(mine[1]), f"epoch {epoch}: both ranks trained rows {set(mine[0]) & set(mine[1])}"
        assert sorted(mine[0] + mine[1]) == list(range(PACKED_ROWS)), f"epoch {epoch}: {mine}"
    assert proc.stdout.count("Training done") == 1  # the main process alone reports
