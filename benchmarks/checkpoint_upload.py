"""Checkpoint upload (and download) throughput: our uploader vs plain boto3, same bytes, same run.

Starts a moto_server on loopback, writes a ~200 MB checkpoint-shaped folder, then per round:
  raw   boto3 `client.upload_file` per file (default TransferConfig), one file after another
  ours  BackgroundUploader.submit + wait: transfer manager, files in parallel, sha256 of every
        file, manifest written last, retention
and the same for downloads (`client.download_file` vs `download_checkpoint`, which checks sha256).
Prints MB/s per method (median of rounds, order alternated), the ratio ours/raw, and how long `submit` held the
caller (what training waits for).

    .venv/bin/python benchmarks/checkpoint_upload.py [--mb 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from s3_server import AWS_ENV, MotoServer, make_bucket  # noqa: E402

MB = 1_000_000


def write_checkpoint(folder: Path, total_mb: int) -> int:
    """The shapes of a Trainer checkpoint: one big weights file, optimizer state, small files."""
    weights = int(total_mb * MB * 0.64)
    files = {
        "model.safetensors": weights,
        "optimizer.pt": int(total_mb * MB * 0.32),
        "tokenizer.json": 3_500_000,
        "scheduler.pt": 1_500,
        "rng_state.pth": 14_000,
        "trainer_state.json": 2_000,
        "config.json": 800,
        "training_args.bin": 5_000,
    }
    folder.mkdir(parents=True)
    for name, size in files.items():
        with open(folder / name, "wb") as fh:
            for start in range(0, size, 16 * MB):
                fh.write(os.urandom(min(16 * MB, size - start)))
    return sum(files.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="checkpoint size in MB")
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()

    import boto3

    from finetune_trainer.storage import BackgroundUploader, download_checkpoint, list_complete, open_store

    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    try:
        with MotoServer() as server:
            os.environ.update({**AWS_ENV, "AWS_ENDPOINT_URL": server.endpoint})
            bucket = make_bucket(server.endpoint, "bench")
            folder = work / "out" / "checkpoint-100"
            total = write_checkpoint(folder, opts.mb)
            files = sorted(p for p in folder.iterdir() if p.is_file())
            client = boto3.client("s3")
            store = open_store(f"s3://{bucket}/ns/job")
            uploader = BackgroundUploader(store, save_total_limit=1)
            results: dict[str, list[float]] = {k: [] for k in ("raw_up", "ours_up", "raw_down", "ours_down", "submit")}
            print(f"checkpoint: {len(files)} files, {total / MB:.0f} MB; moto_server {server.endpoint}; {opts.rounds} rounds")
            for r in range(opts.rounds):
                step = 100 + r

                def raw_up() -> None:
                    t = time.perf_counter()
                    for path in files:
                        client.upload_file(str(path), bucket, f"raw/{r}/{path.name}")
                    results["raw_up"].append(time.perf_counter() - t)

                def ours_up() -> None:
                    t = time.perf_counter()
                    uploader.submit(folder, step)
                    results["submit"].append(time.perf_counter() - t)
                    assert uploader.wait(), uploader.status.last_error
                    results["ours_up"].append(time.perf_counter() - t)

                for run in (raw_up, ours_up) if r % 2 == 0 else (ours_up, raw_up):  # alternate who goes first
                    run()

                down = work / f"raw-down-{r}"
                down.mkdir()
                t = time.perf_counter()
                for path in files:
                    client.download_file(bucket, f"raw/{r}/{path.name}", str(down / path.name))
                results["raw_down"].append(time.perf_counter() - t)

                manifest = list_complete(store)[0]
                t = time.perf_counter()
                download_checkpoint(store, manifest, work / f"ours-down-{r}" / manifest.name)
                results["ours_down"].append(time.perf_counter() - t)

                for path in (down, work / f"ours-down-{r}"):
                    shutil.rmtree(path)
                client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": f"raw/{r}/{p.name}"} for p in files]})
            uploader.close()

        med = {k: statistics.median(v) for k, v in results.items()}
        rate = {k: total / MB / med[k] for k in ("raw_up", "ours_up", "raw_down", "ours_down")}
        spread = {k: f"{total / MB / max(v):.0f}-{total / MB / min(v):.0f}" for k, v in results.items() if k != "submit"}
        print(f"per-round MB/s range: {spread}")
        print(f"upload    raw boto3 {rate['raw_up']:7.1f} MB/s   ours {rate['ours_up']:7.1f} MB/s   "
              f"ratio {rate['ours_up'] / rate['raw_up']:.2f}   (ours includes sha256 + manifest + retention)")
        print(f"download  raw boto3 {rate['raw_down']:7.1f} MB/s   ours {rate['ours_down']:7.1f} MB/s   "
              f"ratio {rate['ours_down'] / rate['raw_down']:.2f}   (ours verifies sha256)")
        print(f"submit() held the training thread {med['submit'] * 1000:.2f} ms (median)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
