"""pytest fixtures over the Kubernetes API emulator (finetune_operator.testing.kube_emulator).

Register the plugin once, in a conftest.py: `pytest_plugins = ["finetune_operator.testing.fixtures"]`.

- `emulator`: an `EmulatorThread` serving the API on loopback for one test;
- `cluster`: a `Cluster` on it (kubectl and the training operator, through the official client);
- `operator`: the real operator (`OperatorThread`) against it, stopped after the test.

The emulator (and so kmock) is imported only when a test asks for one of these, so
registering the plugin costs a suite that never uses them nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from finetune_operator.testing.kube_emulator import Cluster, EmulatorThread, OperatorThread


@pytest.fixture
def emulator() -> Iterator[EmulatorThread]:
    from finetune_operator.testing.kube_emulator import EmulatorThread

    with EmulatorThread() as emu:
        yield emu


@pytest.fixture
def cluster(emulator: EmulatorThread) -> Cluster:
    from finetune_operator.testing.kube_emulator import Cluster

    return Cluster(emulator)


@pytest.fixture
def operator(emulator: EmulatorThread) -> Iterator[OperatorThread]:
    from finetune_operator.testing.kube_emulator import OperatorThread

    op = OperatorThread(emulator.url).start()
    yield op
    if not op.stop_flag.is_set():
        op.stop()
