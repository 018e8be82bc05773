"""The error a benchmark raises for what the user can fix (a task name, a missing package)."""

from __future__ import annotations


class BenchmarkError(RuntimeError):
    """One benchmark cannot run; the message names the config field and the fix. The run
    records it in evaluation.json and goes on with the other benchmarks."""
