"""Checking a FineTuneJob manifest the way the operator will: envelope, then spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune_trainer.config import ConfigError, ConfigIssue, LoadedConfig
from finetune_trainer.config.loader import apply_overrides, parse_overrides, validate_data

from .spec import API_VERSION, DNS_LABEL, KIND, FineTuneJobSpec

import re


def envelope_issues(doc: dict[str, Any]) -> list[ConfigIssue]:
    """apiVersion, kind and metadata.name: what kubectl would refuse before our schema."""
    issues = []
    if doc.get("apiVersion") != API_VERSION:
        issues.append(ConfigIssue("apiVersion", f"must be {API_VERSION!r} (got {doc.get('apiVersion')!r})"))
    if doc.get("kind") != KIND:
        issues.append(ConfigIssue("kind", f"must be {KIND!r} (got {doc.get('kind')!r})"))
    metadata = doc.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or not re.match(DNS_LABEL, name) or len(name) > 63:
        issues.append(
            ConfigIssue("metadata.name", f"must be a DNS label (lowercase letters, digits, '-'; at most 63) (got {name!r})")
        )
    if not isinstance(doc.get("spec"), dict):
        issues.append(ConfigIssue("spec", "must be a mapping holding the config sections (model:, training:, ...)"))
    return issues


def validate_manifest(
    doc: dict[str, Any], overrides: list[str] | None = None, *, mode: str = "validate", base_dir: Path | None = None
) -> LoadedConfig:
    """The spec as a checked FineTuneJobSpec; every problem raised at once, paths under `spec.`."""
    errors = envelope_issues(doc)
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else None
    if spec is None:
        raise ConfigError(errors)
    if overrides:
        spec = apply_overrides(spec, parse_overrides(overrides), root=FineTuneJobSpec)
    try:
        loaded = validate_data(spec, mode=mode, base_dir=base_dir, root=FineTuneJobSpec, prefix=("spec",))
    except ConfigError as exc:
        raise ConfigError(errors + exc.errors, exc.warnings) from None
    if errors:
        raise ConfigError(errors, loaded.warnings)
    return loaded


def is_manifest(doc: dict[str, Any]) -> bool:
    """A FineTuneJob (or anything shaped like a Kubernetes object with a spec)."""
    return doc.get("kind") == KIND or ("spec" in doc and "apiVersion" in doc)


def load_document(
    doc: dict[str, Any], overrides: list[str] | None = None, *, mode: str = "validate", base_dir: Path | None = None
) -> LoadedConfig | None:
    """`finetune`'s reader for manifests (entry point finetune.documents): None when `doc`
    is not one, so the CLI reads it as a seed config."""
    if not is_manifest(doc):
        return None
    loaded = validate_manifest(doc, overrides, mode=mode, base_dir=base_dir)
    if mode == "validate":  # what the operator would refuse anyway, said now (not for a local `train -f`)
        from .render import RenderSettings, spec_issues, untyped_issues  # render builds on this module

        issues = [*untyped_issues(doc), *spec_issues(loaded.config, RenderSettings())]
        if issues:
            raise ConfigError(issues, loaded.warnings)
    return loaded
