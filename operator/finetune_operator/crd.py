"""The FineTuneJob CustomResourceDefinition, generated from the pydantic spec.

One source of truth: `FineTuneJobSpec.model_json_schema()` becomes the CRD's structural
openAPIV3Schema, so `kubectl explain ftj.spec.training` prints the seed's descriptions and
the API server enforces the same types, enums and bounds as `finetune validate`.
`crds/finetunejobs.finetune.dev.yaml` is this module's output (`finetune crd`); a test fails
when the committed file drifts.

How JSON Schema (pydantic) becomes a structural schema (Kubernetes):
- `$ref`s are inlined; `title`, `additionalProperties: false` (forbidden beside `properties`;
  a structural schema prunes unknown fields, and kubectl's strict field validation reports
  them) and `const` (-> a one-value `enum`) are rewritten; numeric `exclusiveMinimum: 0`
  becomes OpenAPI 3.0's `minimum: 0, exclusiveMinimum: true`.
- `X | None` is X with `nullable: true` (a null is then kept and reads as unset, also in
  CEL). Not when X has an enum: the API server checks a null against the enum and fails, so
  there the null is pruned instead, which means the same (unset).
- A union of types (`target_modules`: a list or "all-linear"; `layers_to_finetune`: "auto"
  or a list; `deepspeed_config`: a path or a mapping) cannot be typed: the node gets
  `x-kubernetes-preserve-unknown-fields` and no type, plus the checks that only apply to one
  JSON type (`pattern`/`minLength` to strings, `items`/`minItems` to lists), so a wrong string
  or list item is still refused at apply time. A value of a type no branch allows (a number)
  passes the API server and is refused by the operator (condition Accepted=False).
- Defaults are NOT emitted, with one exception. The API server would write every default
  into the stored object, and three rules depend on whether the user wrote a key:
  `fine_tuning.method: qlora` turns 4-bit on only when `model.load_in_4bit` is unset,
  `training.gradient_accumulation_steps` follows `distributed.gradient_accumulation_steps`
  when unset, and `evaluation.eval_steps` falls back to `output.eval_steps`. So defaults stay
  the operator's (the same code as `finetune validate`), and each description says
  "Default: ...". The exception is `fine_tuning.method` ("lora"), defaulted so the Method
  printer column is never blank; no rule asks whether it was written.
- Cross-field rules that CEL can express are `x-kubernetes-validations` on `spec` (see
  CEL_RULES), each with the `fieldPath` of the key to fix. The rest need what CEL cannot see
  (`deepspeed_config` is untyped, files, data) and are the operator's to report.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
from typing import Any

import yaml

from finetune_trainer.contract import MODEL_VOLUME_DIR

from .spec import GROUP, KIND, OPERATOR_MOUNTS, PLURAL, SHORT_NAME, VERSION, FineTuneJobSpec

CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_FILE = f"crds/{CRD_NAME}.yaml"
SINGULAR = KIND.lower()
CATEGORIES = ["finetune"]

# Keys whose default the API server applies (see the module docstring for why so few).
SERVER_DEFAULTS: dict[tuple[str, ...], Any] = {
    ("fine_tuning",): {},
    ("fine_tuning", "method"): "lora",
}

# Run settings whose pydantic type (dict[str, Any]) says less than Kubernetes knows.
_QUANTITY = {
    "x-kubernetes-int-or-string": True,
    "anyOf": [{"type": "integer"}, {"type": "string"}],
    "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
}
_RESOURCE_LIST = {"type": "object", "additionalProperties": _QUANTITY}
REPLACED: dict[tuple[str, ...], dict[str, Any]] = {
    ("resources",): {
        "type": "object",
        "properties": {
            "requests": {**_RESOURCE_LIST, "description": "Minimum resources (cpu, memory, ephemeral-storage, ...)."},
            "limits": {**_RESOURCE_LIST, "description": "Maximum resources. GPUs come from gpus_per_node, not from here."},
        },
    },
}
# Added to the generated node: env names are unique (the API server refuses duplicates).
EXTENDED: dict[tuple[str, ...], dict[str, Any]] = {
    ("env",): {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
}


# ------------------------------------------------------------------------ JSON Schema -> structural


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema as a Kubernetes structural schema (rules in the module docstring)."""
    defs = schema.get("$defs", {})
    return _node(schema, defs, ())


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a `$ref`; keys beside it (description, default) win over the definition's."""
    if "$ref" not in node:
        return node
    target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
    extra = {k: v for k, v in node.items() if k != "$ref"}
    return {**target, **extra}


def _node(node: dict[str, Any], defs: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node = _resolve(node, defs)
    description = _description(node)
    branches = [_resolve(b, defs) for b in node.get("anyOf", [])]
    nullable = any(b.get("type") == "null" for b in branches)
    branches = [b for b in branches if b.get("type") != "null"]
    if path in REPLACED:
        out = copy.deepcopy(REPLACED[path])
    elif len(branches) == 1:
        out = _node({**branches[0], **_outer(node)}, defs, path)
    elif branches:
        out = _union(branches, node, defs, path)
    else:
        out = _typed(node, defs, path)
    if nullable and "enum" not in out:
        out["nullable"] = True
    if description:
        out["description"] = description
    if path in SERVER_DEFAULTS:
        out["default"] = SERVER_DEFAULTS[path]
    out.update(copy.deepcopy(EXTENDED.get(path, {})))
    return _ordered(out)


def _outer(node: dict[str, Any]) -> dict[str, Any]:
    """What an Optional's wrapper says about the value itself (not the union machinery)."""
    return {k: v for k, v in node.items() if k not in ("anyOf", "default", "description", "title")}


def _typed(node: dict[str, Any], defs: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    kind = node.get("type")
    if kind:
        out["type"] = kind
    else:  # typing.Any: no type to give
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "const" in node:
        out["enum"] = [node["const"]]
    for key in ("enum", "pattern", "minLength", "maxLength", "minItems", "maxItems", "minimum", "maximum", "format"):
        if key in node:
            out[key] = node[key]
    for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if key in node:  # JSON Schema 2020-12 number -> OpenAPI 3.0 boolean modifier
            out[bound], out[key] = node[key], True
    if kind == "object":
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if props:
            out["properties"] = {name: _node(sub, defs, path + (name,)) for name, sub in props.items()}
            if node.get("required"):
                out["required"] = list(node["required"])
        elif isinstance(extra, dict):
            out["additionalProperties"] = _node(extra, defs, path + ("*",))
        else:  # dict[str, Any]: anything goes below
            out["x-kubernetes-preserve-unknown-fields"] = True
    if kind == "array":
        out["items"] = _node(node.get("items", {}), defs, path + ("[]",)) if node.get("items") else {
            "x-kubernetes-preserve-unknown-fields": True
        }
    return out


def _union(branches: list[dict[str, Any]], node: dict[str, Any], defs: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """An untyped node keeping each branch's type-specific checks (they ignore other types)."""
    out: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}
    if "minLength" in node:  # pydantic's min_length on a union is len() of whatever came
        out["minLength"] = out["minItems"] = node["minLength"]
    for branch in branches:
        kind = branch.get("type")
        if kind == "string":
            values = [branch["const"]] if "const" in branch else branch.get("enum")
            if values:
                out["pattern"] = "^(" + "|".join(re.escape(v) for v in values) + ")$"
            elif "pattern" in branch:
                out["pattern"] = branch["pattern"]
            if "minLength" in branch:
                out["minLength"] = branch["minLength"]
        elif kind == "array":
            out["items"] = _node(branch.get("items", {}), defs, path + ("[]",))
            if "minItems" in branch:
                out["minItems"] = branch["minItems"]
        elif kind in ("integer", "number"):
            out.update({k: v for k, v in _typed(branch, defs, path).items() if k != "type"})
    return out


def _description(node: dict[str, Any]) -> str:
    text = inspect.cleandoc(node.get("description") or "")
    default = node.get("default")
    if text and "default" in node and default not in (None, [], {}) and "Default" not in text:
        text = f"{text} Default: {json.dumps(default)}."
    return text


_ORDER = ["description", "type", "nullable", "default", "enum", "format", "pattern", "minLength", "maxLength",
          "minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "minItems", "maxItems", "required"]


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """Stable, readable key order (kubectl explain does not care; reviewers do)."""
    head = {k: node[k] for k in _ORDER if k in node}
    return {**head, **{k: v for k, v in node.items() if k not in head}}


# ---------------------------------------------------------------------------------- CEL rules


def _has(path: str) -> str:
    """`has()` for every level, since `has(self.a.b)` errors when `a` itself is absent."""
    parts = path.split(".")
    return "(" + " && ".join(f"has(self.{'.'.join(parts[: i + 1])})" for i in range(len(parts))) + ")"


def _true(path: str) -> str:
    return f"({_has(path)} && self.{path})"


def _eq(path: str, literal: str) -> str:
    return f"({_has(path)} && self.{path} == {literal})"



_QLORA = _eq("fine_tuning.method", "'qlora'")
_4BIT, _8BIT = _true("model.load_in_4bit"), _true("model.load_in_8bit")
# load_in_4bit as the operator resolves it: qlora turns it on when unset (and 8-bit is off).
_EFFECTIVE_4BIT = f"({_4BIT} || ({_QLORA} && !has(self.model.load_in_4bit) && !{_8BIT}))"
_BITS = "self.fine_tuning.quantization.bits"

# (rule, message, fieldPath): mirrors of config/rules.py, same fields, same fixes.
CEL_RULES: list[tuple[str, str, str]] = [
    (
        f"!({_QLORA} && {_8BIT})",
        "fine_tuning.method qlora trains LoRA on a 4-bit model: set model.load_in_8bit to false, or use method lora",
        ".model.load_in_8bit",
    ),
    (
        f"!({_QLORA} && has(self.model.load_in_4bit) && !self.model.load_in_4bit)",
        "fine_tuning.method qlora requires 4-bit quantization: set model.load_in_4bit to true (or remove it)",
        ".model.load_in_4bit",
    ),
    (
        f"!({_4BIT} && {_8BIT})",
        "model.load_in_4bit and model.load_in_8bit are exclusive: set one of them to false",
        ".model.load_in_8bit",
    ),
    (
        f"!({_eq('fine_tuning.method', repr('full'))} && ({_4BIT} || {_8BIT}))",
        "full fine-tuning cannot update quantized weights: set model.load_in_4bit and load_in_8bit to false, "
        "or use method qlora, lora or spectrum",
        ".fine_tuning.method",
    ),
    (
        f"!{_has('fine_tuning.quantization.bits')} || ({_EFFECTIVE_4BIT} && {_8BIT})"
        f" || ({_BITS} == 4 && {_EFFECTIVE_4BIT}) || ({_BITS} == 8 && {_8BIT})",
        "fine_tuning.quantization.bits must agree with model.load_in_4bit / load_in_8bit: set the matching flag "
        "or remove bits",
        ".fine_tuning.quantization.bits",
    ),
    (
        f"!({_has('distributed.gradient_accumulation_steps')} && {_has('training.gradient_accumulation_steps')})"
        " || self.distributed.gradient_accumulation_steps == self.training.gradient_accumulation_steps",
        "distributed.gradient_accumulation_steps must equal training.gradient_accumulation_steps: make them equal "
        "or remove one",
        ".distributed.gradient_accumulation_steps",
    ),
    (
        f"!{_true('output.push_to_hub')} || {_has('output.hub_model_id')}",
        'output.push_to_hub needs output.hub_model_id ("username/model-name"), or set push_to_hub to false',
        ".output.hub_model_id",
    ),
    (
        f"!({_true('output.merge_adapter')} && ({_eq('fine_tuning.method', repr('full'))}"
        f" || {_eq('fine_tuning.method', repr('spectrum'))}))",
        "output.merge_adapter needs an adapter to merge: fine_tuning.method full and spectrum save full weights "
        "already; set merge_adapter to false, or use method lora or qlora",
        ".output.merge_adapter",
    ),
    (
        f"!({_true('evaluation.do_eval')} && !{_eq('evaluation.eval_strategy', repr('no'))})"
        f" || {_has('dataset.eval_path')}",
        "evaluation.do_eval needs an evaluation set: set dataset.eval_path, or set evaluation.do_eval to false",
        ".dataset.eval_path",
    ),
    *[
        (
            f"!{_eq('dataset.format', repr('custom'))} || {_has(f'dataset.custom.{key}')}",
            f'dataset.format custom needs dataset.custom.{key}, a format string over the rows\' fields such as "{ex}"',
            f".dataset.custom.{key}",
        )
        for key, ex in (("prompt_template", "{question}"), ("response_template", "{answer}"))
    ],
    # mirrors of render.tracking_issues (run settings, checked by the operator too)
    (
        f"!({_has('output.report_to')} && 'mlflow' in self.output.report_to) || {_has('tracking.mlflow')}",
        "output.report_to lists mlflow: set spec.tracking.mlflow.tracking_uri (e.g. http://mlflow.mlflow.svc:5000)",
        ".tracking",
    ),
    (
        f"!({_has('output.report_to')} && 'wandb' in self.output.report_to) || ({_has('tracking.wandb')}"
        f" && ({_has('tracking.wandb.api_key_secret')} || {_eq('tracking.wandb.mode', repr('offline'))}))",
        "output.report_to lists wandb: set spec.tracking.wandb.project and api_key_secret (name, key of a Secret), "
        "or mode: offline",
        ".tracking",
    ),
]


# render.model_volume_issues: an absolute model path lies under spec.model_volume's mount_path
# (not defaulted by the API server, so CEL reads an absent one as the contract's default), and
# that mount shadows none of the operator's own.
_MOUNT = f"({_has('model_volume.mount_path')} ? self.model_volume.mount_path : {MODEL_VOLUME_DIR!r})"
_OPERATOR_MOUNTS = "[" + ", ".join(repr(p) for p in OPERATOR_MOUNTS) + "]"


def _on_model_volume(key: str) -> tuple[str, str, str]:
    path = f"self.model.{key}"
    return (
        f"!({_has(f'model.{key}')} && {path}.startsWith('/')) || ({_has('model_volume')}"
        f" && ({path} == {_MOUNT} || {path}.startsWith({_MOUNT} + '/')))",
        f"model.{key} is a path in the pod, so it must lie under spec.model_volume.mount_path (default "
        f"{MODEL_VOLUME_DIR}): set spec.model_volume to the PersistentVolumeClaim holding it, or name a Hugging Face "
        "model id",
        f".model.{key}",
    )


CEL_RULES += [
    _on_model_volume("base_model"),
    _on_model_volume("tokenizer"),
    (
        f"!{_has('model_volume')} || !{_OPERATOR_MOUNTS}.exists(root, {_MOUNT} == root"
        f" || {_MOUNT}.startsWith(root + '/') || root.startsWith({_MOUNT} + '/'))",
        f"spec.model_volume.mount_path overlaps a path the operator mounts ({', '.join(OPERATOR_MOUNTS)}): "
        f"choose another, e.g. {MODEL_VOLUME_DIR}",
        ".model_volume.mount_path",
    ),
]


def cel_validations() -> list[dict[str, str]]:
    return [{"rule": rule, "message": message, "fieldPath": path, "reason": "FieldValueInvalid"}
            for rule, message, path in CEL_RULES]


# ------------------------------------------------------------------------------------ status


def _num(description: str) -> dict[str, Any]:
    return {"description": description, "type": "number", "nullable": True}


def _uri(description: str) -> dict[str, Any]:
    return {"description": description, "type": "string"}


def status_schema() -> dict[str, Any]:
    """What the operator and the trainer write; unknown fields are kept (newer writers)."""
    condition = {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string", "description": "Ready, Reconciling, Stalled, Accepted, Suspended, Running, Succeeded, Failed."},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string", "description": "CamelCase reason, always set."},
            "message": {"type": "string"},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "observedGeneration": {"type": "integer", "format": "int64"},
        },
    }
    progress = {
        "description": "Training progress, patched by the trainer's rank 0 (Kubeflow Trainer's trainerStatus names).",
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "step": {"type": "integer", "description": "Optimizer steps done."},
            "totalSteps": {"type": "integer", "description": "Optimizer steps in the run."},
            "epoch": _num("Epoch, fractional."),
            "progressPercentage": _num("step / totalSteps, in percent."),
            "estimatedRemainingSeconds": _num("Time to the end of training at the current pace."),
            "eta": {"type": "string", "description": "estimatedRemainingSeconds for people (e.g. 1h05m)."},
            "loss": _num("Latest training loss."),
            "evalLoss": _num("Latest evaluation loss."),
            "learningRate": _num("Current learning rate."),
            "tokensPerSecond": _num("Training throughput."),
            "checkpointUri": {"type": "string", "description": "Newest complete checkpoint in storage."},
            "lossHistory": {"type": "array", "maxItems": 64, "items": {"type": "number"},
                            "description": "The latest training losses, oldest first (finetune status draws them)."},
            "checkpointTime": {"type": "string", "format": "date-time",
                               "description": "When the trainer first reported checkpointUri complete."},
            "samples": {"type": "integer", "description": "Training samples after the data stage."},
            "skippedRows": {"type": "integer", "description": "Bad data rows skipped (dataset.skip_bad_rows)."},
            "packedRows": {"type": "integer", "description": "Rows the samples were packed into (training.sample_packing)."},
            "packingEfficiency": _num("Real tokens / packed rows' capacity (training.sample_packing)."),
            "storageDegraded": {"type": "boolean", "description": "Checkpoint uploads are failing (retried; training goes on)."},
            "storageError": {"type": "string", "description": "The last upload error while storageDegraded."},
            "trackerDegraded": {"type": "boolean",
                                "description": "An experiment tracker is not taking the run's data (retried; training goes on)."},
            "trackerError": {"type": "string", "description": "Which tracker, and its last error, while trackerDegraded."},
            "lastUpdatedTime": {"type": "string", "format": "date-time"},
            "metrics": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
        },
    }
    return {
        "description": "Observed state: conditions (kstatus), phase, progress, evaluation results and outputs.",
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "observedGeneration": {"type": "integer", "format": "int64", "description": "Generation of the spec last reconciled."},
            "phase": {"type": "string", "description": "One-word summary for printer columns; read conditions instead."},
            "conditions": {
                "type": "array",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
                "items": condition,
            },
            "backend": {"type": "string", "enum": ["pytorchjob", "trainjob", "jobset"],
                        "description": "The backend the job runs on, recorded when its workload was created; never changes."},
            "workload": {
                "description": "The workload's state as the operator read it (any backend, in PyTorchJob's condition names).",
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {
                    "backend": {"type": "string"},
                    "kind": {"type": "string"},
                    "name": {"type": "string"},
                    "suspend": {"type": "boolean"},
                    "restarts": {"type": "integer"},
                },
            },
            "progress": progress,
            "outputs": {
                "description": "Where a succeeded job's results are (URIs; a folder ends in /), for a pipeline "
                "to chain to serving.",
                "type": "object",
                "properties": {
                    "final": _uri("final/: the adapter or full weights, tokenizer, config and serving files."),
                    "adapter": _uri("The LoRA adapter (lora, qlora): final/."),
                    "model": _uri("A whole model a server loads: final/merged/, or final/ of a full or spectrum run."),
                    "merged": _uri("The adapter merged into the base (output.merge_adapter): final/merged/."),
                    "config": _uri("The exact config the run used."),
                    "results": _uri("train_results.json: steps, losses, throughput, the merged dtype."),
                    "evaluation": _uri("evaluation.json (evaluation.benchmarks)."),
                    "metrics": _uri("metrics.jsonl: every logged step."),
                    "serving": _uri("serving.md: how to serve the result."),
                    "inferenceService": _uri("A KServe InferenceService (Hugging Face runtime) for the result."),
                    "vllmCommand": _uri("vllm-serve.sh: the vllm serve command line."),
                },
            },
            "evaluation": {
                "description": "Evaluation results after training.",
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
            },
            "model": {
                "description": "The base model the trainer loaded, reported by its rank 0.",
                "type": "object",
                "properties": {
                    "source": {"type": "string", "description": "model.base_model as written."},
                    "revision": {"type": "string",
                                 "description": "A Hub model: the commit it resolved to (model.revision pins it)."},
                },
            },
        },
    }


# ----------------------------------------------------------------------------------- the CRD

PRINTER_COLUMNS = [
    {"name": "Method", "type": "string", "jsonPath": ".spec.fine_tuning.method"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.base_model"},
    {"name": "Nodes", "type": "integer", "jsonPath": ".spec.nodes", "priority": 1},
    {"name": "GPUs", "type": "integer", "jsonPath": ".spec.gpus_per_node", "priority": 1},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Backend", "type": "string", "jsonPath": ".status.backend", "priority": 1},
    {"name": "Progress %", "type": "number", "jsonPath": ".status.progress.progressPercentage"},
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "Checkpoint", "type": "string", "jsonPath": ".status.progress.checkpointUri", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def spec_schema() -> dict[str, Any]:
    schema = structural(FineTuneJobSpec.model_json_schema())
    schema["x-kubernetes-validations"] = cel_validations()
    return schema


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition object (apiextensions.k8s.io/v1)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/name": "finetune-operator"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": [SHORT_NAME],
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "description": "FineTuneJob fine-tunes a language model on Kubernetes: spec is the "
                            "fine-tuning config (the seed's sections) plus where and how to run it.",
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


HEADER = "# Generated by `finetune crd` from operator/finetune_operator/spec.py. Do not edit.\n"


class _NoAliases(yaml.SafeDumper):
    """Shared sub-schemas written out in full: anchors would make the file harder to read."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def crd_yaml() -> str:
    return HEADER + yaml.dump(crd(), Dumper=_NoAliases, sort_keys=False, allow_unicode=True, width=120)
