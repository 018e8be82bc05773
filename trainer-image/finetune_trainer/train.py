"""`finetune train`: the stages of a fine-tuning run, top to bottom.

    config -> seed -> fetch the model -> tokenizer -> data -> model + method -> Trainer -> train (resume)
           -> eval after -> save (weights, tokenizer, config, metrics, loss curve)
           -> serving (merged weights, serving.md, vLLM and KServe manifests) -> publish -> push -> sample

Every rank runs every stage (torchrun starts one process per GPU; the Trainer shards the
data and syncs the gradients). Only the world's main process writes the shared files and
prints; `trainer.save_model` runs on all ranks because ZeRO-3 gathers the weights for it.
Errors a user can fix end the run with exit code 1 (permanent, never retried).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, ConfigIssue, FineTuneConfig, dump_config
from .config.rules import resolve_deepspeed_path, weights_sharded
from .contract import CONFIG_FILE, EXIT_OK, EXIT_PERMANENT, EXIT_UNAVAILABLE, METRICS_FILE, RESULTS_FILE, world
from .data import IGNORE_INDEX, DataError, data_collator, prepare_data
from .storage.checkpoints import checkpoint_step
from .storage.stores import StorageUnavailable
from .training.arguments import training_arguments
from .training.callbacks import (
    DataFields,
    data_record,
    json_line,
    MetricsCallback,
    NonFiniteLossError,
    NonFiniteLossGuard,
    ProgressReporter,
    SessionRecorder,
    perplexity,
)
from .tracking import missing_packages, open_tracking
from .training.deepspeed import deepspeed_config

log = logging.getLogger("finetune_trainer.train")


LOSS_PLOT_FILE = "loss.png"
SAMPLE_NEW_TOKENS = 40



@dataclass
class RunResult:
    exit_code: int
    output_dir: Path | None = None
    results: dict[str, Any] | None = None


# ------------------------------------------------------------------------------- the run


def train(
    cfg: FineTuneConfig,
    *,
    base_dir: Path,
    callbacks: Sequence[Any] = (),
    reporters: Sequence[ProgressReporter] = (),
) -> RunResult:
    """One fine-tuning run of a checked config (`load_config(..., mode="train")`).

    `callbacks` are extra TrainerCallbacks (one that stops training on purpose sets an
    `exit_code` that is not None: the run ends with it, without the final evaluation and
    save); `reporters` get a progress dict at every log."""
    cfg = seed_config(cfg, base_dir=base_dir)
    out = Path(cfg.output.output_dir)
    main = is_main_process()

    import torch
    from transformers import TrainingArguments, set_seed

    from .methods import prepare_model
    from .model.fetch import fetch_model, loading_config, recorded_config
    from .model.loading import load_tokenizer

    set_seed(cfg.training.seed)
    if main and (issues := missing_packages(cfg.output.report_to)):
        raise ConfigError(issues)  # before minutes of loading: the image lacks a tracker's library

    # An s3:// or Hub model onto this disk, once per node (or per job, with a shared cache),
    # before anything reads it; torch.distributed is not up yet, so the ranks meet on files.
    # `cfg` keeps the source as written, with model.revision the Hub commit it resolved to (for
    # config.yaml, checkpoints, trackers and status); the loaders read `loading`, the local copy.
    fetched = fetch_model(cfg)
    cfg = recorded_config(cfg, fetched)
    loading = loading_config(cfg, fetched)
    if main:
        tell(reporters, "set_model", fetched.status())
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(dump_config(cfg))

    # Data before the weights: a bad row fails in seconds, not after minutes of loading them.
    tokenizer = load_tokenizer(loading)
    data = prepare_data(cfg, tokenizer)
    if main:
        for name, stats in data.stats.items():
            log.info(stats.summary(name, cfg.training.max_seq_length))

    # prepare_model loads the base model and applies full/lora/qlora/spectrum; the main
    # process alone writes the Spectrum selection.
    method = prepare_model(loading, output_dir=out if main else None)
    forget_gguf_origin(method.model)
    if cfg.training.sample_packing:
        from .data.packing import isolation_problem

        if problem := isolation_problem(method.model):
            raise ConfigError([ConfigIssue("training.sample_packing", problem.split(": ", 1)[1])])
    if main:
        log.info(method.description)

    use_cpu = not torch.cuda.is_available()
    args = TrainingArguments(
        **training_arguments(
            cfg,
            output_dir=out,
            world_size=world().world_size,
            use_cpu=use_cpu,
            bf16_supported=use_cpu or torch.cuda.is_bf16_supported(),
            deepspeed=deepspeed_config(cfg, base_dir=base_dir),
            hub_token=os.environ.get("HF_TOKEN"),
        )
    )
    _ = args.device  # sets up torch.distributed now: plug-ins agree on the resume point through it

    # Storage decides where the run resumes (after a preemption or a crash): the newest
    # checkpoint whose manifest verifies, in object storage or on this disk, fetched into the
    # output directory. As the Trainer runs, it writes each checkpoint's manifest (and uploads
    # it) and turns SIGTERM into a save.
    from .storage.plugin import open_storage

    storage = open_storage(cfg, out)
    resume = storage.resume_checkpoint()
    kept: list[dict[str, Any]] = []  # the records up to the checkpoint a resumed run keeps
    if main:
        kept = prepare_metrics_file(out / METRICS_FILE, resume_step=checkpoint_step(resume) if resume else None)
        with (out / METRICS_FILE).open("a", encoding="utf-8") as f:
            stats = {name: s.as_dict() for name, s in data.stats.items()}
            f.write(json_line(data_record(stats, step=checkpoint_step(resume) if resume else 0, now=time.time())) + "\n")
        if resume:
            log.info("resuming from %s", resume)
    tracking = open_tracking(cfg, out, resume=resume, store=storage.store, history=kept)  # only the main process
    with tracking.ended_on_failure():
        return _train_and_save(cfg, out, method=method, args=args, tokenizer=tokenizer, data=data, storage=storage,
                               resume=resume, tracking=tracking, callbacks=callbacks, reporters=reporters,
                               loading=loading)


def _train_and_save(cfg: FineTuneConfig, out: Path, *, method, args, tokenizer, data, storage, resume, tracking,
                    callbacks, reporters, loading: FineTuneConfig) -> RunResult:
    """The Trainer, then the results; `train` ends the tracker runs if this raises."""
    from .training.trainer import FineTuneTrainer

    main = is_main_process()
    session = SessionRecorder()
    trainer = FineTuneTrainer(
        model=method.model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=data_collator(
            tokenizer, attention=getattr(method.model.config, "_attn_implementation", None)
        ),
        processing_class=tokenizer,
        callbacks=[
            NonFiniteLossGuard(),
            MetricsCallback(out / METRICS_FILE, reporters=with_fields(reporters, [storage, DataFields(data.stats), tracking]),
                            sinks=[tracking.record]),
            session,
            tracking,  # before storage: the trackers' run ids go into each checkpoint's manifest
            storage,
            *callbacks,
        ],
    )

    # Benchmarks on the base model (LoRA adapters start at zero; a resumed checkpoint loads
    # inside train()), so the report can show before -> after.
    before = None
    if main and cfg.evaluation.benchmarks and cfg.evaluation.evaluate_base_model and benchmarks_can_run(cfg):
        from .evaluation import run_benchmarks

        before = run_benchmarks(method.model, tokenizer, cfg, stage="before")

    # With an eval set, TrainingArguments(eval_on_start=True) gives the loss before training.
    outcome = trainer.train(resume_from_checkpoint=resume)
    stopped = storage.exit_code if storage.exit_code is not None else early_exit_code(callbacks)
    if stopped is not None:  # e.g. preempted: the checkpoint is saved, the run is not finished
        log.warning("training stopped at step %d; exiting %d", trainer.state.global_step, stopped)
        tracking.finish(ok=False)  # the resumed attempt continues these runs
        _end(trainer)
        return RunResult(stopped, out)
    after = final_evaluation(trainer, session) if data.eval is not None else None

    trainer.save_model(str(out))  # adapter or full weights, and the tokenizer; all ranks (ZeRO-3)
    results = run_results(
        outcome,
        trainer.state,
        session=session,
        after=after,
        method=method,
        data_stats={k: vars(v) for k, v in data.stats.items()},
        resumed_from=resume,
    )
    if trainer.is_world_process_zero():
        from .serving import write_serving_outputs

        # merged/ (output.merge_adapter), serving.md, vllm-serve.sh, inferenceservice.yaml: into final/
        results["serving"] = write_serving_outputs(cfg, out, tokenizer, total_params=method.total_params,
                                                   loading=loading)
        (out / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
        from .training.plots import plot_loss

        plot_loss(out / METRICS_FILE, out / LOSS_PLOT_FILE)
    if trainer.is_world_process_zero() and cfg.evaluation.benchmarks and benchmarks_can_run(cfg):
        evaluate_after(trainer.model, tokenizer, cfg, out, before, reporters, tracking)
    storage.publish(out)  # metrics.jsonl and final/ to object storage
    if cfg.output.push_to_hub:
        trainer.push_to_hub(commit_message=f"finetune: {cfg.fine_tuning.method} of {cfg.model.base_model}")

    tracking.finish(ok=True)
    tracking.report_end(reporters)
    answer = sample_answer(trainer, tokenizer, data.eval) if data.eval is not None else None
    if trainer.is_world_process_zero():
        print(report(results, answer, out), flush=True)
    _end(trainer)
    return RunResult(EXIT_OK, out, results)


def benchmarks_can_run(cfg: FineTuneConfig) -> bool:
    """The benchmarks run on rank 0's model; under ZeRO-3 it holds only a shard."""
    if weights_sharded(cfg):
        log.warning("evaluation.benchmarks skipped under ZeRO-3 (rank 0 holds a shard of the weights); "
                    "run them on the saved model")
        return False
    return True


def evaluate_after(model, tokenizer, cfg: FineTuneConfig, out: Path, before, reporters, tracking) -> None:
    """Benchmarks on the trained model: evaluation.json (uploaded with final/), the before ->
    after table (also to the trackers), and status.evaluation."""
    from .evaluation import evaluation_status, finish_evaluation, run_benchmarks
    from .evaluation.report import metric_rows

    after = run_benchmarks(model, tokenizer, cfg, stage="after")
    report = finish_evaluation(out, after, before)
    tracking.log_evaluation(metric_rows(report))
    uri = f"{cfg.output.storage_uri.rstrip('/')}/final/evaluation.json" if cfg.output.storage_uri else None
    tell(reporters, "set_evaluation", evaluation_status(report, results_uri=uri))


def tell(reporters: Sequence[ProgressReporter], method: str, value: dict[str, Any]) -> None:
    """Reporters with a `method` (StatusReporter's set_model, set_evaluation) get `value`."""
    for reporter in reporters:
        if callable(send := getattr(reporter, method, None)):
            send(value)


def with_fields(reporters: Sequence[ProgressReporter], stages: Sequence[Any]) -> list[ProgressReporter]:
    """Reporters that also get what the stages add to a progress update (storage: the newest
    checkpoint and whether uploads are degraded; data: samples and skipped rows)."""
    sources = [stage.progress_fields for stage in stages]
    if not sources:
        return list(reporters)

    def enrich(report: ProgressReporter) -> ProgressReporter:
        return lambda update: report({**update, **{k: v for f in sources for k, v in f().items()}})

    return [enrich(r) for r in reporters]


def _end(trainer) -> None:
    """All ranks meet, then each destroys the process group. Without the meeting a rank
    with nothing left to do (rank 1 while rank 0 uploads the results) tore gloo down while
    its peer's connections were live, and now and then died in C++ (SIGABRT, "terminate
    called without an active exception"), which torchrun turns into a failed run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    end = getattr(trainer, "end", None)
    if callable(end):
        end()  # destroys the process group once no collective is left


def run_command(cfg: FineTuneConfig, *, base_dir: Path, **kwargs: Any) -> int:
    """`train` with the errors a user can cause turned into one message and exit code 1."""
    setup_logging()
    limit_threads()
    dump_stacks_on_hang()
    try:
        return train(cfg, base_dir=base_dir, **kwargs).exit_code
    except ConfigError as exc:
        for issue in exc.errors:
            print(f"{_error_prefix()}: {issue}", file=sys.stderr)
        return EXIT_PERMANENT
    except (DataError, NonFiniteLossError) as exc:
        print(f"{_error_prefix()}: {exc}", file=sys.stderr)
        return EXIT_PERMANENT
    except StorageUnavailable as exc:  # an outage, or a peer that never finished the fetch (FetchTimeout)
        print(f"{_error_prefix()}: {exc}; exiting {EXIT_UNAVAILABLE} so the job retries", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except Exception as exc:  # noqa: BLE001 - one permanent class of our own, else re-raise
        from .methods.spectrum import SpectrumScanError

        if not isinstance(exc, SpectrumScanError):
            raise
        print(f"{_error_prefix()}: {exc}", file=sys.stderr)  # the message names the field to set
        return EXIT_PERMANENT


def dump_stacks_on_hang() -> None:
    """FINETUNE_DUMP_STACKS_AFTER=N: every N seconds, every thread's stack to stderr (faulthandler),
    so a run stuck in a collective says where in its log; for diagnosing hangs, off by default."""
    from .contract import ENV_DUMP_STACKS_AFTER

    seconds = os.environ.get(ENV_DUMP_STACKS_AFTER)
    if seconds and seconds.replace(".", "", 1).isdigit() and float(seconds) > 0:
        import faulthandler

        faulthandler.dump_traceback_later(float(seconds), repeat=True, file=sys.stderr)


def limit_threads() -> None:
    """One trainer in a pod (no torchrun): torch would size its pool from the node's cores,
    not from the pod's CPU limit. A launcher or the user that set OMP_NUM_THREADS has decided."""
    from .cpu_threads import ENV_OMP_NUM_THREADS, set_threads_env

    if os.environ.get(ENV_OMP_NUM_THREADS):
        return
    import torch

    env: dict[str, str] = {}
    note = set_threads_env(env, world().local_world_size)
    torch.set_num_threads(int(env[ENV_OMP_NUM_THREADS]))
    log.info(note)


def _error_prefix() -> str:
    """'error', or 'error (rank N)' when several processes may print the same line."""
    here = world()
    return f"error (rank {here.rank})" if here.world_size > 1 else "error"


# ----------------------------------------------------------------------- the small parts


def is_main_process() -> bool:
    """Rank 0 of the world (torchrun and the training operator set RANK)."""
    return world().is_main


def setup_logging() -> None:
    # torch's deprecation of the collective DeepSpeed calls on every step, once per step per rank.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    if not logging.getLogger().handlers:
        level = logging.INFO if is_main_process() else logging.WARNING
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def forget_gguf_origin(model: Any) -> None:
    """A model read from a .gguf file holds plain dequantized tensors but keeps a "gguf"
    quantizer tag, and with it the Trainer refuses to train it and save_pretrained to save
    it. Drop the tag (the built-in model is already converted and has none)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantizer = getattr(base, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)).lower() == "gguf":
        quantizer.remove_quantization_config(base)
        log.info("model: GGUF weights were dequantized on load; training and saving them as plain tensors")


def seed_config(cfg: FineTuneConfig, *, base_dir: Path) -> FineTuneConfig:
    """The seed sections of a config or a FineTuneJob spec, self-contained: a DeepSpeed file
    path becomes absolute, so the saved config.yaml validates from the output directory."""
    data = cfg.model_dump(include=set(FineTuneConfig.model_fields))
    ds = data["distributed"].get("deepspeed_config")
    if isinstance(ds, str):
        data["distributed"]["deepspeed_config"] = str(resolve_deepspeed_path(ds, base_dir).resolve())
    return FineTuneConfig.model_validate(data)


def prepare_metrics_file(path: Path, *, resume_step: int | None) -> list[dict[str, Any]]:
    """A fresh run starts an empty metrics.jsonl; a resumed one keeps the lines up to its
    checkpoint, so steps that are trained again are not logged twice. Returns the kept records."""
    if resume_step is None or not path.exists():
        path.write_text("")
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [(line, record) for line in lines if (record := json.loads(line))["step"] <= resume_step]
    path.write_text("".join(line + "\n" for line, _ in kept))
    return [record for _, record in kept]


def early_exit_code(callbacks: Sequence[Any]) -> int | None:
    """The exit code a plug-in asked for by stopping training early, if any."""
    codes = [code for cb in callbacks if (code := getattr(cb, "exit_code", None)) is not None]
    return codes[0] if codes else None


def final_evaluation(trainer, session: SessionRecorder) -> dict[str, float]:
    """Eval metrics after training; an evaluation the Trainer just ran at the last step is reused."""
    if session.evals and session.evals[-1][0] == trainer.state.global_step:
        return session.evals[-1][1]
    return trainer.evaluate()


def _eval_summary(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    if not metrics or "eval_loss" not in metrics:
        return None
    return {"eval_loss": metrics["eval_loss"], "perplexity": perplexity(metrics["eval_loss"])}


def run_results(outcome, state, *, session, after, method, data_stats, resumed_from) -> dict[str, Any]:
    """train_results.json: what a user (or the operator) wants to know about the run."""
    runtime = float(outcome.metrics.get("train_runtime", 0.0))
    tokens = state.num_input_tokens_seen - session.start_tokens
    train_time = max(runtime - session.eval_seconds_in_training, 1e-9)
    first = session.evals[0] if session.evals else None
    return {
        "method": method.method,
        "trainable_params": method.trainable_params,
        "total_params": method.total_params,
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "epoch": state.epoch,
        "resumed_from": resumed_from,
        "train_loss": outcome.training_loss,
        "train_runtime_seconds": round(runtime, 3),
        "train_tokens": tokens,
        "train_tokens_per_second": round(tokens / train_time, 2),
        "eval_before": _eval_summary(first[1]) if first and first[0] == session.start_step else None,
        "eval_after": _eval_summary(after),
        "data": data_stats,
    }


def prompt_ids(row: dict[str, list[int]]) -> list[int]:
    """The prompt of a tokenized sample: the tokens before the first learned one (the
    rendering ends with the assistant header, so generation continues as the answer).
    With train_on_inputs every token is learned; then the first half stands in."""
    labels = row["labels"]
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    if first == 0:
        first = max(len(labels) // 2, 1)
    return list(row["input_ids"][:first])


def sample_answer(trainer, tokenizer, eval_set) -> dict[str, str] | None:
    """Greedy answer to the first eval prompt. Under ZeRO-3 each rank holds a shard of the
    weights, so every rank generates (synced_gpus); otherwise the main process alone."""
    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    zero3 = is_deepspeed_zero3_enabled()
    if not (zero3 or trainer.is_world_process_zero()) or len(eval_set) == 0:
        return None
    ids = prompt_ids(eval_set[0])
    model = trainer.model
    model.eval()
    device = next(model.parameters()).device
    inputs = torch.tensor([ids], device=device)
    with torch.no_grad():
        output = model.generate(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=SAMPLE_NEW_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            synced_gpus=zero3,
        )
    return {
        "prompt": tokenizer.decode(ids, skip_special_tokens=True).strip(),
        "answer": tokenizer.decode(output[0][len(ids):], skip_special_tokens=True).strip(),
    }


def _fmt_eval(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "n/a"
    ppl = summary["perplexity"]
    return f"{summary['eval_loss']:.4f} (perplexity {ppl:.2f})" if math.isfinite(ppl) else f"{summary['eval_loss']:.4f}"


def report(results: dict[str, Any], answer: dict[str, str] | None, out: Path) -> str:
    """The lines a user reads at the end of a run."""
    lines = [
        "",
        f"Training done: {results['global_step']} steps, {results['train_tokens_per_second']:.1f} tokens/s, "
        f"{results['trainable_params']:,} of {results['total_params']:,} parameters trained ({results['method']}).",
    ]
    if results["eval_before"] or results["eval_after"]:
        lines.append(f"Eval loss before: {_fmt_eval(results['eval_before'])}")
        lines.append(f"Eval loss after:  {_fmt_eval(results['eval_after'])}")
    if answer:
        prompt = answer["prompt"].replace("\n", " ")
        lines.append(f"Sample prompt: {prompt[-300:]}")
        lines.append(f"Sample answer: {answer['answer']}")
    lines.append(f"Saved to {out}/ (weights, tokenizer, {CONFIG_FILE}, {METRICS_FILE}, {LOSS_PLOT_FILE}, {RESULTS_FILE})")
    return "\n".join(lines)
