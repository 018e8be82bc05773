"""Scores, as pure functions of strings and numbers (no torch).

Answers are compared after SQuAD's normalisation (Rajpurkar et al. 2016, the official
evaluation script): lower case, ASCII punctuation removed, the English articles a/an/the
removed, whitespace collapsed. So "The answer: 18.63 mi." matches "answer 1863 mi" — the
decimal point is punctuation too, which is SQuAD's choice and ours.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of precision and recall of the normalised words (a bag: repeats count).
    Two empty answers agree (1.0); one empty answer scores 0.0."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. 2021 (HumanEval): n samples of which c pass.
    With one greedy sample per problem, pass@1 is simply the fraction that passed."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def corpus_perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> tuple[float, float]:
    """(mean loss per token, perplexity) over all scored tokens of all samples: long
    references weigh more, as in a language model's evaluation loss."""
    tokens = sum(token_counts)
    if tokens == 0:
        return float("nan"), float("nan")
    loss = sum(nll_sums) / tokens
    return loss, math.exp(loss) if loss < 700 else float("inf")
