"""Cross-field rules: what no single key's type can say.

Each rule is a small function of the typed config that returns the problems it finds,
each naming the field to change and how. `check()` runs them all, so a user sees every
problem at once. Two modes: `validate` (a config may be checked away from its data and
files: a cluster mounts them later) and `train` (everything must be there now).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from ..contract import PATH_PREFIXES
from .issues import ConfigIssue
from .schema import FineTuneConfig

Mode = Literal["validate", "train"]
Rule = Callable[[FineTuneConfig, "RuleContext"], Iterator[ConfigIssue]]


class RuleContext:
    """What rules may know besides the config: the mode and the config file's folder."""

    def __init__(self, mode: Mode = "validate", base_dir: Path | None = None):
        self.mode = mode
        self.base_dir = base_dir or Path.cwd()


def error(path: str, message: str) -> ConfigIssue:
    return ConfigIssue(path, message, "error")


def warning(path: str, message: str) -> ConfigIssue:
    return ConfigIssue(path, message, "warning")


SourceKind = Literal["builtin", "s3", "local", "hub"]
BUILTIN_PREFIX = "builtin:"  # model/builtin.py's built-in models
S3_PREFIX = "s3://"


def weights_sharded(cfg: FineTuneConfig) -> bool:
    """ZeRO-3: each rank holds a shard of the weights, so rank 0 alone cannot run the benchmarks."""
    return cfg.distributed.use_deepspeed and cfg.distributed.zero_stage == 3


def model_source_kind(name: str) -> SourceKind:
    """How a model.base_model (or model.tokenizer) value is read: a built-in model, an s3://
    folder (fetched), a local path (a directory, a mounted volume's too, or a .gguf file: what
    looks like a path, or an existing directory), or else a Hugging Face Hub ID."""
    if name.startswith(BUILTIN_PREFIX):
        return "builtin"
    if name.startswith(S3_PREFIX):
        return "s3"
    if name.startswith(PATH_PREFIXES) or name.endswith(".gguf") or Path(name).expanduser().is_dir():
        return "local"
    return "hub"


def revision_needs_a_hub_model(cfg: FineTuneConfig, ctx: RuleContext) -> Iterator[ConfigIssue]:
    kind = model_source_kind(cfg.model.base_model)
    if cfg.model.revision is not None and kind != "hub":
        what = {"builtin": "a built-in model", "s3": "an s3:// folder", "local": "a local path"}[kind]
        yield error(
            "model.revision",
            f"pins a Hugging Face Hub commit, but model.base_model {cfg.model.base_model!r} is {what}, which has "
            "no revisions; remove model.revision (or give a Hub ID as base_model)",
        )


def qlora_needs_4bit(cfg: FineTuneConfig, ctx: RuleContext) -> Iterator[ConfigIssue]:
    if cfg.fine_tuning.method != "qlora":
        return
    if cfg.model.load_in_8bit:
        yield error(
            "model.load_in_8bit",
            "fine_tuning.method 'qlora' trains LoRA on a 4-bit model; set model.load_in_8bit: false "
            "(load_in_4bit is then turned on), or use method 'lora' for LoRA on an 8-bit model",
        )
    elif not cfg.model.load_in_4bit:
        yield error(
            "model.load_in_4bit",
            "fine_tuning.method 'qlora' requires 4-bit quantization; set model.load_in_4bit: true "
            "(or remove the key), or use method 'lora' to train an unquantized model",
        )


def one_quantization(cfg: FineTuneConfig, ctx: RuleContext) -> Iterator[ConfigIssue]:
    if cfg.model.load_in_4bit and cfg.model.load_in_8bit:
        yield error(
            "model.load_in_8bit",
            "model.load_in_4bit and model.load_in_8bit are exclusive; set one of them to false",
        )


def bits_agree_with_load_flags(cfg: FineTuneConfig, ctx: RuleContext) -> Iterator[ConfigIssue]:
    bits, model = cfg.fine_tuning.quantization.bits, cfg.model
    if bits is None or (model.load_in_4bit and model.load_in_8bit):
        return
    loaded = 4 if model.load_in_4bit else 8 if model.load_in_8bit else None
    if loaded is None:
        yield error(
            "fine_tuning.quantization.bits",
            f"bits is {bits} but the model loads unquantized; set model.load_in_{bits}bit: true, "
            "or remove fine_tuning.quantization.bits",
        )
    elif loaded != bits:
        yield error(
            "fine_tuning.quantization.bits",
            f"bits is {bits} but model.load_in_{loaded}bit is true; set bits: {loaded} "
            f"or load the model with model.load_in_{bits}bit instead",
        )


def full_needs_unquantized(cfg: FineTuneConfig, ctx: RuleContext) -> Iterator[ConfigIssue]:
    if cfg.fine_tuning.method == "full" and (cfg.model.load_in_4bit or cfg.model.load_in_8bit):
        flag = "load_in_4bit" if cfg.model.load_in_4bit else "load_in_8bit"
        yield error(
            f"model.{flag}",
            f"full fine-tuning cannot update quantized weights; set model.{flag}: false, or use "
            "method 'qlora'/'lora' (adapters) or 'spectrum' (trains selected modules in full precision)",
        )


def accumulation_agrees(cfg: FineTuneConfig, ctx: RuleContext) -> Iterator[ConfigIssue]:
    dist, training = cfg.distributed.gradient_accumulation_steps, cfg.training.gradient_accumulation_steps
    if dist is not None and dist != training:
        yield error(
            "distributed.gradient_accumulation_steps",
            f"is {dist} but training.gradient_accumulation_steps is {training}; make them equal "
            "or remove one (the other is then used)",
        )


def hub_needs_model_id(cfg: FineTuneConfig, ctx: RuleContext) -> Iterator[ConfigIssue]:
    if cfg.output.push_to_hub and not cfg.output.hub_model_id:
        yield error(
            "output.hub_model_id",
            'output.push_to_hub is true but no hub_model_id is set; set it to "username/model-name" '
            "or set push_to_hub: false",
        )


def merge_needs_an_adapter(cfg: FineTuneConfig, ctx: RuleContext) -> Iterator[ConfigIssue]:
    method = cfg.fine_tuning.method
    if cfg.output.merge_adapter and method in ("full", "spectrum"):
        yield error(
            "output.merge_adapter",
            f"fine_tuning.method '{method}' trains the base weights themselves and saves them whole: there is "
            "no adapter to merge; set output.merge_adapter: false (or use method 'lora'/'qlora')",
        )


def eval_needs_eval_set(cfg: FineTuneConfig, ctx: RuleContext) -> Iterator[ConfigIssue]:
    if cfg.trains_eval() and not cfg.dataset.eval_path:
        yield error(
            "dataset.eval_path",
            f"evaluation.do_eval is true with eval_strategy '{cfg.evaluation.eval_strategy}' but there "
            "is no evaluation set; set dataset.eval_path, or set evaluation.do_eval: false",
        )


def eval_steps_agree(cfg: FineTuneConfig, ctx: RuleContext) -> Iterator[ConfigIssue]:
    ev, out = cfg.evaluation, cfg.output
    if ev.eval_steps is not None and out.explicitly_set("eval_steps") and ev.eval_steps != out.eval_steps:
        yield warning(
            "evaluation.eval_steps",
            f"is {ev.eval_steps} but output.eval_steps is {out.eval_steps}; evaluation.eval_steps is used",
        )


def custom_format_has_templates(cfg: FineTuneConfig, ctx: RuleContext) -> Iterator[ConfigIssue]:
    if cfg.dataset.format != "custom":
        return
    for key, example in (("prompt_template", '"{question}"'), ("response_template", '"{answer}"')):
        if not getattr(cfg.dataset.custom, key):
            yield error(
                f"dataset.custom.{key}",
                f"dataset.format 'custom' needs dataset.custom.{key}, a format string over your rows' "
                f"fields such as {example}",
            )


def train_data_present(cfg: FineTuneConfig, ctx: RuleContext) -> Iterator[ConfigIssue]:
    if cfg.dataset.train_path:
        return
    message = "no training data; set dataset.train_path to a JSON/JSONL file, an s3:// URI or a Hugging Face dataset ID"
    yield error("dataset.train_path", message) if ctx.mode == "train" else warning("dataset.train_path", message)


def precision_matches_compute_dtype(cfg: FineTuneConfig, ctx: RuleContext) -> Iterator[ConfigIssue]:
    quant = cfg.fine_tuning.quantization
    if cfg.model.load_in_4bit and cfg.training.mixed_precision == "fp16" and quant.bnb_4bit_compute_dtype == "bfloat16":
        yield warning(
            "fine_tuning.quantization.bnb_4bit_compute_dtype",
            "is bfloat16 while training.mixed_precision is fp16; set it to float16 (or train in bf16) "
            "to avoid casts on every 4-bit matmul",
        )


def deepspeed_is_configured(cfg: FineTuneConfig, ctx: RuleContext) -> Iterator[ConfigIssue]:
    dist = cfg.distributed
    if not dist.use_deepspeed:
        if dist.zero_stage is not None or dist.deepspeed_config is not None:
            key = "zero_stage" if dist.zero_stage is not None else "deepspeed_config"
            yield warning(f"distributed.{key}", "is ignored because distributed.use_deepspeed is false")
        return
    if dist.zero_stage is None and dist.deepspeed_config is None:
        yield error(
            "distributed.zero_stage",
            "distributed.use_deepspeed is true but neither zero_stage nor deepspeed_config is set; "
            "set zero_stage (0-3) or deepspeed_config",
        )
        return
    if dist.deepspeed_config is None:
        return
    ds = yield from _load_deepspeed_config(dist.deepspeed_config, ctx)
    if ds is not None:
        yield from _deepspeed_agrees(ds, cfg)


def _load_deepspeed_config(value: str | dict[str, Any], ctx: RuleContext):
    """Yields problems; returns the parsed mapping, or None when it cannot be read."""
    if isinstance(value, dict):
        return value
    path = resolve_deepspeed_path(value, ctx.base_dir)
    if not path.is_file():
        message = (
            f"file {value!r} not found (looked at {path}); in a cluster it must exist in the "
            "trainer image or a mounted volume, or give the settings inline"
        )
        yield error("distributed.deepspeed_config", message) if ctx.mode == "train" else warning(
            "distributed.deepspeed_config", message
        )
        return None
    try:
        parsed = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        yield error("distributed.deepspeed_config", f"{path} is not valid JSON: {exc}")
        return None
    if not isinstance(parsed, dict):
        yield error("distributed.deepspeed_config", f"{path} must hold a JSON object")
        return None
    return parsed


def resolve_deepspeed_path(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def _deepspeed_agrees(ds: dict[str, Any], cfg: FineTuneConfig) -> Iterator[ConfigIssue]:
    """Numbers in the DeepSpeed file must match the training section ("auto" always does)."""
    stage = (ds.get("zero_optimization") or {}).get("stage")
    want = cfg.distributed.zero_stage
    if want is not None and stage is not None and stage != "auto" and stage != want:
        yield error(
            "distributed.zero_stage",
            f"is {want} but the DeepSpeed config sets zero_optimization.stage {stage}; make them equal "
            "or remove zero_stage",
        )
    pairs = [
        ("train_micro_batch_size_per_gpu", "training.micro_batch_size", cfg.training.micro_batch_size),
        ("gradient_accumulation_steps", "training.gradient_accumulation_steps", cfg.training.gradient_accumulation_steps),
        ("gradient_clipping", "training.max_grad_norm", cfg.training.max_grad_norm),
    ]
    for ds_key, path, ours in pairs:
        theirs = ds.get(ds_key)
        if theirs not in (None, "auto") and theirs != ours:
            yield error(
                "distributed.deepspeed_config",
                f"sets {ds_key} {theirs} but {path} is {ours}; set it to \"auto\" (filled from the "
                f"training section) or make them equal",
            )
    for precision in ("bf16", "fp16"):
        enabled = (ds.get(precision) or {}).get("enabled")
        if enabled is True and cfg.training.mixed_precision != precision:
            yield error(
                "distributed.deepspeed_config",
                f"enables {precision} but training.mixed_precision is {cfg.training.mixed_precision!r}; "
                f'set {precision}.enabled to "auto" or make them agree',
            )


def benchmarks_have_inputs(cfg: FineTuneConfig, ctx: RuleContext) -> Iterator[ConfigIssue]:
    """A selected benchmark has the data it reads; local files exist when training starts."""
    ev = cfg.evaluation

    def missing(path: str, message: str) -> ConfigIssue:
        return error(path, message) if ctx.mode == "train" else warning(path, message)

    if "domain-specific-eval" in ev.benchmarks and not ev.domain_eval_path:
        yield missing(
            "evaluation.domain_eval_path",
            "evaluation.benchmarks includes 'domain-specific-eval' but no evaluation set is given; set "
            'evaluation.domain_eval_path to a JSONL file (or s3:// URI) of {"prompt": ..., "reference": ...} '
            "lines, or remove the benchmark",
        )
    local = [
        ("domain-specific-eval", "evaluation.domain_eval_path", ev.domain_eval_path, False),
        ("lm-evaluation-harness", "evaluation.lm_eval.include_path", ev.lm_eval.include_path, True),
        ("human-eval", "evaluation.human_eval.problems_path", ev.human_eval.problems_path, False),
    ]
    for benchmark, path, value, is_dir in local:
        if benchmark not in ev.benchmarks or not value or not _looks_local(value, is_dir):
            continue
        found = Path(value).expanduser()
        if not (found.is_dir() if is_dir else found.is_file()):
            kind = "folder" if is_dir else "file"
            yield missing(path, f"{kind} not found: {value} (relative paths are read from the working directory); fix the path")
    if ev.evaluate_base_model and not ev.benchmarks:
        yield warning("evaluation.evaluate_base_model", "is true but evaluation.benchmarks is empty; nothing is evaluated")


def _looks_local(value: str, is_dir: bool) -> bool:
    """A local path (a folder always is; a data location may also be s3:// or a dataset ID)."""
    if value.startswith(S3_PREFIX):
        return False
    return is_dir or value.endswith((".json", ".jsonl")) or value.startswith(PATH_PREFIXES)


RULES: list[Rule] = [
    revision_needs_a_hub_model,
    qlora_needs_4bit,
    one_quantization,
    bits_agree_with_load_flags,
    full_needs_unquantized,
    accumulation_agrees,
    hub_needs_model_id,
    merge_needs_an_adapter,
    eval_needs_eval_set,
    eval_steps_agree,
    custom_format_has_templates,
    train_data_present,
    precision_matches_compute_dtype,
    deepspeed_is_configured,
    benchmarks_have_inputs,
]


def check(cfg: FineTuneConfig, ctx: RuleContext) -> list[ConfigIssue]:
    """Every problem every rule finds, errors and warnings, in rule order."""
    return [issue for rule in RULES for issue in rule(cfg, ctx)]
