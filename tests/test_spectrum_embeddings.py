"""Spectrum trains the input embeddings and the output head too, as the reference's generated
config does (`^lm_head.weight$`, `^model.embed_tokens.weight$`), unless
`fine_tuning.spectrum.train_embeddings: false`. Checked on real optimizer steps: which
parameter values moved, which did not, how tied embeddings are counted, and what
spectrum_selection.json / .txt say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune_trainer.config.schema import FineTuneConfig, SpectrumConfig
from finetune_trainer.methods import MethodResult, count_parameters, prepare_model

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def make_cfg(model_dir: Path, **spectrum) -> FineTuneConfig:
    return FineTuneConfig.model_validate(
        {"model": {"base_model": str(model_dir)}, "fine_tuning": {"method": "spectrum", "spectrum": spectrum}}
    )


@pytest.fixture(scope="module")
def batch(tiny_model_dir) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(["Spectrum trains the embeddings as well.", "And the output head."], return_tensors="pt", padding=True)
    labels = ids.input_ids.masked_fill(ids.attention_mask == 0, -100)
    return {"input_ids": ids.input_ids, "attention_mask": ids.attention_mask, "labels": labels}


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny Llama with its own lm_head matrix (tie_word_embeddings false)."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("tiny-llama-untied")
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def step(result: MethodResult, batch, *, steps: int = 2) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(values before, names of the parameters whose values changed) after `steps` real AdamW
    steps (no weight decay: only gradients move weights) over the trainable parameters."""
    model = result.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}
    return before, changed


def trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def linear_numel(result: MethodResult) -> int:
    modules = dict(result.model.named_modules())
    return sum(p.numel() for name in result.spectrum.trained for p in modules[name].parameters())


# ------------------------------------------------------------------ the key


def test_key_defaults_to_true_and_is_documented():
    field = SpectrumConfig.model_fields["train_embeddings"]
    assert field.default is True and SpectrumConfig().train_embeddings is True
    assert "lm_head" in field.description and "embed_tokens" in field.description and "false" in field.description
    assert make_cfg(Path("m"), train_embeddings=False).fine_tuning.spectrum.train_embeddings is False


# ------------------------------------------------------------------ tied (the tiny Llama)


def test_default_trains_tied_embeddings_once(tiny_model_dir, batch, tmp_path):
    result = prepare_model(make_cfg(tiny_model_dir), output_dir=tmp_path)
    model, selection = result.model, result.spectrum
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert head.weight is embed.weight  # tied: one Parameter
    assert embed.weight.requires_grad and head.weight.requires_grad

    # one trainable parameter for the two modules, counted once
    names = trainable(model)
    assert names == {f"{m}.weight" for m in selection.trained} | {EMBED}
    assert HEAD not in {n for n, _ in model.named_parameters()}
    vocab_x_hidden = embed.weight.numel()
    assert selection.embedding_numel == vocab_x_hidden
    assert result.trainable_params == linear_numel(result) + vocab_x_hidden == count_parameters(model)[0]
    assert result.total_params == sum(p.numel() for p in model.parameters())
    assert f"tied: one matrix, {vocab_x_hidden:,} parameters" in result.description

    before, changed = step(result, batch)
    assert changed == names  # embeddings/head moved, every selected module moved, nothing else
    assert not torch.equal(before[EMBED], embed.weight.detach())
    assert torch.equal(before["model.norm.weight"], model.model.norm.weight.detach())

    written = json.loads((tmp_path / "spectrum_selection.json").read_text())
    assert written["train_embeddings"] is True and written["embeddings_tied"] is True
    assert written["embedding_numel"] == vocab_x_hidden
    assert written["embeddings"] == [
        {"module": "model.embed_tokens", "role": "input_embeddings", "parameters": [EMBED], "numel": vocab_x_hidden,
         "tied_to": "lm_head", "trained": True},
        {"module": "lm_head", "role": "output_head", "parameters": [EMBED], "numel": vocab_x_hidden,
         "tied_to": "model.embed_tokens", "trained": True},
    ]
    table = (tmp_path / "spectrum_selection.txt").read_text()
    assert "plus model.embed_tokens and lm_head (tied: one matrix" in table.splitlines()[0]
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert rows["model.embed_tokens"].endswith("yes, tied to lm_head")
    assert rows["lm_head"].endswith("yes, tied to model.embed_tokens")


def test_key_false_keeps_tied_embeddings_frozen(tiny_model_dir, batch, tmp_path):
    result = prepare_model(make_cfg(tiny_model_dir, train_embeddings=False), output_dir=tmp_path)
    model, selection = result.model, result.spectrum
    assert not model.get_input_embeddings().weight.requires_grad
    assert not model.get_output_embeddings().weight.requires_grad
    assert trainable(model) == {f"{m}.weight" for m in selection.trained}
    assert result.trainable_params == linear_numel(result)

    before, changed = step(result, batch)
    assert changed == trainable(model) and changed  # the selected modules did train
    assert torch.equal(before[EMBED], model.get_input_embeddings().weight.detach())

    written = json.loads((tmp_path / "spectrum_selection.json").read_text())
    assert written["train_embeddings"] is False
    assert [(e["module"], e["trained"], e["tied_to"]) for e in written["embeddings"]] == [
        ("model.embed_tokens", False, "lm_head"), ("lm_head", False, "model.embed_tokens")]
    table = (tmp_path / "spectrum_selection.txt").read_text()
    assert "model.embed_tokens and lm_head frozen (fine_tuning.spectrum.train_embeddings: false)" in table
    assert "no (fine_tuning.spectrum.train_embeddings: false), tied to lm_head" in table


def test_layers_mode_trains_embeddings_too(tiny_model_dir, batch):
    result = prepare_model(make_cfg(tiny_model_dir, layers_to_finetune=[0]))
    assert result.spectrum.mode == "layers"
    assert trainable(result.model) == {f"{m}.weight" for m in result.spectrum.trained} | {EMBED}
    _, changed = step(result, batch)
    assert EMBED in changed and not any(n.startswith("model.layers.1.") for n in changed)


# ------------------------------------------------------------------ untied


def test_untied_embeddings_and_head_are_two_trained_parameters(untied_model_dir, batch, tmp_path):
    result = prepare_model(make_cfg(untied_model_dir), output_dir=tmp_path)
    model, selection = result.model, result.spectrum
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    names = trainable(model)
    assert names == {f"{m}.weight" for m in selection.trained} | {EMBED, HEAD}
    both = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    assert selection.embedding_numel == both and result.trainable_params == linear_numel(result) + both

    before, changed = step(result, batch)
    assert changed == names
    used = batch["input_ids"].unique()
    assert not torch.equal(before[EMBED][used], model.model.embed_tokens.weight.detach()[used])
    assert not torch.equal(before[HEAD], model.lm_head.weight.detach())

    written = json.loads((tmp_path / "spectrum_selection.json").read_text())
    assert written["embeddings_tied"] is False
    assert [(e["module"], e["parameters"], e["tied_to"], e["trained"]) for e in written["embeddings"]] == [
        ("model.embed_tokens", [EMBED], None, True), ("lm_head", [HEAD], None, True)]


def test_untied_key_false_freezes_both(untied_model_dir, batch):
    result = prepare_model(make_cfg(untied_model_dir, train_embeddings=False))
    before, changed = step(result, batch)
    assert changed == {f"{m}.weight" for m in result.spectrum.trained}
    assert torch.equal(before[EMBED], result.model.model.embed_tokens.weight.detach())
    assert torch.equal(before[HEAD], result.model.lm_head.weight.detach())


# ------------------------------------------------------------------ found by accessor, not name


def test_embeddings_found_by_accessor_on_gpt2(tmp_path):
    """GPT-2 calls them transformer.wte and lm_head (tied) and its layers use Conv1D."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    result = prepare_model(make_cfg(tmp_path / "gpt2"))
    assert [(e.module, e.role, e.tied_to) for e in result.spectrum.embeddings] == [
        ("transformer.wte", "input_embeddings", "lm_head"), ("lm_head", "output_head", "transformer.wte")]
    assert "transformer.wte.weight" in trainable(result.model)
    assert "transformer.wpe.weight" not in trainable(result.model)  # position embeddings are not the input embeddings
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    before, changed = step(result, {"input_ids": ids, "labels": ids})
    assert "transformer.wte.weight" in changed and "transformer.wpe.weight" not in changed
