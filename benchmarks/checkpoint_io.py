"""Checkpoint I/O of a real SmolLM2-135M checkpoint: our storage layer vs plain boto3, same bytes,
same run, against a moto_server on loopback; and what a resume costs a new pod.

The checkpoint is a real one: `finetune train` of the built-in SmolLM2-135M-Instruct (full
fine-tuning, one step, save_steps 1) writes checkpoint-1 (weights, AdamW state, scheduler, RNG,
tokenizer ...), or pass one with --checkpoint. Then (who goes first alternates by round):
  upload    raw: boto3 `client.upload_file` per file (default TransferConfig), one after another
            ours: BackgroundUploader.submit, the trainer's path: transfer manager, big files
            one after another and small ones beside them, sha256 of every file, manifest
            last; timed until the manifest is written (the checkpoint is complete); the
            retention after it is reported apart (twice each per upload round, ABBA then BAAB)
  download  raw: boto3 `client.download_file` per file, with boto3's default TransferConfig
            (first download round only: moto_server reads the whole object for every ranged
            GET, so its 8 MiB ranges take minutes) and again with ours (16 MiB parts: the
            second ratio is our overhead)
            ours: download_checkpoint (every sha256 checked, renamed into place whole)
  resume    find_resume_checkpoint on an empty disk: list, read manifests, verify sizes,
            download and check the newest complete checkpoint (what a restarted pod waits for)
Prints MB/s per method (median over rounds, and the range), the ratios ours/raw (target >= 0.9),
how long `submit` held the training thread, and the resume overhead in seconds.

moto_server runs on its own CPU and the client on the others (unless --no-pin): a real S3
server does not share the trainer's cores, and moto_server (pure Python, CPU-bound) would
otherwise compete with the client's sha256 of every byte for the same cores.

    .venv/bin/python benchmarks/checkpoint_io.py [--rounds 3] [--download-rounds 2] [--checkpoint DIR] [--no-pin]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from s3_server import AWS_ENV, MotoServer, make_bucket  # noqa: E402

MB = 1_000_000


def real_checkpoint(work: Path) -> Path:
    """checkpoint-1 of one full fine-tuning step of SmolLM2-135M through `finetune train`."""
    config = {
        "model": {"base_model": "builtin:SmolLM2-135M-Instruct"},
        "fine_tuning": {"method": "full"},
        "training": {"max_steps": 1, "micro_batch_size": 1, "max_seq_length": 64, "mixed_precision": "no",
                     "learning_rate": 1e-5, "warmup_ratio": 0.0},
        "dataset": {"format": "alpaca", "train_path": str(REPO / "tests" / "fixtures" / "data" / "alpaca.jsonl")},
        "output": {"output_dir": str(work / "train"), "save_steps": 1, "logging_steps": 1},
    }
    path = work / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("AWS_ENDPOINT_URL", None)
    proc = subprocess.run([sys.executable, "-m", "finetune_trainer.cli", "train", "--config", str(path)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"finetune train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return work / "train" / "checkpoint-1"


def pin(server_pid: int) -> str:
    """moto_server (every thread) on the last CPU, this process on the others."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return "not pinned (1 CPU)"
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), {cpus[-1]})
    os.sched_setaffinity(0, set(cpus[:-1]))
    return f"moto_server on CPU {cpus[-1]}, client on CPU {','.join(map(str, cpus[:-1]))}"


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def report(name: str, seconds: float, size: int) -> None:
    """One line per timed operation as it happens (a round of a full checkpoint takes minutes)."""
    print(f"  {name:<16} {seconds:7.2f} s  {size / MB / seconds:6.1f} MB/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="upload rounds (4 uploads each)")
    parser.add_argument("--download-rounds", type=int, default=2, help="download rounds (a full checkpoint: minutes each)")
    parser.add_argument("--checkpoint", type=Path, help="an existing checkpoint folder (default: make one)")
    parser.add_argument("--no-pin", action="store_true", help="let moto_server and the client share every CPU")
    opts = parser.parse_args()

    import boto3

    from finetune_trainer.storage import BackgroundUploader, download_checkpoint, find_resume_checkpoint, open_store
    from finetune_trainer.storage.checkpoints import list_checkpoints, list_complete, verify
    from finetune_trainer.storage.stores import transfer_config

    work = Path(tempfile.mkdtemp(prefix="ckpt-io-"))
    try:
        t = time.perf_counter()
        source = opts.checkpoint or real_checkpoint(work)
        made = time.perf_counter() - t
        folder = work / "out" / "checkpoint-100"
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns("manifest.json"))
        files = files_of(folder)
        rel = [p.relative_to(folder).as_posix() for p in files]
        total = sum(p.stat().st_size for p in files)
        largest = sorted(files, key=lambda p: -p.stat().st_size)[:3]

        with MotoServer() as server:
            placement = "not pinned (--no-pin)" if opts.no_pin else pin(server.proc.pid)
            os.environ.update({**AWS_ENV, "AWS_ENDPOINT_URL": server.endpoint})
            bucket = make_bucket(server.endpoint, "bench")
            client = boto3.client("s3")
            store = open_store(f"s3://{bucket}/ns/job")
            completed: list[float] = []  # when each checkpoint's manifest was written
            uploader = BackgroundUploader(store, save_total_limit=1,
                                          on_uploaded=lambda manifest: completed.append(time.perf_counter()))
            tuned = transfer_config(store.transfer)
            print(f"checkpoint: {len(files)} files, {total / MB:.0f} MB "
                  f"({', '.join(f'{p.name} {p.stat().st_size / MB:.0f} MB' for p in largest)})"
                  + (f"; made by finetune train in {made:.0f} s" if not opts.checkpoint else ""))
            print(f"moto_server {server.endpoint}; {opts.rounds} upload rounds, {opts.download_rounds} download rounds; {os.cpu_count()} CPUs, {placement}")
            runs: dict[str, list[float]] = {k: [] for k in ("raw_up", "ours_up", "retention", "submit", "raw_down",
                                                            "raw_tuned_down", "ours_down", "find", "resume")}
            state = {"folder": folder, "step": 100}

            def raw_up() -> None:
                runs["raw_up"].append(timed(lambda: [client.upload_file(str(state["folder"] / k), bucket, f"raw/{k}")
                                                     for k in rel]))

            def ours_up() -> None:
                """Time until the checkpoint is complete in storage (manifest written); the
                retention that follows (deleting the previous one) is reported apart."""
                state["step"] += 1  # a newer checkpoint each time: the uploader ignores older ones
                state["folder"] = state["folder"].rename(state["folder"].with_name(f"checkpoint-{state['step']}"))
                start = time.perf_counter()
                uploader.submit(state["folder"], state["step"])
                runs["submit"].append(time.perf_counter() - start)
                assert uploader.wait(), uploader.status.last_error
                runs["ours_up"].append(completed[-1] - start)
                runs["retention"].append(time.perf_counter() - completed[-1])

            def raw_down(name: str = "raw_down", **config) -> None:
                down = work / "raw-down"
                for k in rel:
                    (down / k).parent.mkdir(parents=True, exist_ok=True)
                runs[name].append(timed(lambda: [client.download_file(bucket, f"raw/{k}", str(down / k), **config)
                                                 for k in rel]))
                shutil.rmtree(down)

            def raw_tuned_down() -> None:
                raw_down("raw_tuned_down", Config=tuned)

            def ours_down() -> None:
                manifest = list_complete(store)[0]
                runs["ours_down"].append(timed(lambda: download_checkpoint(store, manifest, work / "down" / manifest.name)))
                shutil.rmtree(work / "down")

            def resume() -> None:
                """A new pod: nothing on disk; find, verify, download the newest complete checkpoint."""
                start = time.perf_counter()
                problems = verify(store, list_complete(store)[0], listing=list_checkpoints(store))
                runs["find"].append(time.perf_counter() - start)
                assert not problems, problems
                start = time.perf_counter()
                resumed = find_resume_checkpoint(store, work / "pod")
                runs["resume"].append(time.perf_counter() - start)
                assert resumed is not None and resumed.name == f"checkpoint-{state['step']}", resumed
                shutil.rmtree(work / "pod")

            for r in range(opts.rounds):  # ABBA within a round, BAAB in the next: drift cancels
                print(f"upload round {r + 1}", flush=True)
                for run in (raw_up, ours_up, ours_up, raw_up) if r % 2 == 0 else (ours_up, raw_up, raw_up, ours_up):
                    run()
                    report(run.__name__, runs[run.__name__][-1], total)
            for r in range(opts.download_rounds):
                print(f"download round {r + 1}", flush=True)
                # boto3's default TransferConfig downloads 8 MiB ranges, and moto_server reads the
                # whole object for every ranged GET: minutes per round, so it runs in the first only
                plain = (raw_down,) if r == 0 else ()
                for run in (*plain, raw_tuned_down, ours_down) if r % 2 == 0 else (ours_down, raw_tuned_down, *plain):
                    run()
                    report(run.__name__, runs[run.__name__][-1], total)
            resume()
            report("resume", runs["resume"][-1], total)
            uploader.close()

        med = {k: statistics.median(v) for k, v in runs.items()}
        rate = {k: total / MB / med[k] for k in ("raw_up", "ours_up", "raw_down", "raw_tuned_down", "ours_down")}
        spread = {k: f"{total / MB / max(runs[k]):.0f}-{total / MB / min(runs[k]):.0f}" for k in rate}
        print(f"upload    raw boto3 {rate['raw_up']:6.1f} MB/s ({spread['raw_up']})   ours {rate['ours_up']:6.1f} MB/s "
              f"({spread['ours_up']})   ratio {rate['ours_up'] / rate['raw_up']:.2f}   "
              f"(ours: + sha256, manifest; then retention {med['retention']:.2f} s in the background)")
        print(f"download  raw boto3 {rate['raw_down']:6.1f} MB/s ({spread['raw_down']})   ours {rate['ours_down']:6.1f} MB/s "
              f"({spread['ours_down']})   ratio {rate['ours_down'] / rate['raw_down']:.2f}   (ours: + sha256 check)")
        print(f"download  raw boto3 with our TransferConfig {rate['raw_tuned_down']:6.1f} MB/s ({spread['raw_tuned_down']})"
              f"   ratio ours/that {rate['ours_down'] / rate['raw_tuned_down']:.2f}")
        print(f"submit() held the training thread {med['submit'] * 1000:.2f} ms (median)")
        print(f"resume overhead on an empty disk: {med['resume']:.2f} s (median; {min(runs['resume']):.2f}-"
              f"{max(runs['resume']):.2f}), of which finding and verifying the newest complete checkpoint "
              f"{med['find'] * 1000:.0f} ms; the rest is the download and its sha256 check")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
