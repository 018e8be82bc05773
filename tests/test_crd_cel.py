"""The CRD's CEL rules (x-kubernetes-validations) run in cel-python: they compile, they only
read fields the API server exposes to CEL, and they agree with config/rules.py, the
operator's own checks, on every spec hypothesis builds (a rule stricter than rules.py would
make kubectl refuse a job the operator accepts; a looser one only delays the error). The
rules relate fields within small groups, so each group's combinations are enumerated in full.

cel-python is not the API server's cel-go, so this proves the logic, not the cost budget or
type-checking; `test_rules_read_only_typed_fields` covers the type side: a field CEL
cannot see (an untyped node) would make the API server refuse the CRD itself.
"""

from __future__ import annotations

import itertools
import re

import celpy
import pytest

from finetune_operator.crd import CEL_RULES, crd
from finetune_trainer.config import ConfigError
from finetune_trainer.config.loader import validate_data

SPEC_SCHEMA = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
TYPES = {"object", "array", "string", "integer", "number", "boolean"}
ENV = celpy.Environment()
PROGRAMS = [(ENV.program(ENV.compile(rule)), path) for rule, _, path in CEL_RULES]


def schema_at(dotted: str) -> dict | None:
    node = SPEC_SCHEMA
    for part in dotted.strip(".").split("."):
        node = (node.get("properties") or {}).get(part)
        if node is None:
            return None
    return node


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def as_stored(spec: dict) -> dict:
    """What CEL sees: the API server's default for fine_tuning.method applied, and a null
    field reads as absent (has() is false), as the API server's CEL values do."""
    spec = _without_nulls(spec)
    spec.setdefault("fine_tuning", {})
    spec["fine_tuning"] = {"method": "lora", **spec["fine_tuning"]}
    return spec


def cel_failures(spec: dict) -> list[str]:
    """fieldPaths of the rules a spec breaks."""
    activation = {"self": celpy.json_to_cel(as_stored(spec))}
    failed = []
    for program, path in PROGRAMS:
        result = program.evaluate(activation)
        assert isinstance(result, celpy.celtypes.BoolType), f"{path}: rule did not evaluate to a bool: {result!r}"
        if not result:
            failed.append(path)
    return failed


def operator_errors(spec: dict) -> list[str]:
    try:
        validate_data(spec, mode="validate")
    except ConfigError as exc:
        return [e.path for e in exc.errors]
    return []


def test_rules_read_only_typed_fields():
    """The API server exposes only typed nodes to CEL; a rule naming another does not compile."""
    for rule, _, field_path in CEL_RULES:
        for path in set(re.findall(r"self\.([a-z_0-9]+(?:\.[a-z_0-9]+)*)(?![A-Za-z_0-9(])", rule)):  # not .startsWith(
            node = schema_at(path)
            assert node is not None and node.get("type") in TYPES, f"{rule!r} reads {path}, which CEL cannot see"
        assert schema_at(field_path) is not None, f"fieldPath {field_path} is not in the schema"


def test_rules_carry_message_and_field_path():
    validations = SPEC_SCHEMA["x-kubernetes-validations"]
    assert len(validations) == len(CEL_RULES) >= 7
    for v in validations:
        assert v["message"] and "\n" not in v["message"] and v["fieldPath"].startswith(".")


BASE = {"model": {"base_model": "m"}, "dataset": {"train_path": "d.jsonl"}}


def spec(**sections) -> dict:
    out = {k: dict(v) for k, v in BASE.items()}
    for name, value in sections.items():
        out[name] = {**out.get(name, {}), **value}
    return out


@pytest.mark.parametrize(
    "case,broken",
    [
        (spec(), []),
        (spec(fine_tuning={"method": "qlora"}), []),  # 4-bit is implied, not required
        (spec(fine_tuning={"method": "qlora"}, model={"load_in_4bit": False}), [".model.load_in_4bit"]),
        (spec(fine_tuning={"method": "qlora"}, model={"load_in_8bit": True}), [".model.load_in_8bit"]),
        (spec(model={"load_in_4bit": True, "load_in_8bit": True}), [".model.load_in_8bit"]),
        (spec(fine_tuning={"method": "full"}, model={"load_in_8bit": True}), [".fine_tuning.method"]),
        (spec(fine_tuning={"method": "full"}), []),
        (spec(fine_tuning={"quantization": {"bits": 4}}), [".fine_tuning.quantization.bits"]),
        (spec(fine_tuning={"method": "qlora", "quantization": {"bits": 4}}), []),
        (spec(fine_tuning={"quantization": {"bits": 8}}, model={"load_in_4bit": True}), [".fine_tuning.quantization.bits"]),
        (spec(fine_tuning={"quantization": {"bits": 8}}, model={"load_in_8bit": True}), []),
        (spec(output={"push_to_hub": True}), [".output.hub_model_id"]),
        (spec(output={"push_to_hub": True, "hub_model_id": "me/model"}), []),
        (spec(output={"push_to_hub": False, "hub_model_id": None}), []),
        (spec(output={"merge_adapter": True}), []),  # lora by default
        (spec(output={"merge_adapter": True}, fine_tuning={"method": "spectrum"}), [".output.merge_adapter"]),
        (spec(output={"merge_adapter": True}, fine_tuning={"method": "full"}), [".output.merge_adapter"]),
        (spec(training={"gradient_accumulation_steps": 4}, distributed={"gradient_accumulation_steps": 8}),
         [".distributed.gradient_accumulation_steps"]),
        (spec(distributed={"gradient_accumulation_steps": 8}), []),  # training's follows it
        (spec(evaluation={"do_eval": True}), [".dataset.eval_path"]),
        (spec(evaluation={"do_eval": True, "eval_strategy": "no"}), []),
        (spec(evaluation={"do_eval": True}, dataset={"eval_path": "e.jsonl"}), []),
        (spec(dataset={"format": "custom"}), [".dataset.custom.prompt_template", ".dataset.custom.response_template"]),
        (spec(dataset={"format": "custom", "custom": {"prompt_template": "{q}", "response_template": "{a}"}}), []),
    ],
)
def test_rule_table(case, broken):
    assert cel_failures(case) == broken
    assert bool(operator_errors(case)) == bool(broken)


ABSENT = object()


def _combinations(**choices) -> list[dict]:
    """Every combination of the given keys' values (ABSENT: key left out), as dotted keys."""
    names = list(choices)
    out = []
    for values in itertools.product(*(choices[n] for n in names)):
        out.append({n: v for n, v in zip(names, values, strict=True) if v is not ABSENT})
    return out


def _nest(dotted: dict) -> dict:
    out = {k: dict(v) for k, v in BASE.items()}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


B = (ABSENT, True, False)
# Rules only relate fields within one group, so each group is enumerated in full.
GROUPS = {
    "quantization": _combinations(**{
        "model.load_in_4bit": B, "model.load_in_8bit": B,
        "fine_tuning.method": (ABSENT, "full", "lora", "qlora", "spectrum"),
        "fine_tuning.quantization.bits": (ABSENT, 4, 8),
    }),
    "accumulation": _combinations(**{
        "training.gradient_accumulation_steps": (ABSENT, 1, 2, 3),
        "distributed.gradient_accumulation_steps": (ABSENT, 1, 2, 3),
    }),
    "hub": _combinations(**{"output.push_to_hub": B, "output.hub_model_id": (ABSENT, None, "me/model")}),
    "merge": _combinations(**{
        "output.merge_adapter": B, "fine_tuning.method": (ABSENT, "full", "lora", "qlora", "spectrum"),
    }),
    "eval": _combinations(**{
        "evaluation.do_eval": B, "evaluation.eval_strategy": (ABSENT, "steps", "epoch", "no"),
        "dataset.eval_path": (ABSENT, None, "e.jsonl"),
    }),
    "custom": _combinations(**{
        "dataset.format": (ABSENT, "alpaca", "custom"),
        "dataset.custom.prompt_template": (ABSENT, None, "{q}"),
        "dataset.custom.response_template": (ABSENT, "{a}"),
    }),
}
# Run settings: the operator checks these when it renders (render.check), not the config loader.
RUN_SETTINGS_GROUPS = {
    "tracking": _combinations(**{
        "output.report_to": (ABSENT, [], ["mlflow"], ["wandb"], ["tensorboard", "mlflow", "wandb"]),
        "tracking.mlflow": (ABSENT, {"tracking_uri": "http://mlflow.mlflow.svc:5000"}),
        "tracking.wandb": (ABSENT, {"project": "p"}, {"project": "p", "mode": "offline"},
                           {"project": "p", "api_key_secret": {"name": "wandb", "key": "api-key"}}),
    }),
    "model_volume": _combinations(**{
        "model.base_model": ("m", "org/m", "/models", "/models/llama", "/modelsx/llama", "/data/llama", "/data"),
        "model.tokenizer": (ABSENT, None, "org/tok", "/models/tok", "/data/tok"),
        "model_volume": (ABSENT, {"claim_name": "models"}, {"claim_name": "models", "mount_path": "/models"},
                         {"claim_name": "models", "mount_path": "/data", "sub_path": "hf", "read_only": False},
                         {"claim_name": "models", "mount_path": "/workspace/models"},
                         {"claim_name": "models", "mount_path": "/dev"}, {"claim_name": "models", "mount_path": "/tmpfs"},
                         {"claim_name": "models", "mount_path": "/var/run/secrets/models"}),
    }),
}


def render_errors(spec: dict) -> list[str]:
    from finetune_operator.render import RenderSettings, check

    job = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "demo", "namespace": "a"},
           "spec": {**spec, "storage": {"uri": "s3://ckpt/runs"}}}
    try:
        check(job, RenderSettings(trainer_image="registry.example/trainer:1"))
    except ConfigError as exc:
        return [e.path for e in exc.errors]
    return []


def disagreements(cases: list[dict], ours) -> list[tuple]:
    """The combinations where CEL and the operator (`ours`) do not refuse alike."""
    out = []
    for dotted in cases:
        candidate = _nest(dotted)
        cel, theirs = cel_failures(candidate), ours(candidate)
        if bool(cel) != bool(theirs):
            out.append((dotted, cel, theirs))
    return out


@pytest.mark.parametrize("group", RUN_SETTINGS_GROUPS)
def test_cel_agrees_with_the_operator_on_run_settings(group):
    assert not (found := disagreements(RUN_SETTINGS_GROUPS[group], render_errors)), found[:5]
    assert sum(bool(render_errors(_nest(d))) for d in RUN_SETTINGS_GROUPS[group]) >= 6  # refusals were tried


@pytest.mark.parametrize("group", GROUPS)
def test_cel_agrees_with_the_operator(group):
    """Every combination of the group's fields: CEL refuses exactly what the operator refuses."""
    assert not (found := disagreements(GROUPS[group], operator_errors)), found[:5]
    assert len(GROUPS[group]) >= 6
