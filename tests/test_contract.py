"""The ground floor both programs stand on: world() from each launcher's variables, the
retryable-exit rule, and the CLI finding its extensions by entry point."""

from __future__ import annotations

import pytest

from finetune_trainer import contract as c


@pytest.mark.parametrize("env, expected", [
    ({}, c.World()),  # a plain process
    # torchrun in a 2-node x 2-GPU job, second node, second GPU
    ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
      "GROUP_WORLD_SIZE": "2"}, c.World(3, 1, 4, 2, 1, 2)),
    # a one-process pod of the training operator: RANK/WORLD_SIZE, the render's LOCAL_* and PET_*
    ({"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "PET_NODE_RANK": "2",
      "PET_NNODES": "3"}, c.World(2, 0, 3, 1, 2, 3)),
    # no local world size: nodes from PET_NNODES; junk is ignored, never a crash
    ({"RANK": "x", "PET_NNODES": "2"}, c.World(0, 0, 1, 1, 0, 2)),
])
def test_world(env, expected):
    assert c.world(env) == expected
    assert c.world(env).is_main == (expected.rank == 0)


def test_retryable_exit_codes():
    assert [code for code in (0, 1, 2, 127, 128, 137, 143, 255) if c.exit_code_is_retryable(code)] == [128, 137, 143, 255]


def test_the_cli_finds_its_extensions_by_entry_point():
    from finetune_trainer.cli import COMMAND_GROUP, DOCUMENT_GROUP, _entry_points, build_parser

    assert {ep.value for ep in _entry_points(COMMAND_GROUP)} == {"finetune_trainer.commands", "finetune_operator.commands"}
    assert [ep.value for ep in _entry_points(DOCUMENT_GROUP)] == ["finetune_operator.manifest:load_document"]
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"train", "launch", "preview", "crd", "render", "run", "operator"} <= set(commands)
