"""domain-specific-eval: the user's own questions and answers.

Data: `evaluation.domain_eval_path`, JSON Lines (or a JSON list) of
`{"prompt": ..., "reference": ..., "system": ...optional}`, a local file or an s3:// URI.
Each row is the conversation [system?, user: prompt, assistant: reference], tokenized by the
data package exactly as training tokenizes (chat template, BOS/EOS, loss on the answer).

Scores (all over the whole file):
- `exact_match`: share of greedy answers equal to the reference after SQuAD normalisation
  (metrics.py);
- `token_f1`: mean SQuAD word-overlap F1 of answer and reference;
- `perplexity`: exp of the mean negative log-likelihood per reference token, the tokens
  training would learn (the answer and its end-of-turn marker / EOS), given the prompt;
  `reference_loss` is that mean. Lower is better; it needs no generation, so it moves
  even when the answers do not yet match.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..data import DataError, read_rows
from ..data.tokenize import encode
from .generation import answer_losses, greedy_generate, prompt_ids_before_answer, stop_strings
from .metrics import corpus_perplexity, exact_match, mean, token_f1

if TYPE_CHECKING:
    from ..config.schema import FineTuneConfig

log = logging.getLogger(__name__)

FIELD = "evaluation.domain_eval_path"
EXAMPLES_KEPT = 5  # answers shown in evaluation.json, next to the scores
NO_LIMIT = 1 << 30


@dataclass(frozen=True)
class DomainExample:
    prompt: str
    reference: str
    system: str | None = None

    def turns(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, {"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.reference}]


def _string(row: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = row.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        what = "missing" if value is None else "empty" if isinstance(value, str) else f"a {type(value).__name__}"
        raise ValueError(f"field '{name}' must be a non-empty string (it is {what})")
    return value


def parse_examples(rows: list[Any], *, source: str, row_numbers: list[int] | None = None) -> list[DomainExample]:
    """Rows -> examples; a bad row fails with the file, its row number and the field."""
    numbers = row_numbers or list(range(1, len(rows) + 1))
    examples = []
    for number, row in zip(numbers, rows):
        try:
            if not isinstance(row, dict):
                raise ValueError(f'expected a JSON object {{"prompt": ..., "reference": ...}}, got {type(row).__name__}')
            examples.append(
                DomainExample(
                    _string(row, "prompt", required=True),  # type: ignore[arg-type]
                    _string(row, "reference", required=True),  # type: ignore[arg-type]
                    _string(row, "system", required=False),
                )
            )
        except ValueError as exc:
            raise DataError(f"{FIELD}: {source} row {number}: {exc}") from None
    return examples


def load_examples(location: str) -> list[DomainExample]:
    rows = read_rows(location, field=FIELD)
    return parse_examples(list(rows), source=rows.source, row_numbers=rows.row_numbers)


def score(predictions: list[str], references: list[str], losses: list[tuple[float, int]]) -> dict[str, float]:
    """The benchmark's numbers from its raw outputs (pure)."""
    loss, ppl = corpus_perplexity([s for s, _ in losses], [n for _, n in losses])
    return {
        "exact_match": mean(exact_match(p, r) for p, r in zip(predictions, references)),
        "token_f1": mean(token_f1(p, r) for p, r in zip(predictions, references)),
        "perplexity": ppl,
        "reference_loss": loss,
    }


def run(model: Any, tokenizer: Any, cfg: FineTuneConfig) -> dict[str, Any]:
    if not cfg.evaluation.domain_eval_path:
        raise DataError(f"{FIELD} is not set; point it at a JSONL file of prompt/reference lines")
    examples = load_examples(cfg.evaluation.domain_eval_path)
    pre = cfg.dataset.preprocessing.model_copy(update={"train_on_inputs": False})
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None) or NO_LIMIT
    encoded, kept, skipped = [], [], 0
    for example in examples:
        sample = encode(example.turns(), tokenizer, pre, context)
        if sample is None or sample.truncated:  # no room for the whole answer in the model's context
            skipped += 1
            continue
        encoded.append(sample)
        kept.append(example)
    if not kept:
        raise DataError(f"{FIELD}: none of the {len(examples)} examples fits the model's context of {context} tokens")
    if skipped:
        log.warning("domain-specific-eval: %d examples longer than the model's context (%d tokens) skipped", skipped, context)
    batch = cfg.evaluation.eval_batch_size
    prompts = [prompt_ids_before_answer(s.input_ids, s.labels) for s in encoded]
    predictions = [
        p.strip()
        for p in greedy_generate(
            model, tokenizer, prompts, max_new_tokens=cfg.evaluation.domain_eval_max_new_tokens,
            stop=stop_strings(tokenizer, pre), batch_size=batch,
        )
    ]
    losses = answer_losses(model, [(s.input_ids, s.labels) for s in encoded], batch_size=batch)
    references = [e.reference for e in kept]
    return {
        "metrics": score(predictions, references, losses),
        "details": {
            "samples": len(kept),
            "skipped": skipped,
            "reference_tokens": sum(n for _, n in losses),
            "examples": [
                {"prompt": e.prompt, "reference": e.reference, "prediction": p}
                for e, p in zip(kept[:EXAMPLES_KEPT], predictions)
            ],
        },
    }
