"""`finetune run`'s process layer with a stand-in for the trainer: a tiny Python script that
records its environment, meets the others over TCP at MASTER_ADDR:MASTER_PORT, fails or
waits for SIGTERM on demand. It proves the env a replica gets, that workers find the master
on loopback, exit-code propagation and signal forwarding, without training anything.
(The real trainer runs in test_local_run_e2e.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from io import StringIO
from pathlib import Path

import pytest
import yaml

from finetune_trainer.launch import torchrun_command

from finetune_trainer import contract as c
from finetune_trainer.config import ConfigError
from finetune_operator.local import execute, local_command, parse_volumes, plan
from finetune_operator.render import RenderSettings

pytestmark = pytest.mark.timeout(120)

REPLICA = textwrap.dedent(
    """
    import json, os, signal, socket, sys, time
    out = os.environ["TEST_OUT"]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    keys = [k for k in os.environ if k.startswith(("PET_", "FINETUNE_", "MASTER_", "LOCAL_")) or k in ("RANK", "WORLD_SIZE", "HF_TOKEN", "HF_HOME")]
    with open(f"{out}/env-{rank}.json", "w") as f:
        json.dump({k: os.environ[k] for k in keys}, f)

    def on_term(signum, frame):
        open(f"{out}/sigterm-{rank}", "w").close()
        print(f"rank {rank} saving on SIGTERM", flush=True)
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_term)
    mode = os.environ.get("TEST_MODE", "meet")
    if mode == "meet":  # workers connect to the master, which waits for all of them
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        if rank == 0:
            server = socket.create_server((addr, port))
            seen = []
            for _ in range(world - 1):
                conn, _ = server.accept()
                seen.append(int(conn.recv(16)))
            print(f"master met ranks {sorted(seen)}", flush=True)
        else:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection((addr, port)).sendall(str(rank).encode())
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        sys.exit(f"worker {rank} never reached the master")
                    time.sleep(0.05)
            print(f"worker {rank} met the master", flush=True)
        sys.exit(0)
    if mode == "fail" and rank == int(os.environ["FAIL_RANK"]):
        # fail once every other replica is up with its handler in place (not after a guess of time)
        others = [f"{out}/ready-{r}" for r in range(world) if r != rank]
        while not all(os.path.exists(path) for path in others):
            time.sleep(0.05)
        print(f"rank {rank} failing", flush=True)
        sys.exit(int(os.environ["FAIL_CODE"]))
    print(f"rank {rank} ready", flush=True)
    open(f"{out}/ready-{rank}", "w").close()
    time.sleep(60)
    sys.exit(0)
    """
)


def job(nodes: int, gpus: int = 0, **spec) -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "local-demo", "namespace": "default"},
        "spec": {"model": {"base_model": "m"}, "dataset": {"train_path": "d.jsonl"}, "nodes": nodes,
                 "gpus_per_node": gpus, **spec},
    }


@pytest.fixture
def stand_in(tmp_path):
    script = tmp_path / "replica.py"
    script.write_text(REPLICA)
    out = tmp_path / "out"
    out.mkdir()
    return script, out


def stand_in_replicas(tmp_path, stand_in, nodes, mode="meet", **extra_env):
    script, out = stand_in
    the_plan = plan(job(nodes, hf_token_secret={"name": "hf", "key": "token"}), RenderSettings(), tmp_path / "run",
                    base_env={**os.environ, "HF_TOKEN": "hf_from_shell", "HF_HOME": "/my/cache"})
    for replica in the_plan.replicas:
        replica.argv = [sys.executable, str(script)]
        replica.env.update(TEST_OUT=str(out), TEST_MODE=mode, **{k: str(v) for k, v in extra_env.items()})
    return the_plan


def test_plan_mirrors_the_training_operators_env(tmp_path, stand_in):
    the_plan = stand_in_replicas(tmp_path, stand_in, nodes=3)
    assert [r.name for r in the_plan.replicas] == ["master-0", "worker-0", "worker-1"]
    port = the_plan.replicas[0].env["MASTER_PORT"]
    for rank, replica in enumerate(the_plan.replicas):
        env = replica.env
        assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]) == (str(rank), "3", "127.0.0.1", port)
        assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"], env["PET_NODE_RANK"]) == ("3", "1", str(rank))
        assert (env["PET_MASTER_ADDR"], env["PET_MASTER_PORT"]) == ("127.0.0.1", port)
        assert env["LOCAL_RANK"] == "0" and env["FINETUNE_JOB_NAME"] == "local-demo"
        assert env["HF_TOKEN"] == "hf_from_shell"  # a Secret in the cluster, the shell's variable here
        assert env["HF_HOME"] == "/my/cache"  # not the pod's /workspace cache
        assert c.ENV_STATUS_URL not in env  # no API server to report to
        assert env[c.ENV_CONFIG] == str(replica.config_path) and replica.config_path.is_file()
    configs = [replica.config_path.read_text() for replica in the_plan.replicas]
    assert len(set(configs)) == 3  # each replica its own output_dir ...
    assert all(f"storage_uri: file://{(tmp_path / 'run').resolve()}/storage/default/local-demo" in t for t in configs)


@pytest.mark.parametrize("backend", ["pytorchjob", "jobset", "trainjob"])
def test_a_model_cache_claim_is_one_folder_for_every_replica_else_one_each(tmp_path, backend):
    separate = plan(job(3, backend=backend), RenderSettings(), tmp_path / "a", base_env={}).replicas
    assert [r.env[c.ENV_MODEL_CACHE] for r in separate] == [
        str((tmp_path / "a" / r.name / "model-cache").resolve()) for r in separate]
    assert {r.env[c.ENV_MODEL_CACHE_SHARED] for r in separate} == {"0"}  # each node fetches for itself
    shared = plan(job(3, backend=backend, model_cache={"claim_name": "cache"}), RenderSettings(), tmp_path / "b",
                  base_env={}).replicas
    assert {r.env[c.ENV_MODEL_CACHE] for r in shared} == {str((tmp_path / "b" / "model-cache").resolve())}
    assert {r.env[c.ENV_MODEL_CACHE_SHARED] for r in shared} == {"1"}  # rank 0 fetches for the job
    kept = tmp_path / "my-cache"
    kept.mkdir()
    again = plan(job(2, model_cache={"claim_name": "cache"}), RenderSettings(), tmp_path / "c", base_env={},
                 volumes={"cache": kept}).replicas
    assert {r.env[c.ENV_MODEL_CACHE] for r in again} == {str(kept)}  # --volume cache=DIR: kept between runs


def test_a_model_volume_claim_is_a_local_folder(tmp_path):
    models = tmp_path / "models"
    (models / "hf" / "llama").mkdir(parents=True)
    spec = {"model": {"base_model": "/mnt/models/llama", "tokenizer": "/mnt/models/llama/tok"},
            "model_volume": {"claim_name": "base-models", "mount_path": "/mnt/models", "sub_path": "hf"}}
    the_plan = plan(job(2, **spec), RenderSettings(), tmp_path / "run", base_env={}, volumes={"base-models": models})
    for replica in the_plan.replicas:
        model = yaml.safe_load(replica.config_path.read_text())["model"]
        assert model["base_model"] == str((models / "hf" / "llama").resolve())
        assert model["tokenizer"] == str((models / "hf" / "llama" / "tok").resolve())
    with pytest.raises(ConfigError) as exc:  # the claim exists only in the cluster
        plan(job(1, **spec), RenderSettings(), tmp_path / "run2", base_env={})
    assert [e.path for e in exc.value.errors] == ["spec.model.base_model", "spec.model.tokenizer"]
    assert "--volume base-models=" in exc.value.errors[0].message
    with pytest.raises(ConfigError) as exc:  # a misspelt claim, a missing folder
        plan(job(1, **spec), RenderSettings(), tmp_path / "run3", base_env={},
             volumes={"base-model": models, "base-models": tmp_path / "nowhere"})
    assert [e.path for e in exc.value.errors] == ["--volume", "--volume"]
    # Without a model volume an absolute path is this machine's (a pod would need the volume).
    local = plan(job(1, model={"base_model": str(models)}), RenderSettings(), tmp_path / "run4", base_env={})
    assert yaml.safe_load(local.replicas[0].config_path.read_text())["model"]["base_model"] == str(models)
    assert parse_volumes(["base-models=~/m"]) == {"base-models": Path("~/m").expanduser()}
    with pytest.raises(ConfigError):
        parse_volumes(["base-models"])
    with pytest.raises(ConfigError, match="base-models is given twice"):  # not the last one silently
        parse_volumes(["base-models=/a", "base-models=/b"])


@pytest.mark.parametrize(
    "gpus,argv_tail",
    [
        (0, ["-m", "finetune_trainer.cli", "train", "--config"]),
        (1, ["-m", "finetune_trainer.cli", "train", "--config"]),
        (2, ["-m", "finetune_trainer.cli", "launch", "--config"]),  # launch runs torchrun
    ],
)
def test_commands_run_under_this_interpreter(tmp_path, gpus, argv_tail):
    replica = plan(job(2, gpus), RenderSettings(), tmp_path).replicas[1]
    assert replica.argv == [sys.executable, *argv_tail, str(replica.config_path)]
    assert local_command(["my-script", c.CONFIG_PATH], Path("/x/c.yaml")) == ["my-script", "/x/c.yaml"]


def test_replicas_meet_on_loopback_and_stream_prefixed_output(tmp_path, stand_in):
    the_plan = stand_in_replicas(tmp_path, stand_in, nodes=3)
    out = StringIO()
    assert execute(the_plan.replicas, out=out) == 0
    lines = out.getvalue().splitlines()
    assert "[master-0] master met ranks [1, 2]" in lines
    assert "[worker-1] worker 2 met the master" in lines
    assert lines[-1] == "[finetune run] master-0 exited 0, worker-0 exited 0, worker-1 exited 0"


@pytest.mark.parametrize("fail_rank,code", [(2, 7), (0, 3), (1, 137)])
def test_first_failure_stops_the_others_and_sets_the_exit_code(tmp_path, stand_in, fail_rank, code):
    _, out_dir = stand_in
    the_plan = stand_in_replicas(tmp_path, stand_in, nodes=3, mode="fail", FAIL_RANK=fail_rank, FAIL_CODE=code)
    out = StringIO()
    assert execute(the_plan.replicas, out=out, grace_seconds=20) == code
    survivors = {0, 1, 2} - {fail_rank}
    assert {p.name for p in out_dir.glob("sigterm-*")} == {f"sigterm-{r}" for r in survivors}
    assert f"exited with {code}: sending SIGTERM" in out.getvalue()


def test_a_replica_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path, stand_in):
    script, _ = stand_in
    the_plan = stand_in_replicas(tmp_path, stand_in, nodes=2, mode="fail", FAIL_RANK=0, FAIL_CODE=1)
    stubborn = tmp_path / "stubborn.py"
    stubborn.write_text("import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                        "open(os.environ['TEST_OUT'] + '/ready-1', 'w').close()\ntime.sleep(60)\n")
    the_plan.replicas[1].argv = [sys.executable, str(stubborn)]
    started = time.monotonic()
    assert execute(the_plan.replicas, out=StringIO(), grace_seconds=1) == 1
    assert time.monotonic() - started < 30


DRIVER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from finetune_operator.local import LocalReplica, execute
    spec = json.loads(Path(sys.argv[1]).read_text())
    replicas = [LocalReplica(r["name"], r["rank"], r["argv"], r["env"], Path(r["config"])) for r in spec]
    sys.exit(execute(replicas, grace_seconds=20))
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_reach_every_replica_as_sigterm(tmp_path, stand_in, sig):
    """The driver runs execute() as `finetune run` does (main thread, its own handlers)."""
    _, out_dir = stand_in
    the_plan = stand_in_replicas(tmp_path, stand_in, nodes=2, mode="wait")
    spec = tmp_path / "replicas.json"
    spec.write_text(json.dumps([{"name": r.name, "rank": r.rank, "argv": r.argv, "env": r.env,
                                 "config": str(r.config_path)} for r in the_plan.replicas]))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(driver), str(spec)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 60
    while not all((out_dir / f"ready-{r}").exists() for r in (0, 1)):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output
    assert (out_dir / "sigterm-0").exists() and (out_dir / "sigterm-1").exists(), output
    assert "[master-0] rank 0 saving on SIGTERM" in output and f"{sig.name}: sending SIGTERM" in output


TORCHRUN_REPLICA = textwrap.dedent(
    """
    import json, os
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_PORT")
    with open(os.path.join(os.environ["TEST_OUT"], f"torchrun-{os.environ['RANK']}.json"), "w") as f:
        json.dump({k: os.environ.get(k) for k in keys}, f)
    """
)


@pytest.mark.slow
def test_pet_variables_drive_torchrun_across_two_local_nodes(tmp_path, stand_in):
    """nodes 2 x 2 processes: torchrun (as the pods run it) reads only PET_* and builds a
    4-rank world; each process sees its global rank, local rank and node."""
    _, out_dir = stand_in
    module_dir = tmp_path / "mod"
    module_dir.mkdir()
    (module_dir / "replica_probe.py").write_text(TORCHRUN_REPLICA)
    the_plan = plan(job(2, gpus=2), RenderSettings(), tmp_path / "run")
    for replica in the_plan.replicas:
        assert replica.argv[1:4] == ["-m", "finetune_trainer.cli", "launch"]
        # what `finetune launch` runs, with a probe in place of the trainer
        argv = torchrun_command(str(replica.config_path), [])
        replica.argv = argv[: argv.index("finetune_trainer.cli")] + ["replica_probe"]
        replica.env.update(TEST_OUT=str(out_dir), PYTHONPATH=str(module_dir), OMP_NUM_THREADS="1")
    assert execute(the_plan.replicas, out=StringIO(), grace_seconds=20) == 0
    seen = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in out_dir.glob("torchrun-*.json")}
    assert sorted(seen) == [0, 1, 2, 3]
    for rank, env in seen.items():
        assert env["WORLD_SIZE"] == "4" and env["LOCAL_WORLD_SIZE"] == "2"
        assert env["LOCAL_RANK"] == str(rank % 2) and env["GROUP_RANK"] == str(rank // 2)
