"""status.outputs: where a succeeded job's results are, so a GitOps pipeline can chain to serving.

Pure: the URIs follow from the job (its storage, method, output.merge_adapter, benchmarks) and
the operator's default storage, the same way the trainer lays out final/ (contract.final_outputs).
Written with Succeeded=True, in the same status write.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_trainer import contract as c
from finetune_trainer.serving import final_outputs_for
from pydantic import ValidationError

from .spec import FineTuneJobSpec, StorageSpec


def job_outputs(job: Mapping[str, Any], default_storage: StorageSpec | None = None) -> dict[str, str] | None:
    """The URIs of what the job published (None: its spec does not say where, or no longer parses)."""
    meta = job.get("metadata") or {}
    try:
        spec = FineTuneJobSpec.model_validate(job.get("spec") or {})
    except ValidationError:
        return None
    storage = spec.storage or default_storage
    if storage is None or not meta.get("name"):
        return None
    return final_outputs_for(spec, c.job_storage_uri(storage.uri, meta.get("namespace") or "default", meta["name"]))
