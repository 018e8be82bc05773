"""Status as data: every row of `status.PHASES` walked, and a new phase added by a row alone.

(a) each phase row, entered from a phase before it, yields its conditions, reasons and the
    Event severity the row states; (b) a Kueue "Queued" row, added at run time with
    `with_phase`, is decided, derived and announced with no other code change, while the
    cross-cutting rules (the spec's verdict, a new generation) still wrap it.
"""

from __future__ import annotations

import dataclasses

import pytest

from finetune_operator import status as st
from finetune_operator.status import FALSE, TRUE, UNKNOWN, Acceptance, Announcement, Cond, ExitInfo, PhaseRow, Ref

NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T01:00:00Z"
VALID = Acceptance.valid(1)


def pj(*true: str, suspend: bool = False, exit_info: ExitInfo | None = None) -> dict:
    """A PyTorchJob with the named conditions True, summarized."""
    job = {
        "metadata": {"name": "job"},
        "spec": {"runPolicy": {"suspend": suspend}},
        "status": {"conditions": [{"type": t, "status": "True", "message": f"{t}."} for t in true]},
    }
    return st.summarize_pytorchjob(job, exit_info)


def derive(acceptance, suspend, pytorchjob, *, generation=1, previous=None, now=NOW, phases=st.PHASES):
    return st.conditions_for(generation=generation, acceptance=acceptance, suspend=suspend, workload=pytorchjob,
                             previous=previous, now=now, phases=phases)


def by_type(out: dict) -> dict:
    return {c["type"]: c for c in out["conditions"]}


def events(before: dict | None, after: dict, phases=st.PHASES) -> list[tuple[str, str, str, str]]:
    return [(e.type, e.status, e.reason, e.event_type)
            for e in st.transitions(before and before["conditions"], after["conditions"], phases)]


# ------------------------------------------------------------------ (a) every phase row

RUNNING_JOB = (VALID, False, pj("Created", "Running"))

# phase: (before (acceptance, spec.suspend, child) or None, after, statuses, reasons, the Event of entering it)
# statuses: Accepted, Suspended, Running, Succeeded, Failed, Ready, Reconciling, Stalled
PHASE_CASES = {
    "Pending": (None, (Acceptance.pending(1), False, None),
                (UNKNOWN, FALSE, FALSE, UNKNOWN, FALSE, FALSE, TRUE, FALSE),
                {"Running": "NotStarted", "Succeeded": "InProgress", "Ready": "Pending", "Reconciling": "Pending",
                 "Stalled": "AsExpected"}, None),
    "Invalid": (None, (Acceptance.invalid(1, ["spec.x: bad"]), False, None),
                (FALSE, FALSE, FALSE, FALSE, FALSE, FALSE, FALSE, TRUE),
                {"Running": "NotStarted", "Succeeded": "InvalidSpec", "Failed": "NoFailure", "Ready": "InvalidSpec",
                 "Reconciling": "InvalidSpec", "Stalled": "InvalidSpec"},
                ("Accepted", FALSE, "InvalidSpec", "Warning")),
    "Waiting": (None, (Acceptance.refused(1, "BackendNotInstalled", "install JobSet"), False, None),
                (FALSE, FALSE, FALSE, FALSE, FALSE, FALSE, TRUE, TRUE),
                {"Running": "NotStarted", "Succeeded": "BackendNotInstalled", "Ready": "BackendNotInstalled",
                 "Reconciling": "BackendNotInstalled", "Stalled": "BackendNotInstalled"},
                ("Accepted", FALSE, "BackendNotInstalled", "Warning")),
    "Starting": ((VALID, False, None), (VALID, False, pj("Created")),
                 (TRUE, FALSE, FALSE, UNKNOWN, FALSE, FALSE, TRUE, FALSE),
                 {"Running": "Starting", "Ready": "Starting", "Reconciling": "Starting", "Stalled": "AsExpected"},
                 ("Running", FALSE, "Starting", "Normal")),
    "Running": ((VALID, False, pj("Created")), RUNNING_JOB,
                (TRUE, FALSE, TRUE, UNKNOWN, FALSE, TRUE, FALSE, FALSE),
                {"Running": "Training", "Ready": "Running", "Reconciling": "Running"},
                ("Running", TRUE, "Training", "Normal")),
    "Restarting": (RUNNING_JOB, (VALID, False, pj("Created", "Restarting", exit_info=ExitInfo(137))),
                   (TRUE, FALSE, FALSE, UNKNOWN, FALSE, FALSE, TRUE, FALSE),
                   {"Running": "Restarting", "Ready": "Restarting", "Reconciling": "Restarting"},
                   ("Running", FALSE, "Restarting", "Warning")),
    "Suspended": (RUNNING_JOB, (VALID, True, pj("Created", "Suspended", suspend=True)),
                  (TRUE, TRUE, FALSE, UNKNOWN, FALSE, FALSE, FALSE, FALSE),
                  {"Suspended": "Suspended", "Running": "Suspended", "Ready": "Suspended", "Reconciling": "Suspended"},
                  ("Suspended", TRUE, "Suspended", "Normal")),
    "Succeeded": (RUNNING_JOB, (VALID, False, pj("Succeeded")),
                  (TRUE, FALSE, FALSE, TRUE, FALSE, TRUE, FALSE, FALSE),
                  {"Running": "Completed", "Succeeded": "Completed", "Ready": "Succeeded", "Reconciling": "Succeeded"},
                  ("Succeeded", TRUE, "Completed", "Normal")),
    "Failed": (RUNNING_JOB, (VALID, False, pj("Failed", exit_info=ExitInfo(2))),
               (TRUE, FALSE, FALSE, FALSE, TRUE, FALSE, FALSE, TRUE),
               {"Running": "Failed", "Succeeded": "Failed", "Failed": "PermanentError", "Ready": "Failed",
                "Reconciling": "Failed", "Stalled": "PermanentError"},
               ("Failed", TRUE, "PermanentError", "Warning")),
}


def _row(phase: str, phases=st.PHASES) -> PhaseRow:
    return next(r for r in phases if r.phase == phase)


def test_every_phase_row_has_a_case():
    assert [r.phase for r in st.PHASES] == ["Pending", "Waiting", "Invalid", "Succeeded", "Failed", "Suspended", "Restarting",
                                            "Running", "Starting"]  # the order the phase is decided in
    assert set(PHASE_CASES) == {r.phase for r in st.PHASES}


@pytest.mark.parametrize("phase", list(PHASE_CASES))
def test_phase_row(phase):
    before, after, statuses, reasons, event = PHASE_CASES[phase]
    row = _row(phase)
    out = derive(*after)
    conds = by_type(out)
    assert out["phase"] == phase
    assert tuple(conds[t]["status"] for t in st.CONDITION_TYPES) == statuses
    assert {t: conds[t]["reason"] for t in reasons} == reasons

    # where the spec is accepted and a child exists, the row's own statuses and literal reasons show
    if after[0].status == TRUE and after[2] is not None:
        for ctype in st.CONDITION_TYPES:
            spec = row.spec(ctype)
            if spec is None:
                continue
            assert conds[ctype]["status"] == spec.status, ctype
            if isinstance(spec.reason, str) and ctype != st.FAILED:  # Failed=True's reason: the exit code's
                assert conds[ctype]["reason"] == spec.reason, ctype

    # the Event of entering the phase has the row's severity
    got = events(derive(*before) if before else None, out)
    if event is None:
        assert row.announced_by is None and all(e[3] == "Normal" for e in got)
    else:
        assert event in got
        assert event[3] == row.event
        assert row.announced_by.matches(st.Transition(*event[:3], ""))
        assert [e for e in got if e[3] == "Warning"] == ([event] if row.event == "Warning" else [])


def test_terminal_rows_are_the_ended_runs():
    assert {r.phase for r in st.PHASES if r.terminal} == {"Succeeded", "Failed"}
    assert {r.phase for r in st.PHASES if r.event == "Warning"} == {"Waiting", "Invalid", "Failed", "Restarting"}


def test_refs_read_conditions_derived_before():
    failed = by_type(derive(VALID, False, pj("Failed", exit_info=ExitInfo(137))))
    assert _row("Failed").ready.message == Ref(st.FAILED, "message")
    assert failed["Ready"]["message"] == failed["Failed"]["message"] == failed["Stalled"]["message"]
    assert failed["Stalled"]["reason"] == failed["Failed"]["reason"] == "RetriesExhausted"


def test_a_row_must_state_what_no_rule_decides():
    hollow = dataclasses.replace(_row("Running"), ready=None)
    with pytest.raises(ValueError, match="Running states no Ready"):
        derive(*RUNNING_JOB, phases=st.with_phase(hollow, before="Running"))


# ------------------------------------------------------------------ (b) adding a row is enough

QUEUED = PhaseRow(
    "Queued",
    # the child exists and Kueue holds it suspended (runPolicy.suspend) although spec.suspend is false
    lambda f: f.job.exists and f.suspend and not f.spec_suspend and not f.job.running,
    running=Cond(FALSE, "Queued", "waiting for quota in Kueue"),
    ready=Cond(FALSE, "Queued", "queued in Kueue"),
    reconciling=Cond(TRUE, "Queued", "waiting for Kueue to admit the job"),
    announced_by=Announcement(st.RUNNING, reason="Queued"),
)
WITH_QUEUED = st.with_phase(QUEUED, before=st.PHASE_SUSPENDED)
HELD_BY_KUEUE = pj("Created", "Suspended", suspend=True)


def test_queued_is_not_shipped():
    assert "Queued" not in {r.phase for r in st.PHASES}
    assert derive(VALID, False, HELD_BY_KUEUE)["phase"] == "Suspended"


def test_a_queued_row_alone_adds_the_phase():
    assert [r.phase for r in WITH_QUEUED].index("Queued") == [r.phase for r in WITH_QUEUED].index("Suspended") - 1
    before = derive(VALID, False, pj("Created"), phases=WITH_QUEUED)
    out = derive(VALID, False, HELD_BY_KUEUE, previous=before["conditions"], now=LATER, phases=WITH_QUEUED)
    conds = by_type(out)
    assert out["phase"] == "Queued"
    assert {t: (c["status"], c["reason"], c["message"]) for t, c in conds.items()} == {
        "Accepted": (TRUE, "Valid", "spec is valid; children applied"),
        "Suspended": (TRUE, "Suspended", "the PyTorchJob is suspended (spec.suspend, or queued in Kueue): no pods run"),
        "Running": (FALSE, "Queued", "waiting for quota in Kueue"),
        "Succeeded": (UNKNOWN, "InProgress", "the run has not ended"),
        "Failed": (FALSE, "NoFailure", ""),
        "Ready": (FALSE, "Queued", "queued in Kueue"),
        "Reconciling": (TRUE, "Queued", "waiting for Kueue to admit the job"),
        "Stalled": (FALSE, "AsExpected", ""),
    }
    assert events(before, out, WITH_QUEUED) == [("Suspended", TRUE, "Suspended", "Normal"),
                                                ("Running", FALSE, "Queued", "Normal")]


def test_the_queued_rows_event_severity_is_the_rows():
    loud = st.with_phase(dataclasses.replace(QUEUED, event="Warning"), before=st.PHASE_SUSPENDED)
    before = derive(VALID, False, pj("Created"), phases=loud)
    out = derive(VALID, False, HELD_BY_KUEUE, previous=before["conditions"], phases=loud)
    assert ("Running", FALSE, "Queued", "Warning") in events(before, out, loud)


@pytest.mark.parametrize(
    "acceptance, generation, suspend, child, phase, expected",
    [
        # a rejected change: the spec's verdict still decides Ready and Stalled around the new row
        (Acceptance.change_rejected(2, 1), 2, False, HELD_BY_KUEUE, "Queued",
         {"Ready": (FALSE, "SpecChangeRejected"), "Stalled": (TRUE, "SpecChangeRejected"),
          "Reconciling": (FALSE, "SpecChangeRejected"), "Running": (FALSE, "Queued")}),
        # a generation not observed yet: Reconciling NewGeneration wins over the row
        (VALID, 2, False, HELD_BY_KUEUE, "Queued", {"Reconciling": (TRUE, "NewGeneration"), "Ready": (FALSE, "Queued")}),
        # the user's own suspend is still Suspended; once Kueue admits, Running
        (VALID, 1, True, HELD_BY_KUEUE, "Suspended", {"Running": (FALSE, "Suspended")}),
        (VALID, 1, False, pj("Created", "Running"), "Running", {"Running": (TRUE, "Training")}),
    ],
    ids=["rejected-change", "new-generation", "user-suspend", "admitted"],
)
def test_cross_cutting_rules_wrap_the_new_row(acceptance, generation, suspend, child, phase, expected):
    out = derive(acceptance, suspend, child, generation=generation, phases=WITH_QUEUED)
    conds = by_type(out)
    assert out["phase"] == phase
    assert {t: (conds[t]["status"], conds[t]["reason"]) for t in expected} == expected
