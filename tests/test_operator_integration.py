"""The real operator (kopf + our handlers + the official client) against the API emulator.

Every test talks HTTP: the test plays kubectl and the training operator through the
official client, the operator runs in its own thread and event loop, and assertions wait
on conditions (polling the API), never on fixed sleeps. What the emulator cannot prove is
listed in finetune_operator/testing/kube_emulator.py's docstring. The fixtures `cluster`,
`emulator` and `operator` come from the plugin finetune_operator.testing.fixtures.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from finetune_operator.kube import ApiError
from finetune_operator.testing.kube_emulator import OperatorThread, is_create, names, pytorchjob_conditions, wait_for
from finetune_trainer.status_reporter import StatusReporter

FTJ = ("finetune.dev/v1alpha1", "FineTuneJob")
PYTORCHJOB = ("kubeflow.org/v1", "PyTorchJob")


def spec(tmp_path: Path, **extra) -> dict:
    return {
        "model": {"base_model": "builtin:SmolLM2-135M-Instruct", "trust_remote_code": False},
        "fine_tuning": {"method": "lora"},
        "training": {"learning_rate": 2e-4, "max_steps": 20},
        "dataset": {"format": "alpaca", "train_path": "s3://data/alpaca.jsonl"},
        "storage": {"uri": f"file://{tmp_path}/store"},
        **extra,
    }


def children(emulator, name="demo"):
    return {
        "configmaps": names(o for o in emulator.objects("configmaps") if o["metadata"]["name"].startswith(name)),
        "serviceaccounts": names(emulator.objects("serviceaccounts")),
        "roles": names(emulator.objects("roles")),
        "rolebindings": names(emulator.objects("rolebindings")),
        "pytorchjobs": names(emulator.objects("pytorchjobs")),
    }


EXPECTED_CHILDREN = {"configmaps": ["demo-config"], "serviceaccounts": ["demo-trainer"], "roles": ["demo-trainer"],
                     "rolebindings": ["demo-trainer"], "pytorchjobs": ["demo"]}


def test_apply_creates_config_rbac_and_pytorchjob(cluster, emulator, operator, tmp_path):
    job = cluster.apply_job("demo", spec(tmp_path, nodes=2, gpus_per_node=4))
    cluster.wait_condition("demo", "Accepted", "True", reason="Valid")
    assert children(emulator) == EXPECTED_CHILDREN

    uid = job["metadata"]["uid"]
    config_map = cluster.kube.get("v1", "ConfigMap", "default", "demo-config")
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert config["output"]["storage_uri"] == f"file://{tmp_path}/store/default/demo"
    assert config["training"]["learning_rate"] == 2e-4

    role = cluster.kube.get("rbac.authorization.k8s.io/v1", "Role", "default", "demo-trainer")
    assert role["rules"] == [{"apiGroups": ["finetune.dev"], "resources": ["finetunejobs/status"],
                              "resourceNames": ["demo"], "verbs": ["get", "patch"]}]
    binding = cluster.kube.get("rbac.authorization.k8s.io/v1", "RoleBinding", "default", "demo-trainer")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "demo-trainer", "namespace": "default"}]

    pytorchjob = cluster.pytorchjob("demo")
    replicas = pytorchjob["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 1
    assert pytorchjob["spec"]["nprocPerNode"] == "4"
    assert pytorchjob["spec"]["runPolicy"]["suspend"] is False
    container = replicas["Master"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.test/trainer:1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4

    for obj in (config_map, role, binding, pytorchjob, cluster.kube.get("v1", "ServiceAccount", "default", "demo-trainer")):
        (ref,) = obj["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("FineTuneJob", "demo", uid, True)
        assert obj["metadata"]["labels"]["finetune.dev/job-name"] == "demo"

    status = cluster.job("demo")["status"]
    assert status["observedGeneration"] == 1 and status["phase"] == "Starting"
    by_type = {c["type"]: c for c in status["conditions"]}
    assert (by_type["Ready"]["status"], by_type["Reconciling"]["status"], by_type["Stalled"]["status"]) == ("False", "True", "False")
    # kopf's bookkeeping stays out of the object (runner.py): no annotations, nothing in status,
    # and the job's one write is its status
    assert not cluster.job("demo")["metadata"].get("annotations")
    assert "kopf" not in status
    writes = [r for r in emulator.requests() if r.method.value in ("PATCH", "PUT") and r.resource is not None
              and r.resource.plural == "finetunejobs"]
    assert [r.subresource for r in writes] == ["status"], writes
    # kopf posts Events from a queue of its own, after the status write seen above
    wait_for(lambda: ("Normal", "Valid") in [(e["type"], e["reason"]) for e in cluster.events("demo")],
             what="the Valid Event")


def test_invalid_spec_is_refused_with_field_messages_and_nothing_created(cluster, emulator, operator, tmp_path):
    bad = spec(tmp_path)
    bad["training"]["learning_rate"] = -1
    bad["env"] = [{"name": "FINETUNE_JOB_NAME", "value": "x"}]
    cluster.apply_job("demo", bad)
    accepted = cluster.wait_condition("demo", "Accepted", "False", reason="InvalidSpec")
    assert "spec.training.learning_rate" in accepted["message"]
    assert "spec.env[0].name: FINETUNE_JOB_NAME is reserved" in accepted["message"]
    assert cluster.condition("demo", "Stalled")["status"] == "True"
    assert cluster.job("demo")["status"]["phase"] == "Invalid"
    warning = wait_for(lambda: [e for e in cluster.events("demo") if e["type"] == "Warning"], what="a Warning Event")
    assert warning[0]["reason"] == "InvalidSpec" and "spec.training.learning_rate" in warning[0]["message"]
    assert all(v == [] for v in children(emulator).values())

    # Fixing the spec before anything started applies it (the rejection rule starts with the PyTorchJob).
    cluster.kube.patch(*FTJ, "default", "demo", {"spec": {"training": {"learning_rate": 1e-4}, "env": []}})
    cluster.wait_condition("demo", "Accepted", "True")
    assert children(emulator) == EXPECTED_CHILDREN
    assert cluster.job("demo")["status"]["observedGeneration"] == 2


def pod(name, job, *, exit_code, reason="Error", message="", master=True, last=False):
    terminated = {"terminated": {"exitCode": exit_code, "reason": reason, "message": message,
                                 "finishedAt": "2026-01-01T00:00:00Z"}}
    state = {"state": {"running": {}}, "lastState": terminated} if last else {"state": terminated}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"training.kubeflow.org/job-name": job,
                                    "training.kubeflow.org/replica-type": "master" if master else "worker"}},
            "status": {"containerStatuses": [{"name": "pytorch", **state}]}}


def run_pod(cluster, manifest):
    """Create a pod and write its status through /status, as the kubelet does (create drops status)."""
    created = cluster.kube.create({k: v for k, v in manifest.items() if k != "status"})
    cluster.kube.patch("v1", "Pod", "default", manifest["metadata"]["name"], {"status": manifest["status"]},
                       subresource="status")
    return created


def test_pytorchjob_states_are_mirrored_running_restarting_succeeded(cluster, operator, tmp_path):
    cluster.apply_job("demo", spec(tmp_path))
    wait_for(lambda: cluster.pytorchjob("demo"), what="the PyTorchJob")

    cluster.set_pytorchjob_status("demo", pytorchjob_conditions("Created", "Running"))
    cluster.wait_condition("demo", "Ready", "True", reason="Running")
    assert cluster.condition("demo", "Running")["status"] == "True"
    assert cluster.condition("demo", "Reconciling")["status"] == "False"

    # A preemption: the trainer saved and exited 143; the training operator restarts the pod.
    created = run_pod(cluster, pod("demo-master-0", "demo", exit_code=143, message="saved checkpoint-10", last=True))
    assert created["metadata"]["name"] == "demo-master-0"
    cluster.set_pytorchjob_status("demo", pytorchjob_conditions("Created", "Restarting"))
    running = cluster.wait_condition("demo", "Running", "False", reason="Restarting")
    assert "exit code 143 (retryable, SIGTERM)" in running["message"] and "saved checkpoint-10" in running["message"]
    assert cluster.condition("demo", "Ready")["status"] == "False"
    assert cluster.condition("demo", "Reconciling")["reason"] == "Restarting"
    assert cluster.job("demo")["status"]["phase"] == "Restarting"

    cluster.set_pytorchjob_status("demo", pytorchjob_conditions("Created", "Running"))
    cluster.wait_condition("demo", "Running", "True")
    cluster.set_pytorchjob_status("demo", pytorchjob_conditions("Created", "Succeeded"))
    cluster.wait_condition("demo", "Succeeded", "True", reason="Completed")
    status = cluster.job("demo")["status"]
    by_type = {c["type"]: c["status"] for c in status["conditions"]}
    assert status["phase"] == "Succeeded"
    assert (by_type["Ready"], by_type["Running"], by_type["Failed"], by_type["Stalled"]) == ("True", "False", "False", "False")

    events = wait_for(lambda: [(e["type"], e["reason"]) for e in cluster.events("demo")]
                      if len(cluster.events("demo")) >= 6 else None, what="an Event per transition")
    for expected in [("Normal", "Valid"), ("Normal", "Training"), ("Warning", "Restarting"), ("Normal", "Completed")]:
        assert expected in events


def test_a_succeeded_job_lists_its_outputs(cluster, operator, tmp_path):
    """status.outputs appears with Succeeded=True: the URIs a pipeline chains to serving
    (the trainer writes these files: tests/test_serving_outputs.py)."""
    cluster.apply_job("demo", spec(tmp_path, output={"merge_adapter": True},
                                   evaluation={"benchmarks": ["domain-specific-eval"], "domain_eval_path": "s3://data/e.jsonl"}))
    wait_for(lambda: cluster.pytorchjob("demo"), what="the PyTorchJob")
    cluster.set_pytorchjob_status("demo", pytorchjob_conditions("Created", "Running"))
    cluster.wait_condition("demo", "Running", "True")
    assert "outputs" not in cluster.job("demo")["status"]
    cluster.set_pytorchjob_status("demo", pytorchjob_conditions("Created", "Succeeded"))
    cluster.wait_condition("demo", "Succeeded", "True")
    final = f"file://{tmp_path}/store/default/demo/final/"
    assert cluster.job("demo")["status"]["outputs"] == {
        "final": final, "adapter": final, "model": f"{final}merged/", "merged": f"{final}merged/",
        "config": f"{final}config.yaml", "results": f"{final}train_results.json", "evaluation": f"{final}evaluation.json",
        "metrics": f"file://{tmp_path}/store/default/demo/metrics.jsonl", "serving": f"{final}serving.md",
        "inferenceService": f"{final}inferenceservice.yaml", "vllmCommand": f"{final}vllm-serve.sh",
    }


def test_a_finished_run_is_never_restarted(cluster, emulator, operator, tmp_path):
    """After Succeeded, the PyTorchJob may be cleaned up (TTL, a person); an operator restart
    (resume) must not re-create it, which would train again."""
    cluster.apply_job("demo", spec(tmp_path))
    wait_for(lambda: cluster.pytorchjob("demo"), what="the PyTorchJob")
    cluster.set_pytorchjob_status("demo", pytorchjob_conditions("Created", "Succeeded"))
    cluster.wait_condition("demo", "Succeeded", "True")
    cluster.kube.delete(*PYTORCHJOB, "default", "demo")
    operator.stop()
    again = OperatorThread(emulator.url).start()
    try:
        wait_for(lambda: again.memo.stats["reconciles"] >= 1, what="the resume reconcile")
    finally:
        again.stop()
    assert cluster.pytorchjob("demo") is None
    assert cluster.condition("demo", "Succeeded")["status"] == "True"
    assert cluster.job("demo")["status"]["phase"] == "Succeeded"


def test_namespaced_operator_ignores_other_namespaces(cluster, emulator, tmp_path):
    for namespace in ("team-a", "team-b"):
        cluster.kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    op = OperatorThread(emulator.url, namespaces=["team-a"]).start()
    try:
        cluster.apply_job("other", spec(tmp_path), namespace="team-b")
        cluster.apply_job("mine", spec(tmp_path), namespace="team-a")
        cluster.wait_condition("mine", "Accepted", "True", namespace="team-a")
    finally:
        op.stop()
    assert names(emulator.objects("pytorchjobs")) == ["mine"]
    assert cluster.job("other", "team-b").get("status") is None


def test_failure_carries_exit_code_and_trainer_message(cluster, operator, tmp_path):
    cluster.apply_job("demo", spec(tmp_path))
    wait_for(lambda: cluster.pytorchjob("demo"), what="the PyTorchJob")
    run_pod(cluster, pod("demo-master-0", "demo", exit_code=1, message="spec.dataset.train_path: no such file"))
    cluster.set_pytorchjob_status("demo", pytorchjob_conditions(
        "Created", "Failed", message="PyTorchJob demo is failed because 1 Master replica(s) failed."))
    failed = cluster.wait_condition("demo", "Failed", "True", reason="PermanentError")
    assert "exit code 1 (permanent)" in failed["message"]
    assert "spec.dataset.train_path: no such file" in failed["message"]
    assert "1 Master replica(s) failed" in failed["message"]
    assert cluster.condition("demo", "Stalled")["status"] == "True"
    assert cluster.condition("demo", "Succeeded")["status"] == "False"
    assert cluster.job("demo")["status"]["workload"]["lastExit"]["exitCode"] == 1
    wait_for(lambda: ("Warning", "PermanentError") in [(e["type"], e["reason"]) for e in cluster.events("demo")],
             what="a Warning Event for the failure")


def test_progress_from_the_trainer_reporter_lands_in_status(cluster, emulator, operator, tmp_path):
    cluster.apply_job("demo", spec(tmp_path))
    wait_for(lambda: cluster.pytorchjob("demo"), what="the PyTorchJob")
    token = tmp_path / "token"
    token.write_text("test-token\n")
    url = f"{emulator.url}/apis/finetune.dev/v1alpha1/namespaces/default/finetunejobs/demo/status"
    reporter = StatusReporter.from_env({"FINETUNE_STATUS_URL": url, "FINETUNE_STATUS_TOKEN_FILE": str(token)},
                                       min_interval=0.0)
    assert reporter is not None
    reporter({"step": 5, "total_steps": 20, "epoch": 0.25, "loss": 1.5, "eval_loss": None, "learning_rate": 2e-4,
              "tokens_per_second": 900.0, "eta_seconds": 75.0})
    progress = wait_for(lambda: (cluster.job("demo").get("status") or {}).get("progress"), what="status.progress")
    assert progress["step"] == 5 and progress["progressPercentage"] == 25.0 and progress["eta"] == "1m15s"

    # The operator's later status writes keep the trainer's progress, and vice versa.
    cluster.set_pytorchjob_status("demo", pytorchjob_conditions("Created", "Running"))
    cluster.wait_condition("demo", "Running", "True")
    reporter.set_checkpoint(f"file://{tmp_path}/store/default/demo/checkpoints/checkpoint-10")
    reporter({"step": 10, "total_steps": 20, "loss": 1.2, "eval_loss": 1.3})
    reporter.close()
    status = cluster.job("demo")["status"]
    assert status["progress"]["step"] == 10 and status["progress"]["evalLoss"] == 1.3
    assert status["progress"]["checkpointUri"].endswith("checkpoint-10")
    assert status["progress"]["tokensPerSecond"] == 900.0  # merged, not replaced
    assert {c["type"]: c["status"] for c in status["conditions"]}["Running"] == "True"
    # set_checkpoint wakes the sender: it may go out alone, a patch before the update's
    assert reporter.failed == 0 and reporter.sent in (2, 3), (reporter.sent, reporter.failed, reporter.last_error)
    assert "Bearer test-token" in [r.headers.get("Authorization") for r in emulator.requests()
                                   if r.subresource == "status" and r.method == "PATCH"]


@pytest.mark.parametrize("in_flight", ["lands", "is lost"])
def test_operator_killed_mid_reconcile_leaves_no_duplicates(cluster, emulator, tmp_path, in_flight):
    """Operator 1 dies while creating the PyTorchJob (after the ConfigMap and RBAC); its
    in-flight create lands later or never; operator 2 resumes. One of each child, at the end."""
    first_url = emulator.add_server()
    gate = emulator.gate(is_create("pytorchjobs"))  # the first PyTorchJob create hangs
    first = OperatorThread(first_url).start()
    cluster.apply_job("demo", spec(tmp_path))
    assert gate.hit.wait(20), "the operator never got to the PyTorchJob"
    emulator.sever(first_url)  # no write of the dead operator arrives from now on
    first.kill()
    assert cluster.job("demo").get("status") is None  # it never got to write status
    assert children(emulator)["rolebindings"] == ["demo-trainer"] and children(emulator)["pytorchjobs"] == []

    second = OperatorThread(emulator.url).start()
    try:
        if in_flight == "lands":
            gate.release()  # the dead operator's create arrives now, racing the new operator's
        cluster.wait_condition("demo", "Accepted", "True", reason="Valid")
        wait_for(lambda: cluster.job("demo")["status"].get("workload"), what="the PyTorchJob in status")
    finally:
        gate.release(lost=in_flight != "lands")
        second.stop()
        first.join()
    assert children(emulator) == EXPECTED_CHILDREN
    assert len(emulator.objects("pytorchjobs")) == 1
    assert len([r for r in emulator.requests() if is_create("configmaps")(r)]) == 2  # one each; the 2nd got 409


def test_a_new_job_creates_its_children_without_reading_first(cluster, emulator, operator, tmp_path):
    """Never reconciled = nothing to protect: no GET of the PyTorchJob before the creates."""
    cluster.apply_job("demo", spec(tmp_path))
    cluster.wait_condition("demo", "Accepted", "True", reason="Valid")
    assert children(emulator) == EXPECTED_CHILDREN
    reads = [r for r in emulator.requests()
             if r.method.name == "GET" and r.resource is not None and r.resource.plural == "pytorchjobs" and r.name]
    assert reads == []


def test_a_spec_edited_while_the_operator_was_down_is_still_refused(cluster, emulator, tmp_path):
    """Operator 1 creates every child and dies before it writes status; the user edits the
    spec; operator 2 finds the job with no conditions, and still refuses to apply the edit
    once its first create answers AlreadyExists."""
    first_url = emulator.add_server()
    gate = emulator.gate(lambda r: r.method.name == "PATCH" and r.resource is not None
                         and r.resource.plural == "finetunejobs")  # operator 1's first write after the children
    first = OperatorThread(first_url).start()
    cluster.apply_job("demo", spec(tmp_path))
    assert gate.hit.wait(20), "the operator never finished its children"
    emulator.sever(first_url)
    first.kill()
    assert children(emulator) == EXPECTED_CHILDREN and cluster.job("demo").get("status") is None
    config = cluster.kube.get("v1", "ConfigMap", "default", "demo-config")

    cluster.kube.patch(*FTJ, "default", "demo", {"spec": {"training": {"learning_rate": 1e-3}}})
    second = OperatorThread(emulator.url).start()
    try:
        cluster.wait_condition("demo", "Accepted", "False", reason="SpecChangeRejected")
    finally:
        gate.release(lost=True)
        second.stop()
        first.join()
    assert cluster.kube.get("v1", "ConfigMap", "default", "demo-config") == config  # not patched


def test_api_hiccups_are_retried(cluster, emulator, tmp_path):
    left = emulator.fail(is_create("configmaps"), times=2, status=503)
    op = OperatorThread(emulator.url, retry_delay=0.2).start()
    try:
        cluster.apply_job("demo", spec(tmp_path))
        cluster.wait_condition("demo", "Accepted", "True")
    finally:
        op.stop()
    assert left == [0]
    assert children(emulator) == EXPECTED_CHILDREN


def test_existing_children_are_adopted_and_drift_patched(cluster, emulator, operator, tmp_path):
    cluster.kube.create({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": "demo-config", "namespace": "default"}, "data": {"config.yaml": "stale"}})
    cluster.apply_job("demo", spec(tmp_path))
    cluster.wait_condition("demo", "Accepted", "True")
    config_map = cluster.kube.get("v1", "ConfigMap", "default", "demo-config")
    assert config_map["data"]["config.yaml"] != "stale"
    assert config_map["metadata"]["ownerReferences"][0]["name"] == "demo"


def test_delete_removes_children_and_never_storage(cluster, emulator, operator, tmp_path):
    checkpoint = tmp_path / "store" / "default" / "demo" / "checkpoints" / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    (checkpoint / "manifest.json").write_text('{"files": []}')
    cluster.apply_job("demo", spec(tmp_path))
    cluster.wait_condition("demo", "Accepted", "True")
    pytorchjob = cluster.pytorchjob("demo")
    ref = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": "demo", "uid": pytorchjob["metadata"]["uid"]}
    master = pod("demo-master-0", "demo", exit_code=0)
    master["metadata"]["ownerReferences"] = [ref]  # as the training operator creates its pods
    run_pod(cluster, master)

    cluster.kube.delete(*FTJ, "default", "demo")
    wait_for(lambda: all(v == [] for v in children(emulator).values()) and not emulator.objects("pods"),
             what="children and pods garbage-collected")
    assert cluster.job("demo") is None
    assert (checkpoint / "manifest.json").read_text() == '{"files": []}'
    assert "finalizers" not in (pytorchjob["metadata"]) and not cluster.kube.list(*FTJ, "default")


def test_suspend_toggles_the_pytorchjob(cluster, operator, tmp_path):
    cluster.apply_job("demo", spec(tmp_path))
    wait_for(lambda: cluster.pytorchjob("demo"), what="the PyTorchJob")
    cluster.set_pytorchjob_status("demo", pytorchjob_conditions("Created", "Running"))
    cluster.wait_condition("demo", "Running", "True")
    config = cluster.kube.get("v1", "ConfigMap", "default", "demo-config")["data"]

    cluster.kube.patch(*FTJ, "default", "demo", {"spec": {"suspend": True}})
    wait_for(lambda: cluster.pytorchjob("demo")["spec"]["runPolicy"]["suspend"] is True, what="runPolicy.suspend")
    cluster.wait_condition("demo", "Suspended", "True")
    # The PyTorchJob's event may write status first (Reconciling=NewGeneration until the
    # reconcile of generation 2 records it); the reconcile's own write follows.
    cluster.wait_condition("demo", "Reconciling", "True", reason="Suspending")  # pods still run
    cluster.set_pytorchjob_status("demo", pytorchjob_conditions("Created", "Suspended"))
    cluster.wait_condition("demo", "Running", "False", reason="Suspended")
    assert cluster.condition("demo", "Accepted")["status"] == "True"
    assert cluster.job("demo")["status"]["phase"] == "Suspended"

    cluster.kube.patch(*FTJ, "default", "demo", {"spec": {"suspend": False}})
    wait_for(lambda: cluster.pytorchjob("demo")["spec"]["runPolicy"]["suspend"] is False, what="resume")
    cluster.wait_condition("demo", "Suspended", "False")
    cluster.wait_condition("demo", "Reconciling", "True", reason="Resuming")
    assert cluster.kube.get("v1", "ConfigMap", "default", "demo-config")["data"] == config  # only the spec-hash moved


def test_spec_edit_after_start_is_rejected_and_revert_is_accepted(cluster, operator, tmp_path):
    cluster.apply_job("demo", spec(tmp_path))
    wait_for(lambda: cluster.pytorchjob("demo"), what="the PyTorchJob")
    cluster.wait_condition("demo", "Accepted", "True")
    before = {kind: cluster.kube.get(*kind, "default", name)["metadata"]["resourceVersion"]
              for kind, name in [(PYTORCHJOB, "demo"), (("v1", "ConfigMap"), "demo-config")]}

    cluster.kube.patch(*FTJ, "default", "demo", {"spec": {"training": {"learning_rate": 1e-3}}})
    accepted = cluster.wait_condition("demo", "Accepted", "False", reason="SpecChangeRejected")
    assert "only spec.suspend may change" in accepted["message"]
    assert accepted["observedGeneration"] == 2
    assert cluster.condition("demo", "Stalled")["reason"] == "SpecChangeRejected"
    wait_for(lambda: ("Warning", "SpecChangeRejected") in [(e["type"], e["reason"]) for e in cluster.events("demo")],
             what="a Warning Event for the rejection")
    after = {kind: cluster.kube.get(*kind, "default", name)["metadata"]["resourceVersion"]
             for kind, name in [(PYTORCHJOB, "demo"), (("v1", "ConfigMap"), "demo-config")]}
    assert after == before  # the running job was not touched

    cluster.kube.patch(*FTJ, "default", "demo", {"spec": {"training": {"learning_rate": 2e-4}}})
    accepted = cluster.wait_condition("demo", "Accepted", "True")
    assert accepted["observedGeneration"] == 3


def test_many_jobs_in_two_namespaces(cluster, emulator, operator, tmp_path):
    for i in range(6):
        cluster.apply_job(f"job-{i}", spec(tmp_path), namespace=f"team-{i % 2}")
    wait_for(lambda: len(emulator.objects("pytorchjobs")) == 6, what="six PyTorchJobs")
    for i in range(6):
        cluster.wait_condition(f"job-{i}", "Accepted", "True", namespace=f"team-{i % 2}")
    assert len(emulator.objects("configmaps")) == 6


def test_children_are_deterministic_across_reconciles(cluster, emulator, operator, tmp_path):
    """Re-running the handler (kopf resume) finds its own children: same names, no patch."""
    cluster.apply_job("demo", spec(tmp_path))
    cluster.wait_condition("demo", "Accepted", "True")
    snapshot = copy.deepcopy(sorted((o["metadata"]["name"], o["metadata"]["resourceVersion"])
                                    for o in emulator.objects("pytorchjobs") + emulator.objects("configmaps")))
    operator.stop()
    again = OperatorThread(emulator.url).start()  # resume handlers run for the existing job
    try:
        wait_for(lambda: again.memo.stats["reconciles"] >= 1, what="the resume reconcile")
    finally:
        again.stop()
    assert sorted((o["metadata"]["name"], o["metadata"]["resourceVersion"])
                  for o in emulator.objects("pytorchjobs") + emulator.objects("configmaps")) == snapshot


def test_unreachable_api_is_an_api_error_not_a_crash():
    from finetune_operator.kube import Kube
    from finetune_operator.testing.kube_emulator import api_configuration

    kube = Kube(api_configuration("http://127.0.0.1:9"), timeout=2)
    with pytest.raises(ApiError) as err:
        kube.get(*FTJ, "default", "x")
    assert err.value.status == 0
