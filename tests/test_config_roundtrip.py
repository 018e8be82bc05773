"""dump -> load is the identity, for any valid config (hypothesis explores the schema)."""

from __future__ import annotations

import typing
from typing import Any, Literal

import annotated_types as at
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from finetune_trainer.config import ConfigError, dump_config, validate_data
from finetune_trainer.config.loader import parse_yaml
from finetune_trainer.config.schema import FineTuneConfig

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_/-.0123456789", min_size=1, max_size=12)


def _bounds(metadata: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in metadata:
        for attr in ("ge", "gt", "le", "lt", "min_length"):
            if getattr(m, attr, None) is not None:
                out[attr] = getattr(m, attr)
    return out


def strategy_for(annotation: Any, metadata: list[Any]) -> st.SearchStrategy:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_dict(annotation)
    if origin is Literal:
        return st.sampled_from(args)
    if origin is typing.Annotated:
        return strategy_for(args[0], list(args[1:]) + metadata)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        return st.one_of([strategy_for(a, metadata if a is not type(None) else []) for a in args])
    if origin is list:
        inner = strategy_for(args[0], [])
        return st.lists(inner, min_size=max(1, _bounds(metadata).get("min_length", 0)), max_size=4)
    if origin is dict:
        return st.dictionaries(names, st.integers(0, 9), max_size=2)
    b = _bounds(metadata)
    if annotation is type(None):
        return st.none()
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        lo = b.get("ge", b["gt"] + 1 if "gt" in b else 0)
        hi = b.get("le", b["lt"] - 1 if "lt" in b else lo + 5000)
        return st.integers(lo, hi)
    if annotation is float:
        lo = b.get("ge", b.get("gt", 0.0))
        hi = b.get("le", b.get("lt", 10.0))
        return st.floats(lo, hi, allow_nan=False, exclude_min="gt" in b, exclude_max="lt" in b)
    if annotation is str:
        return names
    raise NotImplementedError(annotation)


def model_dict(model: type[BaseModel]) -> st.SearchStrategy:
    """Random subsets of a section's keys with values of the right type and range."""
    fields = {}
    for name, info in model.model_fields.items():
        if name == "hub_model_id":
            fields[name] = st.one_of(st.none(), st.just("user/model-x"))
        else:
            fields[name] = strategy_for(info.annotation, list(info.metadata))
    required = {n for n, i in model.model_fields.items() if i.is_required()}
    return st.fixed_dictionaries(
        {n: s for n, s in fields.items() if n in required},
        optional={n: s for n, s in fields.items() if n not in required},
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_dict(FineTuneConfig))
def test_dump_then_load_is_identity(data):
    try:
        first = validate_data(data).config
    except ConfigError:
        assume(False)
        return
    text = dump_config(first)
    second = validate_data(parse_yaml(text)).config
    assert second == first
    assert dump_config(second) == text


def test_dump_fills_every_default():
    cfg = validate_data({"model": {"base_model": "m"}}).config
    dumped = parse_yaml(dump_config(cfg))
    for section, model in FineTuneConfig.model_fields.items():
        assert section in dumped
    assert dumped["training"]["learning_rate"] == 2.0e-4
    assert dumped["fine_tuning"]["lora"]["target_modules"][0] == "q_proj"
