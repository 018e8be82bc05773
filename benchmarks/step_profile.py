"""Where one LoRA training step of SmolLM2 goes: torch.profiler over the same packed rows, two ways.

    .venv/bin/python benchmarks/step_profile.py [--samples 64] [--steps 4]

plain  peft LoRA as `get_peft_model` builds it and the model's own `labels=` loss: the head and a
       float32 log-softmax over all 49,152 tokens at every position, `nn.Dropout` before each adapter
ours   the model as `finetune train` builds it (methods.prepare_model: LoRA with CpuDropout) and
       its loss (training.loss: the head only at the positions whose next token is learned)

Both train the first `--samples` demo rows, packed by our data stage into rows of 256 tokens,
4 rows a step, bf16 autocast, AdamW; each is measured over `--steps` steps after two warm-up
steps, in its own process, and then profiled for one step. The table sorts the step's self CPU
time into what it is spent on (matmuls, attention, dropout's random numbers, the head's
log-softmax, casts and copies, other element-wise ops, the optimizer), and the last lines give
the step time ratio plain / ours, and each side's FLOP utilisation: 4N per trained token (LoRA:
forward 2N, backward through frozen weights 2N; N = matmul parameters, the tied head included)
against a 2048x2048 bf16 GEMM measured in the same process with the same threads (the peak
trainer_throughput.py --limits measures).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

# benchmarks/, this script's folder, is on sys.path
from trainer_throughput import GEMM_PEAK_FUNCTION

REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / "examples" / "data" / "alpaca_demo.jsonl"

CATEGORIES = [  # (label, op-name fragments); the first that matches wins
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("dropout RNG", ("bernoulli", "randint", "random_", "native_dropout")),
    ("head log-softmax / CE", ("log_softmax", "nll_loss", "cross_entropy")),
    ("casts and copies", ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous")),
    ("optimizer", ("Optimizer", "_foreach", "addcdiv", "lerp")),
    ("element-wise and other", ("",)),
]

STEP = GEMM_PEAK_FUNCTION + textwrap.dedent(
    """
    import json, sys, time
    import datasets, torch
    from finetune_trainer.data.packing import PackedCollator
    from finetune_trainer.model import builtin

    side, rows_dir, config_path, steps, categories = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if side == "plain":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(builtin.model_dir(), attn_implementation="sdpa")
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets,
                                                 task_type="CAUSAL_LM"))
    else:
        from finetune_trainer.config import load_config
        from finetune_trainer.methods import prepare_model
        model = prepare_model(load_config(config_path, mode="train").config).model
        from finetune_trainer.training.loss import LearnedPositions, learned_token_loss
        positions = LearnedPositions(model)
    model.train()
    rows = datasets.load_from_disk(rows_dir)
    collate = PackedCollator(0, fallback=None)
    groups = [[rows[j] for j in range(i, i + 4)] for i in range(0, len(rows) - 3, 4)]
    batches = [(collate(g), sum(len(r["input_ids"]) for r in g)) for g in groups]  # (batch, real tokens)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if side == "plain":
                loss = model(**batch).loss
            else:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                with positions.armed(batch["labels"]):
                    loss = learned_token_loss(model(**inputs), batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for b, _ in batches[:2]:
        step(b)
    timed = [batches[(2 + i) % len(batches)] for i in range(steps)]
    start = time.perf_counter()
    for b, _ in timed:
        step(b)
    seconds = (time.perf_counter() - start) / steps
    tokens = sum(n for _, n in timed) / steps
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(timed[0][0])
    spent = {label: 0.0 for label, _ in categories}
    for event in prof.key_averages():
        label = next(lbl for lbl, frags in categories if any(f in event.key for f in frags))
        spent[label] += event.self_cpu_time_total / 1e3
    peak = gemm_peak()
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" in name or p.dim() == 2)
    print("RESULT " + json.dumps({"seconds": seconds, "tokens": tokens, "spent_ms": spent, "peak": peak,
                                  "matmul_params": n, "threads": torch.get_num_threads()}))
    """
)


def prepare(work: Path, samples: int) -> tuple[Path, Path]:
    """Packed rows of the first `samples` demo rows, and our config for the same run."""
    import yaml
    from transformers import AutoTokenizer

    from finetune_trainer.config import FineTuneConfig
    from finetune_trainer.data import prepare_data
    from finetune_trainer.model import builtin

    data = work / "train.jsonl"
    data.write_text("\n".join(DEMO_DATA.read_text().splitlines()[:samples]) + "\n")
    spec = {
        "model": {"base_model": "builtin:SmolLM2-135M-Instruct"},
        "fine_tuning": {"method": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.05}},
        "training": {"max_seq_length": 256, "micro_batch_size": 4, "sample_packing": True, "mixed_precision": "bf16"},
        "dataset": {"format": "alpaca", "train_path": str(data)},
        "output": {"output_dir": str(work / "out")},
    }
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(spec))
    prepared = prepare_data(FineTuneConfig.model_validate(spec), AutoTokenizer.from_pretrained(builtin.model_dir()))
    rows = work / "rows"
    prepared.train.save_to_disk(str(rows))
    return config, rows


def measure(side: str, work: Path, config: Path, rows: Path, steps: int) -> dict:
    script = work / "step.py"
    script.write_text(STEP)
    done = subprocess.run([sys.executable, str(script), side, str(rows), str(config), str(steps), json.dumps(CATEGORIES)],
                          capture_output=True, text=True, cwd=work, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{side} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="demo rows to pack")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side (after 2 warm-up steps)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="step-profile-") as tmp:
        work = Path(tmp)
        config, rows = prepare(work, args.samples)
        results = {side: measure(side, work, config, rows, args.steps) for side in ("plain", "ours")}
    print(f"one step, 4 packed rows of 256 tokens, {results['ours']['threads']} threads; self CPU ms in the profiled step")
    print(f"{'':26}{'plain':>10}{'ours':>10}")
    for label, _ in CATEGORIES:
        print(f"{label:26}{results['plain']['spent_ms'][label]:10.0f}{results['ours']['spent_ms'][label]:10.0f}")
    for side, r in results.items():
        tps = r["tokens"] / r["seconds"]
        flops = 4 * r["matmul_params"] * tps
        print(f"{side:6} step {r['seconds']:.3f} s, {tps:7.1f} tokens/s, {flops / 1e9:6.1f} GFLOP/s at 4N: "
              f"{flops / r['peak']:.1%} of the bf16 GEMM peak ({r['peak'] / 1e9:.0f} GFLOP/s)")
    print(f"step time plain / ours: {results['plain']['seconds'] / results['ours']['seconds']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
