"""`finetune launch` (torchrun for multi-GPU pods) keeps the trainer's exit code, which the
PyTorchJob's restartPolicy: ExitCode reads: 1-127 permanent, 128+ retried."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from finetune_trainer.launch import KILLED, launch_exit_code, read_exit_codes, record_exit_code


@pytest.mark.parametrize(
    "launcher,ranks,expected",
    [
        (0, {0: 0, 1: 0}, 0),
        (1, {0: 143, 1: 143}, 143),  # preempted after saving: retried, not torchrun's 1
        (1, {0: 1, 1: 143}, 1),  # a permanent failure wins
        (1, {0: 143, 1: 2}, 2),
        (1, {0: 0, 1: 1}, 1),
        (1, {}, KILLED),  # a rank died without a word (OOM kill): retried
        (1, {0: 0}, KILLED),
        (-15, {}, 143),  # torchrun itself killed by SIGTERM
        (137, {}, 137),
    ],
)
def test_launch_exit_code(launcher, ranks, expected):
    assert launch_exit_code(launcher, ranks) == expected


def test_ranks_record_their_codes(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_EXIT_CODE_DIR", str(tmp_path))
    for rank, code in ((0, 143), (1, 1)):
        monkeypatch.setenv("RANK", str(rank))
        record_exit_code(code)
    assert read_exit_codes(tmp_path) == {0: 143, 1: 1}


@pytest.mark.slow
def test_launch_two_processes_bad_data_is_permanent(tmp_path, tiny_model_dir):
    """Both ranks fail on a missing data file: torchrun says 1 as always, and so does the
    launcher, because the ranks said 1 (not a kill, which would be retried)."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"base_model": str(tiny_model_dir), "trust_remote_code": False},
        "dataset": {"train_path": str(tmp_path / "missing.jsonl")},
        "training": {"max_steps": 1, "mixed_precision": "no"},
        "output": {"output_dir": str(tmp_path / "out")},
    }))
    env = {**os.environ, "PET_NPROC_PER_NODE": "2", "PET_NNODES": "1", "PET_STANDALONE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "finetune_trainer.cli", "launch", "--config", str(config)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "missing.jsonl" in proc.stderr
