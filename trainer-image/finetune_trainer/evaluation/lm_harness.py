"""lm-evaluation-harness: EleutherAI's `lm_eval` on the model already in memory.

The loaded model (adapter applied, quantized or not) is wrapped in lm_eval's `HFLM`, so
nothing is loaded twice and what is scored is exactly what was trained. Tasks come from
`evaluation.lm_eval.tasks`: lm_eval's built-in tasks (their data comes from the Hugging Face
Hub, as on a cluster) or tasks defined by YAML files in `evaluation.lm_eval.include_path`,
which run offline on local data (examples/eval/lm_eval_tasks/ ships one).
"""

from __future__ import annotations

import difflib
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BenchmarkError

if TYPE_CHECKING:
    from ..config.schema import FineTuneConfig

log = logging.getLogger(__name__)

FIELD = "evaluation.lm_eval"
INSTALL_HINT = "pip install 'finetune-operator[eval]' (the lm-eval package)"


def evaluate_arguments(cfg: FineTuneConfig) -> dict[str, Any]:
    """Our config -> lm_eval.simple_evaluate's keyword arguments (besides model and tasks'
    manager). A limit of 1 or more is a count of examples, below 1 a fraction."""
    le = cfg.evaluation.lm_eval
    limit: int | float | None = le.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    return {
        "tasks": list(le.tasks),
        "num_fewshot": le.num_fewshot,
        "limit": limit,
        "apply_chat_template": le.apply_chat_template,
        "random_seed": cfg.training.seed,
        "numpy_random_seed": cfg.training.seed,
        "torch_random_seed": cfg.training.seed,
        "fewshot_random_seed": cfg.training.seed,
        "log_samples": False,
        "bootstrap_iters": 0,  # no bootstrap stderr: minutes of CPU for numbers nobody reads here
    }


def _metric_name(task: str, key: str) -> str | None:
    """'acc,none' -> 'task/acc'; 'exact_match,strict-match' -> 'task/exact_match[strict-match]';
    stderr and aliases -> None."""
    if "," not in key:
        return None
    metric, _, flt = key.partition(",")
    if metric.endswith("_stderr"):
        return None
    return f"{task}/{metric}" if flt == "none" else f"{task}/{metric}[{flt}]"


def flatten_results(output: dict[str, Any]) -> dict[str, float]:
    """lm_eval's nested results -> flat 'task/metric' numbers (groups included)."""
    flat: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, values in (output.get(section) or {}).items():
            for key, value in values.items():
                name = _metric_name(task, key)
                if name and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    flat[name] = float(value)
    return dict(sorted(flat.items()))


def task_manager(cfg: FineTuneConfig) -> Any:
    """Only the local folder's tasks when it defines every task asked for (indexing lm_eval's
    ~15,000 built-in task files takes seconds); otherwise built-in tasks plus the folder."""
    from lm_eval.tasks import TaskManager

    le = cfg.evaluation.lm_eval
    if le.include_path:
        folder = str(Path(le.include_path).expanduser())
        if not Path(folder).is_dir():
            raise BenchmarkError(f"{FIELD}.include_path: folder not found: {le.include_path}")
        local = TaskManager(include_path=folder, include_defaults=False)
        if all(task in local.all_tasks for task in le.tasks):
            return local
        return TaskManager(include_path=folder)
    return TaskManager()


def check_tasks(manager: Any, tasks: list[str]) -> None:
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if not unknown:
        return
    hints = []
    for task in unknown:
        close = difflib.get_close_matches(task, known, n=3, cutoff=0.75)
        hints.append(f"{task!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
    raise BenchmarkError(
        f"{FIELD}.tasks: unknown lm_eval task(s) {', '.join(hints)}; use lm_eval's task names, or define the "
        f"task in a YAML file under {FIELD}.include_path"
    )


def _offline_hint(exc: Exception) -> str | None:
    text = f"{type(exc).__name__}: {exc}"
    if any(word in text.lower() for word in ("offline", "connection", "couldn't reach", "name resolution", "hub")):
        return text
    return None


def run(model: Any, tokenizer: Any, cfg: FineTuneConfig) -> dict[str, Any]:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise BenchmarkError(f"lm-evaluation-harness cannot run: {exc}; {INSTALL_HINT}") from None

    arguments = evaluate_arguments(cfg)
    manager = task_manager(cfg)
    check_tasks(manager, arguments["tasks"])
    batch_size = cfg.evaluation.lm_eval.batch_size or cfg.evaluation.eval_batch_size
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        output = lm_eval.simple_evaluate(model=lm, task_manager=manager, **arguments)
    except (ConnectionError, OSError, ValueError) as exc:
        hint = _offline_hint(exc)
        if hint is None:
            raise
        raise BenchmarkError(
            f"{FIELD}.tasks: a task's data could not be fetched ({hint}); without the Hugging Face Hub, "
            f"use tasks defined on local files under {FIELD}.include_path"
        ) from None
    if output is None:  # not the main process
        return {"metrics": {}, "details": {}}
    return {
        "metrics": flatten_results(output),
        "details": {
            "tasks": arguments["tasks"],
            "num_fewshot": {t: c.get("num_fewshot") for t, c in (output.get("configs") or {}).items()},
            "samples": {t: n.get("effective") for t, n in (output.get("n-samples") or {}).items()},
            "lm_eval_version": getattr(lm_eval, "__version__", None),
        },
    }
