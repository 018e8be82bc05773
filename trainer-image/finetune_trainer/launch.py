"""`finetune launch`: torchrun for a pod with several GPUs, keeping the trainer's exit code.

torchrun turns any worker failure into exit 1, and under the PyTorchJob's
`restartPolicy: ExitCode` 1 means "permanent": a run preempted after saving (143) would
never be retried. So each rank writes its exit code to a folder this launcher makes, and
the launcher exits with the code that tells the truth.

The launcher and torchrun's agent hold the pod's whole environment (its Secret-backed
credentials) without needing it to be readable by anyone else: both mark themselves
non-dumpable (process_guard.py), so a program of the same user cannot read
their /proc/<pid>/environ. torchrun runs as `python -m finetune_trainer.launch ARGS`, which
is torchrun with that done first.
"""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from .contract import ENV_PET_NPROC_PER_NODE, exit_code_is_retryable, world
from .cpu_threads import set_threads_env
from .process_guard import mark_not_dumpable

ENV_EXIT_CODE_DIR = "FINETUNE_EXIT_CODE_DIR"
KILLED = 137  # a rank that died without a word was killed (OOM, node loss): retry


def record_exit_code(code: int) -> None:
    """Called by every rank of `finetune train` as it exits (no-op outside the launcher)."""
    folder = os.environ.get(ENV_EXIT_CODE_DIR)
    if folder:
        Path(folder, f"rank-{world().rank}.code").write_text(str(code))


def read_exit_codes(folder: Path) -> dict[int, int]:
    codes = {}
    for path in folder.glob("rank-*.code"):
        try:
            codes[int(path.stem.split("-", 1)[1])] = int(path.read_text().strip())
        except ValueError:
            continue
    return codes


def launch_exit_code(launcher_code: int, rank_codes: dict[int, int]) -> int:
    """The pod's exit code from torchrun's and the ranks' own.

    A permanent failure on any rank (1-127: bad data, NaN loss) wins, lowest rank first;
    else a retryable one (128+: preempted after saving); a failure no rank reported is a
    kill, retried; a signal that killed torchrun itself reads as 128 + signal."""
    if launcher_code == 0:
        return 0
    permanent = [rank_codes[r] for r in sorted(rank_codes) if 1 <= rank_codes[r] <= 127]
    if permanent:
        return permanent[0]
    retryable = [code for code in rank_codes.values() if exit_code_is_retryable(code)]
    if retryable:
        return max(retryable)
    if launcher_code < 0:
        return 128 - launcher_code
    return launcher_code if exit_code_is_retryable(launcher_code) else KILLED


def torchrun_command(config: str, overrides: list[str]) -> list[str]:
    """torchrun reads --nnodes, --nproc-per-node, --node-rank and the rendezvous from PET_*."""
    return [sys.executable, "-m", "finetune_trainer.launch", "-m", "finetune_trainer.cli", "train", "--config", config,
            *overrides]


def run_torchrun(argv: list[str]) -> None:
    """torchrun's own main with `argv`, in this process, once it is not dumpable."""
    mark_not_dumpable()
    sys.argv = ["torchrun", *argv]
    runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)


def launch(config: str, overrides: list[str]) -> int:
    mark_not_dumpable()
    env = {**os.environ}
    nproc = os.environ.get(ENV_PET_NPROC_PER_NODE, "1")
    # torchrun alone sets 1 thread per worker when it starts several, and leaves one worker
    # with every core of the node even under a CPU limit: divide what the pod really has.
    print(f"finetune launch: {set_threads_env(env, int(nproc) if nproc.isdigit() else 1)}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="finetune-exit-") as folder:
        proc = subprocess.Popen(torchrun_command(config, overrides), env={**env, ENV_EXIT_CODE_DIR: folder})

        def forward(signum, _frame):  # torchrun passes it on to the ranks, which save and exit
            proc.send_signal(signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, forward)
        code = proc.wait()
        return launch_exit_code(code, read_exit_codes(Path(folder)))


if __name__ == "__main__":
    run_torchrun(sys.argv[1:])
