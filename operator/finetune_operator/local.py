"""`finetune run`: the workload that render() makes, run as processes on this machine.

Each pod (a PyTorchJob's Master then Workers; a JobSet's or TrainJob's Indexed pods 0..n-1)
becomes one process with the container's command and environment plus what that backend's
controllers would inject, so a laptop runs the cluster's code path for each env contract
(contract.py): same config file, same launcher, same rendezvous.

- pytorchjob: the training operator's MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK and PET_*;
- jobset: the env the operator rendered, with its downward-API fields resolved as the kubelet
  would for that pod (PET_NODE_RANK from the Job completion index annotation), plus the Job
  controller's JOB_COMPLETION_INDEX;
- trainjob: the torch plug-in's PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_*.

The rendezvous host is 127.0.0.1 where a cluster would give a pod's DNS name (the JobSet
hostname <job>-node-0-0.<job> does not resolve here), and the port a free one.

What differs from a pod, and why:
- the config is the ConfigMap's, written to <run dir>/<replica>/config.yaml, with the
  output directory in that replica's folder (pods each have their own /workspace);
- storage is file://<run dir>/storage when neither the spec nor a flag names one;
- a PersistentVolumeClaim is a local directory named by `--volume CLAIM=DIR`: spec.model_volume's
  (model.base_model and model.tokenizer under its mount_path are read from DIR, with its
  sub_path) and spec.model_cache's; the model cache is <run dir>/model-cache, one for every
  replica, when the job has spec.model_cache (FINETUNE_MODEL_CACHE_SHARED=1, as in the pods),
  else <run dir>/<replica>/model-cache each, like the pods' own emptyDirs;
- `finetune ...` (train, or launch for torchrun) becomes `sys.executable -m ...`, so the run
  uses this interpreter whatever PATH says;
- Secrets do not exist here: a variable the pod reads from a Secret is inherited from this
  shell when set (HF_TOKEN, AWS_*), else left out; HF_HOME stays this machine's cache;
- there is no API server: progress is printed, not patched into a status.

Ctrl-C or SIGTERM is forwarded to every replica as SIGTERM (the trainer saves a checkpoint
on it); a second one kills them. The first replica to fail stops the others; the run exits
with that replica's code, else with the Master's.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from finetune_trainer.config import ConfigError, ConfigIssue
from finetune_trainer.config.loader import parse_yaml
from finetune_trainer.cpu_threads import set_threads_env

from finetune_trainer import contract as c
from .render import RenderSettings, is_under, render
from .spec import ModelCacheSpec, ModelVolumeSpec, StorageSpec

TRAINER_MODULE = "finetune_trainer.cli"
# Pod-only variables that mean nothing (or the wrong thing) on this machine.
POD_ONLY_ENV = {c.ENV_HF_HOME, c.ENV_STATUS_URL, c.ENV_STATUS_TOKEN_FILE, c.ENV_STATUS_CA_FILE}


@dataclass
class LocalReplica:
    """One process of a local run: a pod of the workload with the env that pod would have."""

    name: str  # master-0, worker-0, ... (PyTorchJob); node-0, node-1, ... (JobSet, TrainJob)
    rank: int  # the pod's index: Master 0, Worker i -> i + 1; an Indexed Job's completion index
    argv: list[str]
    env: dict[str, str]
    config_path: Path


@dataclass
class LocalPlan:
    replicas: list[LocalReplica]
    run_dir: Path
    storage_uri: str
    grace_seconds: int
    threads: str = ""  # what set_threads_env chose, for the log


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_settings(job: dict[str, Any], run_dir: Path, settings: RenderSettings) -> RenderSettings:
    """The operator's settings for this machine: no status API, storage under the run dir, model
    paths this machine's."""
    storage = settings.default_storage or StorageSpec(uri=f"file://{run_dir.resolve()}/storage")
    return dataclasses.replace(settings, default_storage=storage, status_api_url=None, local_run=True)


def plan(
    job: dict[str, Any],
    settings: RenderSettings,
    run_dir: Path,
    *,
    base_env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    master_port: int | None = None,
    volumes: Mapping[str, Path] | None = None,
) -> LocalPlan:
    """Render the job and turn its workload's pods into local processes (writes the configs).
    `volumes`: the local directory of each PersistentVolumeClaim the job names (--volume)."""
    base_env = dict(os.environ if base_env is None else base_env)
    local = local_settings(job, run_dir, settings)
    manifests = render(job, local, local.offline_backend((job.get("spec") or {}).get("backend")))
    workload, config_map = manifests[-1], manifests[0]
    port = master_port or free_port()
    config = parse_yaml(config_map["data"][c.CONFIG_FILE])
    _absolute_deepspeed_path(config, base_dir or Path.cwd())
    shared_cache = _local_claims(job["spec"], config, dict(volumes or {}), run_dir)

    replicas = []
    for pod in local_pods(workload, port):
        folder = run_dir / pod.name
        folder.mkdir(parents=True, exist_ok=True)
        config["output"]["output_dir"] = str((folder / "output").resolve())
        config_path = (folder / c.CONFIG_FILE).resolve()
        config_path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        env = {**base_env, **pod_env(pod.env, base_env, config_path, pod.metadata), **pod.injected}
        env[c.ENV_MODEL_CACHE] = str((shared_cache or folder / "model-cache").resolve())
        replicas.append(LocalReplica(pod.name, pod.index, local_command(pod.command, config_path), env, config_path))
    storage = config["output"]["storage_uri"]
    grace = job["spec"].get("termination_grace_period_seconds") or 300
    # Every trainer process of every pod shares this machine's CPUs (cpu_threads.py).
    processes = sum(int(r.env.get(c.ENV_PET_NPROC_PER_NODE) or 1) for r in replicas)
    threads = ""
    for replica in replicas:
        threads = set_threads_env(replica.env, processes, user_env=base_env)
    return LocalPlan(replicas, run_dir, storage, grace, threads)


def _local_claims(spec: Mapping[str, Any], config: dict[str, Any], volumes: dict[str, Path],
                  run_dir: Path) -> Path | None:
    """The job's PersistentVolumeClaims on this machine: model paths under spec.model_volume's
    mount read from its --volume directory (in `config`); the shared model cache's directory
    (None: the job has none, each replica caches in its own folder)."""
    volume = ModelVolumeSpec.model_validate(spec["model_volume"]) if spec.get("model_volume") else None
    cache = ModelCacheSpec.model_validate(spec["model_cache"]) if spec.get("model_cache") else None
    claims = {v.claim_name for v in (volume, cache) if v}
    issues = [ConfigIssue("--volume", f"{claim}={folder}: the job names no such claim (spec.model_volume, "
                          f"spec.model_cache: {', '.join(sorted(claims)) or 'none'})")
              for claim, folder in volumes.items() if claim not in claims]
    issues += [ConfigIssue("--volume", f"{claim}={folder}: not a directory")
               for claim, folder in volumes.items() if claim in claims and not Path(folder).is_dir()]
    for key in ("base_model", "tokenizer") if volume else ():
        path = config["model"].get(key)
        if not (isinstance(path, str) and is_under(path, volume.mount_path)):
            continue
        if volume.claim_name not in volumes:
            issues.append(ConfigIssue(f"spec.model.{key}", f"{path} is on the claim {volume.claim_name}, which this "
                                      f"machine does not have: pass --volume {volume.claim_name}=/local/dir"))
            continue
        root = Path(volumes[volume.claim_name]).resolve() / (volume.sub_path or "")
        config["model"][key] = str(root / path[len(volume.mount_path):].lstrip("/"))
    if issues:
        raise ConfigError(issues)
    if cache is None:
        return None
    folder = Path(volumes.get(cache.claim_name) or run_dir / "model-cache")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _absolute_deepspeed_path(config: dict[str, Any], base_dir: Path) -> None:
    """A DeepSpeed file named relative to the manifest stays found from the run dir."""
    ds = config["distributed"].get("deepspeed_config")
    if isinstance(ds, str) and not Path(ds).expanduser().is_absolute():
        config["distributed"]["deepspeed_config"] = str((base_dir / ds).resolve())


@dataclass
class LocalPod:
    """One pod of the workload as its controllers would make it: its index, the container's
    command and env as rendered, the pod's labels/annotations (what downward-API env reads),
    and the env the backend's controllers inject."""

    name: str
    index: int
    command: list[str]
    env: list[dict[str, Any]]
    metadata: dict[str, Any]
    injected: dict[str, str]


def local_pods(workload: Mapping[str, Any], port: int) -> list[LocalPod]:
    """The workload's pods, per backend (see the module docstring)."""
    kind, spec = workload["kind"], workload["spec"]
    if kind == c.PYTORCHJOB_KIND:
        replica_specs = spec["pytorchReplicaSpecs"]
        nproc = int(spec["nprocPerNode"])
        nodes = 1 + replica_specs.get("Worker", {}).get("replicas", 0)
        pods = []
        for rank in range(nodes):
            box = replica_specs["Master" if rank == 0 else "Worker"]["template"]["spec"]["containers"][0]
            pods.append(LocalPod("master-0" if rank == 0 else f"worker-{rank - 1}", rank, box["command"], box["env"],
                                 {}, training_operator_env(rank=rank, nodes=nodes, nproc=nproc, port=port)))
        return pods
    if kind == c.JOBSET_KIND:
        job = spec["replicatedJobs"][0]
        box = job["template"]["spec"]["template"]["spec"]["containers"][0]
        return [LocalPod(f"node-{i}", i, box["command"], box["env"], {
            "labels": {c.JOBSET_NAME_LABEL: workload["metadata"]["name"]},
            "annotations": {c.JOB_COMPLETION_INDEX_ANNOTATION: str(i)},
        }, {c.ENV_JOB_COMPLETION_INDEX: str(i), c.ENV_PET_MASTER_ADDR: "127.0.0.1", c.ENV_PET_MASTER_PORT: str(port),
            c.ENV_PYTHONUNBUFFERED: "1"}) for i in range(int(job["template"]["spec"]["completions"]))]
    if kind == c.TRAINJOB_KIND:
        trainer = spec["trainer"]
        nodes, nproc = int(trainer["numNodes"]), int(trainer["numProcPerNode"])
        return [LocalPod(f"node-{i}", i, trainer["command"], trainer["env"], {}, {
            c.ENV_PET_NNODES: str(nodes), c.ENV_PET_NPROC_PER_NODE: str(nproc), c.ENV_PET_NODE_RANK: str(i),
            c.ENV_PET_MASTER_ADDR: "127.0.0.1", c.ENV_PET_MASTER_PORT: str(port), c.ENV_JOB_COMPLETION_INDEX: str(i),
            c.ENV_PYTHONUNBUFFERED: "1"}) for i in range(nodes)]
    raise ValueError(f"no local mode for {kind}")


def field_ref(path: str, metadata: Mapping[str, Any]) -> str | None:
    """A downward-API fieldPath (metadata.labels['k'], metadata.annotations['k']) on `metadata`."""
    for section in ("labels", "annotations"):
        prefix = f"metadata.{section}['"
        if path.startswith(prefix) and path.endswith("']"):
            return (metadata.get(section) or {}).get(path[len(prefix):-2])
    return None


def pod_env(entries: list[dict[str, Any]], base_env: Mapping[str, str], config_path: Path,
            metadata: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The container's env on this machine: values as given, downward-API fields from the
    pod's metadata, Secret references from this shell (when set), the config path pointing
    at the local file."""
    out = {}
    for entry in entries:
        name = entry["name"]
        if name in POD_ONLY_ENV:
            continue
        ref = ((entry.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
        if "value" in entry:
            out[name] = entry["value"]
        elif ref and (value := field_ref(ref, metadata or {})) is not None:
            out[name] = value
        elif name in base_env:  # valueFrom: a Secret in the cluster, this shell's variable here
            out[name] = base_env[name]
    out[c.ENV_CONFIG] = str(config_path)
    return out


def training_operator_env(*, rank: int, nodes: int, nproc: int, port: int) -> dict[str, str]:
    """What the Kubeflow training operator injects into each replica's `pytorch` container."""
    return {
        c.ENV_MASTER_ADDR: "127.0.0.1",
        c.ENV_MASTER_PORT: str(port),
        c.ENV_WORLD_SIZE: str(nodes * nproc),
        c.ENV_RANK: str(rank),
        c.ENV_PET_NNODES: str(nodes),
        c.ENV_PET_NPROC_PER_NODE: str(nproc),
        c.ENV_PET_NODE_RANK: str(rank),
        c.ENV_PET_MASTER_ADDR: "127.0.0.1",
        c.ENV_PET_MASTER_PORT: str(port),
        c.ENV_PYTHONUNBUFFERED: "1",
    }


def local_command(command: list[str], config_path: Path) -> list[str]:
    """The container's command for this interpreter (`finetune` as a `-m` module)."""
    args = [str(config_path) if a == c.CONFIG_PATH else a for a in command]
    if args[0] == "finetune":
        return [sys.executable, "-m", TRAINER_MODULE, *args[1:]]
    return args


# ------------------------------------------------------------------------------- execution


def exit_code(returncode: int) -> int:
    """A shell's view: killed by signal N -> 128 + N (what the training operator sees too)."""
    return 128 - returncode if returncode < 0 else returncode


def _pump(name: str, stream: TextIO, out: TextIO, lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            out.write(f"[{name}] {line}" if line.endswith("\n") else f"[{name}] {line}\n")
            out.flush()


def execute(replicas: list[LocalReplica], *, grace_seconds: float = 300, out: TextIO | None = None,
            cwd: Path | None = None) -> int:
    """Run the replicas together; return the first failure's exit code, else the Master's.

    Each child gets its own session, so a terminal's Ctrl-C reaches them only through us
    (as SIGTERM, once). Must run in the main thread (it installs signal handlers)."""
    out = out or sys.stdout
    lock = threading.Lock()
    procs: dict[str, subprocess.Popen] = {}
    pumps = []
    for replica in replicas:  # Master first: it hosts the rendezvous
        proc = subprocess.Popen(
            replica.argv, env=replica.env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, text=True, bufsize=1, start_new_session=True,
        )
        procs[replica.name] = proc
        pump = threading.Thread(target=_pump, args=(replica.name, proc.stdout, out, lock), daemon=True)
        pump.start()
        pumps.append(pump)

    state = {"deadline": None, "signals": 0}

    def stop(reason: str) -> None:
        if state["deadline"] is None:
            with lock:
                out.write(f"[finetune run] {reason}: sending SIGTERM to every replica (they save, then exit)\n")
                out.flush()
            state["deadline"] = time.monotonic() + grace_seconds
            for proc in procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)

    def on_signal(signum: int, frame: Any) -> None:
        state["signals"] += 1
        if state["signals"] > 1:
            state["deadline"] = 0.0  # a second Ctrl-C: no more waiting
        stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    codes: dict[str, int] = {}
    first_failure: tuple[str, int] | None = None
    try:
        while len(codes) < len(procs):
            for name, proc in procs.items():
                if name not in codes and proc.poll() is not None:
                    codes[name] = exit_code(proc.returncode)
                    if codes[name] != 0 and first_failure is None:
                        first_failure = (name, codes[name])
                        stop(f"{name} exited with {codes[name]}")
            if state["deadline"] is not None and time.monotonic() > state["deadline"]:
                for proc in procs.values():
                    if proc.poll() is None:
                        proc.kill()
            time.sleep(0.05)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for pump in pumps:
        pump.join(timeout=5)
    with lock:
        summary = ", ".join(f"{r.name} exited {codes[r.name]}" for r in replicas)
        out.write(f"[finetune run] {summary}\n")
        out.flush()
    return first_failure[1] if first_failure else codes[replicas[0].name]


def parse_volumes(values: list[str]) -> dict[str, Path]:
    """--volume CLAIM=DIR (repeatable) -> {claim: dir}."""
    out, issues = {}, []
    for value in values:
        claim, sep, folder = value.partition("=")
        if not (sep and claim and folder):
            issues.append(ConfigIssue("--volume", f"must be CLAIM=DIR (got {value!r})"))
        elif claim in out:
            issues.append(ConfigIssue("--volume", f"{claim} is given twice ({out[claim]} and {folder}); give each claim once"))
        out[claim] = Path(folder).expanduser()
    if issues:
        raise ConfigError(issues)
    return out


def run_local(job: dict[str, Any], args: Any) -> int:
    """`finetune run -f finetune.yaml`: plan, then execute; the run dir is kept for inspection."""
    if getattr(args, "nproc_per_node", None):
        job["spec"]["gpus_per_node"] = args.nproc_per_node  # processes per replica (no GPUs needed)
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="finetune-run-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    the_plan = plan(job, RenderSettings.from_args(args), run_dir, base_dir=Path(args.config).resolve().parent,
                    volumes=parse_volumes(getattr(args, "volume", None) or []))
    names = ", ".join(r.name for r in the_plan.replicas)
    print(f"[finetune run] {len(the_plan.replicas)} replica(s) ({names}) in {run_dir}; storage {the_plan.storage_uri}",
          flush=True)
    print(f"[finetune run] {the_plan.threads}", flush=True)
    code = execute(the_plan.replicas, grace_seconds=the_plan.grace_seconds)
    print(f"[finetune run] {'succeeded' if code == 0 else f'failed (exit {code})'}; results under {the_plan.storage_uri}",
          flush=True)
    return code
