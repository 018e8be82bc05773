"""The scale benchmark still runs (tiny): both operators turn every FineTuneJob into a
PyTorchJob and every line of the report is there. Its figures are for people, not asserts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_operator_scale_runs_both_operators_and_reports():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "operator_scale.py"), "--jobs", "12", "--appliers", "3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out.count("all PyTorchJobs created after:") == 2
    assert "--- baseline: the least API work per job" in out and "--- finetune-operator" in out
    assert "--- ours / baseline: all PyTorchJobs" in out
    requests = [line for line in out.splitlines() if line.startswith("operator requests per job:")]
    assert "create pytorchjobs 1.00" in requests[0] and "create pytorchjobs 1.00" in requests[1]
    assert "fetch pytorchjobs" not in requests[1]  # a new job is created without a read first
