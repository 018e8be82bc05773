"""Threads per process (cpu_threads.py): what a process may use (affinity, cgroup quota) divided
by the processes sharing it, a user's OMP_NUM_THREADS kept; and `finetune run` applying it to
every replica of a multi-node job."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune_trainer.cpu_threads import (
    CpuBudget,
    available_cpus,
    cgroup_quota,
    set_threads_env,
    threads_per_process,
)


def _files(tmp_path: Path, v2: str | None = None, v1: tuple[str, str] | None = None) -> dict[str, Path]:
    paths = {"v2": tmp_path / "cpu.max", "v1_quota": tmp_path / "quota", "v1_period": tmp_path / "period"}
    if v2 is not None:
        paths["v2"].write_text(v2)
    if v1 is not None:
        paths["v1_quota"].write_text(v1[0])
        paths["v1_period"].write_text(v1[1])
    return paths


@pytest.mark.parametrize("v2, v1, expected", [
    ("max 100000\n", None, None),  # cgroup v2, no limit
    ("150000 100000\n", None, 1.5),  # limits.cpu: 1500m
    (None, ("-1", "100000"), None),  # cgroup v1, no limit
    (None, ("400000", "100000"), 4.0),
    (None, None, None),  # neither (macOS, a bare VM)
    ("garbage", None, None),
])
def test_cgroup_quota(tmp_path, v2, v1, expected):
    assert cgroup_quota(**_files(tmp_path, v2, v1)) == expected


@pytest.mark.parametrize("quota, affinity, cpus", [(None, 8, 8), (2.5, 8, 3), (16.0, 8, 8), (0.2, 4, 1)])
def test_available_cpus_is_the_lower_of_affinity_and_quota(quota, affinity, cpus):
    # quota None means "read it": pass a huge one instead so the host's own cgroup cannot interfere
    budget = available_cpus(quota=quota if quota is not None else 1e9, affinity=affinity)
    assert budget.cpus == cpus


@pytest.mark.parametrize("processes, threads", [(1, 8), (2, 4), (3, 2), (16, 1)])
def test_threads_are_divided_among_the_processes(processes, threads):
    assert threads_per_process(processes, CpuBudget(8, "test")) == threads


def test_a_users_omp_num_threads_wins():
    env = {"OMP_NUM_THREADS": "3"}
    note = set_threads_env(env, 2, budget=CpuBudget(8, "test"))
    assert env["OMP_NUM_THREADS"] == "3" and "as set" in note
    child: dict[str, str] = {}
    set_threads_env(child, 2, user_env={"OMP_NUM_THREADS": "5"}, budget=CpuBudget(8, "test"))
    assert "OMP_NUM_THREADS" not in child  # inherited from the user's shell as it is
    set_threads_env(child, 2, user_env={}, budget=CpuBudget(8, "8 CPUs"))
    assert child["OMP_NUM_THREADS"] == "4"


@pytest.mark.parametrize("backend", ["pytorchjob", "jobset", "trainjob"])
def test_finetune_run_gives_each_replica_its_share(tmp_path, backend):
    from finetune_operator.local import plan
    from finetune_operator.render import RenderSettings

    job = yaml.safe_load((Path(__file__).parent.parent / "examples" / "finetunejob-smollm2-lora.yaml").read_text())
    job["spec"].update(nodes=2, backend=backend)
    budget = available_cpus()
    the_plan = plan(job, RenderSettings(), tmp_path, base_env={})
    assert {r.env["OMP_NUM_THREADS"] for r in the_plan.replicas} == {str(max(1, budget.cpus // 2))}
    assert "2 process(es)" in the_plan.threads
    kept = plan(job, RenderSettings(), tmp_path / "b", base_env={"OMP_NUM_THREADS": "7"})
    assert {r.env["OMP_NUM_THREADS"] for r in kept.replicas} == {"7"}
