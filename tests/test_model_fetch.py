"""Base models from s3://, a mounted path and the Hub, fetched once per job (model/fetch.py).

Against a real moto_server over HTTP: the fetched folder is byte for byte the uploaded one, a
second fetch sends no request at all (counted in moto_server's own log), a fetcher SIGKILLed
mid-download leaves nothing the next one trusts, the ranks that do not fetch wait for the one
that does, a Hub model is mirrored by node 0 for the other nodes, and `finetune train` from
s3:// trains exactly as from the same folder on a (mounted) local path. The Hub itself is never
called (HF_HUB_OFFLINE=1 here): the Hub snapshot is a local folder standing in for it, and what
offline mode does when the model is nowhere is the error a user gets.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest
import yaml
from s3_server import TcpGate
from test_checkpoint_resume_single import kill_pod, no_pod_outlives_its_test, start_pod, tail, wait_until  # noqa: F401
from test_train_e2e import metrics, run_train, tiny_config

from finetune_trainer.config import ConfigError, load_config
from finetune_trainer.config.rules import model_source_kind
from finetune_trainer.config.schema import FineTuneConfig
from finetune_trainer.contract import MODEL_MANIFEST_FILE, World
from finetune_trainer.model import fetch
from finetune_trainer.model.fetch import (
    FetchedModel,
    cache_entry,
    complete,
    fetch_model,
    fetches,
    hub_offline,
    loading_config,
    part_ranges,
    recorded_config,
    wanted,
)
from finetune_trainer.storage.stores import MiB, TransferSettings

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def config(base_model: str, **model) -> FineTuneConfig:
    return FineTuneConfig.model_validate({"model": {"base_model": base_model, **model}})


def env_for(cache: Path, **extra: str) -> dict[str, str]:
    """A process's environment: this one's (the AWS settings the fixtures set), its own cache."""
    return {**os.environ, "FINETUNE_MODEL_CACHE": str(cache), **extra}


def upload(folder: Path, bucket: str, prefix: str) -> str:
    client = boto3.client("s3")
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/{prefix}/"


def tree(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file but the manifest."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MODEL_MANIFEST_FILE}


def object_gets(moto_server, bucket: str) -> int:
    """GETs of objects (not listings) in `bucket` that moto_server has logged, once the count
    stops moving (a line is logged as its response ends)."""
    count, last = -1, len(moto_server.requests("GET", f"/{bucket}/"))
    while count != last:
        time.sleep(0.2)
        count, last = last, len(moto_server.requests("GET", f"/{bucket}/"))
    return count


# ------------------------------------------------------------------------ pure parts


@pytest.mark.parametrize("size, parts", [
    (0, 0), (10, 1), (5 * MiB, 1), (16 * MiB, 1), (16 * MiB + 1, 2), (100 * MiB, 7), (200 * MiB, 8),
    (538_090_408, 16), (10 * 1024 * MiB, 160),
], ids=["empty", "tiny", "5MiB", "one part", "just over", "100MiB", "200MiB: one per stream",
        "SmolLM2: two rounds of 8", "10GiB: 64MiB parts"])
def test_part_ranges_cover_the_file_in_whole_mib(size, parts):
    ranges = part_ranges(size, TransferSettings())
    assert len(ranges) == parts
    assert sum(length for _, length in ranges) == size
    assert all(start == prev_start + prev_len for (prev_start, prev_len), (start, _) in zip(ranges, ranges[1:]))
    assert all(length % MiB == 0 and length <= 64 * MiB for _, length in ranges[:-1])


def test_cache_entries_are_per_source_and_requested_revision(tmp_path):
    a = cache_entry(tmp_path, "org/model", None)
    assert a == cache_entry(tmp_path, "org/model", None) and a.parent == tmp_path
    assert a != cache_entry(tmp_path, "org/model", "v1.0") != cache_entry(tmp_path, "org/other", "v1.0")
    assert cache_entry(tmp_path, "s3://bucket/models/llama/", None).name.startswith("bucket-models-llama-")


@pytest.mark.parametrize("value, offline", [("1", True), ("true", True), ("ON", True), ("0", False), ("", False)])
def test_hub_offline_reads_the_variable_as_huggingface_hub_does(value, offline):
    assert hub_offline({"HF_HUB_OFFLINE": value}) is offline


@pytest.mark.parametrize("here, shared, fetcher", [
    (World(rank=0, local_rank=0), False, True), (World(rank=3, local_rank=0, node_rank=1), False, True),
    (World(rank=1, local_rank=1), False, False), (World(rank=3, local_rank=0, node_rank=1), True, False),
    (World(rank=0, local_rank=0), True, True),
], ids=["rank 0", "node 1 local 0", "local 1", "shared: only rank 0", "shared rank 0"])
def test_who_fetches(here, shared, fetcher):
    assert fetches(here, shared) is fetcher


@pytest.mark.parametrize("key, ok", [
    ("model.safetensors", True), ("config.json", True), ("tokenizer.json", True), ("chat_template.jinja", True),
    ("merges.txt", True), ("modeling_custom.py", True), ("manifest.json", False), (MODEL_MANIFEST_FILE, False),
    ("pytorch_model.bin", False), ("checkpoint-4/model.safetensors", False), ("README.md", False),
])
def test_which_objects_of_a_folder_are_fetched(key, ok):
    assert wanted(key, fetch.MODEL_FILES) is ok


@pytest.mark.parametrize("base_model, kind", [
    ("builtin:SmolLM2-135M-Instruct", "builtin"), ("s3://b/m/", "s3"), ("/models/llama", "local"),
    ("./m", "local"), ("weights/m.Q4.gguf", "local"), ("HuggingFaceTB/SmolLM2-135M-Instruct", "hub"),
])
def test_model_source_kind(base_model, kind):
    assert model_source_kind(base_model) == kind


@pytest.mark.parametrize("base_model, what", [
    ("builtin:SmolLM2-135M-Instruct", "a built-in model"), ("s3://b/m/", "an s3:// folder"),
    ("/models/llama", "a local path"),
])
def test_a_revision_needs_a_hub_model(tmp_path, base_model, what):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"base_model": base_model, "revision": "v1.0"}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert [str(e) for e in err.value.errors] == [
        f"model.revision: pins a Hugging Face Hub commit, but model.base_model {base_model!r} is {what}, which has "
        "no revisions; remove model.revision (or give a Hub ID as base_model)"]
    path.write_text(yaml.safe_dump({"model": {"base_model": "org/model", "revision": "v1.0"}}))
    assert load_config(path).config.model.revision == "v1.0"


def test_the_run_records_the_source_and_loads_the_copy(tmp_path):
    cfg = config("org/model", tokenizer="s3://b/tok/")
    fetched = FetchedModel("org/model", tmp_path / "m", COMMIT, tmp_path / "t")
    recorded = recorded_config(cfg, fetched)
    assert (recorded.model.base_model, recorded.model.revision, recorded.model.tokenizer) == ("org/model", COMMIT, "s3://b/tok/")
    loading = loading_config(recorded, fetched)
    assert (loading.model.base_model, loading.model.revision, loading.model.tokenizer) == (
        str(tmp_path / "m"), None, str(tmp_path / "t"))
    assert fetched.status() == {"source": "org/model", "revision": COMMIT}
    local = config(str(tmp_path))
    assert loading_config(local, FetchedModel(str(tmp_path))) is local
    assert FetchedModel("s3://b/m/", tmp_path).status() == {"source": "s3://b/m/"}


# ------------------------------------------------------------------------ s3:// on moto_server


def test_an_s3_model_is_fetched_once_then_reused(tmp_path, tiny_model_dir, moto_server, s3_bucket, caplog):
    caplog.set_level("INFO", logger="finetune_trainer.model.fetch")
    uri = upload(tiny_model_dir, s3_bucket, "models/tiny")
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="models/tiny/checkpoint-4/optimizer.pt", Body=b"not a model file")
    cache = tmp_path / "cache"
    fetched = fetch_model(config(uri), env_for(cache))
    assert fetched.local_dir.parent == cache and fetched.revision is None and fetched.tokenizer_dir is None
    assert tree(fetched.local_dir) == tree(tiny_model_dir)  # the sub-folder's object is not fetched
    manifest = complete(fetched.local_dir)
    assert manifest.source == uri and {f.path: f.sha256 for f in manifest.files} == tree(tiny_model_dir)
    assert any(r.getMessage().startswith(f"model: fetched {uri} (") and "MiB/s" in r.getMessage() for r in caplog.records)
    gets = object_gets(moto_server, s3_bucket)
    assert gets >= len(tree(tiny_model_dir))

    again = fetch_model(config(uri), env_for(cache))
    assert again == fetched
    assert object_gets(moto_server, s3_bucket) == gets  # not one request: the cache is complete
    assert any(r.getMessage().startswith(f"model: reusing cache {fetched.local_dir}") for r in caplog.records)


def test_an_incomplete_cache_folder_is_fetched_again(tmp_path, tiny_model_dir, moto_server, s3_bucket):
    uri = upload(tiny_model_dir, s3_bucket, "m")
    cache = tmp_path / "cache"
    entry = fetch_model(config(uri), env_for(cache)).local_dir
    with (entry / "model.safetensors").open("r+b") as fh:  # a file cut short: its size is wrong
        fh.truncate(100)
    assert complete(entry) is None
    before = object_gets(moto_server, s3_bucket)
    assert fetch_model(config(uri), env_for(cache)).local_dir == entry
    assert tree(entry) == tree(tiny_model_dir) and object_gets(moto_server, s3_bucket) > before
    (entry / MODEL_MANIFEST_FILE).unlink()  # no manifest: never trusted
    assert complete(entry) is None
    fetch_model(config(uri), env_for(cache))
    assert complete(entry) is not None


FETCH = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from finetune_trainer.config.schema import FineTuneConfig
from finetune_trainer.model.fetch import fetch_model
print(fetch_model(FineTuneConfig.model_validate({"model": {"base_model": sys.argv[1]}})).local_dir)
"""


def test_a_fetcher_killed_mid_download_leaves_nothing_trusted(tmp_path, moto_server, s3_bucket):
    """SIGKILL (OOM, node loss) once the first bytes are on disk, through a slow network: the
    cache holds only a temporary folder; the next fetcher deletes it and fetches it all again."""
    client = boto3.client("s3")
    weights = os.urandom(MiB) * 24
    client.put_object(Bucket=s3_bucket, Key="m/model.safetensors", Body=weights)
    client.put_object(Bucket=s3_bucket, Key="m/config.json", Body=b"{}")
    uri, cache = f"s3://{s3_bucket}/m/", tmp_path / "cache"
    entry = cache_entry(cache, uri, None)
    gate = TcpGate(moto_server.port, rate=MiB // 2)  # 512 KiB/s a connection: the kill comes well before the end
    gate.up()
    log = tmp_path / "fetch.log"
    try:
        proc = start_pod([sys.executable, "-c", FETCH, uri], log, env_for(cache, AWS_ENDPOINT_URL=gate.endpoint))

        def partial() -> Path | None:
            for folder in cache.glob(f"{entry.name}.*"):
                target = folder / "model.safetensors"
                if target.is_file() and any(target.open("rb").read(65536)):
                    return folder
            return None

        temporary = wait_until(partial, proc, log, "the first bytes on disk", timeout=60)
        kill_pod(proc)
    finally:
        gate.down()
    assert not entry.exists() and complete(entry) is None, tail(log)
    assert temporary.is_dir()  # what the kill left: a folder nothing reads

    before = object_gets(moto_server, s3_bucket)
    fetched = fetch_model(config(uri), env_for(cache))
    assert fetched.local_dir == entry and not temporary.exists()
    assert (entry / "model.safetensors").read_bytes() == weights
    assert object_gets(moto_server, s3_bucket) - before >= len(part_ranges(len(weights), TransferSettings())) + 1


def test_the_other_ranks_wait_for_the_fetcher(tmp_path, tiny_model_dir, s3_bucket):
    uri = upload(tiny_model_dir, s3_bucket, "m")
    cache = tmp_path / "cache"
    local_rank_1 = env_for(cache, RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    with pytest.raises(TimeoutError) as err:
        fetch_model(config(uri), local_rank_1, wait_seconds=0.3, poll_seconds=0.05)
    entry = cache_entry(cache, uri, None)
    assert str(err.value) == (f"model: waited 0 s for this node's local rank 0 to fetch {uri} into {entry}, and its "
                              f"{MODEL_MANIFEST_FILE} is still not there; that process's log says why")
    shared = {**local_rank_1, "FINETUNE_MODEL_CACHE_SHARED": "1", "LOCAL_RANK": "0", "RANK": "2"}
    with pytest.raises(TimeoutError, match="for global rank 0 to fetch"):
        fetch_model(config(uri), shared, wait_seconds=0.1, poll_seconds=0.05)

    waited: list[FetchedModel] = []
    waiter = threading.Thread(target=lambda: waited.append(fetch_model(config(uri), local_rank_1, poll_seconds=0.05)),
                              daemon=True)
    waiter.start()
    fetched = fetch_model(config(uri), env_for(cache, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2"))
    waiter.join(30)
    assert waited == [fetched]


def test_s3_folders_that_are_not_models_are_config_errors(tmp_path, s3_bucket):
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="nothing/config.json", Body=b"{}")
    cases = [
        (f"s3://{s3_bucket}/nothing/", f"model.base_model: s3://{s3_bucket}/nothing/ holds no *.safetensors file at "
         "its top (1 model files); point it at a folder that save_pretrained wrote (safetensors, config.json, tokenizer)"),
        ("s3://no-such-bucket-here/m/", "model.base_model: cannot read s3://no-such-bucket-here/m/: "),
    ]
    for uri, message in cases:
        with pytest.raises(ConfigError) as err:
            fetch_model(config(uri), env_for(tmp_path / "cache"))
        assert str(err.value).startswith(message), err.value


# ------------------------------------------------------------------------ the Hub, without it


def test_offline_a_hub_model_that_is_nowhere_fails_at_once(tmp_path):
    env = env_for(tmp_path / "cache", HF_HUB_OFFLINE="1")
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        fetch_model(config("finetune-tests/not-cached-anywhere"), env)  # huggingface_hub's own snapshot_download
    assert time.monotonic() - start < 10
    (issue,) = err.value.errors
    assert issue.path == "model.base_model"
    assert issue.message.startswith("'finetune-tests/not-cached-anywhere' is a Hugging Face Hub ID and the Hub is off "
                                    "here (HF_HUB_OFFLINE=1), but it is not in the model cache (")
    for source in ("model.base_model: s3://bucket/prefix/", "spec.model_volume", "hub.offline: false"):
        assert source in issue.message


def hub_standin(tiny_model_dir: Path, root: Path, calls: list) -> fetch.Snapshot:
    """huggingface_hub.snapshot_download as the Hugging Face cache lays it out
    (snapshots/<commit>/ of links to blobs), on a local folder."""
    def snapshot(repo_id, *, revision, allow_patterns, local_files_only):
        calls.append((repo_id, revision, local_files_only))
        snap = root / "snapshots" / COMMIT
        if not snap.is_dir():
            (root / "blobs").mkdir(parents=True)
            snap.mkdir(parents=True)
            for path in tiny_model_dir.iterdir():
                blob = root / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
                shutil.copyfile(path, blob)
                (snap / path.name).symlink_to(blob)
        return str(snap)

    return snapshot


def test_a_hub_model_is_mirrored_by_node_0_for_the_other_nodes(tmp_path, tiny_model_dir, s3_bucket):
    storage = f"s3://{s3_bucket}/team-a/job-1"
    cfg = FineTuneConfig.model_validate({"model": {"base_model": "org/tiny", "revision": "v1.0"},
                                         "output": {"storage_uri": storage}})
    # online (the Hub: a stand-in); two nodes of one process each, each with its own cache
    nodes = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "GROUP_WORLD_SIZE": "2", "LOCAL_RANK": "0", "HF_HUB_OFFLINE": "0"}
    node_0 = env_for(tmp_path / "node-0", RANK="0", GROUP_RANK="0", **nodes)
    node_1 = env_for(tmp_path / "node-1", RANK="1", GROUP_RANK="1", **nodes)
    calls: list = []

    def no_hub(*args, **kwargs):
        raise AssertionError("only node 0 may call the Hub, and only once")

    second: list[FetchedModel] = []  # node 1 starts first and waits for the mirror
    waiter = threading.Thread(target=lambda: second.append(fetch_model(cfg, node_1, snapshot=no_hub, poll_seconds=0.05)),
                              daemon=True)
    waiter.start()
    first = fetch_model(cfg, node_0, snapshot=hub_standin(tiny_model_dir, tmp_path / "hf", calls))
    waiter.join(60)
    assert calls == [("org/tiny", "v1.0", False)]
    assert first.revision == COMMIT and first.status() == {"source": "org/tiny", "revision": COMMIT}
    assert second == [FetchedModel("org/tiny", cache_entry(tmp_path / "node-1", "org/tiny", "v1.0"), COMMIT)]
    assert tree(first.local_dir) == tree(second[0].local_dir) == tree(tiny_model_dir)
    mirror = json.loads(boto3.client("s3").get_object(Bucket=s3_bucket, Key=f"team-a/job-1/model/{MODEL_MANIFEST_FILE}")
                        ["Body"].read())
    assert (mirror["source"], mirror["revision"], mirror["requested"]) == ("org/tiny", COMMIT, "v1.0")

    # a retry on a new pod (an empty cache): the mirror, not the Hub, and the same commit
    retried = fetch_model(cfg, env_for(tmp_path / "node-0-retry", RANK="0", GROUP_RANK="0", **nodes), snapshot=no_hub)
    assert retried.revision == COMMIT and tree(retried.local_dir) == tree(tiny_model_dir)


def test_offline_a_hub_model_in_the_huggingface_cache_is_used(tmp_path, tiny_model_dir):
    calls: list = []
    fetched = fetch_model(config("org/tiny"), env_for(tmp_path / "cache", HF_HUB_OFFLINE="1"),
                          snapshot=hub_standin(tiny_model_dir, tmp_path / "hf", calls))
    assert calls == [("org/tiny", None, True)]  # local_files_only: nothing calls the Hub
    assert fetched.revision == COMMIT and tree(fetched.local_dir) == tree(tiny_model_dir)
    assert os.stat(fetched.local_dir / "model.safetensors").st_nlink == 2  # a link to the blob, not a copy


# ------------------------------------------------------------------------ finetune train


pytest_slow = pytest.mark.slow


def short_run(tmp_path: Path, base_model: str, name: str, **model) -> dict:
    run_dir = tmp_path / name
    run_dir.mkdir()
    return tiny_config(run_dir, base_model, training={"max_steps": 4}, evaluation={"do_eval": False},
                       output={"output_dir": str(run_dir / "out"), "save_steps": 4},
                       model={"base_model": base_model, **model})


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in metrics(out) if r["loss"] is not None]


@pytest_slow
def test_train_from_s3_equals_train_from_a_mounted_path(tmp_path, tiny_model_dir, s3_bucket, monkeypatch, capsys):
    """The same folder three ways, the same seed: on a mounted volume's path (a local directory
    stands in), in s3://, and in s3:// again (its cached copy): the same losses."""
    monkeypatch.setenv("FINETUNE_MODEL_CACHE", str(tmp_path / "cache"))
    mounted = tmp_path / "mnt" / "models" / "tiny"
    shutil.copytree(tiny_model_dir, mounted)
    uri = upload(tiny_model_dir, s3_bucket, "models/tiny")
    runs = {}
    for name, source in (("mounted", str(mounted)), ("s3", uri), ("s3-cached", uri)):
        cfg = short_run(tmp_path, source, name)
        assert run_train(tmp_path / name, cfg) == 0, capsys.readouterr().err
        runs[name] = tmp_path / name / "out"
    assert len(losses(runs["mounted"])) == 4
    assert losses(runs["s3"]) == losses(runs["mounted"]) == losses(runs["s3-cached"])
    saved = yaml.safe_load((runs["s3"] / "config.yaml").read_text())["model"]
    assert (saved["base_model"], saved["revision"], saved["tokenizer"]) == (uri, None, None)  # as written
    assert load_config(runs["s3"] / "config.yaml", mode="train").config.model.base_model == uri


@pytest_slow
def test_train_from_a_hub_model_records_its_commit(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """model.revision as the Hub resolved it, in config.yaml, the checkpoints' config, the
    trackers' params and status.model (the Hub: a local stand-in, as the Hugging Face cache has it)."""
    import finetune_trainer.tracking as tracking
    from finetune_trainer.train import run_command

    monkeypatch.setenv("FINETUNE_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch, "hub_snapshot", hub_standin(tiny_model_dir, tmp_path / "hf", []))
    seen: dict = {}

    def flatten(config, prefix="", real=tracking.flatten):
        return seen.setdefault("params", real(config, prefix))  # what the trackers are given as params

    monkeypatch.setattr(tracking, "flatten", flatten)

    class Status:
        model = None

        def __call__(self, update):
            pass

        def set_model(self, model):
            Status.model = model

    cfg = short_run(tmp_path, "org/tiny", "hub", revision="v1.0")
    cfg["output"]["report_to"] = ["tensorboard"]
    path = tmp_path / "hub" / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run_command(load_config(path, mode="train").config, base_dir=path.parent, reporters=[Status()]) == 0, \
        capsys.readouterr().err
    out = tmp_path / "hub" / "out"
    saved = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert (saved["base_model"], saved["revision"]) == ("org/tiny", COMMIT)
    manifest = json.loads((out / "checkpoint-4" / "manifest.json").read_text())
    assert manifest["config"]["model"]["revision"] == COMMIT
    assert Status.model == {"source": "org/tiny", "revision": COMMIT}
    assert seen["params"]["model.revision"] == COMMIT and seen["params"]["model.base_model"] == "org/tiny"


@pytest_slow
def test_train_smollm2_from_s3_equals_its_local_folder(tmp_path, s3_bucket, monkeypatch, capsys):
    """The built-in SmolLM2-135M (538 MB of safetensors) through s3:// and from its folder: the
    same two LoRA steps, the same losses."""
    from finetune_trainer.model import builtin

    monkeypatch.setenv("FINETUNE_MODEL_CACHE", str(tmp_path / "cache"))
    folder = builtin.model_dir()
    uri = upload(folder, s3_bucket, "models/smollm2")
    try:
        runs = {}
        for name, source in (("local", str(folder)), ("s3", uri)):
            cfg = short_run(tmp_path, source, name)
            cfg["training"] |= {"max_steps": 2, "micro_batch_size": 2}
            cfg["fine_tuning"]["lora"] = {**cfg["fine_tuning"]["lora"], "target_modules": ["q_proj", "v_proj"]}
            del cfg["dataset"]["eval_path"]  # no eval set: no sample answer generated at the end
            assert run_train(tmp_path / name, cfg) == 0, capsys.readouterr().err
            runs[name] = losses(tmp_path / name / "out")
        assert len(runs["local"]) == 2 and runs["s3"] == runs["local"]
        assert tree(cache_entry(tmp_path / "cache", uri, None)) == tree(folder)
    finally:  # the session's moto_server keeps what it holds
        client = boto3.client("s3")
        keys = [{"Key": o["Key"]} for o in client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
        client.delete_objects(Bucket=s3_bucket, Delete={"Objects": keys})


@pytest_slow
def test_storage_down_during_the_fetch_exits_retryable(tmp_path, tiny_model_dir, s3_outage, monkeypatch, capsys):
    """S3 down past the retry budget while the base model is fetched: an outage, not the user's
    mistake, so the trainer exits EXIT_UNAVAILABLE (retried by restartPolicy ExitCode), saying why."""
    from finetune_trainer.contract import EXIT_UNAVAILABLE, exit_code_is_retryable

    monkeypatch.setenv("FINETUNE_MODEL_CACHE", str(tmp_path / "cache"))
    uri = upload(tiny_model_dir, s3_outage.bucket, "models/tiny")
    s3_outage.down()
    assert run_train(tmp_path, short_run(tmp_path, uri, "down")) == EXIT_UNAVAILABLE
    assert exit_code_is_retryable(EXIT_UNAVAILABLE)
    err = capsys.readouterr().err
    assert "so the job retries" in err and "models/tiny" in err
    assert not list((tmp_path / "cache").glob("*/" + MODEL_MANIFEST_FILE))  # nothing half-fetched is trusted


def test_a_mirror_of_the_same_files_under_another_revision_name_is_renamed_not_left(tmp_path):
    """The other nodes wait for the mirror of the revision *they* were asked for: the same files
    asked for as another name (unset, then the commit) get a manifest with that name, without a
    second upload of the files, or those nodes would wait out WAIT_SECONDS and exit 170."""
    from finetune_trainer.storage import open_store
    from finetune_trainer.storage.checkpoints import hash_files

    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "model.safetensors").write_bytes(os.urandom(256))
    mirror = open_store((tmp_path / "mirror").as_uri())
    first = fetch.ModelManifest(source="org/m", revision="a" * 40, requested=None,
                                files=tuple(hash_files(entry, ["model.safetensors"])))
    fetch.publish_mirror(mirror, entry, first)
    assert fetch.mirrored(mirror, "org/m", None)
    (entry / "model.safetensors").unlink()  # a second upload of the files would fail now
    fetch.publish_mirror(mirror, entry, fetch.replace(first, requested="a" * 40))
    assert fetch.mirrored(mirror, "org/m", "a" * 40) and not fetch.mirrored(mirror, "org/m", None)
