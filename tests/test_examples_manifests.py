"""Every example manifest is what a cluster accepts: FineTuneJobs against the committed CRD's
schema, `finetune validate -f` and the operator's own checks under the chart's default policy;
what the operator renders from them, the Secret and the kustomization against the Kubernetes
schemas; and `kubectl apply --dry-run=client` of each file (kubectl discovers the kinds from the
Kubernetes API emulator on loopback: no cluster, nothing leaves the machine)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from kube_tools import REPO, crd_schema_errors, emulated_kubectl, kube_schema_errors, run_tool

EXAMPLES = REPO / "examples"


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]


def finetunejob_files() -> list[Path]:
    return sorted(p for p in EXAMPLES.glob("*.yaml") if any(d.get("kind") == "FineTuneJob" for d in documents(p)))


JOB_FILES = finetunejob_files()
CLUSTER_JOB_FILES = sorted(EXAMPLES.glob("finetunejob-*.yaml"))
ids = lambda p: p.name  # noqa: E731


def test_the_examples_are_there():
    names = {p.name for p in CLUSTER_JOB_FILES}
    assert {"finetunejob-smollm2-lora.yaml", "finetunejob-qlora-16gb.yaml", "finetunejob-spectrum.yaml",
            "finetunejob-multi-gpu-full-zero3.yaml"} <= names


@pytest.mark.parametrize("path", JOB_FILES, ids=ids)
def test_finetunejob_matches_the_crd_schema(path):
    for doc in documents(path):
        assert crd_schema_errors(doc) == [], path.name
        assert doc["metadata"]["name"] and doc["apiVersion"] == "finetune.dev/v1alpha1"


def test_crd_schema_check_can_fail():
    doc = documents(CLUSTER_JOB_FILES[0])[0]
    bad = copy.deepcopy(doc)
    bad["spec"]["nodes"] = 0
    bad["spec"]["training"]["lerning_rate"] = 1e-4
    bad["spec"]["fine_tuning"]["method"] = "dora"
    errors = " ".join(crd_schema_errors(bad))
    assert "spec.nodes" in errors and "lerning_rate" in errors and "dora" in errors


@pytest.mark.parametrize("path", JOB_FILES, ids=ids)
def test_finetune_validate_accepts_it(path, capsys):
    from finetune_trainer.cli import main

    assert main(["validate", "-f", str(path)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("path", CLUSTER_JOB_FILES, ids=ids)
def test_operator_accepts_it_under_the_charts_default_policy(path):
    """What the operator (installed with the chart's defaults) does with the file: accept it
    (trust_remote_code is forbidden, so each example writes it out as false) and render children
    that the Kubernetes schemas accept, the workload's pod templates included."""
    from finetune_operator.render import RenderSettings, render

    chart_values = yaml.safe_load((REPO / "helm" / "finetune-operator" / "values.yaml").read_text())
    settings = RenderSettings(trainer_image=chart_values["trainer"]["image"],
                              forbid_trust_remote_code=chart_values["policy"]["forbidTrustRemoteCode"])
    (job,) = documents(path)
    job["metadata"]["uid"] = "0b5e4c3a-0000-4000-8000-000000000001"
    manifests = render(job, settings)  # spec.backend, or auto read as PyTorchJob (no cluster to ask)
    workload_kind = {"jobset": "JobSet", "trainjob": "TrainJob"}.get(job["spec"].get("backend"), "PyTorchJob")
    assert [m["kind"] for m in manifests] == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", workload_kind]
    errors = [e for m in manifests[:4] for e in kube_schema_errors(m)]
    workload = manifests[-1]
    if workload_kind == "PyTorchJob":
        replicas = workload["spec"]["pytorchReplicaSpecs"]
        assert sum(r["replicas"] for r in replicas.values()) == job["spec"].get("nodes", 1)
        templates = {role.lower(): spec["template"] for role, spec in replicas.items()}
    elif workload_kind == "JobSet":
        job_spec = workload["spec"]["replicatedJobs"][0]["template"]["spec"]
        assert job_spec["completions"] == job["spec"].get("nodes", 1)
        templates = {"node": job_spec["template"]}
    else:  # a TrainJob's pods come from its runtime; test_render_backends.py checks the patches
        assert workload["spec"]["trainer"]["numNodes"] == job["spec"].get("nodes", 1)
        templates = {}
    for role, template in templates.items():
        errors += kube_schema_errors({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role},
                                      "template": template})
    assert errors == []


def test_policy_refuses_an_example_without_the_explicit_false():
    from finetune_trainer.config import ConfigError
    from finetune_operator.render import RenderSettings, check

    (job,) = documents(EXAMPLES / "finetunejob-qlora-16gb.yaml")
    del job["spec"]["model"]["trust_remote_code"]
    with pytest.raises(ConfigError) as err:
        check(job, RenderSettings(forbid_trust_remote_code=True))
    assert "spec.model.trust_remote_code" in str(err.value.errors[0])


def test_seed_templates_are_pasted_unchanged():
    """The three FineTuneJobs carry their seed template's settings (examples/config/), with the
    documented exceptions: trust_remote_code written out, deepspeed_config inlined."""
    pairs = {"finetunejob-qlora-16gb.yaml": "qlora-16gb.yaml", "finetunejob-spectrum.yaml": "spectrum.yaml",
             "finetunejob-multi-gpu-full-zero3.yaml": "multi-gpu-full-zero3.yaml"}
    for job_file, seed_file in pairs.items():
        (job,) = documents(EXAMPLES / job_file)
        seed = yaml.safe_load((EXAMPLES / "config" / seed_file).read_text())
        for section, settings in seed.items():
            for key, value in settings.items():
                if (section, key) == ("distributed", "deepspeed_config"):
                    assert job["spec"][section][key]["zero_optimization"]["stage"] == seed[section]["zero_stage"]
                    continue
                assert job["spec"][section][key] == value, f"{job_file}: spec.{section}.{key}"
        assert job["spec"]["model"]["trust_remote_code"] is False


def test_multi_gpu_example_is_two_nodes_of_zero3():
    (job,) = documents(EXAMPLES / "finetunejob-multi-gpu-full-zero3.yaml")
    assert job["spec"]["nodes"] == 2 and job["spec"]["gpus_per_node"] >= 2
    assert job["spec"]["distributed"]["use_deepspeed"] and job["spec"]["distributed"]["zero_stage"] == 3


def test_secret_is_what_the_jobs_reference():
    (secret,) = documents(EXAMPLES / "secret-s3-credentials.yaml")
    assert kube_schema_errors(secret) == []
    from finetune_trainer import contract

    assert set(secret["stringData"]) == {contract.ENV_AWS_ACCESS_KEY_ID, contract.ENV_AWS_SECRET_ACCESS_KEY}
    for path in CLUSTER_JOB_FILES:
        (job,) = documents(path)
        assert job["spec"]["storage"]["credentials_secret"] == secret["metadata"]["name"], path.name
        assert job["metadata"]["namespace"] == secret["metadata"]["namespace"], path.name


def test_model_claims_are_what_the_job_mounts():
    claims = documents(EXAMPLES / "pvc-models.yaml")
    assert [e for claim in claims for e in kube_schema_errors(claim)] == []
    (job,) = documents(EXAMPLES / "finetunejob-model-volume.yaml")
    by_name = {claim["metadata"]["name"]: claim for claim in claims}
    assert set(by_name) == {job["spec"]["model_volume"]["claim_name"], job["spec"]["model_cache"]["claim_name"]}
    assert by_name[job["spec"]["model_cache"]["claim_name"]]["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod
    assert job["spec"]["model"]["base_model"].startswith(job["spec"]["model_volume"]["mount_path"] + "/")
    assert {claim["metadata"]["namespace"] for claim in claims} == {job["metadata"]["namespace"]}


class Yaml12Floats(yaml.SafeLoader):
    """kustomize writes 1.0e-5 as 1e-05, a float in YAML 1.2 (and to the API server) but a
    string to PyYAML's YAML 1.1 rules."""


Yaml12Floats.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))


def test_kustomization_lists_every_cluster_example():
    kustomization = documents(EXAMPLES / "kustomization.yaml")[0]
    assert sorted(kustomization["resources"]) == sorted(p.name for p in CLUSTER_JOB_FILES)
    built = [d for d in yaml.load_all(run_tool("kubectl", "kustomize", str(EXAMPLES)).stdout, Yaml12Floats) if d]
    assert sorted(d["metadata"]["name"] for d in built) == sorted(
        documents(p)[0]["metadata"]["name"] for p in CLUSTER_JOB_FILES)
    for doc in built:
        assert doc["metadata"]["namespace"] == kustomization["namespace"]
        assert crd_schema_errors(doc) == []


# ------------------------------------------------------------------ kubectl apply --dry-run=client


@pytest.fixture(scope="module")
def kubectl_dry_run(tmp_path_factory):
    pytest.importorskip("kmock")
    with emulated_kubectl(tmp_path_factory.mktemp("kube")) as dry_run:
        yield dry_run


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=ids)
def test_kubectl_apply_dry_run(kubectl_dry_run, path):
    if path.name == "kustomization.yaml":
        names = kubectl_dry_run("-k", str(EXAMPLES))
        assert len(names) == len(CLUSTER_JOB_FILES)
    else:
        names = kubectl_dry_run("-f", str(path))
        assert len(names) == len(documents(path))
    assert all("/" in n for n in names)


def test_kubectl_dry_run_can_fail(kubectl_dry_run, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: finetune.dev/v1\nkind: FineTuneJob\nmetadata: {name: x}\nspec: {}\n")
    with pytest.raises(AssertionError, match="no matches for kind"):
        kubectl_dry_run("-f", str(bad))

