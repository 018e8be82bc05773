"""`finetune train` on a CUDA GPU: the paths a CPU never takes. The frozen base in bf16 under
LoRA, bitsandbytes NF4 (QLoRA) and LLM.int8 placed on the GPU while loading, full fine-tuning
with fp32 masters and bf16 autocast, and Liger's Triton kernels, packed rows under SDPA, and DeepSpeed ZeRO-2/3 over NCCL under torchrun. Each really
trains the tiny Llama, and the loss must fall.

Skipped where no CUDA GPU is visible (CI has none); it is the same code path the CPU tests
cover, with `cuda=True` at each decision. Not covered even on a GPU: flash_attention_2
(flash-attn ships no wheel for this torch; the choice of it is table-tested in
test_model_loading.py), and more than one GPU (NCCL refuses two ranks on one device, so
ZeRO runs one rank here; test_train_distributed.py runs two ranks over gloo).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from test_train_e2e import assert_loss_fell, run_train, tiny_config

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: bf16 weights, bitsandbytes on "
                       "CUDA and Liger's Triton kernels run only there (CI has none; run on a GPU machine)"),
    pytest.mark.timeout(600),
]


def train_on_gpu(tmp_path, tiny_model_dir, caplog, method, **sections):
    """Train, and return (log text, the peak GPU memory the run allocated)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg = tiny_config(tmp_path, tiny_model_dir, method, **sections)
    with caplog.at_level(logging.INFO):
        assert run_train(tmp_path, cfg) == 0
    out = tmp_path / "out"
    assert_loss_fell(out)
    return caplog.text, torch.cuda.max_memory_allocated()


def test_lora_loads_the_frozen_base_in_bf16_on_the_gpu(tmp_path, tiny_model_dir, caplog):
    log, peak = train_on_gpu(tmp_path, tiny_model_dir, caplog, "lora", training={"mixed_precision": "bf16"})
    assert "weights in bfloat16" in log
    assert peak > 0


def test_qlora_quantizes_to_nf4_on_the_gpu(tmp_path, tiny_model_dir, caplog):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    log, peak = train_on_gpu(tmp_path, tiny_model_dir, caplog, "qlora", training={"mixed_precision": "bf16"})
    assert "quantized to 4 bits by bitsandbytes" in log and "weights in bfloat16" in log
    assert peak > 0
    adapter = tmp_path / "out"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).to("cuda")
    model = PeftModel.from_pretrained(base, adapter)
    ids = torch.tensor([[1, 2, 3, 4]], device="cuda")
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_lora_on_an_8bit_base(tmp_path, tiny_model_dir, caplog):
    log, _ = train_on_gpu(tmp_path, tiny_model_dir, caplog, "lora", model={"load_in_8bit": True},
                          training={"mixed_precision": "bf16"})
    assert "quantized to 8 bits by bitsandbytes" in log


def test_full_fine_tuning_keeps_fp32_masters_under_bf16(tmp_path, tiny_model_dir, caplog):
    log, _ = train_on_gpu(tmp_path, tiny_model_dir, caplog, "full",
                          training={"mixed_precision": "bf16", "learning_rate": 2e-3})
    assert "weights in float32 (full trains base weights" in log


def test_liger_kernels_train_on_the_gpu(tmp_path, tiny_model_dir, caplog):
    pytest.importorskip("liger_kernel", reason="Liger is part of the trainer image, not of every venv")
    log, _ = train_on_gpu(tmp_path, tiny_model_dir, caplog, "lora", model={"use_liger_kernels": True},
                          training={"mixed_precision": "bf16"})
    # LoRA adapts lm_head here (test_train_e2e's LORA): Liger's fused linear loss would skip
    # that adapter and the loss would stall (it did, at 10.6, before liger_options).
    assert "liger: applied its kernels for model type 'llama', with its plain cross-entropy" in log


@pytest.mark.parametrize(("stage", "method"), [(2, "lora"), (3, "full")])
def test_deepspeed_zero_over_nccl_on_the_gpu(tmp_path, tiny_model_dir, stage, method):
    pytest.importorskip("deepspeed", reason="DeepSpeed is part of the trainer image, not of every venv")
    from test_train_distributed import losses, torchrun, write_config

    config = write_config(tmp_path, tiny_model_dir, method, precision="bf16", use_deepspeed=True, zero_stage=stage)
    proc = torchrun(tmp_path, config, nproc=1, gpu=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    curve = losses(tmp_path / "out")
    assert curve[-1] < curve[0] - 0.3, curve
    args = torch.load(tmp_path / "out" / "training_args.bin", weights_only=False)
    assert args.deepspeed["zero_optimization"]["stage"] == stage and args.bf16 and not args.use_cpu


def test_packed_rows_train_on_the_gpu(tmp_path, tiny_model_dir, caplog):
    """training.sample_packing on CUDA in bf16: SDPA with the block-diagonal mask transformers
    derives from the packed position_ids. Under flash_attention_2 the collator flattens the batch
    into one padding-free row for the varlen kernel (its loss equality is checked on the CPU in
    test_data_packing.py); that kernel is not run here (no flash-attn wheel for this torch; see the
    module docstring)."""
    log, peak = train_on_gpu(tmp_path, tiny_model_dir, caplog, "lora",
                             training={"mixed_precision": "bf16", "sample_packing": True, "max_seq_length": 256,
                                       "micro_batch_size": 1})
    assert "packed into" in log and peak > 0
