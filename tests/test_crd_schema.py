"""The generated CRD: committed as generated, structural by the API server's rules, and
accepting every shipped example while refusing what the spec refuses.

No API server runs here, so `structural_errors` re-implements the apiextensions checks a
CRD must pass (k8s.io/apiextensions-apiserver: ValidateStructural and the OpenAPI checks of
ValidateCustomResourceDefinitionOpenAPISchema), and `as_json_schema` turns the OpenAPI 3.0
schema into the JSON Schema draft 4 that `jsonschema` runs (draft 4 shares OpenAPI 3.0's
boolean exclusiveMinimum; `nullable` becomes a null branch, and nulls at non-nullable keys
are pruned first, as the API server does).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from finetune_operator.crd import CRD_FILE, crd, crd_yaml

REPO = Path(__file__).resolve().parent.parent
SEED_CONFIGS = sorted((REPO / "examples" / "config").glob("*.yaml"))

# JSONSchemaProps fields of apiextensions.k8s.io/v1 that a CRD may use.
ALLOWED_KEYS = {
    "description", "type", "format", "title", "default", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
    "maxLength", "minLength", "pattern", "maxItems", "minItems", "uniqueItems", "multipleOf", "enum", "maxProperties",
    "minProperties", "required", "items", "allOf", "oneOf", "anyOf", "not", "properties", "additionalProperties",
    "nullable", "example", "externalDocs", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string", "x-kubernetes-list-map-keys", "x-kubernetes-list-type", "x-kubernetes-map-type",
    "x-kubernetes-validations",
}
FORBIDDEN_KEYS = {"$ref", "$defs", "definitions", "id", "$schema", "patternProperties", "dependencies", "additionalItems", "const"}
TYPES = {"object", "array", "string", "integer", "number", "boolean"}
FORBIDDEN_IN_JUNCTOR = {"type", "description", "default", "additionalProperties", "nullable", "title",
                        "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
                        "x-kubernetes-int-or-string", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
                        "x-kubernetes-map-type", "x-kubernetes-validations"}
INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]


def _children(node: dict[str, Any], path: str):
    for name, sub in (node.get("properties") or {}).items():
        yield sub, f"{path}.properties.{name}", "field"
    if isinstance(node.get("items"), dict):
        yield node["items"], f"{path}.items", "item"
    if isinstance(node.get("additionalProperties"), dict):
        yield node["additionalProperties"], f"{path}.additionalProperties", "field"


def structural_errors(node: dict[str, Any], path: str = "openAPIV3Schema", level: str = "root") -> list[str]:
    """The apiextensions rules a structural schema must meet; [] when it does."""
    errors = []
    unknown = set(node) - ALLOWED_KEYS
    if unknown:
        errors.append(f"{path}: not a JSONSchemaProps field: {sorted(unknown)}")
    for key in FORBIDDEN_KEYS & set(node):
        errors.append(f"{path}.{key}: not supported in a CRD")
    kind = node.get("type")
    typeless_ok = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
    if kind is None and not typeless_ok:
        errors.append(f"{path}.type: must not be empty for specified {level}s")
    if kind is not None and kind not in TYPES:
        errors.append(f"{path}.type: {kind!r} is not an OpenAPI v3 type (null: use nullable)")
    if level == "root" and kind != "object":
        errors.append(f"{path}.type: must be object at the root")
    if kind == "array" and "items" not in node:
        errors.append(f"{path}.items: must be specified for type array")
    if node.get("uniqueItems"):
        errors.append(f"{path}.uniqueItems: cannot be true")
    extra = node.get("additionalProperties")
    if extra is False or (node.get("properties") and isinstance(extra, dict)):
        errors.append(f"{path}.additionalProperties: and properties are mutually exclusive (and false is forbidden)")
    if node.get("x-kubernetes-int-or-string") and node.get("x-kubernetes-preserve-unknown-fields"):
        errors.append(f"{path}: int-or-string excludes preserve-unknown-fields")
    if node.get("x-kubernetes-preserve-unknown-fields") is False:
        errors.append(f"{path}.x-kubernetes-preserve-unknown-fields: must be true or undefined")
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in node and not isinstance(node[key], bool):
            errors.append(f"{path}.{key}: must be a boolean in OpenAPI 3.0")
        if node.get(key) is True and key.replace("exclusive", "").lower() not in node:
            errors.append(f"{path}.{key}: needs {key.replace('exclusiveM', 'm')}")
    if "x-kubernetes-validations" in node and kind not in TYPES:
        errors.append(f"{path}.x-kubernetes-validations: CEL cannot see an untyped node")
    if node.get("x-kubernetes-list-type") == "map":
        items = node.get("items") or {}
        keys = node.get("x-kubernetes-list-map-keys") or []
        if kind != "array" or items.get("type") != "object" or not keys:
            errors.append(f"{path}: list-type map needs an array of objects and list-map-keys")
        for key in keys:
            if key not in (items.get("required") or []) or (items.get("properties") or {}).get(key, {}).get("type") in (
                None, "object", "array"
            ):
                errors.append(f"{path}: map key {key!r} must be a required scalar property")
    if level == "root":
        metadata = (node.get("properties") or {}).get("metadata")
        if metadata is not None and set(metadata) - {"type"} or (metadata or {}).get("type", "object") != "object":
            errors.append(f"{path}.properties.metadata: may only be type: object")
    if "default" in node:
        try:
            jsonschema.Draft4Validator(as_json_schema(node)).validate(node["default"])
        except jsonschema.ValidationError as exc:
            errors.append(f"{path}.default: does not validate: {exc.message}")
    for junctor in ("allOf", "anyOf", "oneOf"):
        for i, sub in enumerate(node.get(junctor) or []):
            if junctor == "anyOf" and node.get("x-kubernetes-int-or-string") and node[junctor] == INT_OR_STRING:
                continue
            errors += _junctor_errors(sub, node, f"{path}.{junctor}[{i}]")
    if "not" in node:
        errors += _junctor_errors(node["not"], node, f"{path}.not")
    for sub, sub_path, sub_level in _children(node, path):
        errors += structural_errors(sub, sub_path, sub_level)
    return errors


def _junctor_errors(sub: dict[str, Any], outer: dict[str, Any], path: str) -> list[str]:
    """Inside allOf/anyOf/oneOf/not: value checks only, on fields also specified outside."""
    errors = [f"{path}.{key}: must be empty to be structural" for key in FORBIDDEN_IN_JUNCTOR & set(sub)]
    for name, prop in (sub.get("properties") or {}).items():
        if name not in (outer.get("properties") or {}):
            errors.append(f"{path}.properties.{name}: must also be specified outside the junctor")
        else:
            errors += _junctor_errors(prop, outer["properties"][name], f"{path}.properties.{name}")
    if "items" in sub:
        if "items" not in outer:
            errors.append(f"{path}.items: must also be specified outside the junctor")
        else:
            errors += _junctor_errors(sub["items"], outer["items"], f"{path}.items")
    return errors


def as_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI 3.0 (Kubernetes flavour) -> JSON Schema draft 4, for jsonschema."""
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k not in ("nullable", "default")}
    if "properties" in out:
        out["properties"] = {k: as_json_schema(v) for k, v in out["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = as_json_schema(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [as_json_schema(s) for s in out[key]]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]  # untyped nodes take null already
    return out


def prune_nulls(value: Any, node: dict[str, Any]) -> Any:
    """What the API server does before validating: nulls at non-nullable keys are dropped."""
    if isinstance(value, dict):
        props = node.get("properties") or {}
        extra = node.get("additionalProperties") if isinstance(node.get("additionalProperties"), dict) else {}
        out = {}
        for key, sub in value.items():
            schema = props.get(key, extra)
            if sub is None and not schema.get("nullable"):
                continue
            out[key] = prune_nulls(sub, schema)
        return out
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        return [prune_nulls(v, node["items"]) for v in value]
    return value


def openapi_schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def validate(obj: dict[str, Any]) -> list[str]:
    schema = openapi_schema()
    validator = jsonschema.Draft4Validator(as_json_schema(schema))
    return sorted(
        ".".join(map(str, e.absolute_path)) + ": " + e.message for e in validator.iter_errors(prune_nulls(obj, schema))
    )


def job(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "demo"}, "spec": spec}


# ------------------------------------------------------------------------------------------ tests


def test_committed_crd_is_the_generators_output():
    committed = (REPO / CRD_FILE).read_text()
    assert committed == crd_yaml(), f"{CRD_FILE} is stale: run `finetune crd > {CRD_FILE}`"


def test_crd_is_structural():
    assert structural_errors(openapi_schema()) == []


@pytest.mark.parametrize(
    "bad,error",
    [
        ({"type": "object", "properties": {"a": {"description": "untyped"}}}, "must not be empty"),
        ({"type": "object", "properties": {"a": {"type": "array"}}}, "items: must be specified"),
        ({"type": "object", "properties": {"a": {"type": "string", "const": "x"}}}, "const"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}}, "$ref"),
        ({"type": "object", "additionalProperties": False, "properties": {"a": {"type": "string"}}}, "mutually exclusive"),
        ({"type": "object", "properties": {"a": {"type": "null"}}}, "use nullable"),
        ({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "array"}]}}}, "must be empty to be structural"),
        ({"type": "object", "properties": {"a": {"type": "number", "exclusiveMinimum": 0}}}, "boolean"),
        ({"type": "object", "properties": {"a": {"x-kubernetes-preserve-unknown-fields": True,
                                                 "anyOf": [{"items": {"minimum": 0}}]}}}, "outside the junctor"),
        ({"type": "object", "properties": {"a": {"type": "string", "default": 3}}}, "default: does not validate"),
    ],
)
def test_structural_checker_catches_each_rule(bad, error):
    """The checker is only worth its verdict on the CRD if it fails non-structural schemas."""
    assert any(error in e for e in structural_errors(bad)), structural_errors(bad)


def test_crd_names_columns_and_subresources():
    spec = crd()["spec"]
    assert spec["names"]["shortNames"] == ["ftj"] and spec["names"]["categories"]
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert {"Method", "Model", "Phase", "Progress %", "ETA", "Loss", "Age"} <= set(columns)
    schema = openapi_schema()
    for name, path in columns.items():  # every column reads a field the schema declares
        node = schema
        for part in path.strip(".").split("."):
            node = node["properties"][part] if part != "creationTimestamp" else {"type": "string"}
        assert node.get("type"), name


def test_descriptions_reach_kubectl_explain():
    spec = openapi_schema()["properties"]["spec"]
    training = spec["properties"]["training"]
    assert training["description"] == "Training parameters."
    lr = training["properties"]["learning_rate"]
    assert "Peak learning rate" in lr["description"] and "Default: 0.0002." in lr["description"]
    assert lr["minimum"] == 0 and lr["exclusiveMinimum"] is True
    assert spec["properties"]["fine_tuning"]["properties"]["method"]["enum"] == ["full", "lora", "qlora", "spectrum"]
    assert spec["properties"]["distributed"]["properties"]["zero_stage"] == {
        "description": "ZeRO optimization stage 0-3 (higher = more memory efficient).",
        "type": "integer", "nullable": True, "minimum": 0, "maximum": 3,
    }


def test_only_method_is_defaulted_by_the_api_server():
    """Server defaults would mark every key as written and break qlora's implied 4-bit."""
    defaults = []

    def walk(node, path):
        if "default" in node:
            defaults.append(path)
        for sub, sub_path, _ in _children(node, path):
            walk(sub, sub_path.replace(".properties", ""))

    walk(openapi_schema()["properties"]["spec"], "spec")
    assert defaults == ["spec.fine_tuning", "spec.fine_tuning.method"]


def _shipped_jobs() -> list[Path]:
    return sorted(p for p in (REPO / "examples").rglob("*.yaml")
                  if "lm_eval_tasks" not in p.parts  # lm_eval task files: their `!function` tag is lm_eval's YAML
                  and any(isinstance(d, dict) and d.get("kind") == "FineTuneJob" for d in yaml.safe_load_all(p.read_text())))


@pytest.mark.parametrize("path", SEED_CONFIGS, ids=lambda p: p.name)
def test_seed_config_pasted_under_spec_validates(path):
    assert validate(job(yaml.safe_load(path.read_text()))) == []


@pytest.mark.parametrize("path", _shipped_jobs(), ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_finetunejob_validates(path):
    for doc in yaml.safe_load_all(path.read_text()):
        if isinstance(doc, dict) and doc.get("kind") == "FineTuneJob":
            assert validate(doc) == []


BASE = {"model": {"base_model": "m"}, "dataset": {"train_path": "d.jsonl"}}


@pytest.mark.parametrize(
    "patch",
    [
        {"fine_tuning": {"lora": {"target_modules": "all-linear"}}},
        {"fine_tuning": {"lora": {"target_modules": ["q_proj", "v_proj"]}}},
        {"fine_tuning": {"spectrum": {"layers_to_finetune": [0, 3]}}},
        {"distributed": {"deepspeed_config": {"zero_optimization": {"stage": 3}}}},
        {"distributed": {"deepspeed_config": "ds.json", "zero_stage": None}},
        {"resources": {"requests": {"cpu": "500m", "memory": "8Gi"}, "limits": {"memory": 17179869184}}},
        {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        {"affinity": {"nodeAffinity": {}}, "node_selector": {"gpu": "a100"}},
        {"storage": {"uri": "s3://b/p", "credentials_secret": "s3-creds", "path_style": True}},
        {"fine_tuning": {"quantization": {"bits": None}}},
    ],
)
def test_valid_specs_pass_the_schema(patch):
    assert validate(job({**BASE, **patch})) == []


@pytest.mark.parametrize(
    "patch,where",
    [
        ({"training": {"learning_rate": 0}}, "spec.training.learning_rate"),
        ({"training": {"epochs": 1.5}}, "spec.training.epochs"),
        ({"fine_tuning": {"method": "prefix"}}, "spec.fine_tuning.method"),
        ({"fine_tuning": {"lora": {"dropout": 1}}}, "spec.fine_tuning.lora.dropout"),
        ({"fine_tuning": {"lora": {"target_modules": "q_proj"}}}, "spec.fine_tuning.lora.target_modules"),
        ({"fine_tuning": {"lora": {"target_modules": []}}}, "spec.fine_tuning.lora.target_modules"),
        ({"fine_tuning": {"lora": {"target_modules": [""]}}}, "spec.fine_tuning.lora.target_modules.0"),
        ({"fine_tuning": {"spectrum": {"layers_to_finetune": "all"}}}, "spec.fine_tuning.spectrum.layers_to_finetune"),
        ({"fine_tuning": {"spectrum": {"layers_to_finetune": [-1]}}}, "spec.fine_tuning.spectrum.layers_to_finetune.0"),
        ({"fine_tuning": {"quantization": {"bits": 3}}}, "spec.fine_tuning.quantization.bits"),
        ({"distributed": {"deepspeed_config": ""}}, "spec.distributed.deepspeed_config"),
        ({"resources": {"requests": {"cpu": "lots"}}}, "spec.resources.requests.cpu"),
        ({"nodes": 0}, "spec.nodes"),
        ({"storage": {"uri": "gs://bucket"}}, "spec.storage.uri"),
        ({"env": [{"name": "1BAD"}]}, "spec.env.0.name"),
        ({"termination_grace_period_seconds": 5}, "spec.termination_grace_period_seconds"),
        ({"model": {}}, "spec.model"),
    ],
)
def test_invalid_specs_fail_the_schema_at_the_field(patch, where):
    errors = validate(job({**BASE, **patch}))
    assert any(e.startswith(where + ":") for e in errors), errors


def test_missing_spec_fails():
    doc = job({})
    del doc["spec"]
    assert validate(doc)


def test_status_accepts_what_the_status_model_writes():
    doc = job(BASE)
    doc["status"] = {
        "observedGeneration": 3,
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True", "reason": "Running", "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 3}],
        "progress": {"step": 10, "totalSteps": 100, "progressPercentage": 10, "loss": None, "eta": "5m",
                     "somethingNewer": {"kept": True}},
    }
    assert validate(doc) == []
    doc["status"]["conditions"][0]["status"] = True
    assert validate(doc)


def test_prune_nulls_mirrors_the_api_server():
    schema = openapi_schema()
    pruned = prune_nulls(copy.deepcopy(job({**BASE, "fine_tuning": {"quantization": {"bits": None}}})), schema)
    assert pruned["spec"]["fine_tuning"]["quantization"] == {}  # bits has an enum: not nullable, pruned
