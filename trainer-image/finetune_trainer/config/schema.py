"""The configuration language: the seed's YAML, section by section, as pydantic models.

This module is the contract between the user, the operator and the trainer. It imports
nothing heavy (the operator uses it without torch), every key carries the seed's name,
default and description (descriptions become `kubectl explain` text), and unknown keys
are errors: a typo must never train the wrong model.

Types and ranges live here; rules that relate two fields live in `rules.py`, so that
every broken rule is reported at once with the dotted path of the field to fix.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

Method = Literal["full", "lora", "qlora", "spectrum"]
Precision = Literal["no", "fp16", "bf16"]
ComputeDtype = Literal["bfloat16", "float16", "float32"]
DatasetFormat = Literal["alpaca", "sharegpt", "oasst", "custom", "text"]
OasstPaths = Literal["best", "all"]
EvalStrategy = Literal["steps", "epoch", "no"]
Benchmark = Literal["lm-evaluation-harness", "domain-specific-eval", "human-eval"]
# Experiment trackers, by the names transformers' `report_to` uses (tracking/ reports to them).
Tracker = Literal["tensorboard", "mlflow", "wandb"]
# The names transformers' TrainingArguments accepts for `optim` that make sense for
# fine-tuning; the seed lists the first three.
Optimizer = Literal[
    "adamw_torch",
    "adamw_8bit",
    "paged_adamw_8bit",
    "adamw_torch_fused",
    "adamw_bnb_8bit",
    "paged_adamw_32bit",
    "adafactor",
    "sgd",
    "lion_8bit",
    "paged_lion_8bit",
]
# transformers' SchedulerType values that need no extra arguments; the seed lists the
# first three.
Scheduler = Literal[
    "cosine",
    "linear",
    "constant_with_warmup",
    "constant",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
]

LayerIndex = Annotated[int, Field(ge=0)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)

    def explicitly_set(self, name: str) -> bool:
        """Whether the user wrote this key (as opposed to it taking its default)."""
        return name in self.model_fields_set


class ModelConfig(Section):
    """The base model and how it is loaded."""

    base_model: NonEmptyStr = Field(
        description="The model to fine-tune: a Hugging Face Hub ID, an s3://bucket/prefix/ folder (as save_pretrained "
        "writes it: safetensors, config, tokenizer), a local directory (a mounted volume's path too), or a .gguf "
        "file. Hub and s3:// models are fetched once per job into the model cache.",
    )
    revision: NonEmptyStr | None = Field(
        default=None,
        description="Hub models only: the commit, tag or branch to train from. Default: the default branch; the "
        "commit it resolved to is recorded (the run's config.yaml, status.model, the experiment trackers).",
    )
    tokenizer: NonEmptyStr | None = Field(
        default=None,
        description="Tokenizer to use, in the same forms as base_model. Default: the model's own (from the same "
        "fetched files and revision).",
    )
    load_in_8bit: bool = Field(default=False, description="Load the base model in 8-bit (bitsandbytes LLM.int8).")
    load_in_4bit: bool = Field(
        default=False,
        description="Load the base model in 4-bit (bitsandbytes NF4/FP4). Turned on automatically for qlora.",
    )
    trust_remote_code: bool = Field(
        default=True,
        description="Run modelling code shipped in the model repository. Clusters can forbid it by policy.",
    )
    use_flash_attention: bool = Field(
        default=True,
        description="Use Flash Attention 2 when flash-attn and a CUDA GPU are present; otherwise SDPA, and the log says why.",
    )
    use_liger_kernels: bool = Field(
        default=False,
        description="Apply Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused cross-entropy) when they can run.",
    )


class LoraConfigSection(Section):
    """LoRA / QLoRA adapter settings (peft.LoraConfig)."""

    r: int = Field(default=16, ge=1, description="Rank of the adaptation matrices (8-32; higher = more capacity).")
    alpha: float = Field(default=32, gt=0, description="Scaling factor, typically 2x the rank.")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input (0.05-0.1).")
    target_modules: list[NonEmptyStr] | Literal["all-linear"] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        min_length=1,
        description='Module names to adapt (model-dependent), or "all-linear" for every linear layer but the output head.',
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _names_or_all_linear(cls, value: Any) -> Any:
        if value == "all-linear" or (
            isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)
        ):
            return value
        return _one_of(value, accepted='a non-empty list of module names, e.g. ["q_proj", "v_proj"], or "all-linear"')
    bias: Literal["none", "all", "lora_only"] = Field(
        default="none", description='Which biases to train: "none", "all" or "lora_only".'
    )
    task_type: Literal["CAUSAL_LM"] = Field(
        default="CAUSAL_LM", description="peft task type; the trainer fine-tunes causal language models."
    )


def _one_of(value: Any, *, accepted: str) -> Any:
    raise ValueError(f"must be {accepted} (got {value!r})")


class SpectrumConfig(Section):
    """Spectrum: train only the modules with the highest signal-to-noise ratio."""

    snr_threshold: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description=(
            "SNR percentile threshold (0.0 to 1.0): within each module type (q_proj, k_proj, ...), "
            "modules whose SNR is above this percentile of their type are trained, i.e. the top "
            "(1 - snr_threshold) fraction. Higher = fewer layers."
        ),
    )
    layers_to_finetune: Literal["auto"] | list[LayerIndex] = Field(
        default="auto",
        description='"auto" to select by SNR analysis, or a list of transformer layer indices to train.',
    )
    train_embeddings: bool = Field(
        default=True,
        description=(
            "Also train the input embeddings (embed_tokens) and the output head (lm_head), as the reference "
            "Spectrum implementation does; tied embeddings are one matrix, trained once. false keeps both "
            "frozen (with a large vocabulary they are a large share of a small model)."
        ),
    )

    @field_validator("layers_to_finetune", mode="before")
    @classmethod
    def _auto_or_indices(cls, value: Any) -> Any:
        if value == "auto" or (
            isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        ):
            return value
        return _one_of(value, accepted='"auto" or a list of layer indices (integers >= 0), e.g. [0, 1, 2]')


class QuantizationConfig(Section):
    """bitsandbytes quantization settings (used when the model loads in 4 or 8 bits)."""

    bits: Literal[4, 8] | None = Field(
        default=None,
        description="Bit precision for quantization, 4 or 8; must agree with model.load_in_4bit/load_in_8bit. Default: from those flags.",
    )
    bnb_4bit_compute_dtype: ComputeDtype = Field(
        default="bfloat16", description='Compute dtype for 4-bit layers: "bfloat16" or "float16".'
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description='4-bit data type: "nf4" or "fp4".')
    bnb_4bit_use_double_quant: bool = Field(
        default=True, description="Quantize the quantization constants too (saves ~0.4 bit per parameter)."
    )


class FineTuningConfig(Section):
    """Which parameters are trained, and how."""

    method: Method = Field(
        default="lora",
        description='"full" (all parameters), "lora", "qlora" (LoRA on a 4-bit model) or "spectrum" (high-SNR modules only).',
    )
    lora: LoraConfigSection = Field(default_factory=LoraConfigSection, description="LoRA / QLoRA parameters.")
    spectrum: SpectrumConfig = Field(default_factory=SpectrumConfig, description="Spectrum parameters.")
    quantization: QuantizationConfig = Field(
        default_factory=QuantizationConfig, description="Quantization parameters."
    )


class TrainingConfig(Section):
    """The optimisation loop."""

    epochs: int = Field(default=3, ge=1, description="Number of training epochs (2-5 for most cases).")
    max_steps: int | None = Field(
        default=None,
        ge=1,
        description="Stop after this many optimizer steps, overriding epochs (for smoke tests and quick runs).",
    )
    micro_batch_size: int = Field(default=1, ge=1, description="Batch size per GPU (per process).")
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, description="Micro-batches accumulated before each optimizer update."
    )
    learning_rate: float = Field(default=2.0e-4, gt=0, description="Peak learning rate (1e-5 to 3e-4).")
    lr_scheduler_type: Scheduler = Field(
        default="cosine", description='Learning-rate schedule: "cosine", "linear", "constant_with_warmup", ...'
    )
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Fraction of the steps spent warming up.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping threshold (0.3-1.0).")
    optimizer: Optimizer = Field(
        default="adamw_torch", description='Optimizer: "adamw_torch", "adamw_8bit", "paged_adamw_8bit", ...'
    )
    weight_decay: float = Field(default=0.0, ge=0, description="Decoupled weight decay (0.001-0.01).")
    max_seq_length: int = Field(
        default=2048, ge=8, description="Longer samples are truncated to this many tokens (model-dependent)."
    )
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations to save memory.")
    sample_packing: bool = Field(
        default=False,
        description="Pack short samples into rows of up to max_seq_length (best-fit decreasing); each sample "
        "sees only itself (position_ids restart, block-diagonal attention). Steps count packed rows.",
    )
    group_by_length: bool = Field(
        default=False,
        description="Draw micro-batches of similar length (less padding; transformers' length-grouped sampler).",
    )
    mixed_precision: Precision = Field(
        default="bf16",
        description='"bf16", "fp16" or "no". On hardware without support the trainer falls back to fp32 and says so.',
    )
    seed: int = Field(default=42, ge=0, description="Random seed for data order, initialisation and dropout.")


class PreprocessingConfig(Section):
    """How samples become token sequences."""

    add_eos_token: bool = Field(default=True, description="Append the tokenizer's EOS token to every sample.")
    add_bos_token: bool = Field(default=False, description="Prepend the tokenizer's BOS token to every sample.")
    use_chat_template: bool = Field(
        default=True, description="Render conversations with the tokenizer's chat template."
    )
    train_on_inputs: bool = Field(
        default=False,
        description="Also compute the loss on prompts; by default only responses are learned.",
    )


class CustomFormatConfig(Section):
    """How rows of a `custom` dataset become a prompt and a response.

    Templates are Python format strings over the row's fields, e.g.
    `prompt_template: "Question: {question}\nContext: {context}"` and
    `response_template: "{answer}"`. Every field a template names must be in every row.
    """

    prompt_template: NonEmptyStr | None = Field(
        default=None, description="Format string over row fields that builds the user turn, e.g. \"{question}\"."
    )
    response_template: NonEmptyStr | None = Field(
        default=None, description="Format string over row fields that builds the assistant turn, e.g. \"{answer}\"."
    )
    system_template: NonEmptyStr | None = Field(
        default=None, description="Optional format string for a system turn."
    )


class DatasetConfig(Section):
    """The training (and evaluation) data."""

    format: DatasetFormat = Field(
        default="alpaca",
        description='Dataset format: "alpaca", "sharegpt", "oasst", "custom", or "text" (raw documents for '
        'continued pre-training: every token learned, long documents split into max_seq_length pieces).',
    )
    train_path: NonEmptyStr | None = Field(
        default=None,
        description="Training data: a JSON/JSONL file (relative to the working directory), an s3:// URI, or a Hugging Face dataset ID.",
    )
    eval_path: NonEmptyStr | None = Field(
        default=None, description="Evaluation data, in the same forms as train_path."
    )
    preprocessing: PreprocessingConfig = Field(
        default_factory=PreprocessingConfig, description="Tokenisation settings."
    )
    custom: CustomFormatConfig = Field(
        default_factory=CustomFormatConfig, description='Templates for format "custom" (ignored otherwise).'
    )
    skip_bad_rows: int = Field(
        default=0, ge=0,
        description="Skip up to this many malformed rows per file (counted in the log, metrics.jsonl and the "
        "job's status); more fails the run. 0: any bad row stops the run, every bad row listed.",
    )
    oasst_paths: OasstPaths = Field(
        default="best",
        description='Format "oasst": "best" follows the best-ranked reply at each branch (one conversation '
        'per tree); "all" trains on every root-to-leaf path.',
    )


class DistributedConfig(Section):
    """Multi-GPU / multi-node settings."""

    use_deepspeed: bool = Field(default=False, description="Use DeepSpeed ZeRO (true for multi-GPU training).")
    deepspeed_config: NonEmptyStr | dict[str, Any] | None = Field(
        default=None,
        description="DeepSpeed config: a JSON file path (relative to this config file) or an inline mapping. Default: generated from zero_stage.",
    )

    @field_validator("deepspeed_config", mode="before")
    @classmethod
    def _path_or_mapping(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value) or isinstance(value, dict):
            return value
        return _one_of(value, accepted="a path to a DeepSpeed JSON file or an inline mapping")
    zero_stage: int | None = Field(
        default=None, ge=0, le=3, description="ZeRO optimization stage 0-3 (higher = more memory efficient)."
    )
    gradient_accumulation_steps: int | None = Field(
        default=None,
        ge=1,
        description="Steps before optimizer update; if set, must equal training.gradient_accumulation_steps.",
    )


class OutputConfig(Section):
    """Where results go, and how often the trainer logs, evaluates and saves."""

    output_dir: NonEmptyStr = Field(default="models/runs", description="Directory to save models and logs in.")
    storage_uri: NonEmptyStr | None = Field(
        default=None,
        description="Object storage for checkpoints and results (s3://bucket/prefix or file:///path). Set by the operator.",
    )
    logging_steps: int = Field(default=10, ge=1, description="Steps between log lines (10-50).")
    eval_steps: int = Field(default=100, ge=1, description="Steps between evaluations (100-500).")
    save_steps: int = Field(default=500, ge=1, description="Steps between checkpoints (100-1000).")
    save_total_limit: int | None = Field(
        default=5, ge=1, description="Maximum number of checkpoints kept (3-10); older ones are deleted."
    )
    push_to_hub: bool = Field(default=False, description="Upload the result to the Hugging Face Hub (token from HF_TOKEN).")
    hub_model_id: NonEmptyStr | None = Field(
        default=None, pattern=r"^[\w.-]+/[\w.-]+$", description='Hub repository, "username/model-name".'
    )
    merge_adapter: bool = Field(
        default=False,
        description="LoRA/QLoRA: also write the adapter merged into the base weights (final/merged/: a plain "
        "transformers model, in the training precision; QLoRA merges into the unquantized base in "
        "bnb_4bit_compute_dtype, never into the 4-bit one). full and spectrum already save full weights.",
    )
    report_to: list[Tracker] = Field(
        default_factory=list,
        max_length=3,
        description="Experiment trackers the main process reports to: tensorboard, mlflow, wandb (transformers' "
        'names; default none, "none" also means none). Endpoints and keys come from the environment '
        "(a FineTuneJob: spec.tracking), never from this file.",
    )
    run_name: NonEmptyStr | None = Field(
        default=None, description="The run's name in the trackers. Default: the FineTuneJob's name, else output_dir's."
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, value: Any) -> Any:
        """transformers takes one name or a list, and "none" for none: so do we."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            value = [v for v in value if v != "none"]
            if len(set(map(str, value))) != len(value):
                raise ValueError("lists a tracker twice")
        return value


class LmEvalConfig(Section):
    """EleutherAI lm-evaluation-harness (`lm_eval`) on the trained model, adapter applied."""

    tasks: list[NonEmptyStr] = Field(
        default_factory=lambda: ["hellaswag", "arc_easy"],
        min_length=1,
        description="lm_eval task (or group) names. Built-in tasks fetch their data from the Hugging Face Hub; "
        "offline, use tasks defined by YAML files under include_path.",
    )
    num_fewshot: int | None = Field(
        default=None, ge=0, le=64, description="Few-shot examples per question. Default: each task's own (0 if unset)."
    )
    limit: float | None = Field(
        default=None,
        gt=0,
        description="At most this many examples per task (a number below 1 is a fraction of the task). Default: all.",
    )
    include_path: NonEmptyStr | None = Field(
        default=None,
        description="Folder of custom task YAML files (lm_eval's include_path), relative to the working directory.",
    )
    batch_size: int | None = Field(
        default=None, ge=1, description="Requests per forward pass. Default: evaluation.eval_batch_size."
    )
    apply_chat_template: bool = Field(
        default=False,
        description="Wrap prompts in the tokenizer's chat template (lm_eval's apply_chat_template); off is the "
        "usual setting for published scores.",
    )


class HumanEvalConfig(Section):
    """HumanEval-style code generation, each program run in a sandboxed subprocess; reports pass@1."""

    problems_path: NonEmptyStr = Field(
        default="openai/openai_humaneval:test",
        description="Problems with task_id, prompt, test and entry_point: a JSONL file, an s3:// URI or a Hugging "
        "Face dataset ID (DATASET:split). Default: OpenAI's HumanEval from the Hub.",
    )
    max_new_tokens: int = Field(default=384, ge=1, le=8192, description="Longest completion generated per problem.")
    timeout_seconds: float = Field(
        default=10.0, gt=0, le=600, description="Wall-clock (and CPU) limit for one problem's program and tests."
    )
    memory_mb: int = Field(default=1024, ge=64, description="Address-space limit of one problem's program, in MiB.")
    limit: int | None = Field(default=None, ge=1, description="Evaluate only the first N problems. Default: all.")


class EvaluationConfig(Section):
    """Evaluation during and after training."""

    do_eval: bool = Field(default=False, description="Evaluate on dataset.eval_path during training.")
    eval_batch_size: int = Field(default=8, ge=1, description="Batch size for evaluation (8-32).")
    eval_strategy: EvalStrategy = Field(default="steps", description='When to evaluate: "steps", "epoch" or "no".')
    eval_steps: int | None = Field(
        default=None, ge=1, description="Steps between evaluations. Default: output.eval_steps."
    )
    benchmarks: list[Benchmark] = Field(
        default_factory=list,
        description='Benchmarks to run after training: "lm-evaluation-harness", "domain-specific-eval", "human-eval".',
    )
    evaluate_base_model: bool = Field(
        default=False,
        description="Also run the benchmarks before training (the base model, or the untrained adapter, which "
        "leaves it unchanged), so the results show before, after and the change.",
    )
    domain_eval_path: NonEmptyStr | None = Field(
        default=None,
        description='domain-specific-eval data: JSONL lines of {"prompt": ..., "reference": ...} (optional '
        '"system"), as a local file or an s3:// URI. Scored by exact match, token F1 and reference perplexity.',
    )
    domain_eval_max_new_tokens: int = Field(
        default=128, ge=1, le=8192, description="Longest answer generated per domain-specific-eval prompt."
    )
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig, description="lm-evaluation-harness settings.")
    human_eval: HumanEvalConfig = Field(default_factory=HumanEvalConfig, description="human-eval settings.")


class FineTuneConfig(Section):
    """A fine-tuning run: the whole configuration file."""

    model: ModelConfig = Field(description="The base model and how it is loaded.")
    fine_tuning: FineTuningConfig = Field(default_factory=FineTuningConfig, description="Fine-tuning method.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Training parameters.")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig, description="Dataset configuration.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Distributed training.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Logging and checkpoints.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Evaluation settings.")

    @model_validator(mode="after")
    def _fill_implied(self) -> FineTuneConfig:
        """Fill values that other keys imply (never ones that contradict the user: rules.py
        reports those). Runs on assignment too, so it must be idempotent."""
        model, ft, training, dist = self.model, self.fine_tuning, self.training, self.distributed
        if ft.method == "qlora" and not model.explicitly_set("load_in_4bit") and not model.load_in_8bit:
            _set_silently(model, "load_in_4bit", True)
        if ft.quantization.bits is None and (model.load_in_4bit != model.load_in_8bit):
            _set_silently(ft.quantization, "bits", 4 if model.load_in_4bit else 8)
        if dist.gradient_accumulation_steps is not None and not training.explicitly_set(
            "gradient_accumulation_steps"
        ):
            _set_silently(training, "gradient_accumulation_steps", dist.gradient_accumulation_steps)
        return self

    # Derived values the trainer, the operator and the summary share.
    def effective_eval_steps(self) -> int:
        return self.evaluation.eval_steps or self.output.eval_steps

    def trains_eval(self) -> bool:
        """Whether evaluation runs during training (and so needs dataset.eval_path)."""
        return self.evaluation.do_eval and self.evaluation.eval_strategy != "no"


def _set_silently(section: Section, name: str, value: Any) -> None:
    """Set an implied value without marking it as written by the user and without
    re-running validators (assignment validation would recurse into this one)."""
    section.__dict__[name] = value


SECTIONS: dict[str, type[Section]] = {
    name: field.annotation  # type: ignore[misc]
    for name, field in FineTuneConfig.model_fields.items()
}
