"""Table tests of the status mapping: (acceptance, spec, PyTorchJob, pods, progress) -> status.

Each row is one situation a FineTuneJob can be in; the expected columns are the phase and
every condition's status (and the reasons that carry meaning). The invariants every row
must satisfy (reason always set, observedGeneration, lastTransitionTime) are checked on all.
"""

from __future__ import annotations

import pytest

from finetune_operator import status as st
from finetune_trainer.contract import exit_code_is_retryable
from finetune_operator.status import FALSE, TRUE, UNKNOWN, Acceptance, ExitInfo

NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T01:00:00Z"


def pj(*true: str, suspend: bool = False, messages: dict | None = None, exit_info: ExitInfo | None = None,
       replicas: dict | None = None) -> dict:
    """A PyTorchJob (as the API returns it) with the named conditions True, summarized."""
    messages = messages or {}
    job = {
        "metadata": {"name": "job"},
        "spec": {"runPolicy": {"suspend": suspend}},
        "status": {
            "conditions": [{"type": t, "status": "True", "reason": f"PyTorchJob{t}", "message": messages.get(t, f"{t}.")}
                           for t in true],
            "replicaStatuses": replicas or {},
        },
    }
    return st.summarize_pytorchjob(job, exit_info)


VALID = Acceptance.valid(1)
INVALID = Acceptance.invalid(1, ["spec.training.learning_rate: must be > 0"])
REJECTED = Acceptance.change_rejected(2)
PENDING = Acceptance.pending(1)

# Columns: Accepted, Suspended, Running, Succeeded, Failed, Ready, Reconciling, Stalled
ROWS = [
    # id, acceptance, generation, spec.suspend, pytorchjob, progress, phase, statuses, reasons
    ("not validated yet", PENDING, 1, False, None, None, "Pending",
     (UNKNOWN, FALSE, FALSE, UNKNOWN, FALSE, FALSE, TRUE, FALSE), {"Reconciling": "Pending", "Accepted": "Pending"}),
    ("invalid spec", INVALID, 1, False, None, None, "Invalid",
     (FALSE, FALSE, FALSE, FALSE, FALSE, FALSE, FALSE, TRUE),
     {"Accepted": "InvalidSpec", "Ready": "InvalidSpec", "Stalled": "InvalidSpec", "Succeeded": "InvalidSpec",
      "Running": "NotStarted", "Reconciling": "InvalidSpec"}),
    ("invalid and suspended", INVALID, 1, True, None, None, "Invalid",
     (FALSE, TRUE, FALSE, FALSE, FALSE, FALSE, FALSE, TRUE), {"Suspended": "Suspended"}),
    ("valid, no child yet", VALID, 1, False, None, None, "Starting",
     (TRUE, FALSE, FALSE, UNKNOWN, FALSE, FALSE, TRUE, FALSE), {"Ready": "Starting", "Reconciling": "Starting"}),
    ("valid, suspended before the child exists", VALID, 1, True, None, None, "Suspended",
     (TRUE, TRUE, FALSE, UNKNOWN, FALSE, FALSE, FALSE, FALSE), {"Ready": "Suspended", "Reconciling": "Suspended"}),
    ("child without status", VALID, 1, False, pj(), None, "Starting",
     (TRUE, FALSE, FALSE, UNKNOWN, FALSE, FALSE, TRUE, FALSE), {"Running": "Starting"}),
    ("child created", VALID, 1, False, pj("Created"), None, "Starting",
     (TRUE, FALSE, FALSE, UNKNOWN, FALSE, FALSE, TRUE, FALSE), {"Running": "Starting"}),
    ("running", VALID, 1, False, pj("Created", "Running"), None, "Running",
     (TRUE, FALSE, TRUE, UNKNOWN, FALSE, TRUE, FALSE, FALSE),
     {"Running": "Training", "Ready": "Running", "Reconciling": "Running", "Stalled": "AsExpected"}),
    ("running with progress", VALID, 1, False, pj("Created", "Running"), {"step": 5, "totalSteps": 10}, "Running",
     (TRUE, FALSE, TRUE, UNKNOWN, FALSE, TRUE, FALSE, FALSE), {}),
    ("restarting", VALID, 1, False, pj("Created", "Restarting"), None, "Restarting",
     (TRUE, FALSE, FALSE, UNKNOWN, FALSE, FALSE, TRUE, FALSE),
     {"Running": "Restarting", "Ready": "Restarting", "Reconciling": "Restarting"}),
    ("restarting after a preemption", VALID, 1, False,
     pj("Created", "Restarting", exit_info=ExitInfo(143, "Error", "saved checkpoint-40")), None, "Restarting",
     (TRUE, FALSE, FALSE, UNKNOWN, FALSE, FALSE, TRUE, FALSE), {"Running": "Restarting"}),
    ("succeeded", VALID, 1, False, pj("Created", "Succeeded"), None, "Succeeded",
     (TRUE, FALSE, FALSE, TRUE, FALSE, TRUE, FALSE, FALSE),
     {"Succeeded": "Completed", "Ready": "Succeeded", "Running": "Completed", "Reconciling": "Succeeded"}),
    ("succeeded with a checkpoint", VALID, 1, False, pj("Created", "Succeeded"), {"checkpointUri": "s3://b/ns/j/final"},
     "Succeeded", (TRUE, FALSE, FALSE, TRUE, FALSE, TRUE, FALSE, FALSE), {}),
    ("failed: exit 1 is permanent", VALID, 1, False, pj("Created", "Failed", exit_info=ExitInfo(1, "Error", "NaN loss")),
     None, "Failed", (TRUE, FALSE, FALSE, FALSE, TRUE, FALSE, FALSE, TRUE),
     {"Failed": "PermanentError", "Stalled": "PermanentError", "Ready": "Failed", "Succeeded": "Failed",
      "Running": "Failed", "Reconciling": "Failed"}),
    ("failed: exit 127 is permanent", VALID, 1, False, pj("Failed", exit_info=ExitInfo(127)), None, "Failed",
     (TRUE, FALSE, FALSE, FALSE, TRUE, FALSE, FALSE, TRUE), {"Failed": "PermanentError"}),
    ("failed: exit 143 retried until the backoff limit", VALID, 1, False, pj("Failed", exit_info=ExitInfo(143)), None,
     "Failed", (TRUE, FALSE, FALSE, FALSE, TRUE, FALSE, FALSE, TRUE), {"Failed": "RetriesExhausted"}),
    ("failed: exit 137 (OOMKilled) retried", VALID, 1, False, pj("Failed", exit_info=ExitInfo(137, "OOMKilled")), None,
     "Failed", (TRUE, FALSE, FALSE, FALSE, TRUE, FALSE, FALSE, TRUE), {"Failed": "RetriesExhausted"}),
    ("failed: no exit code known", VALID, 1, False, pj("Failed"), None, "Failed",
     (TRUE, FALSE, FALSE, FALSE, TRUE, FALSE, FALSE, TRUE), {"Failed": "JobFailed", "Stalled": "JobFailed"}),
    ("failed: exit code only in the job's message", VALID, 1, False,
     pj("Failed", messages={"Failed": "replica master exited with code 2"}), None, "Failed",
     (TRUE, FALSE, FALSE, FALSE, TRUE, FALSE, FALSE, TRUE), {"Failed": "PermanentError"}),
    ("failed wins over a stale Running", VALID, 1, False, pj("Running", "Failed", exit_info=ExitInfo(1)), None, "Failed",
     (TRUE, FALSE, TRUE, FALSE, TRUE, FALSE, FALSE, TRUE), {"Failed": "PermanentError"}),
    ("succeeded wins over failed", VALID, 1, False, pj("Succeeded", "Failed"), None, "Succeeded",
     (TRUE, FALSE, FALSE, TRUE, FALSE, TRUE, FALSE, FALSE), {}),
    ("suspending: pods still run", VALID, 1, True, pj("Created", "Running", suspend=True), None, "Suspended",
     (TRUE, TRUE, TRUE, UNKNOWN, FALSE, FALSE, TRUE, FALSE), {"Reconciling": "Suspending", "Ready": "Suspended"}),
    ("suspended", VALID, 1, True, pj("Created", "Suspended", suspend=True), None, "Suspended",
     (TRUE, TRUE, FALSE, UNKNOWN, FALSE, FALSE, FALSE, FALSE),
     {"Running": "Suspended", "Reconciling": "Suspended", "Suspended": "Suspended"}),
    ("suspended, no condition from the training operator yet", VALID, 1, True, pj("Created", suspend=True), None,
     "Suspended", (TRUE, TRUE, FALSE, UNKNOWN, FALSE, FALSE, FALSE, FALSE), {}),
    ("resuming", VALID, 1, False, pj("Created", "Suspended", suspend=False), None, "Suspended",
     (TRUE, FALSE, FALSE, UNKNOWN, FALSE, FALSE, TRUE, FALSE), {"Reconciling": "Resuming"}),
    ("queued in Kueue: the child says suspended though spec.suspend is false", VALID, 1, False, pj("Created", suspend=True),
     None, "Suspended", (TRUE, TRUE, FALSE, UNKNOWN, FALSE, FALSE, FALSE, FALSE), {}),
    ("spec edit rejected while running", REJECTED, 2, False, pj("Created", "Running"), None, "Running",
     (FALSE, FALSE, TRUE, UNKNOWN, FALSE, FALSE, FALSE, TRUE),
     {"Accepted": "SpecChangeRejected", "Ready": "SpecChangeRejected", "Stalled": "SpecChangeRejected"}),
    ("invalid edit while running", Acceptance.invalid(2, ["spec.nodes: must be >= 1"]), 2, False, pj("Created", "Running"),
     None, "Running", (FALSE, FALSE, TRUE, UNKNOWN, FALSE, FALSE, FALSE, TRUE), {"Accepted": "InvalidSpec"}),
    ("new generation not reconciled yet", VALID, 2, False, pj("Created", "Running"), None, "Running",
     (TRUE, FALSE, TRUE, UNKNOWN, FALSE, TRUE, TRUE, FALSE), {"Reconciling": "NewGeneration"}),
    ("new generation after an invalid one", INVALID, 2, False, None, None, "Invalid",
     (FALSE, FALSE, FALSE, FALSE, FALSE, FALSE, TRUE, TRUE), {"Reconciling": "NewGeneration"}),
    ("succeeded, then the spec edited", REJECTED, 2, False, pj("Succeeded"), None, "Succeeded",
     (FALSE, FALSE, FALSE, TRUE, FALSE, FALSE, FALSE, TRUE), {"Ready": "SpecChangeRejected"}),
]
TYPES = ("Accepted", "Suspended", "Running", "Succeeded", "Failed", "Ready", "Reconciling", "Stalled")


@pytest.mark.parametrize(
    "acceptance, generation, suspend, pytorchjob, progress, phase, statuses, reasons",
    [row[1:] for row in ROWS],
    ids=[row[0] for row in ROWS],
)
def test_mapping(acceptance, generation, suspend, pytorchjob, progress, phase, statuses, reasons):
    out = st.conditions_for(generation=generation, acceptance=acceptance, suspend=suspend, workload=pytorchjob,
                            progress=progress, now=NOW)
    by_type = {c["type"]: c for c in out["conditions"]}
    assert out["phase"] == phase
    assert tuple(by_type[t]["status"] for t in TYPES) == statuses
    for ctype, reason in reasons.items():
        assert by_type[ctype]["reason"] == reason, ctype
    assert out["observedGeneration"] == acceptance.generation
    assert (out.get("workload") is not None) == (pytorchjob is not None)


@pytest.mark.parametrize("row", ROWS, ids=[row[0] for row in ROWS])
def test_every_condition_follows_the_api_conventions(row):
    _, acceptance, generation, suspend, pytorchjob, progress, *_ = row
    out = st.conditions_for(generation=generation, acceptance=acceptance, suspend=suspend, workload=pytorchjob,
                            progress=progress, now=NOW)
    assert [c["type"] for c in out["conditions"]] == list(TYPES)
    for cond in out["conditions"]:
        assert cond["status"] in (TRUE, FALSE, UNKNOWN)
        assert cond["reason"] and cond["reason"][0].isupper() and " " not in cond["reason"], cond
        assert cond["lastTransitionTime"] == NOW
        assert cond["observedGeneration"] == acceptance.generation
        assert isinstance(cond["message"], str)


def _by_type(out):
    return {c["type"]: c for c in out["conditions"]}


def test_failed_condition_carries_exit_code_reason_and_message():
    job = pj("Failed", messages={"Failed": "PyTorchJob job is failed because 1 Master replica(s) failed."},
             exit_info=ExitInfo(1, "Error", "spec.dataset: no rows left after filtering", "job-master-0"))
    failed = _by_type(st.conditions_for(generation=1, acceptance=VALID, suspend=False, workload=job,
                                        progress={"checkpointUri": "s3://b/ns/job/checkpoints/checkpoint-40"}, now=NOW))["Failed"]
    assert failed["reason"] == "PermanentError"
    for part in ("exit code 1 (permanent)", "reason Error", "pod job-master-0", "no rows left after filtering",
                 "1 Master replica(s) failed", "checkpoint-40"):
        assert part in failed["message"]


def test_restarting_names_the_retryable_exit():
    job = pj("Restarting", exit_info=ExitInfo(143, "Error", "preempted; saved checkpoint-40"))
    running = _by_type(st.conditions_for(generation=1, acceptance=VALID, suspend=False, workload=job, now=NOW))["Running"]
    assert "exit code 143 (retryable, SIGTERM)" in running["message"]
    assert "saved checkpoint-40" in running["message"]


def test_invalid_spec_message_lists_every_field():
    acceptance = Acceptance.invalid(3, ["spec.training.learning_rate: must be > 0", "spec.nodes: must be >= 1"])
    accepted = _by_type(st.conditions_for(generation=3, acceptance=acceptance, suspend=False, workload=None, now=NOW))["Accepted"]
    assert accepted["message"].splitlines()[1:] == ["spec.training.learning_rate: must be > 0", "spec.nodes: must be >= 1"]
    assert accepted["observedGeneration"] == 3


# ------------------------------------------------------------------ lastTransitionTime


def test_transition_time_moves_only_when_status_changes():
    first = st.conditions_for(generation=1, acceptance=VALID, suspend=False, workload=pj("Created"), now=NOW)
    second = st.conditions_for(generation=1, acceptance=VALID, suspend=False, workload=pj("Created", "Running"),
                               previous=first["conditions"], now=LATER)
    times = {c["type"]: c["lastTransitionTime"] for c in second["conditions"]}
    assert times["Running"] == LATER  # False -> True
    assert times["Ready"] == LATER  # False -> True
    assert times["Reconciling"] == LATER  # True -> False
    assert times["Accepted"] == NOW  # unchanged
    assert times["Succeeded"] == NOW  # Unknown -> Unknown
    assert times["Stalled"] == NOW


def test_reason_change_alone_keeps_the_transition_time():
    previous = [{"type": "Running", "status": "False", "reason": "Starting", "lastTransitionTime": NOW}]
    out = st.merge_transition_times([{"type": "Running", "status": "False", "reason": "Restarting"}], previous, LATER)
    assert out[0]["lastTransitionTime"] == NOW


def test_same_input_twice_changes_nothing():
    first = st.conditions_for(generation=1, acceptance=VALID, suspend=False, workload=pj("Running"), now=NOW)
    status = dict(first)
    again = st.conditions_for(generation=1, acceptance=VALID, suspend=False, workload=pj("Running"),
                              previous=first["conditions"], now=LATER)
    assert not st.status_changed(status, again)
    assert st.status_changed(status, {**again, "phase": "Failed"})


# ------------------------------------------------------------------ transitions -> Events


def test_first_visit_announces_what_is_news():
    out = st.conditions_for(generation=1, acceptance=VALID, suspend=False, workload=None, now=NOW)
    events = st.transitions(None, out["conditions"])
    assert [(e.type, e.status, e.reason) for e in events] == [("Accepted", TRUE, "Valid"), ("Running", FALSE, "NotStarted")]
    assert all(e.event_type == "Normal" for e in events)


@pytest.mark.parametrize(
    "before, after, expected",
    [
        (pj("Created"), pj("Created", "Running"), [("Running", TRUE, "Training", "Normal")]),
        (pj("Running"), pj("Restarting"), [("Running", FALSE, "Restarting", "Warning")]),
        (pj("Restarting"), pj("Running"), [("Running", TRUE, "Training", "Normal")]),
        (pj("Running"), pj("Succeeded"),
         [("Running", FALSE, "Completed", "Normal"), ("Succeeded", TRUE, "Completed", "Normal")]),
        (pj("Running"), pj("Failed", exit_info=ExitInfo(2)),
         [("Running", FALSE, "Failed", "Normal"), ("Succeeded", FALSE, "Failed", "Normal"),
          ("Failed", TRUE, "PermanentError", "Warning")]),
        (pj("Running"), pj("Running", suspend=True), [("Suspended", TRUE, "Suspended", "Normal")]),
        (pj("Running"), pj("Running"), []),
    ],
    ids=["starts", "restarts", "recovers", "succeeds", "fails", "suspends", "nothing"],
)
def test_transitions_between_child_states(before, after, expected):
    first = st.conditions_for(generation=1, acceptance=VALID, suspend=False, workload=before, now=NOW)
    second = st.conditions_for(generation=1, acceptance=VALID, suspend=False, workload=after,
                               previous=first["conditions"], now=LATER)
    got = [(e.type, e.status, e.reason, e.event_type) for e in st.transitions(first["conditions"], second["conditions"])]
    assert got == expected


def test_rejection_is_a_warning():
    first = st.conditions_for(generation=1, acceptance=VALID, suspend=False, workload=pj("Running"), now=NOW)
    second = st.conditions_for(generation=2, acceptance=REJECTED, suspend=False, workload=pj("Running"),
                               previous=first["conditions"], now=LATER)
    (event,) = st.transitions(first["conditions"], second["conditions"])
    assert (event.type, event.reason, event.event_type) == ("Accepted", "SpecChangeRejected", "Warning")
    assert event.event_message().startswith("Accepted=False: the spec changed after the job started")


# ------------------------------------------------------------------ exit codes


@pytest.mark.parametrize("code, retryable", [(1, False), (2, False), (127, False), (128, True), (137, True),
                                             (143, True), (255, True)])
def test_exit_code_classes(code, retryable):
    assert exit_code_is_retryable(code) is retryable
    assert ExitInfo(code).retryable is retryable


def pod(name, *, master=False, state=None, last=None, container="pytorch", extra_containers=()):
    def term(t):
        return {"terminated": {"exitCode": t[0], "reason": t[1], "message": t[2], "finishedAt": t[3]}} if t else {}

    statuses = [{"name": container, "state": term(state) or {"running": {}}, "lastState": term(last)}]
    statuses += [{"name": c, "state": {"terminated": {"exitCode": 9, "finishedAt": "2099-01-01T00:00:00Z"}}}
                 for c in extra_containers]
    labels = {"training.kubeflow.org/replica-type": "master" if master else "worker"}
    return {"metadata": {"name": name, "labels": labels}, "status": {"containerStatuses": statuses}}


@pytest.mark.parametrize(
    "pods, expected",
    [
        ([], None),
        ([pod("a", state=(0, "Completed", "", "2026-01-01T00:00:00Z"))], None),
        ([pod("a", state=(1, "Error", "bad data", "2026-01-01T00:00:00Z"))], (1, "Error", "bad data", "a")),
        ([pod("a", last=(143, "Error", "preempted", "2026-01-01T00:00:00Z"))], (143, "Error", "preempted", "a")),
        ([pod("w", state=(137, "OOMKilled", "", "2026-01-01T00:00:05Z")),
          pod("m", master=True, state=(1, "Error", "x", "2026-01-01T00:00:01Z"))], (137, "OOMKilled", "", "w")),
        ([pod("w", state=(2, "Error", "w", "2026-01-01T00:00:01Z")),
          pod("m", master=True, state=(1, "Error", "m", "2026-01-01T00:00:01Z"))], (1, "Error", "m", "m")),
        ([pod("a", state=(1, "Error", "trainer", "2026-01-01T00:00:00Z"), extra_containers=("sidecar",))],
         (1, "Error", "trainer", "a")),
    ],
    ids=["no pods", "clean exit", "failed now", "failed before a restart", "newest wins", "master on ties",
         "sidecars ignored"],
)
def test_exit_from_pods(pods, expected):
    info = st.exit_from_pods(pods)
    assert (None if info is None else (info.exit_code, info.reason, info.message, info.pod)) == expected


@pytest.mark.parametrize("message, code", [("exit code 3", 3), ("master exited with code 143.", 143),
                                           ("ExitCode: 1", None), ("exit code: 42", 42), ("", None)])
def test_exit_from_message(message, code):
    info = st.exit_from_message(message)
    assert (info.exit_code if info else None) == code


def test_summary_keeps_what_the_mapping_needs_and_round_trips_the_exit():
    job = {"metadata": {"name": "j"}, "spec": {"runPolicy": {"suspend": True}},
           "status": {"conditions": [{"type": "Running", "status": "True", "reason": "R", "message": "m",
                                      "lastUpdateTime": "t"}],
                      "replicaStatuses": {"Master": {"active": 1, "selector": "x"}}, "lastReconcileTime": "t"}}
    summary = st.summarize_pytorchjob(job, ExitInfo(143, "Error", "msg", "p"))
    assert summary == {"backend": "pytorchjob", "kind": "PyTorchJob", "name": "j", "suspend": True,
                       "conditions": [{"type": "Running", "status": "True", "reason": "R", "message": "m"}],
                       "replicaStatuses": {"Master": {"active": 1}},
                       "lastExit": {"exitCode": 143, "reason": "Error", "message": "msg", "pod": "p"}}
    assert st.exit_from_summary(summary) == ExitInfo(143, "Error", "msg", "p")
    assert st.needs_pods(summary) is False
    assert st.needs_pods({"conditions": [{"type": "Restarting", "status": "True"}]}) is True


def test_acceptance_from_recorded_conditions():
    recorded = [{"type": "Accepted", "status": "False", "reason": "InvalidSpec", "message": "m", "observedGeneration": 4}]
    assert Acceptance.from_conditions(recorded, 5) == Acceptance(FALSE, "InvalidSpec", "m", 4)
    assert Acceptance.from_conditions(None, 5) == Acceptance.pending(5)
