"""`finetune operator` as a process: kubeconfig login, flags into render settings, kopf's
liveness endpoint with our probe, a job reconciled, a clean exit on SIGTERM; and a bad
--metrics-address refused as a usage error before anything starts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from finetune_operator.metrics import parse_address
from finetune_operator.testing.kube_emulator import wait_for

FINETUNE = str(Path(sys.executable).parent / "finetune")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def healthz(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read() or b"{}")
    except OSError:
        return None


def test_operator_command_serves_liveness_and_reconciles(cluster, emulator, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emu",
        "clusters": [{"name": "emu", "cluster": {"server": emulator.url}}],
        "users": [{"name": "u", "user": {"token": "operator-token"}}],
        "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "u"}}],
    }))
    port = free_port()
    liveness = f"http://127.0.0.1:{port}/healthz"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_SERVICE")}
    env["KUBECONFIG"] = str(kubeconfig)
    process = subprocess.Popen(
        [FINETUNE, "operator", "--standalone", "--liveness", liveness, "--trainer-image", "registry.test/trainer:7",
         "--default-storage-uri", "s3://shared-bucket/runs", "--log-level", "warning",
         "--metrics-address", "127.0.0.1:0"],  # the default 8081 may be taken on a CI machine
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert wait_for(lambda: listening(port), timeout=60, what="the liveness endpoint")
        cluster.apply_job("demo", {"model": {"base_model": "builtin:SmolLM2-135M-Instruct", "trust_remote_code": False},
                                   "dataset": {"format": "alpaca", "train_path": "s3://data/a.jsonl"}})
        pytorchjob = wait_for(lambda: cluster.pytorchjob("demo"), what="the PyTorchJob")
        container = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        assert container["image"] == "registry.test/trainer:7"
        config = yaml.safe_load(cluster.kube.get("v1", "ConfigMap", "default", "demo-config")["data"]["config.yaml"])
        assert config["output"]["storage_uri"] == "s3://shared-bucket/runs/default/demo"
        cluster.wait_condition("demo", "Accepted", "True")
        # the count goes up after the status write, and kopf keeps a probe's answer 10 s: ask until it says so
        assert wait_for(lambda: (healthz(liveness) or {}).get("reconciles") == 1, timeout=60,
                        what="the liveness probe to count the reconcile")
        assert any(r.headers.get("Authorization") == "Bearer operator-token" for r in emulator.requests())
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output[-3000:]


@pytest.mark.parametrize("address, parsed", [("0.0.0.0:8081", ("0.0.0.0", 8081)), (":8081", ("0.0.0.0", 8081)),
                                             ("8081", ("0.0.0.0", 8081)), ("127.0.0.1:0", ("127.0.0.1", 0))])
def test_metrics_addresses_parse_to_host_and_port(address, parsed):
    assert parse_address(address) == parsed


@pytest.mark.parametrize("address", ["nonsense", "1.2.3.4:notaport", ":99999", "host:", "1.2.3.4:-1", "a b:80"])
def test_a_bad_metrics_address_is_a_usage_error_naming_the_flag_the_value_and_the_form(address, capsys):
    from finetune_trainer.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["operator", "--metrics-address", address])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (f"finetune operator: error: argument --metrics-address: {address!r}: "
                                    "expected HOST:PORT with a PORT from 0 to 65535")
