"""Issue 4 (b) through `torchrun --nproc_per_node 2` (gloo on loopback): the pod (torchrun and
both ranks) is SIGKILLed after its second complete checkpoint in storage, and a new pod with an
empty disk resumes from storage. Once with DDP (LoRA), once with DeepSpeed ZeRO-3 (full
fine-tuning): every rank's files (rng_state_<rank>.pth; ZeRO-3's per-rank parameter and
optimizer shards under global_step*/) must be in the manifest and be restored on resume,
which the restart proves by training the steps after the checkpoint exactly as the killed run
did. Not covered here: NCCL, GPUs, several machines (see test_local_run_e2e.py for two nodes).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from s3_server import free_port
from test_checkpoint_resume_single import (
    Bucket,
    assert_final_artifacts,
    assert_kept_two_after,
    assert_resumed_exactly,
    kill_pod_when,
    new_pod_disk,
    no_pod_outlives_its_test,  # noqa: F401  (autouse fixture)
    output_dir,
    start_pod,
    tail,
    trained_past_second_checkpoint,
    trainer_env,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MAX_STEPS, SAVE_STEPS = 16, 4
RNG_MISSING = "Didn't find an RNG file"  # the Trainer's warning when a rank's RNG state is absent


def torchrun_env() -> dict[str, str]:
    from finetune_trainer.model import builtin

    return trainer_env(
        DS_ACCELERATOR="cpu",  # DeepSpeed on CPU: gloo, no CUDA probing
        # DeepSpeed compiles its CPU comm op on first use (~30 s); keep it between runs.
        TORCH_EXTENSIONS_DIR=str(builtin.cache_root() / "torch_extensions"),
    )


def start_torchrun(config: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "finetune_trainer.cli", "train", "--config", str(config)]
    return start_pod(cmd, log, torchrun_env())


@pytest.mark.parametrize("variant", ["ddp", "zero3"])
def test_e_two_ranks_sigkill_new_pod_resumes_every_rank_from_storage(
        tmp_path, tiny_model_dir, s3_bucket, s3_endpoint, variant):
    zero3 = variant == "zero3"
    bucket = Bucket(s3_endpoint, s3_bucket, f"team-a/job-e-{variant}")
    sections = {"distributed": {"use_deepspeed": True, "zero_stage": 3}, "fine_tuning": {"method": "full"},
                "training": {"learning_rate": 2e-3}} if zero3 else {}
    config = write_config(tmp_path, tiny_model_dir, bucket.uri, max_steps=MAX_STEPS, save_steps=SAVE_STEPS,
                          micro_batch_size=2, **sections)
    out = output_dir(config)
    log = tmp_path / "1.log"
    proc = start_torchrun(config, log)
    killed = kill_pod_when(lambda: trained_past_second_checkpoint(bucket, out), proc, log,
                           "a second complete checkpoint", timeout=600)
    assert killed >= 3  # torchrun and both ranks die at once
    newest = bucket.complete()[-1]
    assert newest >= 2 * SAVE_STEPS

    # every rank's files, as the ranks wrote them on the node's disk, are in the manifest
    manifest = bucket.assert_complete(newest, out / f"checkpoint-{newest}")
    names = {f["path"] for f in manifest["files"]}
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json", "scheduler.pt"} <= names, sorted(names)
    if zero3:
        for rank in (0, 1):
            for kind in ("model_states", "optim_states"):
                pattern = rf"^global_step{newest}/(bf16_)?zero_pp_rank_{rank}_mp_rank_00_{kind}\.pt$"
                assert any(re.match(pattern, n) for n in names), (pattern, sorted(names))
    else:
        assert {"adapter_model.safetensors", "optimizer.pt"} <= names

    killed = new_pod_disk(config)
    log2 = tmp_path / "2.log"
    proc = start_torchrun(config, log2)
    assert proc.wait(timeout=600) == 0, tail(log2, 8000)
    text = tail(log2, 10**7)
    results = json.loads((out / "train_results.json").read_text())
    assert results["resumed_from"] == str(out / f"checkpoint-{newest}")
    assert f"resuming from {out}/checkpoint-{newest} (downloaded from {bucket.uri}" in text
    assert RNG_MISSING not in text, "a rank resumed without its RNG state"
    assert results["global_step"] == MAX_STEPS
    # the same losses after the checkpoint as the killed run: weights, per-rank optimizer
    # shards, scheduler, every rank's RNG and the data position all came back
    assert_resumed_exactly(killed, out, newest, MAX_STEPS)
    assert_kept_two_after(bucket, newest, final=MAX_STEPS)
    bucket.assert_complete(MAX_STEPS, out / f"checkpoint-{MAX_STEPS}")
    assert_final_artifacts(bucket, out, MAX_STEPS,
                           weights=("model.safetensors", "config.json") if zero3 else
                           ("adapter_model.safetensors", "adapter_config.json"))
