"""What the generating benchmarks share: prompts rendered as in training, greedy decoding in
batches, and the loss of given answers.

Prompts go through the data package's rendering (`dataset.preprocessing`: chat template or
the plain '### Instruction:/### Response:' format, BOS), so the model is asked the way it
was taught; the answer is the continuation after the assistant header.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..data.tokenize import IGNORE_INDEX, PLAIN_HEADERS, has_chat_template, render

if TYPE_CHECKING:
    from ..config.schema import PreprocessingConfig
    from ..data.formats import Conversation

# After a plain-format answer the model may start the next block; stop there.
PLAIN_STOP = "\n\n" + PLAIN_HEADERS["user"]


def prompt_ids_before_answer(input_ids: Sequence[int], labels: Sequence[int]) -> list[int]:
    """The tokens before the first learned one: everything up to the assistant header."""
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return list(input_ids[:first])


def prefill_ids(turns: Conversation, prefill: str, tokenizer: Any, pre: PreprocessingConfig) -> list[int]:
    """Token ids of `turns` rendered as in training, with the assistant's answer started
    by `prefill` (e.g. the code to complete) and left open for the model to continue."""
    rendered = render([*turns, {"role": "assistant", "content": prefill}], tokenizer, use_chat_template=pre.use_chat_template)
    start = rendered.learned[-1][0]
    text = rendered.text[: start + len(prefill)]
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if pre.add_bos_token and bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


def stop_strings(tokenizer: Any, pre: PreprocessingConfig) -> list[str]:
    """Where an answer ends besides EOS: the plain format's next block."""
    return [] if pre.use_chat_template and has_chat_template(tokenizer) else [PLAIN_STOP]


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(cuts)] if cuts else text


def model_device(model: Any) -> Any:
    return next(model.parameters()).device


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    until: Callable[[str], bool] | None = None,
    skip_special_tokens: bool = True,
) -> list[str]:
    """Greedy continuations of token-id prompts, cut at the first stop string. `until(text)`
    ends a sequence early once its answer so far satisfies it (e.g. a closed code block).
    Prompts of similar length are batched together (left-padded); answers come back in
    input order."""
    import torch

    device, pad = model_device(model), pad_id(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    model.eval()
    for batch in _batches(order, max(1, batch_size)):
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            prompt = torch.tensor(list(prompts[i]), dtype=torch.long)
            ids[row, width - len(prompt):] = prompt
            mask[row, width - len(prompt):] = 1
        kwargs: dict[str, Any] = {}
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
        if until is not None:
            kwargs["stopping_criteria"] = [_answer_done(tokenizer, width, until, skip_special_tokens)]
        with torch.inference_mode():
            output = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                use_cache=True,  # off in the config of a model trained with gradient checkpointing
                **kwargs,
            )
        for row, i in enumerate(batch):
            text = tokenizer.decode(output[row, width:], skip_special_tokens=skip_special_tokens)
            answers[i] = cut_at_stop(text, stop)
    return answers


def _answer_done(tokenizer: Any, prompt_width: int, until: Callable[[str], bool], skip_special_tokens: bool) -> Any:
    """A transformers StoppingCriteria: per row, whether `until` holds for the answer so far."""
    import torch
    from transformers import StoppingCriteria

    class AnswerDone(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, prompt_width:], skip_special_tokens=skip_special_tokens)
            return torch.tensor([until(t) for t in texts], dtype=torch.bool, device=input_ids.device)

    return AnswerDone()


def answer_losses(
    model: Any, samples: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 8
) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, token count) of the learned tokens of each
    (input_ids, labels) sample: the model's surprise at the reference answers."""
    import torch
    import torch.nn.functional as F

    device = model_device(model)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(samples)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i][0]))
    model.eval()
    for batch in _batches(order, max(1, batch_size)):
        width = max(len(samples[i][0]) for i in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(samples[i][0])
            ids[row, :n] = torch.tensor(list(samples[i][0]))
            labels[row, :n] = torch.tensor(list(samples[i][1]))
            mask[row, :n] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for row, i in enumerate(batch):  # one row at a time: a float32 copy of all logits can be large
            target = labels[row, 1:].to(logits.device)
            nll = F.cross_entropy(logits[row, :-1].float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
            out[i] = (float(nll), int((target != IGNORE_INDEX).sum()))
    return out
