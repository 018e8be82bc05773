"""`finetune train` under `torchrun --nproc_per_node 2` on loopback (gloo): plain DDP with
LoRA, and DeepSpeed ZeRO-2 / ZeRO-3 through the trainer's own config mapping.

Each run goes through a small launcher that hands `train()` one extra TrainerCallback (its
`callbacks` argument) to write a hash of every rank's trainable parameters. What this cannot cover here: NCCL, GPUs,
more than one machine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PAIRS = [("Say the first word.", "apple"), ("Say the second word.", "banana"),
         ("Say the third word.", "cherry"), ("Say the fourth word.", "date")]

LAUNCHER = '''
import hashlib, os, sys
from pathlib import Path
from transformers import TrainerCallback
from finetune_trainer.config import load_config
from finetune_trainer.train import run_command


class HashTrainable(TrainerCallback):
    """Each rank writes a sha256 of its trainable parameters (gathered under ZeRO-3)."""

    def __init__(self, out):
        self.out = out

    def on_train_end(self, args, state, control, model=None, **kwargs):
        import torch
        from transformers.integrations import is_deepspeed_zero3_enabled

        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        digest = hashlib.sha256()
        if is_deepspeed_zero3_enabled():
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in params]):
                for n, p in params:
                    digest.update(n.encode() + p.detach().float().cpu().numpy().tobytes())
        else:
            for n, p in params:
                digest.update(n.encode() + p.detach().float().cpu().numpy().tobytes())
        (self.out / f"rank{os.environ['RANK']}.sha256").write_text(digest.hexdigest())


config = sys.argv[sys.argv.index("--config") + 1]
loaded = load_config(config, mode="train")
out = Path(loaded.config.output.output_dir)
sys.exit(run_command(loaded.config, base_dir=Path(config).resolve().parent, callbacks=[HashTrainable(out)]))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path: Path, model_dir: Path, method: str, *, precision: str = "no", **distributed) -> Path:
    rows = [{"instruction": q, "output": a} for q, a in PAIRS] * 4
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    cfg = {
        "model": {"base_model": str(model_dir)},
        # lm_head: the tiny random model's logits barely move with projection adapters alone.
        "fine_tuning": {"method": method, "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "lm_head"]}},
        "training": {
            "max_steps": 8, "micro_batch_size": 2, "learning_rate": 1e-2 if method == "lora" else 2e-3,
            "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "mixed_precision": precision, "max_seq_length": 64,
        },
        "dataset": {"format": "alpaca", "train_path": str(tmp_path / "train.jsonl"), "eval_path": str(tmp_path / "eval.jsonl")},
        "output": {"output_dir": str(tmp_path / "out"), "logging_steps": 1, "save_steps": 8},
        "distributed": distributed,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(tmp_path: Path, config: Path, *, nproc: int = 2, gpu: bool = False) -> subprocess.CompletedProcess:
    from finetune_trainer.model import builtin

    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    env = {
        **os.environ,
        # DeepSpeed compiles its CPU comm op on first use (~30 s); keep it between runs.
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(builtin.cache_root() / "torch_extensions")),
        "OMP_NUM_THREADS": "1",
    }
    if not gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed on CPU: gloo, no CUDA probing
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(launcher), "train", "--config", str(config),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=800, cwd=tmp_path)


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["loss"] is not None]


def assert_ranks_agree_and_loss_fell(proc, out: Path):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    hashes = [(out / f"rank{r}.sha256").read_text() for r in (0, 1)]
    assert hashes[0] == hashes[1]
    curve = losses(out)
    assert curve[-1] < curve[0] - 0.3, curve
    results = json.loads((out / "train_results.json").read_text())
    # 16 samples, 2 ranks x 2 per step: 4 steps per epoch, so 8 steps are 2 epochs (data sharded, not duplicated)
    assert results["global_step"] == 8 and results["epoch"] == pytest.approx(2.0)
    assert proc.stdout.count("Training done") == 1  # the main process alone reports


def test_lora_ddp_two_ranks_same_weights(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    proc = torchrun(tmp_path, write_config(tmp_path, tiny_model_dir, "lora"))
    out = tmp_path / "out"
    assert_ranks_agree_and_loss_fell(proc, out)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)


@pytest.mark.parametrize("stage,method", [(2, "lora"), (3, "full")])
def test_deepspeed_zero_through_the_trainer(tmp_path, tiny_model_dir, stage, method):
    import torch
    from transformers import AutoModelForCausalLM

    config = write_config(tmp_path, tiny_model_dir, method, use_deepspeed=True, zero_stage=stage)
    proc = torchrun(tmp_path, config)
    out = tmp_path / "out"
    assert_ranks_agree_and_loss_fell(proc, out)
    ds = torch.load(out / "training_args.bin", weights_only=False).deepspeed
    assert ds["zero_optimization"]["stage"] == stage
    if method == "full":  # ZeRO-3 gathered the shards into one loadable model
        model = AutoModelForCausalLM.from_pretrained(out)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        q = "model.layers.0.self_attn.q_proj.weight"
        assert model.state_dict()[q].shape == base.state_dict()[q].shape
        assert not model.state_dict()[q].equal(base.state_dict()[q])
    else:
        from peft import PeftModel

        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
