"""From training to serving: output.merge_adapter's merged weights, and final/'s serving files.

- The merged model loads in plain transformers and gives the logits of base + adapter: on the
  tiny Llama through `finetune train` (LoRA in fp32, QLoRA merged into the bf16 base) and on
  SmolLM2 (the built-in model) with a random adapter that also adapts its tied head.
- The KServe InferenceService validates against KServe's CRD schema of spec.predictor.model
  (written below from KServe's v1beta1 types, the fields we use); the vLLM command parses with
  an argparse table of vLLM 0.33's `vllm serve` flags (names, choices, arity copied from its
  own parser), and with vLLM's parser itself where vLLM is importable (not in CI: its wheel
  needs a CUDA torch; run it with vLLM's sources on PYTHONPATH and VLLM_TARGET_DEVICE=cpu).
- vllm-serve.sh really runs, with a stand-in `vllm` on PATH that prints the argv it got.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from finetune_trainer import contract as c
from finetune_trainer.config import ConfigError, FineTuneConfig
from finetune_trainer.config.loader import validate_data
from finetune_trainer.serving import (
    ServingPlan,
    base_for_server,
    dns_name,
    final_outputs_for,
    inference_service,
    serving_doc,
    serving_dtype,
    serving_plan,
    vllm_command,
    vllm_lora_rank,
    vllm_script,
)
from test_train_e2e import run_train, tiny_config

BASE = {"model": {"base_model": "meta-llama/Llama-3.1-8B-Instruct"}, "dataset": {"train_path": "d.jsonl"}}


def config(**sections) -> FineTuneConfig:
    data = {k: dict(v) for k, v in BASE.items()}
    for name, value in sections.items():
        data[name] = {**data.get(name, {}), **value}
    return validate_data(data, mode="validate").config


# --------------------------------------------------------------------------- pure decisions


@pytest.mark.parametrize("sections,dtype", [
    ({"training": {"mixed_precision": "bf16"}}, "bfloat16"),
    ({"training": {"mixed_precision": "fp16"}}, "float16"),
    ({"training": {"mixed_precision": "no"}}, "float32"),
    ({"fine_tuning": {"method": "qlora"}}, "bfloat16"),  # bnb_4bit_compute_dtype's default
    ({"fine_tuning": {"method": "qlora", "quantization": {"bnb_4bit_compute_dtype": "float16"}},
      "training": {"mixed_precision": "fp16"}}, "float16"),
    ({"fine_tuning": {"method": "qlora"}, "training": {"mixed_precision": "no"}}, "bfloat16"),  # the compute dtype wins
])
def test_serving_dtype(sections, dtype):
    got, why = serving_dtype(config(**sections))
    assert got == dtype and why
    if sections.get("fine_tuning", {}).get("method") == "qlora":
        assert "never the 4-bit weights" in why


@pytest.mark.parametrize("r,rank", [(1, 1), (2, 8), (8, 8), (9, 16), (16, 16), (17, 32), (300, 320), (512, 512), (513, None)])
def test_vllm_lora_rank_rounds_up_to_a_choice(r, rank):
    assert vllm_lora_rank(r) == rank


@pytest.mark.parametrize("text,name", [("demo", "demo"), ("My_Run.v2", "my-run-v2"), ("0-run", "run"), ("---", "finetuned-model"),
                                       ("a" * 80, "a" * 63)])
def test_dns_name(text, name):
    assert dns_name(text) == name


JOB = "s3://ckpt/runs/ml/demo"


@pytest.mark.parametrize("sections,keys", [
    ({}, {"final", "adapter", "config", "results", "metrics", "serving", "inferenceService", "vllmCommand"}),
    ({"output": {"merge_adapter": True}}, {"final", "adapter", "model", "merged", "config", "results", "metrics",
                                           "serving", "inferenceService", "vllmCommand"}),
    ({"fine_tuning": {"method": "qlora"}, "output": {"merge_adapter": True}, "evaluation": {"benchmarks": ["human-eval"]}},
     {"final", "adapter", "model", "merged", "config", "results", "evaluation", "metrics", "serving", "inferenceService",
      "vllmCommand"}),
    ({"fine_tuning": {"method": "full"}}, {"final", "model", "config", "results", "metrics", "serving", "inferenceService",
                                           "vllmCommand"}),
    ({"fine_tuning": {"method": "full"}, "evaluation": {"benchmarks": ["human-eval"]},
      "distributed": {"use_deepspeed": True, "zero_stage": 3}},  # no benchmarks under ZeRO-3: no evaluation.json
     {"final", "model", "config", "results", "metrics", "serving", "inferenceService", "vllmCommand"}),
])
def test_final_outputs(sections, keys):
    out = final_outputs_for(config(**sections), JOB)
    assert set(out) == keys
    assert out["final"] == f"{JOB}/final/" and out["config"] == f"{JOB}/final/config.yaml"
    assert out["metrics"] == f"{JOB}/metrics.jsonl"
    if "merged" in out:
        assert out["merged"] == out["model"] == f"{JOB}/final/merged/"
    elif "model" in out:
        assert out["model"] == out["final"]


def test_the_crd_declares_every_output():
    """status.outputs' keys are typed in the CRD (an undeclared one would be pruned by the API server)."""
    from finetune_operator.crd import crd

    status = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    declared = status["properties"]["outputs"]["properties"]
    every = {k for adapter in (True, False) for merged in (True, False)
             for k in c.final_outputs(JOB, adapter=adapter, merged=merged, evaluation=True)}
    assert every == set(declared) and all(v["type"] == "string" for v in declared.values())


def test_operator_outputs_use_the_jobs_storage_or_the_default():
    from finetune_operator.outputs import job_outputs
    from finetune_operator.spec import StorageSpec

    job = {"metadata": {"name": "demo", "namespace": "ml"}, "spec": {**BASE, "fine_tuning": {"method": "full"}}}
    assert job_outputs(job) is None  # no storage named: nothing to point at
    default = job_outputs(job, StorageSpec(uri="s3://ckpt/runs/"))
    assert default == final_outputs_for(config(fine_tuning={"method": "full"}), "s3://ckpt/runs/ml/demo")
    own = job_outputs({**job, "spec": {**job["spec"], "storage": {"uri": "s3://mine"}}}, StorageSpec(uri="s3://other"))
    assert own["model"] == "s3://mine/ml/demo/final/"
    assert job_outputs({**job, "spec": {**job["spec"], "training": {"learning_rate": -1}}}, StorageSpec(uri="s3://x")) is None


@pytest.mark.parametrize("method,refused", [("lora", False), ("qlora", False), ("full", True), ("spectrum", True)])
def test_merge_adapter_needs_an_adapter(method, refused):
    data = {**BASE, "fine_tuning": {"method": method}, "output": {"merge_adapter": True}}
    if not refused:
        validate_data(data)
        return
    with pytest.raises(ConfigError) as err:
        validate_data(data)
    (issue,) = err.value.errors
    assert issue.path == "output.merge_adapter" and f"'{method}'" in issue.message


# ------------------------------------------------------------------ manifests: KServe and vLLM


def plan(**overrides) -> ServingPlan:
    fields = {"name": "demo", "namespace": "ml", "method": "lora", "base_model": "meta-llama/Llama-3.1-8B-Instruct",
              "base": "meta-llama/Llama-3.1-8B-Instruct", "base_note": "", "adapter": True, "merged": False,
              "dtype": "bfloat16", "dtype_why": "training.mixed_precision is 'bf16'", "lora_rank": 16,
              "trust_remote_code": False, "final_uri": f"{JOB}/final/", "weights_bytes": 16 * 1024**3}
    return ServingPlan(**{**fields, **overrides})


PLANS = {
    "lora": plan(),
    "lora-r24-remote-code": plan(lora_rank=24, trust_remote_code=True),
    "merged": plan(merged=True),
    "qlora-merged": plan(method="qlora", merged=True),
    "full": plan(method="full", adapter=False, dtype="float16"),
}

# serving.kserve.io/v1beta1 InferenceService, as KServe's CRD types it, for the fields we write:
# spec.predictor.model is a ModelSpec (modelFormat {name, version}, runtime, storageUri,
# protocolVersion, and the inlined container's args and resources). The real CRD prunes unknown
# fields silently; here they fail (additionalProperties: false), so a misspelt key is caught.
QUANTITY = {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {
    "type": "string",
    "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"}]}
RESOURCE_LIST = {"type": "object", "additionalProperties": QUANTITY}
MODEL_SPEC = {
    "type": "object",
    "required": ["modelFormat"],
    "additionalProperties": False,
    "properties": {
        "modelFormat": {"type": "object", "required": ["name"], "additionalProperties": False,
                        "properties": {"name": {"type": "string"}, "version": {"type": "string"}}},
        "runtime": {"type": "string"},
        "protocolVersion": {"type": "string"},
        "storageUri": {"type": "string"},
        "args": {"type": "array", "items": {"type": "string"}},
        "resources": {"type": "object", "additionalProperties": False,
                      "properties": {"limits": RESOURCE_LIST, "requests": RESOURCE_LIST}},
    },
}
INFERENCE_SERVICE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"type": "string", "enum": ["serving.kserve.io/v1beta1"]},
        "kind": {"type": "string", "enum": ["InferenceService"]},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": r"^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
            "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        }},
        "spec": {"type": "object", "required": ["predictor"], "properties": {
            "predictor": {"type": "object", "properties": {"model": MODEL_SPEC}},
        }},
    },
}
# The storage initializer's URI schemes (KServe's webhook refuses others).
KSERVE_STORAGE_SCHEMES = ("gs://", "s3://", "pvc://", "file://", "https://", "http://", "hdfs://", "webhdfs://",
                          "oci://", "hf://")
KSERVE_RUNTIME_FLAGS = ("--model_name", "--model_dir", "--model_id")  # the Hugging Face runtime's own


def test_the_schema_check_can_fail():
    isvc = inference_service(PLANS["lora"])
    isvc["spec"]["predictor"]["model"]["storageURI"] = isvc["spec"]["predictor"]["model"].pop("storageUri")
    with pytest.raises(jsonschema.ValidationError, match="storageURI"):
        jsonschema.validate(isvc, INFERENCE_SERVICE_SCHEMA)
    bad = inference_service(PLANS["lora"])
    bad["spec"]["predictor"]["model"]["resources"]["limits"]["memory"] = "24 GB"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, INFERENCE_SERVICE_SCHEMA)


def vllm_parser() -> argparse.ArgumentParser:
    """The `vllm serve` options our commands use, as vLLM 0.33's parser defines them (make_arg_parser
    in vllm/entrypoints/common/cli_args.py: option strings, choices, nargs, types)."""
    p = argparse.ArgumentParser(prog="vllm serve", exit_on_error=False, allow_abbrev=False)
    p.add_argument("model_tag", nargs="?")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float", "float16", "float32", "half"], default="auto")
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--disable-lora", dest="enable_lora", action="store_false")
    p.add_argument("--lora-modules", nargs="+", type=lambda s: s.split("=", 1) if "=" in s else json.loads(s))
    p.add_argument("--max-lora-rank", type=int, choices=[1, 8, 16, 32, 64, 128, 256, 320, 512], default=16)
    p.add_argument("--served-model-name", nargs="+")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-trust-remote-code", dest="trust_remote_code", action="store_false")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-id")  # not vLLM's: only so that a KServe arg is refused by name below
    return p


def parse_vllm(parser, argv):
    args, unknown = parser.parse_known_args(argv)
    assert not unknown, f"not vllm serve flags: {unknown}"
    return args


def vllm_argv_of(isvc) -> list[str]:
    """The vLLM half of a KServe Hugging Face runtime's args (the runtime's own flags removed)."""
    return [a for a in isvc["spec"]["predictor"]["model"]["args"] if not a.startswith(KSERVE_RUNTIME_FLAGS)]


@pytest.mark.parametrize("name", PLANS)
def test_manifests_pass_the_schemas(name):
    p = PLANS[name]
    isvc = inference_service(p, job_name="demo")
    jsonschema.validate(isvc, INFERENCE_SERVICE_SCHEMA)
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "huggingface"} and model["storageUri"].startswith(KSERVE_STORAGE_SCHEMES)
    assert model["storageUri"] == (f"{JOB}/final/merged" if p.merged else f"{JOB}/final")
    assert f"--model_name={p.name}" in model["args"] and f"--dtype={p.dtype}" in model["args"]
    assert isvc["metadata"] == {"name": "demo", "namespace": "ml", "labels": {c.LABEL_JOB_NAME: "demo"}}
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1" and model["resources"]["requests"]["memory"] == "24Gi"

    parser = vllm_parser()
    served = parse_vllm(parser, vllm_argv_of(isvc))  # what the runtime hands vLLM
    argv = vllm_command(p, "/srv/final")
    assert argv[:2] == ["vllm", "serve"]
    local = parse_vllm(parser, argv[2:])
    assert local.dtype == served.dtype == p.dtype and local.trust_remote_code is p.trust_remote_code
    if p.whole_model:
        assert "--model_dir=/mnt/models" in model["args"]
        assert local.model_tag == ("/srv/final/merged" if p.merged else "/srv/final") and local.served_model_name == [p.name]
        assert not local.enable_lora and not served.enable_lora
    else:
        assert f"--model_id={p.base}" in model["args"]
        assert local.model_tag == p.base and local.enable_lora and served.enable_lora
        assert local.lora_modules == [[p.name, "/srv/final"]] and served.lora_modules == [[p.name, "/mnt/models"]]
        assert local.max_lora_rank == served.max_lora_rank == vllm_lora_rank(p.lora_rank) >= p.lora_rank


def test_the_flag_table_refuses_bad_values_and_flags():
    """Bad choices, as vLLM's parser refuses them; abbreviated flags too (vLLM's takes them: ours is
    stricter, so a command only ever spells whole flags)."""
    parser = vllm_parser()
    for argv in (["m", "--dtype", "bf16"], ["m", "--max-lora-rank", "24"]):
        with pytest.raises(argparse.ArgumentError):
            parser.parse_known_args(argv)
    with pytest.raises(AssertionError, match="--lora-module"):
        parse_vllm(parser, ["m", "--lora-module", "a=b"])


def test_vllms_own_parser_takes_the_commands(monkeypatch):
    monkeypatch.setenv("VLLM_TARGET_DEVICE", os.environ.get("VLLM_TARGET_DEVICE", "cpu"))
    cli_args = pytest.importorskip("vllm.entrypoints.common.cli_args", reason="vLLM is not importable here (its wheel "
                                   "needs a CUDA torch); the argparse table above stands in for it")
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = cli_args.make_arg_parser(FlexibleArgumentParser())
    for name, p in PLANS.items():
        for argv in (vllm_command(p, "/srv/final")[2:], vllm_argv_of(inference_service(p))):
            args = parser.parse_args(argv)
            assert args.dtype == p.dtype, name
            if not p.whole_model:
                assert args.enable_lora and args.max_lora_rank >= p.lora_rank
                assert [m.name for m in args.lora_modules] == [p.name]


def test_serving_doc_says_dtype_and_how(tmp_path):
    doc = serving_doc(PLANS["qlora-merged"])
    assert "**bfloat16**" in doc and "merged/" in doc and f"aws s3 sync {JOB}/final/ ./final" in doc
    assert shlex.join(vllm_command(PLANS["qlora-merged"], "./final")) in doc
    assert "--enable-lora" in doc  # the adapter alternative
    assert "kubectl apply -f final/inferenceservice.yaml" in doc
    note = serving_doc(plan(lora_rank=1024))
    assert "above vLLM's largest --max-lora-rank" in note


def test_builtin_base_is_served_from_its_hub_origin(tmp_path):
    cfg = config(model={"base_model": "builtin:SmolLM2-135M-Instruct"}, output={"storage_uri": JOB})
    p = serving_plan(cfg, output_dir=tmp_path, total_params=10, merged=False, job_name="Demo_1")
    assert p.base == "HuggingFaceTB/SmolLM2-135M-Instruct" and "Q4_1" in p.base_note and p.name == "demo-1"
    assert p.final_uri == f"{JOB}/final/"
    local = serving_plan(config(), output_dir=tmp_path / "out", total_params=10, merged=True)
    assert local.final_uri == (tmp_path / "out").resolve().as_uri() + "/" and local.name == "out"


@pytest.mark.parametrize("base_model, base, note", [
    ("builtin:SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "is a Q4_1 GGUF of"),
    ("s3://b/models/llama/", "s3://b/models/llama/", "is in object storage"),
    ("/models/llama", "/models/llama", "is a local path"),
    ("weights/m.Q4.gguf", "weights/m.Q4.gguf", "is a local path"),
    ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct", None),
])
def test_base_for_server_says_what_a_server_can_load(base_model, base, note):
    got, got_note = base_for_server(base_model)
    assert got == base
    assert (got_note == "") if note is None else (f"`{base_model}` {note}" in got_note)


def run_script(script: Path, tmp_path: Path) -> list[str]:
    """vllm-serve.sh with a stand-in `vllm` that prints the argv it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "vllm"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("FINAL_DIR", None)
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30, check=True)
    return json.loads(done.stdout)


@pytest.mark.parametrize("name", ["lora", "merged", "lora-r24-remote-code"])
def test_vllm_script_runs_the_command(tmp_path, name):
    p = PLANS[name]
    final = tmp_path / "my final"  # a space: the script must quote
    final.mkdir()
    (final / c.VLLM_FILE).write_text(vllm_script(p))
    got = run_script(final / c.VLLM_FILE, tmp_path)
    assert ["vllm", *got] == vllm_command(p, str(final))
    parse_vllm(vllm_parser(), got[1:])


# ----------------------------------------------------------------- merged weights, for real


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_lora_run_merges_and_publishes_final(tmp_path, tiny_model_dir, capsys):
    """`finetune train` with merge_adapter (LoRA on the projections and the tied lm_head, fp32):
    merged/ loads in plain transformers with base + adapter's logits, and final/ in storage
    carries merged/, serving.md, vllm-serve.sh and inferenceservice.yaml."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = tmp_path / "store"
    cfg = tiny_config(tmp_path, tiny_model_dir, training={"max_steps": 4},
                      output={"merge_adapter": True, "storage_uri": store.as_uri()}, evaluation={"do_eval": False})
    assert run_train(tmp_path, cfg) == 0, capsys.readouterr().err
    out = tmp_path / "out"
    merged_dir = out / c.MERGED_DIR
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert merged.lm_head.weight.data_ptr() != merged.get_input_embeddings().weight.data_ptr()  # untied for the merge
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([AutoTokenizer.from_pretrained(merged_dir)("Say the first word.")["input_ids"]])
    want, got = logits(reference, ids), logits(merged, ids)
    assert (got - want).abs().max() < 1e-4
    assert (logits(base, ids) - want).abs().max() > 1e-2  # the adapter trained: the check is not base == base

    results = json.loads((out / c.RESULTS_FILE).read_text())
    assert results["serving"]["merged"]["dtype"] == "float32" and results["serving"]["merged"]["untied_head"] is True
    assert results["serving"]["model_uri"] == f"{store.as_uri()}/final/merged/"
    final = store / c.FINAL_KEY
    for name in (c.SERVING_FILE, c.VLLM_FILE, c.KSERVE_FILE, "adapter_model.safetensors", "merged/model.safetensors",
                 "merged/config.json", "merged/tokenizer.json"):
        assert (final / name).is_file(), name
    listed = {f["path"] for f in json.loads((final / "manifest.json").read_text())["files"]}
    assert {"merged/model.safetensors", c.SERVING_FILE, c.KSERVE_FILE} <= listed
    assert "**float32**" in (final / c.SERVING_FILE).read_text()
    isvc = yaml.safe_load((final / c.KSERVE_FILE).read_text())
    jsonschema.validate(isvc, INFERENCE_SERVICE_SCHEMA)
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == f"{store.as_uri()}/final/merged"
    got_argv = run_script(final / c.VLLM_FILE, tmp_path)  # from the published copy
    assert got_argv[:2] == ["serve", str(final / c.MERGED_DIR)] and "float32" in got_argv


def test_qlora_merges_into_the_16_bit_base(tmp_path, tiny_model_dir, capsys):
    """QLoRA trains against NF4 weights; merged/ is the unquantized base in bf16 plus the adapter."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tmp_path, tiny_model_dir, method="qlora", training={"max_steps": 4, "mixed_precision": "bf16"},
                      output={"merge_adapter": True}, evaluation={"do_eval": False})
    cfg["fine_tuning"]["quantization"] = {"bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"}
    assert run_train(tmp_path, cfg) == 0, capsys.readouterr().err
    out = tmp_path / "out"
    merged_dir = out / c.MERGED_DIR
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config and config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    with safe_open(str(merged_dir / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is no dict) == {torch.bfloat16}
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16), out)
    ids = torch.tensor([[1, 5, 9, 200, 4000, 7]])
    want, got = logits(reference, ids), logits(merged, ids)
    # bf16 rounding of the merged weights (8 bits of mantissa) against an fp32-computed adapter delta
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    results = json.loads((out / c.RESULTS_FILE).read_text())
    assert results["serving"]["merged"]["dtype"] == "bfloat16" and "bnb_4bit_compute_dtype" in results["serving"]["merged"]["why"]
    assert "**bfloat16**" in (out / c.SERVING_FILE).read_text()


@pytest.mark.timeout(600)
def test_smollm2_merged_logits_equal_base_plus_adapter(tmp_path, builtin_tokenizer_dir):
    """The built-in SmolLM2-135M (tied embeddings): a random adapter on every linear module and the
    head, merged by `merge_adapter`, gives base + adapter's logits from a plain transformers load."""
    import torch
    from finetune_trainer.model import builtin
    from finetune_trainer.serving import merge_adapter
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = builtin.model_dir()
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                          "gate_proj", "up_proj", "down_proj", "lm_head"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    out = tmp_path / "out"
    model.save_pretrained(out)
    del model
    cfg = config(model={"base_model": "builtin:SmolLM2-135M-Instruct"}, training={"mixed_precision": "no"},
                 output={"merge_adapter": True})
    tokenizer = AutoTokenizer.from_pretrained(builtin_tokenizer_dir)
    result = merge_adapter(cfg, out, tokenizer)
    assert result.dtype == "float32" and result.untied_head

    start = time.perf_counter()
    merged = AutoModelForCausalLM.from_pretrained(out / c.MERGED_DIR)
    load_seconds = time.perf_counter() - start
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                           tokenize=False)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    want, got = logits(reference, ids), logits(merged, ids)
    diff = (got - want).abs().max().item()
    moved = (logits(AutoModelForCausalLM.from_pretrained(base_dir), ids) - want).abs().max().item()
    print(f"SmolLM2 merge {result.seconds:.1f}s, reload {load_seconds:.1f}s, logits max |diff| {diff:.2e} "
          f"(adapter moved them by {moved:.2f})")
    assert diff < 1e-3
    assert moved > 0.5
    assert (merged.generation_config.eos_token_id is not None
            and AutoTokenizer.from_pretrained(out / c.MERGED_DIR).chat_template == tokenizer.chat_template)
