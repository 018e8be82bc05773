"""Throughput and peak memory of `finetune train` against a plain transformers Trainer script.

Same model (built-in SmolLM2-135M-Instruct), same tokenized samples, same LoRA and training
settings, in the same run: each side is a fresh subprocess, the order alternates between
repeats, and the medians are compared. tokens/s = non-padding tokens trained / the Trainer's
own train_runtime (model loading and tokenisation are outside it on both sides); peak RSS
is the child's ru_maxrss from wait4. Our overhead target: ratio >= 0.95.

    .venv/bin/python benchmarks/trainer_throughput.py [--samples 64] [--repeats 3]
    .venv/bin/python benchmarks/trainer_throughput.py --packing [--samples 64] [--repeats 3]
    .venv/bin/python benchmarks/trainer_throughput.py --limits [--samples 64] [--repeats 3]
    .venv/bin/python benchmarks/trainer_throughput.py --trl [--samples 64] [--repeats 3]   # pip install -e '.[bench]'

--packing compares `finetune train` with training.sample_packing on and off, on the demo data
and on a mixed-length set (the demo rows, every fourth one with a long response), by effective
tokens/s: real trained tokens (non-padding) per second of train_runtime. Target on the mixed
set: packed >= 1.5x unpacked; peak RSS at most 10% above.

--limits compares `finetune train` (packed) with the machine's limits on the same packed rows:
(a) a bare PyTorch loop (peft LoRA, bf16 autocast, AdamW: forward, backward, step, nothing
else), target ours >= 0.9x; (b) model FLOP utilisation: about 4N FLOPs per trained token for
LoRA (forward 2N, backward through frozen weights 2N, no weight gradients; N = every parameter
that takes part in a matmul, the tied embedding as lm_head included) times tokens/s, over the
peak of a 2048x2048 bf16 GEMM measured in the same run with the same threads.

--trl compares `finetune train` (training.sample_packing) with TRL's SFTTrainer packing the same
samples itself (packing_strategy "bfd", padding-free as TRL turns on for it), on the demo data
and on the mixed-length set: same model (sdpa), LoRA and training settings, the samples our
data stage tokenized (input_ids, labels with -100 on prompt tokens; TRL keeps a given labels
column). Effective tokens/s on both sides = real tokens trained (the samples' lengths, which
TRL's prepared rows are checked to add up to) / train_runtime. Target: ours >= 0.95x TRL.
TRL is needed for this alone: the `bench` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / "examples" / "data" / "alpaca_demo.jsonl"

SETTINGS = {
    "micro_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "learning_rate": 2.0e-4,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.03,
    "max_grad_norm": 1.0,
    "optimizer": "adamw_torch",
    "weight_decay": 0.0,
    "max_seq_length": 256,
    "gradient_checkpointing": False,
    "mixed_precision": "bf16",
    "seed": 42,
    "epochs": 1,
}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}

# What the plain and the TRL script share, so they train with the same settings: their arguments,
# the tokenizer, the samples our data stage made, the LoRA config, and the Trainer arguments that
# SETTINGS map to (TRL's SFTConfig is a TrainingArguments; each script adds only what it alone needs).
TRAINER_SCRIPT_HEAD = textwrap.dedent(
    """
    import json, sys
    import datasets
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from finetune_trainer.model import builtin

    samples, settings, lora, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    model_dir = builtin.model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train = datasets.load_from_disk(samples)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules=targets, task_type="CAUSAL_LM")
    trainer_args = dict(
        output_dir=out, num_train_epochs=settings["epochs"], per_device_train_batch_size=settings["micro_batch_size"],
        gradient_accumulation_steps=settings["gradient_accumulation_steps"], learning_rate=settings["learning_rate"],
        lr_scheduler_type=settings["lr_scheduler_type"], warmup_steps=settings["warmup_ratio"],
        max_grad_norm=settings["max_grad_norm"], optim=settings["optimizer"], weight_decay=settings["weight_decay"],
        gradient_checkpointing=settings["gradient_checkpointing"],  # TRL's default is True
        bf16=settings["mixed_precision"] == "bf16", use_cpu=True, seed=settings["seed"], logging_steps=10,
        save_strategy="no", report_to="none",
    )
    """
)

# What a user would write with transformers + peft alone, on the samples our data stage made.
PLAIN_SCRIPT = TRAINER_SCRIPT_HEAD + textwrap.dedent(
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), peft_config)
    args = TrainingArguments(**trainer_args)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    result = Trainer(model=model, args=args, train_dataset=train, data_collator=collator).train()
    tokens = sum(sum(m) for m in train["attention_mask"]) * settings["epochs"]
    print("RESULT " + json.dumps({"train_runtime": result.metrics["train_runtime"], "tokens": tokens}))
    """
)


def mixed_rows(rows: list[str]) -> list[str]:
    """Short rows and long rows: every fourth demo row gets a response of ~8 demo responses."""
    parsed = [json.loads(r) for r in rows]
    out = []
    for i, row in enumerate(parsed):
        if i % 4 == 3:
            row = {**row, "output": " ".join(p["output"] for p in parsed[i:i + 8] or parsed[:8])}
        out.append(json.dumps(row))
    return out


BARE_LOOP = textwrap.dedent(
    """
    import json, sys, time
    import datasets, torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from finetune_trainer.data.packing import PackedCollator
    from finetune_trainer.model import builtin

    rows_dir, settings, lora = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    torch.manual_seed(settings["seed"])
    model = AutoModelForCausalLM.from_pretrained(builtin.model_dir(), attn_implementation="sdpa")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                             target_modules=targets, task_type="CAUSAL_LM"))
    model.train()
    rows = datasets.load_from_disk(rows_dir)
    collate = PackedCollator(0, fallback=None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings["learning_rate"])
    batch_size = settings["micro_batch_size"]
    batches = [collate([rows[j] for j in range(i, min(i + batch_size, len(rows)))])
               for i in range(0, len(rows), batch_size)]
    start = time.perf_counter()
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    real = sum(len(ids) for ids in rows["input_ids"])
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" in name or p.dim() == 2)
    print("RESULT " + json.dumps({"seconds": elapsed, "tokens": real, "matmul_params": n}))
    """
)

# The bf16 GEMM peak, as source a script includes to measure it on its own process's threads
# (step_profile.py's step script too): FLOP/s of a 2048x2048 matmul, the median of 5 runs of 10.
GEMM_PEAK_FUNCTION = textwrap.dedent(
    """
    def gemm_peak():
        import time, torch
        a, b = torch.randn(2048, 2048, dtype=torch.bfloat16), torch.randn(2048, 2048, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(10):
                a @ b
            runs.append(10 * 2 * 2048 ** 3 / (time.perf_counter() - start))
        return sorted(runs)[len(runs) // 2]
    """
)
GEMM_PEAK = GEMM_PEAK_FUNCTION + textwrap.dedent(
    """
    import json, torch
    print("RESULT " + json.dumps({"flops": gemm_peak(), "threads": torch.get_num_threads()}))
    """
)


# TRL's SFTTrainer packing the samples itself, as a TRL user would write it. Before training (outside
# train_runtime) it checks what TRL made of the samples: each packed row split at its seq_lengths
# must give back the given samples, every one, whole, with its labels; and one collated batch must
# be a single padding-free row whose learned labels are the samples' minus each one's first.
TRL_SCRIPT = TRAINER_SCRIPT_HEAD + textwrap.dedent(
    """
    import collections
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    args = SFTConfig(**trainer_args, data_seed=settings["seed"], packing=True, packing_strategy="bfd",
                     max_length=settings["max_seq_length"])  # bfd turns padding_free on
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft_config)
    rows = trainer.train_dataset
    given = collections.Counter(zip(map(tuple, train["input_ids"]), map(tuple, train["labels"])))
    packed = collections.Counter()
    for ids, labels, lengths in zip(rows["input_ids"], rows["labels"], rows["seq_lengths"]):
        at = 0
        for n in lengths:
            packed[(tuple(ids[at:at + n]), tuple(labels[at:at + n]))] += 1
            at += n
        assert at == len(ids)
    first = [rows[i] for i in range(min(len(rows), settings["micro_batch_size"]))]
    batch = trainer.data_collator(first)
    expected = 0
    for row in first:
        at = 0
        for n in row["seq_lengths"]:
            expected += sum(1 for label in row["labels"][at + 1:at + n] if label != -100)
            at += n
    check = {
        "samples": len(train), "packed_samples": sum(len(x) for x in rows["seq_lengths"]), "rows": len(rows),
        "given_tokens": sum(len(x) for x in train["input_ids"]), "packed_tokens": sum(len(x) for x in rows["input_ids"]),
        "samples_kept_whole_with_labels": packed == given,
        "learned_tokens": sum(sum(1 for label in x if label != -100) for x in train["labels"]),
        "padding_free_batch": batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch,
        "batch_learned_as_expected": int((batch["labels"] != -100).sum()) == expected,
        "shuffle_dataset": args.shuffle_dataset,
    }
    result = trainer.train()
    tokens = check["packed_tokens"] * settings["epochs"]  # what it trained: the packed rows, all real tokens
    print("RESULT " + json.dumps({"train_runtime": result.metrics["train_runtime"], "tokens": tokens,
                                  "train_loss": result.training_loss, "steps": result.global_step, **check}))
    """
)

def prepare(work: Path, samples: int, *, packing: bool = False, mixed: bool = False,
            micro_batch_size: int | None = None) -> tuple[Path, Path, Path]:
    """The first `samples` demo rows, our config for them, and the same samples tokenized by
    our data stage for the plain script."""
    from finetune_trainer.config import FineTuneConfig
    from finetune_trainer.data import prepare_data
    from finetune_trainer.model import builtin
    from transformers import AutoTokenizer

    rows = DEMO_DATA.read_text().splitlines()[:samples]
    rows = mixed_rows(rows) if mixed else rows
    data = work / "train.jsonl"
    data.write_text("\n".join(rows) + "\n")
    spec = {
        "model": {"base_model": "builtin:SmolLM2-135M-Instruct"},
        "fine_tuning": {"method": "lora", "lora": LORA},
        "training": {**SETTINGS, "sample_packing": packing,
                     "micro_batch_size": micro_batch_size or SETTINGS["micro_batch_size"]},
        "dataset": {"format": "alpaca", "train_path": str(data)},
        "output": {"output_dir": str(work / "ours"), "logging_steps": 10, "save_steps": 10**6},
    }
    config = work / f"config{'-packed' if packing else ''}{f'-mb{micro_batch_size}' if micro_batch_size else ''}.yaml"
    import yaml

    config.write_text(yaml.safe_dump(spec))
    cfg = FineTuneConfig.model_validate(spec)
    tokenizer = AutoTokenizer.from_pretrained(builtin.model_dir())
    prepared = prepare_data(cfg, tokenizer)
    samples_dir = work / "samples"
    prepared.train.save_to_disk(str(samples_dir))
    return config, samples_dir, data


def run_ours(config: Path, work: Path) -> dict[str, float]:
    import shutil

    shutil.rmtree(work / "ours", ignore_errors=True)  # no resume between repeats
    finetune = Path(sys.executable).parent / "finetune"
    _, rss = _run_measured([str(finetune), "train", "--config", str(config)], work)
    results = json.loads((work / "ours" / "train_results.json").read_text())
    runtime, data = results["train_runtime_seconds"], results["data"]["train"]
    # train_tokens is the Trainer's non-padding count (the attention mask's sum; packed rows, which
    # carry none, are counted by shape); real_tokens_per_second counts every token of the kept samples.
    return {"tokens_per_second": results["train_tokens"] / runtime, "rss_mib": rss,
            "real_tokens_per_second": data["tokens"] * SETTINGS["epochs"] / runtime, "real_tokens": data["tokens"],
            "counted_tokens": results["train_tokens"], "packed_rows": data["packed_rows"],
            "steps": results["global_step"], "train_loss": results["train_loss"]}


def run_plain(samples_dir: Path, work: Path) -> dict[str, float]:
    result, rss = _script_result(work, "plain_trainer.py", PLAIN_SCRIPT, str(samples_dir), json.dumps(SETTINGS),
                                 json.dumps(LORA), str(work / "plain"))
    return {"tokens_per_second": result["tokens"] / result["train_runtime"], "rss_mib": rss}


def _run_measured(cmd: list[str], cwd: Path) -> tuple[str, float]:
    """Popen + wait4, so ru_maxrss is this child's alone (RUSAGE_CHILDREN would be the max of all)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_chunks, err_chunks = [], []
    # communicate() would reap the child itself; read the pipes, then reap with wait4.
    import threading

    readers = [
        threading.Thread(target=lambda: out_chunks.append(proc.stdout.read())),
        threading.Thread(target=lambda: err_chunks.append(proc.stderr.read())),
    ]
    for t in readers:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    for t in readers:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{''.join(err_chunks)[-3000:]}")
    return "".join(out_chunks), usage.ru_maxrss / 1024


def packing_comparison(samples: int, repeats: int) -> int:
    """Packed vs unpacked `finetune train`, on the demo data and on the mixed-length set."""
    met = True
    med = lambda runs, key: statistics.median(x[key] for x in runs)  # noqa: E731
    for label, mixed in (("demo data", False), ("mixed lengths", True)):
        with tempfile.TemporaryDirectory(prefix="trainer-packing-") as tmp:
            work = Path(tmp)
            unpacked_cfg, _, _ = prepare(work, samples, mixed=mixed)
            packed_cfg, _, _ = prepare(work, samples, packing=True, mixed=mixed)
            # A packed step of 4 full rows holds several times an unpacked step's tokens, and
            # activations grow with them: "packed-1" (one row a step) is nearer the same tokens.
            one_row_cfg, _, _ = prepare(work, samples, packing=True, mixed=mixed, micro_batch_size=1)
            runs: dict[str, list[dict[str, float]]] = {"unpacked": [], "packed": [], "packed-1": []}
            for r in range(repeats):
                order = [("unpacked", unpacked_cfg), ("packed", packed_cfg), ("packed-1", one_row_cfg)]
                for name, cfg in order if r % 2 == 0 else order[::-1]:
                    figures = run_ours(cfg, work)
                    runs[name].append(figures)
                    print(f"{label}, repeat {r + 1} {name:8}: {figures['tokens_per_second']:8.1f} effective tokens/s, "
                          f"peak RSS {figures['rss_mib']:7.0f} MiB, {figures['real_tokens'] / figures['steps']:6.0f} "
                          f"tokens a step", flush=True)
        ratio = med(runs["packed"], "tokens_per_second") / med(runs["unpacked"], "tokens_per_second")
        rss = med(runs["packed"], "rss_mib") / med(runs["unpacked"], "rss_mib")
        target = " (target >= 1.5: " + ("met)" if ratio >= 1.5 else "NOT met)") if mixed else ""
        print(f"{label}: packed {med(runs['packed'], 'tokens_per_second'):.1f} vs unpacked "
              f"{med(runs['unpacked'], 'tokens_per_second'):.1f} effective tokens/s: ratio {ratio:.2f}{target}; "
              f"peak RSS ratio {rss:.2f} (target <= 1.10)", flush=True)
        one = med(runs["packed-1"], "tokens_per_second") / med(runs["unpacked"], "tokens_per_second")
        one_rss = med(runs["packed-1"], "rss_mib") / med(runs["unpacked"], "rss_mib")
        print(f"{label}: packed one row a step {med(runs['packed-1'], 'tokens_per_second'):.1f} effective tokens/s: "
              f"ratio {one:.2f}; peak RSS ratio {one_rss:.2f}\n", flush=True)
        met = met and (ratio >= 1.5 or not mixed) and rss <= 1.10
    return 0 if met else 1


def _script_result(work: Path, name: str, source: str, *args: str) -> tuple[dict[str, Any], float]:
    script = work / name
    script.write_text(source)
    stdout, rss = _run_measured([sys.executable, str(script), *args], work)
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:]), rss


def limits_comparison(samples: int, repeats: int) -> int:
    """Ours (packed) vs a bare loop on the same packed rows, and both as a share of the GEMM peak."""
    med = statistics.median
    with tempfile.TemporaryDirectory(prefix="trainer-limits-") as tmp:
        work = Path(tmp)
        config, rows_dir, _ = prepare(work, samples, packing=True, mixed=True)
        ours, bare, peaks, params = [], [], [], 0
        for r in range(repeats):
            peak, _ = _script_result(work, "gemm.py", GEMM_PEAK)
            peaks.append(peak["flops"])
            order = ["ours", "bare"] if r % 2 == 0 else ["bare", "ours"]
            for name in order:
                if name == "ours":
                    tps = run_ours(config, work)["tokens_per_second"]
                    ours.append(tps)
                else:
                    result, _ = _script_result(work, "bare_loop.py", BARE_LOOP, str(rows_dir), json.dumps(SETTINGS),
                                               json.dumps(LORA))
                    tps, params = result["tokens"] / result["seconds"], result["matmul_params"]
                    bare.append(tps)
                print(f"repeat {r + 1} {name}: {tps:8.1f} tokens/s (bf16 GEMM peak {peak['flops'] / 1e9:.0f} GFLOP/s, "
                      f"{peak['threads']} threads)", flush=True)
    peak = med(peaks)
    ratio = med(ours) / med(bare)
    for label, tps in (("finetune train (packed)", med(ours)), ("bare PyTorch loop", med(bare))):
        print(f"{label:24}: {tps:8.1f} tokens/s; at 4N = {4 * params / 1e9:.2f} GFLOP/token: "
              f"{4 * params * tps / 1e9:.1f} GFLOP/s, {4 * params * tps / peak:.1%} of the bf16 GEMM peak "
              f"({peak / 1e9:.0f} GFLOP/s)")
    print(f"ours / bare loop: {ratio:.3f} (target >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'})")
    return 0 if ratio >= 0.9 else 1


def _require_trl() -> None:
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        raise SystemExit("--trl needs TRL, which is not installed: pip install -e '.[bench]' "
                         "(the bench extra; for benchmarks only)")


def run_trl(samples_dir: Path, work: Path) -> dict[str, Any]:
    result, rss = _script_result(work, "trl_sft.py", TRL_SCRIPT, str(samples_dir), json.dumps(SETTINGS),
                                 json.dumps(LORA), str(work / "trl"))
    return {**result, "real_tokens_per_second": result["tokens"] / result["train_runtime"], "rss_mib": rss}


def trl_comparison(samples: int, repeats: int) -> int:
    """Ours (packed) vs TRL's SFTTrainer (its own bfd packing, padding-free) on the same samples."""
    _require_trl()
    met = True
    med = lambda runs, key: statistics.median(x[key] for x in runs)  # noqa: E731
    for label, mixed in (("demo data", False), ("mixed lengths", True)):
        with tempfile.TemporaryDirectory(prefix="trainer-trl-") as tmp:
            work = Path(tmp)
            config, _, _ = prepare(work, samples, packing=True, mixed=mixed)
            _, samples_dir, _ = prepare(work, samples, mixed=mixed)  # unpacked samples: TRL packs them itself
            runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
            for r in range(repeats):
                order = [("ours", lambda: run_ours(config, work)), ("trl", lambda: run_trl(samples_dir, work))]
                for name, run in order if r % 2 == 0 else order[::-1]:
                    figures = run()
                    runs[name].append(figures)
                    print(f"{label}, repeat {r + 1} {name:4}: {figures['real_tokens_per_second']:8.1f} effective "
                          f"tokens/s, peak RSS {figures['rss_mib']:7.0f} MiB, {figures['steps']} steps, "
                          f"train loss {figures['train_loss']:.4f}", flush=True)
        ours, trl = runs["ours"][0], runs["trl"][0]
        whole = trl["samples_kept_whole_with_labels"] and trl["packed_tokens"] == trl["given_tokens"]
        print(f"{label}: {trl['samples']} samples, {trl['given_tokens']} tokens ({trl['learned_tokens']} learned); "
              f"TRL packed {trl['packed_samples']} of them into {trl['rows']} rows ({trl['packed_tokens']} tokens; "
              f"{'every sample whole, labels as given' if whole else 'NOT every sample whole: counted what it trained'}"
              f"; padding-free batch {trl['padding_free_batch']}, learned labels as expected "
              f"{trl['batch_learned_as_expected']}, shuffle_dataset {trl['shuffle_dataset']}); ours "
              f"{ours['packed_rows']} rows, {ours['real_tokens']} tokens (the Trainer's own non-padding count: "
              f"{ours['counted_tokens']})")
        ratio = med(runs["ours"], "real_tokens_per_second") / med(runs["trl"], "real_tokens_per_second")
        rss = med(runs["ours"], "rss_mib") / med(runs["trl"], "rss_mib")
        print(f"{label}: finetune train {med(runs['ours'], 'real_tokens_per_second'):.1f} vs TRL SFTTrainer "
              f"{med(runs['trl'], 'real_tokens_per_second'):.1f} effective tokens/s (median of {repeats}): ratio "
              f"ours/TRL {ratio:.3f} (target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'}); peak RSS "
              f"{med(runs['ours'], 'rss_mib'):.0f} vs {med(runs['trl'], 'rss_mib'):.0f} MiB: ratio ours/TRL {rss:.3f}\n",
              flush=True)
        met = met and ratio >= 0.95
    return 0 if met else 1

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="demo rows to train on (one epoch)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, order alternating")
    parser.add_argument("--packing", action="store_true", help="packed vs unpacked instead of ours vs plain")
    parser.add_argument("--limits", action="store_true", help="ours (packed) vs a bare loop and the GEMM peak")
    parser.add_argument("--trl", action="store_true", help="ours (packed) vs TRL's SFTTrainer (bfd packing)")
    args = parser.parse_args()
    if args.trl:
        return trl_comparison(args.samples, args.repeats)
    if args.packing:
        return packing_comparison(args.samples, args.repeats)
    if args.limits:
        return limits_comparison(args.samples, args.repeats)
    with tempfile.TemporaryDirectory(prefix="trainer-throughput-") as tmp:
        work = Path(tmp)
        config, samples_dir, _ = prepare(work, args.samples)
        ours, plain = [], []
        for r in range(args.repeats):
            order = [("ours", lambda: run_ours(config, work)), ("plain", lambda: run_plain(samples_dir, work))]
            for name, run in order if r % 2 == 0 else order[::-1]:
                figures = run()
                (ours if name == "ours" else plain).append(figures)
                print(f"repeat {r + 1} {name:5}: {figures['tokens_per_second']:8.1f} tokens/s, "
                      f"peak RSS {figures['rss_mib']:7.0f} MiB", flush=True)
    med = lambda runs, key: statistics.median(x[key] for x in runs)  # noqa: E731
    ours_tps, plain_tps = med(ours, "tokens_per_second"), med(plain, "tokens_per_second")
    ours_rss, plain_rss = med(ours, "rss_mib"), med(plain, "rss_mib")
    ratio = ours_tps / plain_tps
    print(f"\nfinetune train : {ours_tps:8.1f} tokens/s, peak RSS {ours_rss:7.0f} MiB (median of {args.repeats})")
    print(f"plain Trainer  : {plain_tps:8.1f} tokens/s, peak RSS {plain_rss:7.0f} MiB (median of {args.repeats})")
    print(f"throughput ratio (ours / plain): {ratio:.3f}  (target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})")
    print(f"peak RSS ratio (ours / plain):   {ours_rss / plain_rss:.3f}")
    return 0 if ratio >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
