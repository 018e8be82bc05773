"""A FineTuneJob's status, derived once: (acceptance, spec, workload, pods, progress) -> status.

Pure functions only, so the whole mapping is a table test. The handlers feed them what they
read and write what they return (through the `/status` subresource).
The mapping is data: one row of `PHASES` per phase (when it holds, its conditions, the Event of
entering it), and small named rules for what is not about one phase (see "the mapping").

Conditions follow the Kubernetes API conventions (type, status, reason always set, message,
lastTransitionTime changing only when status changes, observedGeneration) and kstatus:

- domain: Accepted, Suspended, Running, Succeeded, Failed;
- kstatus: Ready (accepted and training healthily, or finished well: a GitOps sync never waits
  for hours of training), Reconciling (something in flight), Stalled (invalid or failed).

Completion is `Succeeded=True` (what `kubectl wait --for=condition=Succeeded` reads).
The child (PyTorchJob, TrainJob or JobSet) is first read into one vocabulary, the PyTorchJob's
conditions (`summarize_child`: Created, Running, Restarting, Succeeded, Failed, Suspended), so
the table is the same for every backend. No child reports exit codes; the exit code and the
trainer's termination message come from the pods (`exit_from_pods`), falling back to a code
quoted in the child's message. 1-127 are permanent and 128-255 retried (contract.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune_trainer.contract import CONTAINER_NAME as PYTORCH_CONTAINER
from finetune_trainer import contract as c
from finetune_trainer.contract import JOB_COMPLETION_INDEX_ANNOTATION, REPLICA_TYPE_LABEL, exit_code_is_retryable

# ------------------------------------------------------------------ condition types and values

ACCEPTED = "Accepted"
SUSPENDED = "Suspended"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
DOMAIN_TYPES = (ACCEPTED, SUSPENDED, RUNNING, SUCCEEDED, FAILED)
KSTATUS_TYPES = (READY, RECONCILING, STALLED)
CONDITION_TYPES = DOMAIN_TYPES + KSTATUS_TYPES

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"

# ------------------------------------------------------------------ reasons (CamelCase, always set)

REASON_PENDING = "Pending"  # not validated yet
REASON_VALID = "Valid"
REASON_INVALID_SPEC = "InvalidSpec"
REASON_SPEC_CHANGE_REJECTED = "SpecChangeRejected"
REASON_BACKEND_NOT_INSTALLED = "BackendNotInstalled"  # the chosen kind's CRD is not served: retried
REASON_BACKEND_NOT_ENABLED = "BackendNotEnabled"  # spec.backend names a kind this operator may not create
REASON_NEW_GENERATION = "NewGeneration"
REASON_SUSPENDED = "Suspended"
REASON_NOT_SUSPENDED = "NotSuspended"
REASON_SUSPENDING = "Suspending"
REASON_RESUMING = "Resuming"
REASON_NOT_STARTED = "NotStarted"
REASON_STARTING = "Starting"
REASON_TRAINING = "Training"
REASON_RESTARTING = "Restarting"
REASON_COMPLETED = "Completed"
REASON_IN_PROGRESS = "InProgress"
REASON_FAILED = "Failed"
REASON_NO_FAILURE = "NoFailure"
REASON_PERMANENT_ERROR = "PermanentError"  # exit code 1-127: a retry cannot fix it
REASON_RETRIES_EXHAUSTED = "RetriesExhausted"  # exit code 128+: retried until the backoff limit
REASON_JOB_FAILED = "JobFailed"  # the PyTorchJob failed and no exit code is known
REASON_RUNNING = "Running"
REASON_SUCCEEDED = "Succeeded"
REASON_AS_EXPECTED = "AsExpected"

# phase: a one-word summary for printer columns only
PHASE_PENDING = "Pending"
PHASE_INVALID = "Invalid"
PHASE_WAITING = "Waiting"  # for its backend's CRD to be installed
PHASE_STARTING = "Starting"
PHASE_RUNNING = "Running"
PHASE_RESTARTING = "Restarting"
PHASE_SUSPENDED = "Suspended"
PHASE_SUCCEEDED = "Succeeded"
PHASE_FAILED = "Failed"

# The training operator's container name and replica label (kubeflow/training-operator v1):
# PYTORCH_CONTAINER and REPLICA_TYPE_LABEL, from the contract (imported above).

# what a retryable exit code means: 128 + a signal, or one of ours
_RETRYABLE_MEANINGS = {130: "SIGINT", 134: "SIGABRT", 137: "SIGKILL", 139: "SIGSEGV", 143: "SIGTERM",
                       c.EXIT_UNAVAILABLE: "storage or model source unavailable"}


# ------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class Acceptance:
    """The verdict on one generation of the spec: Accepted's status, reason and message."""

    status: str
    reason: str
    message: str
    generation: int

    @classmethod
    def valid(cls, generation: int) -> Acceptance:
        return cls(TRUE, REASON_VALID, "spec is valid; children applied", generation)

    @classmethod
    def invalid(cls, generation: int, lines: Sequence[str]) -> Acceptance:
        return cls(FALSE, REASON_INVALID_SPEC, "invalid spec:\n" + "\n".join(lines), generation)

    @classmethod
    def change_rejected(cls, generation: int, running_generation: int | None = None) -> Acceptance:
        was = f"generation {running_generation}'s" if running_generation else "the original"
        return cls(
            FALSE,
            REASON_SPEC_CHANGE_REJECTED,
            f"the spec changed after the job started; only spec.suspend may change. The run keeps {was} "
            "spec. Revert the edit, or delete and re-create the FineTuneJob (checkpoints stay in storage "
            "and the new run resumes from them).",
            generation,
        )

    @classmethod
    def refused(cls, generation: int, reason: str, message: str) -> Acceptance:
        """A valid spec no backend can run now (backends.choose's Refusal)."""
        return cls(FALSE, reason, message, generation)

    @classmethod
    def pending(cls, generation: int) -> Acceptance:
        return cls(UNKNOWN, REASON_PENDING, "not validated yet", generation)

    @classmethod
    def from_conditions(cls, conditions: Iterable[Mapping[str, Any]] | None, generation: int) -> Acceptance:
        """The verdict already recorded in status (what a PyTorchJob event must keep)."""
        found = find(conditions, ACCEPTED)
        if found is None:
            return cls.pending(generation)
        return cls(
            str(found.get("status", UNKNOWN)),
            str(found.get("reason") or REASON_PENDING),
            str(found.get("message") or ""),
            int(found.get("observedGeneration") or generation),
        )


@dataclass(frozen=True)
class ExitInfo:
    """How the trainer container ended: exit code, the kubelet's reason, the termination message."""

    exit_code: int
    reason: str = ""
    message: str = ""
    pod: str = ""

    @property
    def retryable(self) -> bool:
        return exit_code_is_retryable(self.exit_code)

    def describe(self) -> str:
        kind = "retryable" if self.retryable else "permanent"
        meaning = _RETRYABLE_MEANINGS.get(self.exit_code)
        parts = [f"exit code {self.exit_code} ({kind}{', ' + meaning if meaning else ''})"]
        if self.reason:
            parts.append(f"reason {self.reason}")
        if self.pod:
            parts.append(f"pod {self.pod}")
        text = ", ".join(parts)
        return f"{text}: {self.message.strip()}" if self.message.strip() else text


@dataclass(frozen=True)
class JobState:
    """The PyTorchJob's status reduced to what we map: its True conditions and their messages."""

    exists: bool = False
    created: bool = False
    running: bool = False
    restarting: bool = False
    succeeded: bool = False
    failed: bool = False
    suspended: bool = False  # the PyTorchJob reports Suspended=True
    suspend_requested: bool = False  # its runPolicy.suspend (spec.suspend of a TrainJob, JobSet)
    kind: str = "PyTorchJob"  # for messages
    messages: tuple[tuple[str, str], ...] = ()
    replicas: tuple[tuple[str, int, int, int], ...] = ()  # (type, active, succeeded, failed)

    def message(self, condition_type: str) -> str:
        return dict(self.messages).get(condition_type, "")

    def replica_summary(self) -> str:
        return ", ".join(f"{t}: {a} active, {s} succeeded, {f} failed" for t, a, s, f in self.replicas)


def job_state(summary: Mapping[str, Any] | None) -> JobState:
    """A PyTorchJob summary (`summarize_pytorchjob`, or None when absent) -> JobState.
    Only conditions with status True count."""
    if summary is None:
        return JobState()
    true = {c.get("type"): str(c.get("message") or "") for c in summary.get("conditions") or [] if c.get("status") == TRUE}
    replicas = tuple(
        (str(rtype), int(r.get("active") or 0), int(r.get("succeeded") or 0), int(r.get("failed") or 0))
        for rtype, r in sorted((summary.get("replicaStatuses") or {}).items())
    )
    return JobState(
        exists=True,
        created="Created" in true,
        running="Running" in true,
        restarting="Restarting" in true,
        succeeded="Succeeded" in true,
        failed="Failed" in true,
        suspended="Suspended" in true,
        suspend_requested=bool(summary.get("suspend")),
        kind=str(summary.get("kind") or "PyTorchJob"),
        messages=tuple(sorted(true.items())),
        replicas=replicas,
    )


def summarize_pytorchjob(pytorchjob: Mapping[str, Any], exit_info: ExitInfo | None = None) -> dict[str, Any]:
    """What status.workload records of a PyTorchJob: its conditions, replica counts, whether
    it is suspended, and the trainer's last non-zero exit. Both writers of our status (the
    FineTuneJob's reconcile and the child's watch) derive conditions from this record."""
    status = pytorchjob.get("status") or {}
    return _summary(
        c.BACKEND_PYTORCHJOB, pytorchjob,
        suspend=bool(((pytorchjob.get("spec") or {}).get("runPolicy") or {}).get("suspend")),
        conditions=[
            {k: c[k] for k in ("type", "status", "reason", "message") if k in c} for c in status.get("conditions") or []
        ],
        replicas={
            rtype: {k: r[k] for k in ("active", "succeeded", "failed") if k in r}
            for rtype, r in (status.get("replicaStatuses") or {}).items()
        },
        exit_info=exit_info,
    )


def _summary(backend: str, child: Mapping[str, Any], *, suspend: bool, conditions: list[dict[str, Any]],
             replicas: Mapping[str, Any], exit_info: ExitInfo | None, **extra: Any) -> dict[str, Any]:
    meta = child.get("metadata") or {}
    out: dict[str, Any] = {"backend": backend, "kind": str(child.get("kind") or KINDS[backend]), "name": meta.get("name", ""),
                           "suspend": suspend, "conditions": conditions, "replicaStatuses": dict(replicas), **extra}
    if exit_info is not None:
        out["lastExit"] = {
            "exitCode": exit_info.exit_code, "reason": exit_info.reason, "message": exit_info.message, "pod": exit_info.pod
        }
    return out


def _true(ctype: str, reason: str, message: str) -> dict[str, str]:
    return {"type": ctype, "status": TRUE, "reason": reason, "message": message}


def _true_conditions(child: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(c.get("type")): c for c in (child.get("status") or {}).get("conditions") or [] if c.get("status") == TRUE}


def _jobs_counts(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    return {str(r.get("name") or ""): {k: int(r.get(k) or 0) for k in ("active", "ready", "succeeded", "failed", "suspended")}
            for r in rows}


def _replicas(counts: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """Child Job counts as status.workload.replicaStatuses records them (PyTorchJob's keys)."""
    return {name: {k: v for k, v in row.items() if k in ("active", "succeeded", "failed")} for name, row in counts.items()}


def _running_conditions(counts: Mapping[str, Mapping[str, int]], *, reported: bool, terminal: bool,
                        suspended: bool, restarting: str) -> list[dict[str, str]]:
    """Created once its controller reported anything; Running once every pod of a child Job is
    ready; Restarting (with its message) while the group comes back from a failure; neither of
    the two once it ended."""
    out = [_true("Created", "Created", "created")] if reported else []
    if terminal or suspended:
        return out
    ready = sum(r["ready"] for r in counts.values())
    if restarting:
        out.append(_true("Restarting", "Restarting", restarting))
    elif ready > 0:
        out.append(_true("Running", "Running", "the trainer pods run"))
    return out


def summarize_jobset(jobset: Mapping[str, Any], exit_info: ExitInfo | None = None) -> dict[str, Any]:
    """A JobSet, read into the PyTorchJob's condition vocabulary the table speaks: its
    terminalState (or Completed/Failed conditions), Suspended, `restarts` (the whole group was
    restarted after a retryable failure: Restarting until its Job is ready again) and
    replicatedJobsStatus (ready: Running)."""
    status = jobset.get("status") or {}
    true = _true_conditions(jobset)
    counts = _jobs_counts(status.get("replicatedJobsStatus") or [])
    succeeded = status.get("terminalState") == "Completed" or "Completed" in true
    failed = status.get("terminalState") == "Failed" or "Failed" in true
    suspended = "Suspended" in true
    restarts = int(status.get("restarts") or 0)
    coming_back = restarts > 0 and sum(r["ready"] for r in counts.values()) == 0
    conditions = _running_conditions(
        counts, reported=bool(status), terminal=succeeded or failed, suspended=suspended,
        restarting=f"JobSet restarted the group ({restarts} of failurePolicy.maxRestarts)" if coming_back else "")
    if suspended:
        conditions.append(_true("Suspended", "Suspended", str(true["Suspended"].get("message") or "suspended")))
    if succeeded:
        conditions.append(_true("Succeeded", "Completed", str((true.get("Completed") or {}).get("message") or "completed")))
    if failed:
        conditions.append(_true("Failed", str((true.get("Failed") or {}).get("reason") or "Failed"),
                                str((true.get("Failed") or {}).get("message") or "the JobSet failed")))
    return _summary(c.BACKEND_JOBSET, jobset, suspend=bool((jobset.get("spec") or {}).get("suspend")),
                    conditions=conditions, replicas=_replicas(counts), exit_info=exit_info, restarts=restarts)


def summarize_trainjob(trainjob: Mapping[str, Any], exit_info: ExitInfo | None = None) -> dict[str, Any]:
    """A TrainJob, read into the same vocabulary: Complete -> Succeeded, Failed, Suspended,
    and its jobsStatus (ready: Running; a failed child Job while the TrainJob has not
    failed: its JobSet is restarting the group under the runtime's failure policy)."""
    status = trainjob.get("status") or {}
    true = _true_conditions(trainjob)
    counts = _jobs_counts(status.get("jobsStatus") or [])
    succeeded, failed, suspended = "Complete" in true, "Failed" in true, "Suspended" in true
    failed_jobs = sum(r["failed"] for r in counts.values())
    conditions = _running_conditions(
        counts, reported=bool(status), terminal=succeeded or failed, suspended=suspended,
        restarting=f"{failed_jobs} child Job(s) failed; the runtime's JobSet restarts them" if failed_jobs else "")
    for ctype, ours in (("Suspended", "Suspended"), ("Complete", "Succeeded"), ("Failed", "Failed")):
        if ctype in true:
            conditions.append(_true(ours, str(true[ctype].get("reason") or ours), str(true[ctype].get("message") or "")))
    return _summary(c.BACKEND_TRAINJOB, trainjob, suspend=bool((trainjob.get("spec") or {}).get("suspend")),
                    conditions=conditions, replicas=_replicas(counts), exit_info=exit_info)


KINDS = {c.BACKEND_PYTORCHJOB: c.PYTORCHJOB_KIND, c.BACKEND_JOBSET: c.JOBSET_KIND, c.BACKEND_TRAINJOB: c.TRAINJOB_KIND}
SUMMARIZERS: Mapping[str, Callable[..., dict[str, Any]]] = {
    c.BACKEND_PYTORCHJOB: summarize_pytorchjob, c.BACKEND_JOBSET: summarize_jobset,
    c.BACKEND_TRAINJOB: summarize_trainjob,
}


def summarize_child(backend: str, child: Mapping[str, Any], exit_info: ExitInfo | None = None) -> dict[str, Any]:
    """status.workload for the child of any backend (one vocabulary for the phase table)."""
    return SUMMARIZERS[backend](child, exit_info)


def exit_from_summary(summary: Mapping[str, Any] | None) -> ExitInfo | None:
    last = (summary or {}).get("lastExit")
    if not last or last.get("exitCode") is None:
        return None
    return ExitInfo(int(last["exitCode"]), str(last.get("reason") or ""), str(last.get("message") or ""), str(last.get("pod") or ""))


def blank_summary(summary: Mapping[str, Any]) -> bool:
    """A child nobody has reported on yet (just created): nothing beyond what its creator saw."""
    counts = [n for r in (summary.get("replicaStatuses") or {}).values() for n in (r or {}).values()]
    return not summary.get("conditions") and not summary.get("lastExit") and not any(counts)


def needs_pods(summary: Mapping[str, Any]) -> bool:
    """Exit codes live on the pods: read them only when the job failed or is restarting
    (`summary`: a child summary, whose conditions speak the table's vocabulary)."""
    return any(c.get("type") in ("Failed", "Restarting") and c.get("status") == TRUE for c in summary.get("conditions") or [])


def _terminations(pod: Mapping[str, Any], container: str) -> list[tuple[str, dict[str, Any]]]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    out = []
    for cs in statuses:
        if cs.get("name") != container and len(statuses) > 1:
            continue
        for key in ("state", "lastState"):
            term = (cs.get(key) or {}).get("terminated")
            if term and term.get("exitCode") not in (None, 0):
                out.append((str(term.get("finishedAt") or ""), term))
    return out


def _is_first_pod(meta: Mapping[str, Any]) -> bool:
    """The PyTorchJob's Master, or an Indexed Job's pod 0 (JobSet, TrainJob)."""
    labels, notes = meta.get("labels") or {}, meta.get("annotations") or {}
    if str(labels.get(REPLICA_TYPE_LABEL, "")).lower() == "master":
        return True
    return str(labels.get(JOB_COMPLETION_INDEX_ANNOTATION, notes.get(JOB_COMPLETION_INDEX_ANNOTATION, ""))) == "0"


def exit_from_pods(pods: Iterable[Mapping[str, Any]], container: str = PYTORCH_CONTAINER) -> ExitInfo | None:
    """The newest non-zero exit of the trainer container across the job's pods (the first pod
    on ties), with the kubelet's reason and the trainer's termination message."""
    best: tuple[tuple[str, int], ExitInfo] | None = None
    for pod in pods:
        meta = pod.get("metadata") or {}
        is_master = _is_first_pod(meta)
        for finished, term in _terminations(pod, container):
            info = ExitInfo(
                exit_code=int(term["exitCode"]),
                reason=str(term.get("reason") or ""),
                message=str(term.get("message") or ""),
                pod=str(meta.get("name") or ""),
            )
            key = (finished, 1 if is_master else 0)
            if best is None or key > best[0]:
                best = (key, info)
    return best[1] if best else None


_EXIT_IN_MESSAGE = re.compile(r"exit(?:ed with)? code[:= ]+(\d{1,3})", re.IGNORECASE)


def exit_from_message(message: str) -> ExitInfo | None:
    """An exit code quoted in a PyTorchJob condition message, when a version reports one."""
    match = _EXIT_IN_MESSAGE.search(message or "")
    return ExitInfo(exit_code=int(match.group(1))) if match else None


# ------------------------------------------------------------------ the mapping: status as data
#
# A phase is one row of PHASES: when it holds, what it shows per condition, and the Event of
# entering it. The rows are in the order the phase is decided (the first whose `when` holds).
# What is not about one phase (the spec's verdict, a generation not observed yet, suspending
# and resuming, the failure reason from the exit code, the checkpoint) is a small named rule
# below the table; RULES and FINISHERS say where each applies around the row. A new phase (say
# Kueue's "Queued") is a new row: `with_phase`, then pass the table as `phases=`.

NORMAL, WARNING = "Normal", "Warning"


def find(conditions: Iterable[Mapping[str, Any]] | None, condition_type: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions or () if c.get("type") == condition_type), None)


def _cond(ctype: str, status: str, reason: str, message: str) -> dict[str, str]:
    return {"type": ctype, "status": status, "reason": reason, "message": message}


@dataclass(frozen=True)
class Ref:
    """A reason or message a row takes from a condition derived before it (CONDITION_TYPES order)."""

    condition: str
    field: str  # "reason" or "message"


@dataclass(frozen=True)
class Cond:
    """A condition as a row states it. `job_message`: the PyTorchJob condition whose message,
    when it has one, replaces `message`; `names_exit`: append the trainer's last exit, if known."""

    status: str
    reason: str | Ref
    message: str | Ref = ""
    job_message: str = ""
    names_exit: bool = False


@dataclass(frozen=True)
class Announcement:
    """The domain-condition transition that announces entering a phase (None: any)."""

    condition: str
    status: str | None = None
    reason: str | None = None

    def matches(self, event: Transition) -> bool:
        return (event.type == self.condition and self.status in (None, event.status)
                and self.reason in (None, event.reason))


@dataclass(frozen=True)
class Facts:
    """What a status is derived from: the inputs of `conditions_for`, read."""

    acceptance: Acceptance
    suspend: bool  # what happens: the child's runPolicy.suspend once it exists, else spec.suspend
    job: JobState
    spec_suspend: bool = False  # spec.suspend as written (not `suspend` when Kueue suspends the child)
    generation: int = 0
    exit_info: ExitInfo | None = None
    progress: Mapping[str, Any] | None = None


IN_PROGRESS = Cond(UNKNOWN, REASON_IN_PROGRESS, "the run has not ended")
NO_FAILURE = Cond(FALSE, REASON_NO_FAILURE, "")
AS_EXPECTED = Cond(FALSE, REASON_AS_EXPECTED, "")
NOT_STARTED = Cond(FALSE, REASON_NOT_STARTED, "no training workload yet")
TRAINING = Cond(TRUE, REASON_TRAINING, "the trainer pods run", job_message="Running")


@dataclass(frozen=True)
class PhaseRow:
    """One phase. A condition left None is one a rule always decides in this phase: a phase
    without a child has no Running of its own, one without an accepted spec no Ready or
    Reconciling (nor, when rejected, Stalled) of its own. Accepted and Suspended are rules' only."""

    phase: str
    when: Callable[[Facts], bool]
    running: Cond | None
    ready: Cond | None
    reconciling: Cond | None
    succeeded: Cond | None = IN_PROGRESS
    failed: Cond | None = NO_FAILURE
    stalled: Cond | None = AS_EXPECTED
    terminal: bool = False  # the run is over: nothing is suspending or resuming any more
    event: str = NORMAL  # the Event type of entering the phase
    announced_by: Announcement | None = None  # the transition that is that Event

    def spec(self, ctype: str) -> Cond | None:
        return getattr(self, ctype.lower(), None) if ctype not in (ACCEPTED, SUSPENDED) else None


_WAITING = "waiting for the trainer pods"
_ENDED = "the run has ended"

PHASES: tuple[PhaseRow, ...] = (
    PhaseRow(PHASE_PENDING, lambda f: not f.job.exists and f.acceptance.status == UNKNOWN,
             running=None, ready=None, reconciling=None),
    PhaseRow(PHASE_WAITING, lambda f: not f.job.exists and f.acceptance.reason == REASON_BACKEND_NOT_INSTALLED,
             running=None, ready=None, stalled=None,
             reconciling=Cond(TRUE, REASON_BACKEND_NOT_INSTALLED, "waiting for the backend's CRD; retried until it is served"),
             succeeded=Cond(FALSE, REASON_BACKEND_NOT_INSTALLED, "the job starts once its backend is installed"),
             event=WARNING, announced_by=Announcement(ACCEPTED, FALSE, REASON_BACKEND_NOT_INSTALLED)),
    PhaseRow(PHASE_INVALID, lambda f: not f.job.exists and f.acceptance.status == FALSE,
             running=None, ready=None, reconciling=None, stalled=None,
             succeeded=Cond(FALSE, Ref(ACCEPTED, "reason"), "the job cannot run until its spec is fixed"),
             event=WARNING, announced_by=Announcement(ACCEPTED, FALSE)),
    PhaseRow(PHASE_SUCCEEDED, lambda f: f.job.succeeded,
             running=Cond(FALSE, REASON_COMPLETED, "training finished"),
             ready=Cond(TRUE, REASON_SUCCEEDED, "training finished"),
             reconciling=Cond(FALSE, PHASE_SUCCEEDED, _ENDED),
             succeeded=Cond(TRUE, REASON_COMPLETED, "done", job_message="Succeeded"),
             terminal=True, announced_by=Announcement(SUCCEEDED, TRUE)),
    PhaseRow(PHASE_FAILED, lambda f: f.job.failed,
             running=Cond(FALSE, REASON_FAILED, "training failed"),
             ready=Cond(FALSE, REASON_FAILED, Ref(FAILED, "message")),
             reconciling=Cond(FALSE, PHASE_FAILED, _ENDED),
             succeeded=Cond(FALSE, REASON_FAILED, "the run failed"),
             failed=Cond(TRUE, REASON_JOB_FAILED, "the training workload failed", job_message="Failed"),
             stalled=Cond(TRUE, Ref(FAILED, "reason"), Ref(FAILED, "message")),
             terminal=True, event=WARNING, announced_by=Announcement(FAILED, TRUE)),
    PhaseRow(PHASE_SUSPENDED, lambda f: f.suspend or (f.job.suspended and not f.job.running),
             running=Cond(FALSE, REASON_SUSPENDED, "suspended"),
             ready=Cond(FALSE, REASON_SUSPENDED, "suspended"),
             reconciling=Cond(FALSE, REASON_SUSPENDED, "suspended"),
             announced_by=Announcement(SUSPENDED, TRUE)),
    PhaseRow(PHASE_RESTARTING, lambda f: f.job.restarting,
             running=Cond(FALSE, REASON_RESTARTING, "restarting", job_message="Restarting", names_exit=True),
             ready=Cond(FALSE, REASON_RESTARTING, "the trainer is restarting"),
             reconciling=Cond(TRUE, REASON_RESTARTING, "the trainer is restarting"),
             event=WARNING, announced_by=Announcement(RUNNING, reason=REASON_RESTARTING)),
    PhaseRow(PHASE_RUNNING, lambda f: f.job.running,
             running=TRAINING,
             ready=Cond(TRUE, REASON_RUNNING, "accepted and training"),
             reconciling=Cond(FALSE, REASON_RUNNING, "training"),
             announced_by=Announcement(RUNNING, TRUE)),
    PhaseRow(PHASE_STARTING, lambda f: True,
             running=Cond(FALSE, REASON_STARTING, _WAITING, job_message="Created"),
             ready=Cond(FALSE, REASON_STARTING, _WAITING),
             reconciling=Cond(TRUE, REASON_STARTING, _WAITING),
             announced_by=Announcement(RUNNING, reason=REASON_STARTING)),
)


def with_phase(row: PhaseRow, *, before: str, phases: Sequence[PhaseRow] = PHASES) -> tuple[PhaseRow, ...]:
    """A table with one more phase, decided just before `before`."""
    at = [r.phase for r in phases].index(before)
    return (*phases[:at], row, *phases[at:])


def decide_phase(facts: Facts, phases: Sequence[PhaseRow] = PHASES) -> PhaseRow:
    """The one place the phase is decided: the first row whose `when` holds."""
    return next(row for row in phases if row.when(facts))


def phase_for(acceptance: Acceptance, suspend: bool, job: JobState, phases: Sequence[PhaseRow] = PHASES) -> str:
    return decide_phase(Facts(acceptance, suspend, job, spec_suspend=suspend), phases).phase


# ------------------------------------------------------------------ rules around the table

Rule = Callable[[Facts, PhaseRow], "Cond | None"]


def _verdict(f: Facts, row: PhaseRow) -> Cond:
    """Accepted is the spec's verdict, in every phase."""
    return Cond(f.acceptance.status, f.acceptance.reason, f.acceptance.message)


def _suspension(f: Facts, row: PhaseRow) -> Cond:
    """Suspended says what happens to the child (or spec.suspend before there is one)."""
    if f.suspend:
        return Cond(TRUE, REASON_SUSPENDED, f"the {f.job.kind} is suspended (spec.suspend, or queued in Kueue): no pods run")
    return Cond(FALSE, REASON_NOT_SUSPENDED, "not suspended")


def _no_child(f: Facts, row: PhaseRow) -> Cond | None:
    return NOT_STARTED if not f.job.exists else None


def _live_pods(f: Facts, row: PhaseRow) -> Cond | None:
    """The child reports Running: so is Running, whatever the phase (suspending, finishing)."""
    return TRAINING if f.job.running else None


def _not_accepted(f: Facts, row: PhaseRow) -> Cond | None:
    """Not Ready while the spec is not accepted (pending, invalid, or a rejected change)."""
    return Cond(FALSE, f.acceptance.reason, f.acceptance.message) if f.acceptance.status != TRUE else None


def _validating(f: Facts, row: PhaseRow) -> Cond | None:
    return Cond(TRUE, REASON_PENDING, "validating the spec") if f.acceptance.status == UNKNOWN else None


def _new_generation(f: Facts, row: PhaseRow) -> Cond | None:
    if f.acceptance.generation >= f.generation:
        return None
    return Cond(TRUE, REASON_NEW_GENERATION,
                f"generation {f.generation} is not reconciled yet (observed {f.acceptance.generation})")


def _awaiting_spec_fix(f: Facts, row: PhaseRow) -> Cond | None:
    if f.acceptance.status != FALSE or f.acceptance.reason == REASON_BACKEND_NOT_INSTALLED:
        return None  # a missing CRD is not the spec's fault: the Waiting row says what happens
    return Cond(FALSE, f.acceptance.reason, "waiting for a spec change")


def _run_ended(f: Facts, row: PhaseRow) -> Cond | None:
    """A terminal phase's Reconciling wins over suspending and resuming."""
    return row.reconciling if row.terminal else None


def _suspending(f: Facts, row: PhaseRow) -> Cond | None:
    return Cond(TRUE, REASON_SUSPENDING, "waiting for the trainer pods to stop") if f.suspend and f.job.running else None


def _resuming(f: Facts, row: PhaseRow) -> Cond | None:
    if not f.suspend and f.job.suspended:
        return Cond(TRUE, REASON_RESUMING, f"waiting for the {f.job.kind} to resume")
    return None


def _spec_rejected(f: Facts, row: PhaseRow) -> Cond | None:
    return Cond(TRUE, f.acceptance.reason, f.acceptance.message) if f.acceptance.status == FALSE else None


# Per condition, the rules tried before the phase's row, in precedence order (first non-None wins).
RULES: Mapping[str, tuple[Rule, ...]] = {
    ACCEPTED: (_verdict,),
    SUSPENDED: (_suspension,),
    RUNNING: (_no_child, _live_pods),
    READY: (_not_accepted,),
    RECONCILING: (_validating, _new_generation, _awaiting_spec_fix, _run_ended, _suspending, _resuming),
    STALLED: (_spec_rejected,),
}


def _failure_from_exit(cond: dict[str, str], f: Facts) -> dict[str, str]:
    """Failed=True: the exit code decides permanent vs retries exhausted, and is named."""
    if cond["type"] != FAILED or cond["status"] != TRUE:
        return cond
    info = f.exit_info or exit_from_message(f.job.message("Failed"))
    if info is None:
        return {**cond, "message": f"{cond['message']} (no exit code reported)"}
    reason = REASON_RETRIES_EXHAUSTED if info.retryable else REASON_PERMANENT_ERROR
    return {**cond, "reason": reason, "message": f"trainer {info.describe()}; {cond['message']}"}


def _with_checkpoint(message: str, progress: Mapping[str, Any] | None) -> str:
    checkpoint = (progress or {}).get("checkpointUri")
    return f"{message}; newest complete checkpoint: {checkpoint}" if checkpoint else message


def _names_checkpoint(cond: dict[str, str], f: Facts) -> dict[str, str]:
    """A run that ended (Succeeded=True or Failed=True) names its newest complete checkpoint."""
    if cond["type"] in (SUCCEEDED, FAILED) and cond["status"] == TRUE:
        return {**cond, "message": _with_checkpoint(cond["message"], f.progress)}
    return cond


# Applied, in order, to every condition once decided (before later conditions read it via Ref).
FINISHERS = (_failure_from_exit, _names_checkpoint)


def _resolve(ctype: str, spec: Cond, f: Facts, built: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    def value(v: str | Ref) -> str:
        return built[v.condition][v.field] if isinstance(v, Ref) else v

    message = (f.job.message(spec.job_message) if spec.job_message else "") or value(spec.message)
    if spec.names_exit and f.exit_info is not None:
        message += f"; last {f.exit_info.describe()}"
    return _cond(ctype, spec.status, value(spec.reason), message)


def derive(facts: Facts, row: PhaseRow) -> list[dict[str, str]]:
    """Every condition (CONDITION_TYPES order): the first rule that decides it, else the row."""
    built: dict[str, dict[str, str]] = {}
    for ctype in CONDITION_TYPES:
        spec = next((c for c in (rule(facts, row) for rule in RULES.get(ctype, ())) if c is not None), None)
        spec = spec or row.spec(ctype)
        if spec is None:
            raise ValueError(f"phase {row.phase} states no {ctype} condition and no rule decides it")
        cond = _resolve(ctype, spec, facts, built)
        for finish in FINISHERS:
            cond = finish(cond, facts)
        built[ctype] = cond
    return list(built.values())


def merge_transition_times(
    new: Iterable[dict[str, Any]], previous: Iterable[Mapping[str, Any]] | None, now: str
) -> list[dict[str, Any]]:
    """lastTransitionTime moves only when a condition's status changes."""
    out = []
    for cond in new:
        old = find(previous, cond["type"])
        same = old is not None and old.get("status") == cond["status"] and old.get("lastTransitionTime")
        out.append({**cond, "lastTransitionTime": old["lastTransitionTime"] if same else now})
    return out


def conditions_for(
    *,
    generation: int,
    acceptance: Acceptance,
    suspend: bool,
    workload: Mapping[str, Any] | None,
    progress: Mapping[str, Any] | None = None,
    previous: Iterable[Mapping[str, Any]] | None = None,
    now: str,
    phases: Sequence[PhaseRow] = PHASES,
) -> dict[str, Any]:
    """The status fields we own: `conditions`, `phase`, `observedGeneration`.

    `acceptance` is this generation's verdict (or the recorded one, when a child's event
    triggers the update); `workload` is the child's summary (`summarize_child`, None
    when absent; its `lastExit` comes from the pods); `suspend` is spec.suspend, used until
    the child exists (then the child's runPolicy.suspend says what really happens);
    `previous` are the conditions in status now (for transition times); `phases` the table."""
    job = job_state(workload)
    facts = Facts(
        acceptance=acceptance,
        suspend=job.suspend_requested if job.exists else suspend,
        job=job,
        spec_suspend=suspend,
        generation=generation,
        exit_info=exit_from_summary(workload),
        progress=progress,
    )
    row = decide_phase(facts, phases)
    conditions = merge_transition_times(derive(facts, row), previous, now)
    for cond in conditions:
        cond["observedGeneration"] = acceptance.generation
    out: dict[str, Any] = {"observedGeneration": acceptance.generation, "phase": row.phase, "conditions": conditions}
    if workload is not None:
        out["workload"] = dict(workload)
        out["backend"] = workload.get("backend") or c.BACKEND_PYTORCHJOB
    return out


# ------------------------------------------------------------------ transitions -> Events


@dataclass(frozen=True)
class Transition:
    """A domain condition whose status changed: one Kubernetes Event."""

    type: str
    status: str
    reason: str
    message: str
    phases: Sequence[PhaseRow] = field(default=PHASES, compare=False, repr=False)

    @property
    def warning(self) -> bool:
        """It announces entering a phase whose row says Warning (rejected spec, failure, restart)."""
        return any(
            row.event == WARNING and row.announced_by is not None and row.announced_by.matches(self)
            for row in self.phases
        )

    @property
    def event_type(self) -> str:
        return WARNING if self.warning else NORMAL

    def event_message(self) -> str:
        head = f"{self.type}={self.status}"
        return f"{head}: {self.message}" if self.message else head


def transitions(
    previous: Iterable[Mapping[str, Any]] | None,
    current: Iterable[Mapping[str, Any]],
    phases: Sequence[PhaseRow] = PHASES,
) -> list[Transition]:
    """Domain conditions that appeared or changed status or reason (the kstatus trio restates them)."""
    previous = list(previous or ())
    out = []
    for cond in current:
        if cond["type"] not in DOMAIN_TYPES:
            continue
        old = find(previous, cond["type"])
        if old is not None and old.get("status") == cond["status"] and old.get("reason") == cond["reason"]:
            continue
        if old is None and (cond["status"] == UNKNOWN or (cond["status"] == FALSE and cond["type"] in (SUSPENDED, FAILED))):
            continue  # "not known yet", "not suspended", "not failed" on the first visit is not news
        out.append(Transition(cond["type"], cond["status"], cond["reason"], str(cond.get("message") or ""), phases))
    return out


def finished(conditions: Iterable[Mapping[str, Any]] | None) -> bool:
    """Succeeded=True or Failed=True: the run is over for good."""
    return any((find(conditions, ctype) or {}).get("status") == TRUE for ctype in (SUCCEEDED, FAILED))


def status_changed(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether writing `new` would change anything we own in `old` (avoids no-op writes)."""
    old = old or {}
    return any(old.get(key) != value for key, value in new.items())
