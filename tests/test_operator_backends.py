"""Issue 15: every backend (PyTorchJob, TrainJob, JobSet) through the real operator and the API emulator.

The emulator serves only the workload kinds a test installs (`EmulatorThread(workloads=...)`,
`serve`), as a cluster serves only the CRDs installed; the test plays the TrainJob and JobSet
controllers by writing their status through /status, in their own vocabulary (TrainJob:
Suspended/Complete/Failed conditions and jobsStatus; JobSet: terminalState, restarts,
replicatedJobsStatus). No controller runs here, so nothing proves that a real Trainer v2 or
JobSet controller accepts the objects beyond the structural schemas of test_render_backends.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_operator.render import RenderSettings
from test_operator_integration import spec as integration_spec
from finetune_operator.testing.kube_emulator import (
    Cluster,
    EmulatorThread,
    OperatorThread,
    is_create,
    names,
    now_rfc3339,
    pytorchjob_conditions,
    wait_for,
)

FTJ = ("finetune.dev/v1alpha1", "FineTuneJob")
KINDS = {"pytorchjob": ("kubeflow.org/v1", "PyTorchJob", "pytorchjobs"),
         "trainjob": ("trainer.kubeflow.org/v1alpha1", "TrainJob", "trainjobs"),
         "jobset": ("jobset.x-k8s.io/v1alpha2", "JobSet", "jobsets")}


def spec(tmp_path: Path, **extra) -> dict:
    """test_operator_integration's job, with its storage credentials by reference."""
    out = integration_spec(tmp_path, **extra)
    out["storage"] = {**out["storage"], "credentials_secret": "s3-creds"}
    return out


class World:
    """An emulator serving some workload kinds, a user, and the operator."""

    def __init__(self, emulator: EmulatorThread, operator: OperatorThread | None):
        self.emulator, self.operator = emulator, operator
        self.cluster = Cluster(emulator)

    def child(self, backend: str, name: str = "demo") -> dict | None:
        api_version, kind, _ = KINDS[backend]
        return self.cluster.kube.get(api_version, kind, "default", name)

    def children(self, backend: str) -> list[str]:
        return names(self.emulator.objects(KINDS[backend][2]))

    def set_status(self, backend: str, status: dict, name: str = "demo") -> None:
        api_version, kind, _ = KINDS[backend]
        self.cluster.kube.patch(api_version, kind, "default", name, {"status": status}, subresource="status")

    def events(self, name: str = "demo") -> list[tuple[str, str, str]]:
        return [(e["type"], e["reason"], e.get("message", "")) for e in self.cluster.events(name)]


@pytest.fixture
def world(request) -> Iterator[World]:
    """`@pytest.mark.parametrize("world", [("jobset",), ...], indirect=True)`: the kinds served."""
    served = request.param if hasattr(request, "param") else ("pytorchjob",)
    with EmulatorThread(workloads=served) as emulator:
        world = World(emulator, OperatorThread(emulator.url).start())
        try:
            yield world
        finally:
            world.operator.stop()  # the one running now (a test may have restarted it)


def _cond(ctype: str, status: str = "True", reason: str = "", message: str = "") -> dict:
    return {"type": ctype, "status": status, "reason": reason or ctype, "message": message or f"{ctype}.",
            "lastTransitionTime": now_rfc3339()}


def jobset_status(*, ready=0, active=0, failed=0, restarts=0, terminal="", conditions=()) -> dict:
    return {"restarts": restarts, "terminalState": terminal, "conditions": list(conditions),
            "replicatedJobsStatus": [{"name": "node", "ready": ready, "active": active, "succeeded": 0,
                                      "failed": failed, "suspended": 0}]}


def trainjob_status(*, ready=0, active=0, failed=0, conditions=()) -> dict:
    return {"conditions": list(conditions),
            "jobsStatus": [{"name": "node", "ready": ready, "active": active, "succeeded": 0, "failed": failed,
                            "suspended": 0}]}


STATUS = {"jobset": jobset_status, "trainjob": trainjob_status}
SUCCEEDED = {"jobset": lambda: jobset_status(terminal="Completed", conditions=[_cond("Completed")]),
             "trainjob": lambda: trainjob_status(conditions=[_cond("Complete")])}
FAILED = {"jobset": lambda: jobset_status(terminal="Failed", failed=1, conditions=[_cond(
              "Failed", reason="FailedJobs", message="jobset failed due to PodFailurePolicy")]),
          "trainjob": lambda: trainjob_status(failed=1, conditions=[_cond(
              "Failed", reason="JobsFailed", message="trainjob failed: a child Job failed")])}
CONTAINER = {"jobset": "pytorch", "trainjob": "node"}


def trainer_pod(backend: str, name: str, *, exit_code: int, message: str, index: int = 0) -> dict:
    """A pod of the child as JobSet's and the Job controller's labels mark it, terminated."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"jobset.sigs.k8s.io/jobset-name": "demo",
                                    "batch.kubernetes.io/job-completion-index": str(index)}},
            "status": {"containerStatuses": [{"name": CONTAINER[backend], "state": {"terminated": {
                "exitCode": exit_code, "reason": "Error", "message": message,
                "finishedAt": "2026-01-01T00:00:00Z"}}}]}}


def run_pod(cluster: Cluster, manifest: dict) -> None:
    cluster.kube.create({k: v for k, v in manifest.items() if k != "status"})
    cluster.kube.patch("v1", "Pod", "default", manifest["metadata"]["name"], {"status": manifest["status"]},
                       subresource="status")


# ------------------------------------------------------------------ each backend end to end

NEW_BACKENDS = ["trainjob", "jobset"]


@pytest.mark.parametrize("world", [("trainjob",), ("jobset",)], indirect=True, ids=NEW_BACKENDS)
def test_auto_creates_the_served_kind_with_the_shared_pod_contract(world, tmp_path):
    backend = world.emulator.workloads[0]
    job = world.cluster.apply_job("demo", spec(tmp_path, nodes=2, gpus_per_node=4))
    world.cluster.wait_condition("demo", "Accepted", "True", reason="Valid")
    child = world.child(backend)
    assert child is not None and world.children("pytorchjob") == []
    assert child["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert child["metadata"]["labels"]["finetune.dev/job-name"] == "demo"
    assert child["metadata"]["annotations"]["finetune.dev/backend"] == backend
    cm = world.cluster.kube.get("v1", "ConfigMap", "default", "demo-config")
    assert cm["metadata"]["annotations"]["finetune.dev/backend"] == backend
    status = wait_for(lambda: (world.cluster.job("demo").get("status") or {}).get("backend") and
                      world.cluster.job("demo")["status"], what="status.backend")
    assert status["backend"] == backend and status["workload"]["kind"] == KINDS[backend][1]
    wait_for(lambda: any(r == "BackendSelected" and KINDS[backend][1] in m for _, r, m in world.events()),
             what="the BackendSelected Event")

    if backend == "trainjob":
        assert child["spec"]["runtimeRef"]["name"] == "torch-distributed"
        trainer = child["spec"]["trainer"]
        assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
        assert trainer["command"][:2] == ["finetune", "launch"]
        assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 4
        env = {e["name"]: e for e in trainer["env"]}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"  # by reference
        assert not any(n.startswith("PET_") for n in env)  # the torch plug-in injects them
        patch = child["spec"]["runtimePatches"][0]
        assert patch["manager"] == "finetune.dev/finetune-operator"
        pod = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
        assert pod["spec"]["serviceAccountName"] == "demo-trainer"
        assert pod["spec"]["containers"][0]["name"] == "node"
    else:
        job_spec = child["spec"]["replicatedJobs"][0]["template"]["spec"]
        assert (job_spec["parallelism"], job_spec["completions"], job_spec["completionMode"]) == (2, 2, "Indexed")
        pod = job_spec["template"]["spec"]
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["PET_MASTER_ADDR"]["value"] == "demo-node-0-0.demo"
        assert env["PET_NNODES"]["value"] == "2" and env["PET_NPROC_PER_NODE"]["value"] == "4"
        assert "job-completion-index" in env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
        assert child["spec"]["failurePolicy"]["maxRestarts"] == 3
        assert pod["serviceAccountName"] == "demo-trainer" and pod["restartPolicy"] == "Never"


@pytest.mark.parametrize("world", [("trainjob",), ("jobset",)], indirect=True, ids=NEW_BACKENDS)
def test_child_status_drives_running_restarting_succeeded(world, tmp_path):
    backend = world.emulator.workloads[0]
    world.cluster.apply_job("demo", spec(tmp_path))
    wait_for(lambda: world.child(backend), what="the child")
    world.set_status(backend, STATUS[backend](active=1))
    world.cluster.wait_condition("demo", "Running", "False", reason="Starting")
    world.set_status(backend, STATUS[backend](active=1, ready=1))
    world.cluster.wait_condition("demo", "Running", "True", reason="Training")
    assert world.cluster.job("demo")["status"]["phase"] == "Running"

    # A retryable failure (preempted after saving): the group restarts.
    run_pod(world.cluster, trainer_pod(backend, "demo-node-0-0-abc", exit_code=143, message="saved checkpoint-10"))
    if backend == "jobset":
        world.set_status(backend, jobset_status(active=1, ready=0, restarts=1))
    else:
        world.set_status(backend, trainjob_status(active=1, failed=1))
    running = world.cluster.wait_condition("demo", "Running", "False", reason="Restarting")
    assert "exit code 143 (retryable, SIGTERM)" in running["message"] and "saved checkpoint-10" in running["message"]
    assert world.cluster.job("demo")["status"]["phase"] == "Restarting"
    wait_for(lambda: ("Warning", "Restarting") in [(t, r) for t, r, _ in world.events()], what="a Warning Event")

    world.set_status(backend, SUCCEEDED[backend]())
    world.cluster.wait_condition("demo", "Succeeded", "True", reason="Completed")
    assert world.cluster.job("demo")["status"]["phase"] == "Succeeded"
    assert world.cluster.condition("demo", "Ready")["status"] == "True"


@pytest.mark.parametrize("world", [("trainjob",), ("jobset",)], indirect=True, ids=NEW_BACKENDS)
def test_child_failure_carries_the_exit_code_from_the_pods(world, tmp_path):
    backend = world.emulator.workloads[0]
    world.cluster.apply_job("demo", spec(tmp_path, nodes=2))
    wait_for(lambda: world.child(backend), what="the child")
    run_pod(world.cluster, trainer_pod(backend, "demo-node-0-1-x", exit_code=1, index=1,
                                       message="error: dataset.train_path: no such file"))
    world.set_status(backend, FAILED[backend]())
    failed = world.cluster.wait_condition("demo", "Failed", "True", reason="PermanentError")
    assert "exit code 1 (permanent)" in failed["message"] and "no such file" in failed["message"]
    status = world.cluster.job("demo")["status"]
    assert status["phase"] == "Failed" and status["workload"]["lastExit"]["pod"] == "demo-node-0-1-x"
    assert world.cluster.condition("demo", "Stalled")["status"] == "True"


@pytest.mark.parametrize("world", [("trainjob",), ("jobset",)], indirect=True, ids=NEW_BACKENDS)
def test_suspend_and_resume_map_to_the_childs_suspend(world, tmp_path):
    backend = world.emulator.workloads[0]
    world.cluster.apply_job("demo", spec(tmp_path))
    wait_for(lambda: world.child(backend), what="the child")
    assert world.child(backend)["spec"]["suspend"] is False
    world.cluster.kube.patch(*FTJ, "default", "demo", {"spec": {"suspend": True}})
    wait_for(lambda: world.child(backend)["spec"]["suspend"] is True, what="the child suspended")
    world.cluster.wait_condition("demo", "Suspended", "True")
    assert world.cluster.job("demo")["status"]["phase"] == "Suspended"
    world.cluster.kube.patch(*FTJ, "default", "demo", {"spec": {"suspend": False}})
    wait_for(lambda: world.child(backend)["spec"]["suspend"] is False, what="the child resumed")
    world.cluster.wait_condition("demo", "Suspended", "False")


@pytest.mark.parametrize("world", [("trainjob",), ("jobset",)], indirect=True, ids=NEW_BACKENDS)
def test_kueue_admission_is_never_undone(world, tmp_path):
    backend = world.emulator.workloads[0]
    world.cluster.apply_job("demo", spec(tmp_path, queue_name="gpus"))
    child = wait_for(lambda: world.child(backend), what="the child")
    assert child["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus" and child["spec"]["suspend"] is True
    api_version, kind, _ = KINDS[backend]
    world.cluster.kube.patch(api_version, kind, "default", "demo", {"spec": {"suspend": False}})  # Kueue admits
    world.operator.stop()  # a restart reconciles (resume) every job again, applying its children
    world.operator = OperatorThread(world.emulator.url).start()
    wait_for(lambda: world.operator.memo.stats["reconciles"] >= 1, what="the restarted operator's reconcile")
    assert world.child(backend)["spec"]["suspend"] is False


@pytest.mark.parametrize("world", [("trainjob",), ("jobset",)], indirect=True, ids=NEW_BACKENDS)
def test_spec_edit_after_start_is_rejected_and_delete_collects_the_child(world, tmp_path):
    backend = world.emulator.workloads[0]
    world.cluster.apply_job("demo", spec(tmp_path))
    wait_for(lambda: world.child(backend), what="the child")
    world.cluster.wait_condition("demo", "Accepted", "True")
    before = world.child(backend)
    world.cluster.kube.patch(*FTJ, "default", "demo", {"spec": {"training": {"learning_rate": 1e-3}}})
    world.cluster.wait_condition("demo", "Accepted", "False", reason="SpecChangeRejected")
    after = world.child(backend)  # the run keeps its spec: the child was not patched
    assert after["spec"] == before["spec"] and after["metadata"]["annotations"] == before["metadata"]["annotations"]
    world.cluster.kube.delete(*FTJ, "default", "demo")
    wait_for(lambda: world.child(backend) is None and not world.emulator.objects("configmaps"),
             what="the child garbage-collected")


# ------------------------------------------------------------------ discovery and the choice


@pytest.mark.parametrize("world, expected", [
    (("pytorchjob",), "pytorchjob"),
    (("jobset", "pytorchjob"), "jobset"),
    (("trainjob", "jobset"), "trainjob"),
    (("trainjob", "jobset", "pytorchjob"), "trainjob"),
], indirect=["world"], ids=["one", "jobset-over-pytorchjob", "trainjob-over-jobset", "all"])
def test_auto_prefers_trainjob_then_jobset_then_pytorchjob(world, expected, tmp_path):
    world.cluster.apply_job("demo", spec(tmp_path))
    wait_for(lambda: world.child(expected), what=f"a {expected}")
    world.cluster.wait_condition("demo", "Accepted", "True")
    assert [b for b in KINDS if world.children(b)] == [expected]


@pytest.mark.parametrize("world", [()], indirect=True, ids=["none"])
def test_a_cluster_serving_no_backend_is_told_what_to_install_and_proceeds_once_it_is(world, tmp_path):
    world.cluster.apply_job("demo", spec(tmp_path))
    refused = world.cluster.wait_condition("demo", "Accepted", "False", reason="BackendNotInstalled")
    for install in ("Kubeflow Trainer v2", "JobSet controller", "Kubeflow Training Operator v1"):
        assert install in refused["message"]
    assert world.cluster.job("demo")["status"]["phase"] == "Waiting"
    wait_for(lambda: ("Warning", "BackendNotInstalled") in [(t, r) for t, r, _ in world.events()],
             what="a Warning Event")
    assert world.emulator.objects("configmaps") == []  # nothing half-created

    world.emulator.serve("jobset")  # the cluster admin installs JobSet
    wait_for(lambda: world.child("jobset"), what="the JobSet, created on a retry", timeout=30)
    world.cluster.wait_condition("demo", "Accepted", "True", reason="Valid")
    assert world.cluster.job("demo")["status"]["backend"] == "jobset"
    # kopf follows the new CRD: the JobSet's own events now reach the FineTuneJob.
    world.set_status("jobset", jobset_status(active=1, ready=1))
    world.cluster.wait_condition("demo", "Running", "True", reason="Training", timeout=30)


@pytest.mark.parametrize("world", [("pytorchjob",)], indirect=True, ids=["pytorchjob-only"])
def test_a_job_pinned_to_a_missing_backend_waits_for_its_crd(world, tmp_path):
    world.cluster.apply_job("demo", spec(tmp_path, backend="trainjob"))
    refused = world.cluster.wait_condition("demo", "Accepted", "False", reason="BackendNotInstalled")
    assert "spec.backend is trainjob" in refused["message"] and "Kubeflow Trainer v2" in refused["message"]
    assert world.children("pytorchjob") == []  # pinned: never falls back
    world.emulator.serve("trainjob")
    wait_for(lambda: world.child("trainjob"), what="the TrainJob", timeout=30)
    world.cluster.wait_condition("demo", "Accepted", "True")


@pytest.mark.parametrize("world", [("pytorchjob",)], indirect=True, ids=["pytorchjob-only"])
def test_a_running_jobs_backend_survives_a_discovery_change(world, tmp_path):
    world.cluster.apply_job("demo", spec(tmp_path))
    wait_for(lambda: world.child("pytorchjob"), what="the PyTorchJob")
    world.set_status("pytorchjob", pytorchjob_conditions("Created", "Running"))
    world.cluster.wait_condition("demo", "Running", "True")
    world.emulator.serve("trainjob")  # Trainer v2 installed later
    world.operator.stop()  # a restarted operator (fresh discovery) resumes the job
    world.operator = OperatorThread(world.emulator.url).start()
    world.cluster.kube.patch(*FTJ, "default", "demo", {"spec": {"suspend": True}})  # and a reconcile
    wait_for(lambda: world.child("pytorchjob")["spec"]["runPolicy"]["suspend"] is True, what="suspended")
    assert world.children("trainjob") == [] and world.cluster.job("demo")["status"]["backend"] == "pytorchjob"


def test_a_reconcile_killed_before_the_workload_keeps_its_backend(tmp_path):
    """Operator 1 chooses JobSet, creates the ConfigMap and RBAC and dies before the JobSet;
    TrainJob is installed meanwhile; operator 2 reads the choice off the ConfigMap: one child, a JobSet."""
    with EmulatorThread(workloads=("jobset",)) as emulator:
        cluster = Cluster(emulator)
        first_url = emulator.add_server()
        gate = emulator.gate(is_create("jobsets"))
        first = OperatorThread(first_url).start()
        cluster.apply_job("demo", spec(tmp_path))
        assert gate.hit.wait(20), "the operator never got to the JobSet"
        emulator.sever(first_url)
        first.kill()
        assert cluster.job("demo").get("status") is None
        emulator.serve("trainjob")
        second = OperatorThread(emulator.url).start()
        try:
            cluster.wait_condition("demo", "Accepted", "True", reason="Valid")
            wait_for(lambda: (cluster.job("demo")["status"].get("backend")), what="status.backend")
        finally:
            gate.release(lost=True)
            second.stop()
            first.join()
        assert names(emulator.objects("jobsets")) == ["demo"] and emulator.objects("trainjobs") == []
        assert cluster.job("demo")["status"]["backend"] == "jobset"


def test_a_backend_this_operator_may_not_use_is_refused(tmp_path):
    with EmulatorThread(workloads=("jobset", "pytorchjob")) as emulator:
        settings = RenderSettings(trainer_image="registry.test/trainer:1", enabled_backends=("pytorchjob",))
        operator = OperatorThread(emulator.url, render_settings=settings).start()
        cluster = Cluster(emulator)
        try:
            cluster.apply_job("pinned", spec(tmp_path, backend="jobset"))
            refused = cluster.wait_condition("pinned", "Accepted", "False", reason="BackendNotEnabled")
            assert "enabled: pytorchjob" in refused["message"]
            cluster.apply_job("auto", spec(tmp_path))  # auto picks among the enabled only
            wait_for(lambda: cluster.pytorchjob("auto"), what="the PyTorchJob")
            assert emulator.objects("jobsets") == []
        finally:
            operator.stop()


# ------------------------------------------------------------------ an old CRD after `helm upgrade`


def test_an_operator_on_a_crd_without_backends_says_how_to_upgrade(tmp_path, caplog):
    """Helm never upgrades crds/: the CRD of the previous release (the upgrade fixture) lacks
    spec.backend, which a real API server would prune from every job. The operator says so."""
    import yaml

    from finetune_operator.handlers import stale_crd_fields

    fixtures = Path(__file__).parent / "fixtures" / "upgrade"
    old = yaml.safe_load((fixtures / "finetunejobs-before-backends.yaml").read_text())
    new = yaml.safe_load((Path(__file__).parent.parent / "crds" / "finetunejobs.finetune.dev.yaml").read_text())
    assert stale_crd_fields([old]) == ["spec.backend", "spec.training_runtime"]
    assert stale_crd_fields([new]) == [] and stale_crd_fields([]) == []
    with EmulatorThread() as emulator:
        Cluster(emulator).kube.create(old)
        with caplog.at_level("ERROR"):
            operator = OperatorThread(emulator.url).start()
            try:
                wait_for(lambda: any("predates this operator" in r.getMessage() for r in caplog.records),
                         what="the stale-CRD error in the operator's log")
            finally:
                operator.stop()
    message = next(r.getMessage() for r in caplog.records if "predates" in r.getMessage())
    assert "spec.backend" in message and "kubectl apply --server-side" in message


def test_discovery_remembers_what_it_found_and_never_an_empty_answer():
    """backends.Discovery over the emulator's real discovery endpoints: a found set is reused
    for `ttl` (one GET per group/version, not one per job), an empty one is asked again."""
    from finetune_operator.backends import Discovery

    now = [0.0]
    with EmulatorThread(workloads=()) as emulator:
        kube = Cluster(emulator).kube

        def asked() -> int:
            return sum(1 for r in emulator.requests() if r.url.path.startswith(("/apis/trainer", "/apis/jobset",
                                                                                  "/apis/kubeflow")))

        discovery = Discovery(ttl=30, clock=lambda: now[0])
        assert discovery.served(kube) == frozenset() and discovery.served(kube) == frozenset()
        assert asked() == 6  # nothing found: asked each time (three group/versions each)
        emulator.serve("jobset")
        assert discovery.served(kube) == {"jobset"}
        emulator.serve("trainjob")
        assert discovery.served(kube) == {"jobset"} and asked() == 9  # remembered within the ttl
        now[0] = 31.0
        assert discovery.served(kube) == {"jobset", "trainjob"} and asked() == 12
        discovery.forget()
        assert discovery.served(kube) == {"jobset", "trainjob"} and asked() == 15
