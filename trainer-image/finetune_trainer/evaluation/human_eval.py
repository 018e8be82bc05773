"""human-eval: complete Python functions, run their tests in the sandbox, report pass@1.

Problems (`evaluation.human_eval.problems_path`) have HumanEval's fields: `task_id`, `prompt`
(imports, signature and docstring), `test` (defines `check(candidate)`), `entry_point`;
`canonical_solution` is optional. The default is OpenAI's HumanEval from the Hugging Face
Hub; offline, a JSONL file of the same shape (examples/eval/humaneval_tiny.jsonl).

Generation: one greedy sample per problem, asked the way the model was trained (chat template
or the plain format): "Complete this Python function", then the prompt in a code block.
Chat models answer with the whole function in a block, base models often with the body:
the first code block of the answer (or the whole answer when it has none) is taken, and
- when it defines the entry point, it is appended after the prompt (the prompt's imports
  stay, its stub is redefined);
- otherwise it is the continuation of the prompt, cut at the first new top-level statement
  (the stop sequences of the HumanEval paper).
The program `prompt + completion + test + check(entry_point)` runs in the sandbox
(sandbox.py); pass@1 is the share of problems whose program exits 0.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..data import DataError, read_rows
from .generation import greedy_generate, prefill_ids, stop_strings
from .metrics import mean, pass_at_k
from .sandbox import ExecutionResult, SandboxLimits, run_program

if TYPE_CHECKING:
    from ..config.schema import FineTuneConfig

log = logging.getLogger(__name__)

FIELD = "evaluation.human_eval.problems_path"
REQUIRED = ("task_id", "prompt", "test", "entry_point")
INSTRUCTION = "Complete this Python function:\n```python\n{prompt}```"
CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S)
# The Codex paper's stop sequences: a new top-level statement ends a continued function.
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str | None = None


def parse_problems(rows: list[Any], *, source: str, row_numbers: list[int] | None = None) -> list[Problem]:
    numbers = row_numbers or list(range(1, len(rows) + 1))
    problems = []
    for number, row in zip(numbers, rows):
        if not isinstance(row, dict):
            raise DataError(f"{FIELD}: {source} row {number}: expected a JSON object with {', '.join(REQUIRED)}")
        missing = [k for k in REQUIRED if not isinstance(row.get(k), str) or not row[k].strip()]
        if missing:
            raise DataError(
                f"{FIELD}: {source} row {number}: missing or empty field(s) {', '.join(missing)} "
                f"(HumanEval problems have {', '.join(REQUIRED)})"
            )
        solution = row.get("canonical_solution")
        problems.append(Problem(*(row[k] for k in REQUIRED), solution if isinstance(solution, str) else None))
    return problems


def load_problems(location: str, limit: int | None = None) -> list[Problem]:
    rows = read_rows(location, field=FIELD)
    problems = parse_problems(list(rows), source=rows.source, row_numbers=rows.row_numbers)
    return problems[:limit] if limit else problems


def program_for(problem: Problem, completion: str) -> str:
    """What runs: the prompt, the completion, the tests, and the call of `check`."""
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def truncate_completion(text: str) -> str:
    """A continued function up to the first stop sequence."""
    cuts = [i for i in (text.find(stop) for stop in CODE_STOPS) if i >= 0]
    return text[: min(cuts)] if cuts else text


def extract_code(answer: str) -> str:
    """The first fenced code block of an answer, or the whole answer when it has none."""
    match = CODE_BLOCK.search(answer)
    return match.group(1) if match else answer


def completion_from_answer(problem: Problem, answer: str) -> str:
    """What goes after the prompt: the answer's whole function, or the body it continues."""
    code = extract_code(answer)
    if re.search(rf"^[ \t]*def[ \t]+{re.escape(problem.entry_point)}[ \t]*\(", code, re.M):
        return "\n" + code
    return truncate_completion(code)


def code_block_closed(answer: str) -> bool:
    """Generation can stop: the answer's first code block is complete."""
    return answer.count("```") >= 2


def execute(problems: Sequence[Problem], completions: Sequence[str], limits: SandboxLimits) -> list[ExecutionResult]:
    """Each problem's program in its own sandbox, a few at a time (the CPU limit is per program)."""
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda pc: run_program(program_for(*pc), limits), zip(problems, completions)))


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def score(problems: Sequence[Problem], results: Sequence[ExecutionResult]) -> dict[str, Any]:
    """pass@1 and what happened to each problem (pure)."""
    passed = sum(r.passed for r in results)
    return {
        "metrics": {"pass@1": mean(pass_at_k(1, int(r.passed), 1) for r in results)},
        "details": {
            "problems": len(results),
            "passed": passed,
            "sandbox": results[0].isolation if results else None,
            "per_problem": [
                {"task_id": p.task_id, "status": r.status, "seconds": r.seconds, "error": None if r.passed else _last_line(r.stderr)}
                for p, r in zip(problems, results)
            ],
        },
    }


def limits_from(cfg: FineTuneConfig) -> SandboxLimits:
    he = cfg.evaluation.human_eval
    return SandboxLimits(timeout_seconds=he.timeout_seconds, memory_mb=he.memory_mb)


def prompt_ids(problem: Problem, tokenizer: Any, pre: Any) -> list[int]:
    return prefill_ids([{"role": "user", "content": INSTRUCTION.format(prompt=problem.prompt)}], "", tokenizer, pre)


def run(model: Any, tokenizer: Any, cfg: FineTuneConfig) -> dict[str, Any]:
    he, pre = cfg.evaluation.human_eval, cfg.dataset.preprocessing
    problems = load_problems(he.problems_path, he.limit)
    answers = greedy_generate(
        model, tokenizer, [prompt_ids(p, tokenizer, pre) for p in problems], max_new_tokens=he.max_new_tokens,
        stop=stop_strings(tokenizer, pre), batch_size=cfg.evaluation.eval_batch_size, until=code_block_closed,
    )
    completions = [completion_from_answer(p, a) for p, a in zip(problems, answers)]
    results = execute(problems, completions, limits_from(cfg))
    out = score(problems, results)
    for entry, completion in zip(out["details"]["per_problem"], completions):
        entry["completion"] = completion
    return out
