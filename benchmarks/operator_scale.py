"""500 FineTuneJobs applied at once against the API emulator: how fast does each get its PyTorchJob?

    .venv/bin/python benchmarks/operator_scale.py [--jobs 500] [--appliers 8] [--workers 8] [--rate 0] [--no-baseline]

The emulator (finetune_operator.testing.kube_emulator, real HTTP) runs in this process and timestamps every
create as it arrives; the operator (`finetune operator`'s code: kopf, our handlers, the
official client) runs in a child process, so its peak RSS (VmHWM) is its own. Reported:
time from the first FineTuneJob to the last PyTorchJob, p50/p99 of each job's
FineTuneJob-create -> PyTorchJob-create latency, time until every job is Accepted=True in
status, the operator's peak RSS, and the targets (all within 60 s, p99 < 1 s, RSS < 150 MB);
then the CPU the operator and the emulator spent until the last PyTorchJob, and the
operator's API requests per job by verb and resource (what a real API server would serve).

The baseline, measured first in the same run on a fresh emulator (`--baseline-only` runs it
alone): the least API work any operator must do for these jobs, from kopf's lightest handler
(`on.event`, no progress annotations, no retries, no checks, no child watch): render, create
the ConfigMap, ServiceAccount, Role, RoleBinding and PyTorchJob, one status patch, one Event.
Its figures bound what any kopf operator can reach here; the ratio says how far ours is from it.

The emulator shares this machine's cores with the operator and with the appliers, and answers
from Python; a real API server does neither, so these are pessimistic figures for the
operator, not a model of a cluster.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_TOTAL_S, TARGET_P99_S, TARGET_RSS_MB = 60.0, 1.0, 150.0

SPEC = {
    "model": {"base_model": "builtin:SmolLM2-135M-Instruct", "trust_remote_code": False},
    "fine_tuning": {"method": "lora"},
    "training": {"max_steps": 100},
    "dataset": {"format": "alpaca", "train_path": "s3://data/alpaca.jsonl"},
    "storage": {"uri": "s3://bench-bucket"},
}


def serve_operator(url: str, workers: int, baseline: bool) -> None:
    """The child process: the real operator (or the baseline) against `url` until SIGTERM."""
    import logging

    import kopf

    from finetune_operator.kube import Kube
    from finetune_operator.render import RenderSettings
    from finetune_operator.runner import operator_kwargs
    from finetune_operator.testing.kube_emulator import api_configuration

    logging.basicConfig(level=logging.WARNING)
    kwargs = operator_kwargs(kube=Kube(api_configuration(url)), render_settings=RenderSettings(), standalone=True,
                             workers=workers)
    if baseline:
        kwargs["registry"] = baseline_registry()
    kopf.run(**kwargs)


def baseline_registry():
    """The least an operator must do per FineTuneJob, and nothing else (see the docstring)."""
    import asyncio

    import kopf

    from finetune_operator import handlers
    from finetune_operator.kube import JSON_PATCH, status_json_patch
    from finetune_operator.render import render
    from finetune_operator.spec import API_VERSION, GROUP, KIND, PLURAL, VERSION

    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(handlers.login)

    def create_all(kube, job, settings) -> None:
        for manifest in render(job, settings):
            kube.create(manifest)
        meta = job["metadata"]
        fields = {"observedGeneration": 1, "conditions": [{"type": "Accepted", "status": "True", "reason": "Valid"}]}
        kube.patch(API_VERSION, KIND, meta["namespace"], meta["name"], status_json_patch(job, fields),
                   content_type=JSON_PATCH, subresource="status")

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def least(type, body, memo, **_) -> None:
        if type != "ADDED" or body.get("status"):
            return  # its own status write comes back as MODIFIED
        job = handlers.as_job(body)
        await asyncio.get_running_loop().run_in_executor(None, create_all, memo.kube, job, memo.render_settings)
        kopf.event({"apiVersion": API_VERSION, "kind": KIND, "metadata": job["metadata"]},
                   type="Normal", reason="Accepted", message="valid")

    return registry


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set size, from the kernel."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc status")


def cpu_seconds(pid: int) -> float:
    """user + system CPU time the process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


def measure(args: argparse.Namespace, *, baseline: bool) -> dict:
    """One burst against a fresh emulator: the figures of the operator (or of the baseline)."""
    import kmock

    from finetune_operator.testing.kube_emulator import Cluster, EmulatorThread, wait_for

    arrivals: dict[tuple[str, str], float] = {}  # (plural, name) -> when its create reached the server

    async def stamp(request) -> None:
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            arrivals.setdefault((request.resource.plural, request.data["metadata"].get("name", "")), time.monotonic())

    with EmulatorThread() as emulator:
        emulator.call(lambda: emulator.emulator.hooks.append(stamp))
        cluster = Cluster(emulator)
        command = [sys.executable, __file__, "--serve-operator", emulator.url, "--workers", str(args.workers)]
        child = subprocess.Popen(command + (["--baseline-only"] if baseline else []))
        try:
            # The operator is up once it lists FineTuneJobs (then it watches them).
            wait_for(lambda: any(r.resource is not None and r.resource.plural == "finetunejobs"
                                 for r in emulator.requests()), timeout=60, what="the operator's first list")
            rss_idle = peak_rss_mb(child.pid)

            names = [f"job-{i:04d}" for i in range(args.jobs)]
            cpu_before = {"operator": cpu_seconds(child.pid), "emulator": cpu_seconds(os.getpid())}
            start = time.monotonic()

            def apply(index_name: tuple[int, str]) -> None:
                index, name = index_name
                if args.rate:  # paced: job i is due at start + i / rate
                    time.sleep(max(0.0, start + index / args.rate - time.monotonic()))
                cluster.apply_job(name, SPEC, namespace=f"team-{index % 5}")

            with concurrent.futures.ThreadPoolExecutor(args.appliers) as pool:
                list(pool.map(apply, enumerate(names)))
            applied = time.monotonic() - start

            def pytorchjobs_done() -> bool:
                return all(("pytorchjobs", n) in arrivals for n in names)

            wait_for(pytorchjobs_done, timeout=600, what=f"{args.jobs} PyTorchJobs")
            all_children = max(arrivals[("pytorchjobs", n)] for n in names) - start
            burst_cpu = {"operator": cpu_seconds(child.pid) - cpu_before["operator"],
                         "emulator": cpu_seconds(os.getpid()) - cpu_before["emulator"]}

            def all_accepted() -> bool:
                jobs = emulator.objects("finetunejobs")
                return len(jobs) == args.jobs and all(
                    any(c["type"] == "Accepted" and c["status"] == "True" for c in (j.get("status") or {}).get("conditions", []))
                    for j in jobs)

            wait_for(all_accepted, timeout=600, what="every job Accepted=True")
            all_status = time.monotonic() - start
            rss_peak = peak_rss_mb(child.pid)
            operator_cpu = cpu_seconds(child.pid)
        finally:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
        served = collections.Counter(
            f"{r.action.name.lower() if r.action else r.method}{' watch' if r.params.get('watch') else ''} "
            f"{r.resource.plural if r.resource else 'other'}{'/' + r.subresource if r.subresource else ''}"
            for r in emulator.requests() if r.resource is None or r.resource.plural != "finetunejobs" or r.action != kmock.action.CREATE
        )
    latencies = [arrivals[("pytorchjobs", n)] - arrivals[("finetunejobs", n)] for n in names]
    return {"applied": applied, "all_children": all_children, "all_status": all_status, "latencies": latencies,
            "p50": percentile(latencies, 50), "p99": percentile(latencies, 99), "rss_idle": rss_idle,
            "rss_peak": rss_peak, "operator_cpu": operator_cpu, "burst_cpu": burst_cpu, "served": served}


def report(args: argparse.Namespace, name: str, m: dict) -> None:
    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    pace = f"paced at {args.rate:g}/s" if args.rate else "all at once"
    print(f"--- {name}")
    print(f"FineTuneJobs applied:               {args.jobs} in {m['applied']:.2f} s ({pace}, {args.appliers} client threads)")
    print(f"all PyTorchJobs created after:      {m['all_children']:.2f} s   target < {TARGET_TOTAL_S:.0f} s   "
          f"{verdict(m['all_children'] < TARGET_TOTAL_S)}")
    print(f"create -> PyTorchJob latency p50:   {m['p50'] * 1000:.0f} ms")
    print(f"create -> PyTorchJob latency p99:   {m['p99'] * 1000:.0f} ms   target < {TARGET_P99_S * 1000:.0f} ms   "
          f"{verdict(m['p99'] < TARGET_P99_S)}")
    print(f"create -> PyTorchJob latency max:   {max(m['latencies']) * 1000:.0f} ms "
          f"(mean {statistics.mean(m['latencies']) * 1000:.0f} ms)")
    print(f"every job Accepted=True after:      {m['all_status']:.2f} s")
    print(f"operator peak RSS:                  {m['rss_peak']:.0f} MB (idle {m['rss_idle']:.0f} MB)   "
          f"target < {TARGET_RSS_MB:.0f} MB   {verdict(m['rss_peak'] < TARGET_RSS_MB)}")
    cpu = m["burst_cpu"]
    print(f"CPU until the last PyTorchJob:      operator {cpu['operator']:.2f} s ({cpu['operator'] / args.jobs * 1000:.1f} ms/job), "
          f"emulator and clients {cpu['emulator']:.2f} s, in {m['all_children']:.2f} s on {len(os.sched_getaffinity(0))} cores")
    print("operator requests per job:          " + ", ".join(
        f"{k} {v / args.jobs:.2f}" for k, v in m["served"].most_common() if v >= args.jobs / 10))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--appliers", type=int, default=8, help="client threads creating the FineTuneJobs")
    parser.add_argument("--workers", type=int, default=8, help="the operator's handler threads")
    parser.add_argument("--rate", type=float, default=0.0, help="jobs per second (default 0: all at once)")
    parser.add_argument("--no-baseline", action="store_true", help="measure the operator only")
    parser.add_argument("--baseline-only", action="store_true", help="measure the baseline only")
    parser.add_argument("--serve-operator", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_operator:
        serve_operator(args.serve_operator, args.workers, args.baseline_only)
        return 0

    base = None if args.no_baseline else measure(args, baseline=True)
    if base:
        report(args, "baseline: the least API work per job (render, 5 creates, 1 status patch, 1 Event)", base)
    if args.baseline_only:
        return 0
    ours = measure(args, baseline=False)
    report(args, "finetune-operator", ours)
    if base:
        cpu = ours["burst_cpu"]["operator"] / base["burst_cpu"]["operator"]
        print(f"--- ours / baseline: all PyTorchJobs {ours['all_children'] / base['all_children']:.2f}x, "
              f"p99 {ours['p99'] / base['p99']:.2f}x, operator CPU per job {cpu:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
