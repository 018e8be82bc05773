"""Fetching a base model from S3: `fetch_model` (model/fetch.py) vs plain boto3, same files, same
run, against a moto_server on loopback that this script starts.

The model is the built-in SmolLM2-135M-Instruct as `save_pretrained` writes it (model.safetensors
538 MB, tokenizer, configs), or any folder given with --model. Each round (who goes first
alternates) times, on an empty disk:
  raw       boto3 `client.download_file` of every file, one after another, with a TransferConfig
            that sends the same ranged GETs as ours (the part size we use for the largest file,
            range_concurrency in flight): the bytes and the requests are the same, so the ratio is
            our overhead (sha256 of every file, the manifest, the rename into the cache)
  ours      fetch_model of the s3:// folder into an empty model cache
and, once, `raw-default`: download_file with boto3's default TransferConfig (8 MiB parts, 10 in
flight; --no-default skips it: moto_server reads the whole object for every ranged GET, so its
65 ranges of the 538 MB file cost it far more than ours) and the reuse of a complete cache.
Prints MiB/s per method (median over rounds, and the range) and the ratio ours/raw (target >= 0.9).

moto_server runs on its own CPU and the client on the others (unless --no-pin), as in
checkpoint_io.py: a real S3 server does not share the trainer's cores.

    .venv/bin/python benchmarks/model_fetch.py [--rounds 3] [--model DIR] [--no-default] [--no-pin]
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
from checkpoint_io import pin  # noqa: E402
from s3_server import AWS_ENV, MotoServer, make_bucket  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", type=Path, help="a model folder (default: the built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--no-default", action="store_true", help="skip boto3 with its default TransferConfig")
    parser.add_argument("--no-pin", action="store_true", help="let moto_server and the client share every CPU")
    opts = parser.parse_args()

    import boto3
    from boto3.s3.transfer import TransferConfig

    from finetune_trainer.config.schema import FineTuneConfig
    from finetune_trainer.model import builtin
    from finetune_trainer.model.fetch import fetch_model, part_ranges
    from finetune_trainer.storage.stores import MiB, TransferSettings

    model = opts.model or builtin.model_dir()
    files = sorted(p for p in model.rglob("*") if p.is_file())
    rel = [p.relative_to(model).as_posix() for p in files]
    total = sum(p.stat().st_size for p in files)
    settings = TransferSettings()
    largest = max(p.stat().st_size for p in files)
    part = part_ranges(largest, settings)[0][1]
    same_requests = TransferConfig(multipart_threshold=part, multipart_chunksize=part,
                                   max_concurrency=settings.range_concurrency, use_threads=True)
    work = Path(tempfile.mkdtemp(prefix="model-fetch-"))
    try:
        with MotoServer() as server:
            placement = "not pinned (--no-pin)" if opts.no_pin else pin(server.proc.pid)
            os.environ.update({**AWS_ENV, "AWS_ENDPOINT_URL": server.endpoint, "HF_HUB_OFFLINE": "1"})
            bucket = make_bucket(server.endpoint, "bench")
            client = boto3.client("s3")
            start = time.perf_counter()
            for path, key in zip(files, rel):
                client.upload_file(str(path), bucket, f"models/smollm2/{key}")
            print(f"model: {model} ({len(files)} files, {total / MiB:.0f} MiB; largest {largest / MiB:.0f} MiB in "
                  f"{len(part_ranges(largest, settings))} ranges of {part / MiB:.0f} MiB, {settings.range_concurrency} "
                  f"in flight), uploaded in {time.perf_counter() - start:.1f} s")
            print(f"moto_server {server.endpoint}; {opts.rounds} rounds; {os.cpu_count()} CPUs, {placement}", flush=True)
            cfg = FineTuneConfig.model_validate({"model": {"base_model": f"s3://{bucket}/models/smollm2/"}})
            runs: dict[str, list[float]] = {"raw": [], "ours": [], "raw-default": [], "reuse": []}

            def raw(name: str = "raw", config: TransferConfig = same_requests) -> None:
                down = work / "raw"
                for key in rel:
                    (down / key).parent.mkdir(parents=True, exist_ok=True)
                runs[name].append(timed(lambda: [client.download_file(bucket, f"models/smollm2/{key}", str(down / key),
                                                                      Config=config) for key in rel]))
                shutil.rmtree(down)

            def ours() -> None:
                cache = work / "cache"
                os.environ["FINETUNE_MODEL_CACHE"] = str(cache)
                runs["ours"].append(timed(lambda: fetch_model(cfg)))
                runs["reuse"].append(timed(lambda: fetch_model(cfg)))
                shutil.rmtree(cache)

            def report(name: str) -> None:
                seconds = runs[name][-1]
                print(f"  {name:<12} {seconds:7.2f} s  {total / MiB / seconds:7.1f} MiB/s", flush=True)

            for r in range(opts.rounds):
                print(f"round {r + 1}", flush=True)
                for run in (raw, ours) if r % 2 == 0 else (ours, raw):
                    run()
                    report(run.__name__)
            if not opts.no_default:
                raw("raw-default", TransferConfig())
                report("raw-default")

        rate = {k: total / MiB / statistics.median(v) for k, v in runs.items() if v}
        spread = {k: f"{total / MiB / max(v):.0f}-{total / MiB / min(v):.0f}" for k, v in runs.items() if v}
        print(f"fetch from S3   raw boto3 (same ranges) {rate['raw']:6.1f} MiB/s ({spread['raw']})   "
              f"ours {rate['ours']:6.1f} MiB/s ({spread['ours']})   ratio {rate['ours'] / rate['raw']:.2f}   "
              "(ours: + sha256 of every file, manifest, rename into the cache)")
        if "raw-default" in rate:
            print(f"                raw boto3 (default TransferConfig) {rate['raw-default']:6.1f} MiB/s   "
                  f"ratio ours/that {rate['ours'] / rate['raw-default']:.2f}")
        print(f"reuse of a complete cache: {statistics.median(runs['reuse']) * 1000:.0f} ms (median; sizes checked, "
              "no request)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
