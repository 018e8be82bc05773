"""One paragraph that tells a user what their config will do, before it costs GPU hours."""

from __future__ import annotations

from .schema import FineTuneConfig

METHOD_NAMES = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA", "spectrum": "Spectrum"}


def _loading(cfg: FineTuneConfig) -> str:
    q = cfg.fine_tuning.quantization
    if cfg.model.load_in_4bit:
        double = " + double quantization" if q.bnb_4bit_use_double_quant else ""
        return f"loaded in 4-bit {q.bnb_4bit_quant_type.upper()}{double}, {q.bnb_4bit_compute_dtype} compute"
    if cfg.model.load_in_8bit:
        return "loaded in 8-bit"
    return "loaded unquantized"


def _what_trains(cfg: FineTuneConfig) -> str:
    ft = cfg.fine_tuning
    if ft.method == "full":
        return "all parameters"
    if ft.method in ("lora", "qlora"):
        lora = ft.lora
        targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
        bias = "" if lora.bias == "none" else f", plus {lora.bias} biases"
        return f"rank-{lora.r} adapters (alpha {lora.alpha:g}, dropout {lora.dropout:g}) on {targets}{bias}; the base stays frozen"
    sp = ft.spectrum
    embeddings = (
        ", plus the input embeddings and output head (once when tied)" if sp.train_embeddings
        else "; the input embeddings and output head stay frozen (train_embeddings: false)"
    )
    if sp.layers_to_finetune == "auto":
        share = (1 - sp.snr_threshold) * 100
        return (
            f"the top {share:.0f}% of each module type by signal-to-noise ratio (snr_threshold {sp.snr_threshold:g})"
            f"{embeddings}; the rest is frozen"
        )
    return f"transformer layers {', '.join(map(str, sp.layers_to_finetune))}{embeddings}; the rest is frozen"


def summarize(cfg: FineTuneConfig) -> str:
    t, d = cfg.training, cfg.distributed
    per_process = t.micro_batch_size * t.gradient_accumulation_steps
    length = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs} epoch{'s' if t.epochs != 1 else ''}"
    deepspeed = ""
    if d.use_deepspeed:
        deepspeed = f" DeepSpeed ZeRO-{d.zero_stage}" if d.zero_stage is not None else " DeepSpeed (from deepspeed_config)"
        deepspeed += " shards the states across processes."
    data = cfg.dataset.train_path or "no training data set yet"
    evaluation = f"evaluates on {cfg.dataset.eval_path} every {cfg.effective_eval_steps()} steps" if (
        cfg.trains_eval() and cfg.evaluation.eval_strategy == "steps"
    ) else (f"evaluates on {cfg.dataset.eval_path} every epoch" if cfg.trains_eval() else "no evaluation during training")
    return (
        f"{METHOD_NAMES[cfg.fine_tuning.method]} of {cfg.model.base_model} ({_loading(cfg)}), training "
        f"{_what_trains(cfg)}. Effective batch size {per_process} per process "
        f"(micro batch {t.micro_batch_size} x {t.gradient_accumulation_steps} accumulation steps) x the number "
        f"of processes; precision {t.mixed_precision}; {t.optimizer} at learning rate {t.learning_rate:g} "
        f"({t.lr_scheduler_type}, warmup {t.warmup_ratio:g}) for {length}, sequences up to {t.max_seq_length} "
        f"tokens.{deepspeed} Data: {data} ({cfg.dataset.format}); {evaluation}. "
        f"Output: {cfg.output.output_dir}, a checkpoint every {cfg.output.save_steps} steps "
        f"(keeping {cfg.output.save_total_limit or 'all'})."
    )
