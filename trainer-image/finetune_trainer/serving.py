"""From a finished run to a model server: merged weights, and how to serve what final/ holds.

`train()` calls one function on the world's main process, after the final save and before
`storage.publish` (so everything lands in final/):

    write_serving_outputs(cfg, output_dir, tokenizer, total_params=...)
        merged/                  output.merge_adapter (LoRA, QLoRA): the adapter merged into the base
        serving.md               for people: what is where, how to serve it, which dtype and why
        vllm-serve.sh            the `vllm serve` command line (base + LoRA module, or the whole model)
        inferenceservice.yaml    a KServe InferenceService (Hugging Face runtime, storageUri in final/)

Everything else here is pure (a config and a plan in, an argv, a dict or text out), so each
piece is a table test. The operator reuses `final_outputs_for` for status.outputs.

Merging (`merge_adapter`): the base is loaded again, unquantized, on the CPU (the trained model
keeps the GPU), in `serving_dtype`; the saved adapter is applied and merged, and the result is
saved as a plain transformers model with the tokenizer. QLoRA merges into the 16-bit base in
`bnb_4bit_compute_dtype`, never into the 4-bit weights (a merge there would be rounded back to
4 bits). A head tied to the input embeddings is untied first when either is adapted: the adapter
changed one of them during training, and merging into a shared tensor would change both.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import contract as c
from .config import FineTuneConfig
from .config.rules import model_source_kind, weights_sharded
from .model import builtin

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

KSERVE_API_VERSION = "serving.kserve.io/v1beta1"
KSERVE_KIND = "InferenceService"
KSERVE_MODEL_FORMAT = "huggingface"  # KServe's Hugging Face runtime (vLLM backend for generation)
KSERVE_MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts storageUri
VLLM_PORT = 8000  # vLLM's default
# `vllm serve --max-lora-rank` accepts only these (vLLM 0.33's choices): the adapter's r, rounded up.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
GIB = 1024**3
DEFAULT_NAME = "finetuned-model"


# ------------------------------------------------------------------------------ pure: decisions


def serving_dtype(cfg: FineTuneConfig) -> tuple[str, str]:
    """(torch dtype name, why) of the merged weights, and what a server runs the model in."""
    if cfg.model.load_in_4bit:
        dtype = cfg.fine_tuning.quantization.bnb_4bit_compute_dtype
        return dtype, (f"QLoRA: the unquantized base in fine_tuning.quantization.bnb_4bit_compute_dtype ({dtype}), "
                       "the precision its 4-bit weights were computed in while the adapter trained; never the "
                       "4-bit weights themselves")
    precision = cfg.training.mixed_precision
    dtype = PRECISION_DTYPES[precision]
    return dtype, f"training.mixed_precision is {precision!r}"


def has_adapter(cfg: FineTuneConfig) -> bool:
    return cfg.fine_tuning.method in c.ADAPTER_METHODS


def evaluation_published(cfg: FineTuneConfig) -> bool:
    """Whether final/ gets evaluation.json: benchmarks are set, and rank 0 holds the whole
    model to run them on (not under ZeRO-3)."""
    return bool(cfg.evaluation.benchmarks) and not weights_sharded(cfg)


def final_outputs_for(cfg: FineTuneConfig, job_uri: str) -> dict[str, str]:
    """status.outputs of a run of `cfg` that stored its results under `job_uri`."""
    return c.final_outputs(job_uri, adapter=has_adapter(cfg), merged=has_adapter(cfg) and cfg.output.merge_adapter,
                           evaluation=evaluation_published(cfg))


def vllm_lora_rank(r: int) -> int | None:
    """The smallest `--max-lora-rank` vLLM accepts for an adapter of rank r (None: above them all)."""
    return next((rank for rank in VLLM_LORA_RANKS if rank >= r), None)


def dns_name(text: str) -> str:
    """A DNS-1035 label (an InferenceService's name, vLLM's model name) made from `text`."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    name = re.sub(r"^[^a-z]+", "", name)[:63].rstrip("-")
    return name or DEFAULT_NAME


def base_for_server(base_model: str) -> tuple[str, str]:
    """(what a server loads as the base of an adapter, a note for serving.md or "")."""
    kind = model_source_kind(base_model)
    if kind == "builtin":
        hub = builtin.HUB_ORIGINS.get(base_model.removeprefix(builtin.BUILTIN_PREFIX))
        if hub:
            return hub, (f"The base `{base_model}` is a Q4_1 GGUF of `{hub}`, dequantized; the adapter was trained on "
                         "those weights, so base + adapter on the Hub's weights is close but not exact. The merged "
                         "model is exact.")
        return base_model, f"The base `{base_model}` is not on the Hub: serve the merged model (output.merge_adapter)."
    if kind == "s3":
        return base_model, (f"The base `{base_model}` is in object storage: the server needs a copy of that folder "
                            "(KServe's --model_id wants a Hub ID), or serve the merged model (output.merge_adapter).")
    if kind == "local":
        return base_model, (f"The base `{base_model}` is a local path: the server needs the same files at that path "
                            "(KServe's --model_id wants a Hub ID), or serve the merged model (output.merge_adapter).")
    return base_model, ""


@dataclass(frozen=True)
class ServingPlan:
    """What the serving files say, decided once."""

    name: str  # the served model's name (vLLM's model name, the InferenceService's name)
    namespace: str | None
    method: str
    base_model: str  # as configured
    base: str  # what a server loads as the base of the adapter
    base_note: str
    adapter: bool  # final/ holds a LoRA adapter
    merged: bool  # final/merged/ holds the adapter merged into the base
    dtype: str
    dtype_why: str
    lora_rank: int
    trust_remote_code: bool
    final_uri: str  # final/ (ends in "/")
    weights_bytes: int  # of the served model, in `dtype`

    @property
    def whole_model(self) -> bool:
        """A server loads one model (merged or full weights), no adapter on top."""
        return self.merged or not self.adapter

    @property
    def model_uri(self) -> str:
        """KServe's storageUri: the merged weights, the full weights, or the adapter."""
        return f"{self.final_uri}{c.MERGED_DIR}/" if self.merged else self.final_uri


def serving_plan(cfg: FineTuneConfig, *, output_dir: Path, total_params: int, merged: bool,
                 job_name: str | None = None, namespace: str | None = None) -> ServingPlan:
    dtype, why = serving_dtype(cfg)
    if cfg.output.storage_uri:
        final_uri = final_outputs_for(cfg, cfg.output.storage_uri)["final"]
    else:  # a local run: output_dir is what final/ would hold
        final_uri = Path(output_dir).resolve().as_uri() + "/"
    base, note = base_for_server(cfg.model.base_model)
    return ServingPlan(
        name=dns_name(job_name or Path(output_dir).resolve().name), namespace=namespace,
        method=cfg.fine_tuning.method, base_model=cfg.model.base_model, base=base, base_note=note,
        adapter=has_adapter(cfg), merged=merged, dtype=dtype, dtype_why=why, lora_rank=cfg.fine_tuning.lora.r,
        trust_remote_code=cfg.model.trust_remote_code, final_uri=final_uri,
        weights_bytes=total_params * DTYPE_BYTES[dtype],
    )


# ------------------------------------------------------------------------------ pure: builders


def vllm_command(plan: ServingPlan, final_dir: str, *, adapter: bool | None = None) -> list[str]:
    """`vllm serve` for a local copy of final/ at `final_dir`. `adapter=True`: the base with the
    LoRA adapter as a module named `plan.name` (default: only when there is no whole model)."""
    use_adapter = (not plan.whole_model) if adapter is None else adapter
    if use_adapter:
        argv = ["vllm", "serve", plan.base, "--dtype", plan.dtype, "--enable-lora",
                "--lora-modules", f"{plan.name}={final_dir}", "--max-lora-rank", str(vllm_lora_rank(plan.lora_rank))]
    else:
        model_dir = f"{final_dir}/{c.MERGED_DIR}" if plan.merged else final_dir
        argv = ["vllm", "serve", model_dir, "--served-model-name", plan.name, "--dtype", plan.dtype]
    if plan.trust_remote_code:
        argv.append("--trust-remote-code")
    return argv + ["--port", str(VLLM_PORT)]


def kserve_resources(plan: ServingPlan) -> dict[str, dict[str, str]]:
    """One GPU; memory for the weights plus room to load them and run the server."""
    memory = f"{math.ceil(plan.weights_bytes / GIB) + 8}Gi"
    return {"requests": {"cpu": "2", "memory": memory},
            "limits": {"cpu": "4", "memory": memory, "nvidia.com/gpu": "1"}}


def inference_service(plan: ServingPlan, job_name: str | None = None) -> dict[str, Any]:
    """A KServe InferenceService on the Hugging Face runtime, storageUri in final/. Its args are
    the runtime's own (`--model_name`, `--model_dir`, `--model_id`) and vLLM's, which it passes on."""
    args = [f"--model_name={plan.name}"]
    if plan.whole_model:
        args.append(f"--model_dir={KSERVE_MODEL_DIR}")
    else:  # the base from the Hub, the adapter from storageUri
        args += [f"--model_id={plan.base}", "--enable-lora", f"--lora-modules={plan.name}={KSERVE_MODEL_DIR}",
                 f"--max-lora-rank={vllm_lora_rank(plan.lora_rank)}"]
    args.append(f"--dtype={plan.dtype}")
    if plan.trust_remote_code:
        args.append("--trust-remote-code")
    metadata: dict[str, Any] = {"name": plan.name}
    if plan.namespace:
        metadata["namespace"] = plan.namespace
    if job_name:
        metadata["labels"] = {c.LABEL_JOB_NAME: job_name}
    model = {"modelFormat": {"name": KSERVE_MODEL_FORMAT}, "args": args, "storageUri": plan.model_uri.rstrip("/"),
             "resources": kserve_resources(plan)}
    return {"apiVersion": KSERVE_API_VERSION, "kind": KSERVE_KIND, "metadata": metadata,
            "spec": {"predictor": {"model": model}}}


def _sh(arg: str) -> str:
    """One shell word; "$FINAL_DIR" stays expandable."""
    return f'"{arg}"' if "$FINAL_DIR" in arg and '"' not in arg else shlex.quote(arg)


def vllm_script(plan: ServingPlan) -> str:
    """vllm-serve.sh: run it from a local copy of final/ (FINAL_DIR: that copy, default its folder)."""
    argv = vllm_command(plan, "$FINAL_DIR")
    return (
        "#!/usr/bin/env bash\n"
        f"# Serve {plan.name} with vLLM (OpenAI-compatible API on port {VLLM_PORT}). Written by `finetune train`.\n"
        "# Run it from a local copy of final/ (see serving.md); FINAL_DIR overrides where that copy is.\n"
        "set -euo pipefail\n"
        'FINAL_DIR="${FINAL_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"\n'
        f"exec {' '.join(_sh(a) for a in argv)} \"$@\"\n"
    )


def copy_command(final_uri: str) -> str:
    """How to get a local copy of final/ into ./final."""
    if final_uri.startswith("file://"):
        return f"cp -r {shlex.quote(final_uri[len('file://'):].rstrip('/'))} ./final"
    if final_uri.startswith("s3://"):
        return f"aws s3 sync {shlex.quote(final_uri)} ./final"
    return f"# copy {final_uri} to ./final"


def serving_doc(plan: ServingPlan) -> str:
    """serving.md: paragraphs and shell blocks, each a list item."""
    what = (f"a LoRA adapter ({plan.method}, r={plan.lora_rank}) for `{plan.base_model}`" if plan.adapter
            else f"the full weights ({plan.method} of `{plan.base_model}`)")
    chat = json.dumps({"model": plan.name, "messages": [{"role": "user", "content": "Hello"}]})
    doc = [f"# Serving {plan.name}",
           (f"`{plan.final_uri}` holds {what}, its tokenizer, `{c.CONFIG_FILE}` (the exact config), "
            f"`{c.RESULTS_FILE}` and these serving files.")]
    if plan.merged:
        doc.append(f"`{c.MERGED_DIR}/` holds the adapter merged into the base: a plain transformers model in "
                   f"**{plan.dtype}** ({plan.dtype_why}). Load it with "
                   f'`AutoModelForCausalLM.from_pretrained("final/{c.MERGED_DIR}")`.')
    doc.append(f"Serving dtype: **{plan.dtype}** ({plan.dtype_why}).")
    if plan.adapter and vllm_lora_rank(plan.lora_rank) is None:
        doc.append(f"Note: r={plan.lora_rank} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]}); "
                   "serve the merged model (output.merge_adapter: true).")
    doc += ["## vLLM", "A local copy of final/, then the command in `vllm-serve.sh`:",
            _shell(copy_command(plan.final_uri), f"bash final/{c.VLLM_FILE}",
                   f"# = {shlex.join(vllm_command(plan, './final'))}")]
    if plan.merged:
        doc += ["The adapter on the base instead of the merged model:",
                _shell(shlex.join(vllm_command(plan, "./final", adapter=True)))]
    if plan.adapter and plan.base_note:
        doc.append(f"Note: {plan.base_note}")
    doc += ["Then ask it:",
            _shell(f"curl -s localhost:{VLLM_PORT}/v1/chat/completions -H 'Content-Type: application/json' "
                   f"-d {shlex.quote(chat)}"),
            "## KServe",
            (f"`{c.KSERVE_FILE}` serves `{plan.model_uri}` on KServe's Hugging Face runtime (vLLM backend, one GPU; "
             "adjust `resources` to your model and cluster). KServe's storage initializer needs credentials for the "
             "bucket (a ServiceAccount with the storage Secret, see KServe's docs); a `file://` URI is only reachable "
             "on the machine that wrote it."),
            _shell(f"kubectl apply -f final/{c.KSERVE_FILE}",
                   f"kubectl wait isvc/{plan.name} --for=condition=Ready --timeout=20m")]
    return "\n\n".join(doc) + "\n"


def _shell(*lines: str) -> str:
    return "\n".join(["```bash", *lines, "```"])


# ------------------------------------------------------------------------------ edges


@dataclass(frozen=True)
class MergeResult:
    path: str  # relative to output_dir
    dtype: str
    why: str
    seconds: float
    untied_head: bool  # the tied output head got its own copy before the merge


def merge_adapter(cfg: FineTuneConfig, output_dir: Path, tokenizer: PreTrainedTokenizerBase) -> MergeResult:
    """The adapter saved in output_dir merged into a fresh 16/32-bit load of the base, saved to
    output_dir/merged/ with the tokenizer (see the module docstring)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .model.loading import pretrained_kwargs, resolve_model_source

    start = time.perf_counter()
    dtype, why = serving_dtype(cfg)
    source, gguf_file = resolve_model_source(cfg.model.base_model)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype),
                              **pretrained_kwargs(cfg, cfg.model.base_model, gguf_file, revision=cfg.model.revision)}
    base = AutoModelForCausalLM.from_pretrained(source, **kwargs)  # no quantization_config, no device_map: CPU
    quantizer = getattr(base, "hf_quantizer", None)
    if quantizer is not None:  # a GGUF file's tag (its weights are dequantized): save_pretrained refuses it
        quantizer.remove_quantization_config(base)
    model = PeftModel.from_pretrained(base, str(output_dir))
    untied = untie_adapted_head(model)
    merged = model.merge_and_unload()
    target = output_dir / c.MERGED_DIR
    shutil.rmtree(target, ignore_errors=True)
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)
    result = MergeResult(c.MERGED_DIR, dtype, why, round(time.perf_counter() - start, 2), untied)
    log.info("merged the adapter into %s in %s (%s) in %.1f s%s", target, dtype, why, result.seconds,
             "; the tied output head was untied first" if untied else "")
    return result


def untie_adapted_head(model: Any) -> bool:
    """A head tied to the input embeddings, with either of them adapted, gets its own weight:
    merging into the shared tensor would add the head's update to the embeddings too (or the
    embeddings' to the head), which the trained model never did."""
    import torch

    inner = model.get_base_model()
    head, embeddings = inner.get_output_embeddings(), inner.get_input_embeddings()
    head_layer, embed_layer = getattr(head, "base_layer", head), getattr(embeddings, "base_layer", embeddings)
    if head_layer is None or head_layer.weight is not embed_layer.weight:
        return False
    if head_layer is head and embed_layer is embeddings:
        return False  # neither is adapted: the merged model keeps them tied
    head_layer.weight = torch.nn.Parameter(head_layer.weight.detach().clone(), requires_grad=False)
    inner.config.tie_word_embeddings = False
    return True


def write_serving_outputs(cfg: FineTuneConfig, output_dir: Path, tokenizer: PreTrainedTokenizerBase, *,
                          total_params: int, environ: dict[str, str] | None = None,
                          loading: FineTuneConfig | None = None) -> dict[str, Any]:
    """merged/ (when asked) and the serving files in output_dir; returns what train_results.json
    records under "serving". Main process only. `loading`: the config the base model loads from
    (its fetched copy, model/fetch.py), where `cfg` names it as written; default `cfg`."""
    env = os.environ if environ is None else environ
    merge = None
    if cfg.output.merge_adapter and has_adapter(cfg):
        merge = merge_adapter(loading or cfg, output_dir, tokenizer)
    job_name = env.get(c.ENV_JOB_NAME) or None
    plan = serving_plan(cfg, output_dir=output_dir, total_params=total_params, merged=merge is not None,
                        job_name=job_name, namespace=env.get(c.ENV_JOB_NAMESPACE) or None)
    (output_dir / c.SERVING_FILE).write_text(serving_doc(plan))
    script = output_dir / c.VLLM_FILE
    script.write_text(vllm_script(plan))
    script.chmod(0o755)
    (output_dir / c.KSERVE_FILE).write_text(yaml.safe_dump(inference_service(plan, job_name), sort_keys=False))
    return {"name": plan.name, "dtype": plan.dtype, "dtype_why": plan.dtype_why, "model_uri": plan.model_uri,
            "merged": asdict(merge) if merge else None, "files": [c.SERVING_FILE, c.VLLM_FILE, c.KSERVE_FILE]}
