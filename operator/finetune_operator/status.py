"""A FineTuneJob's status, derived once: (acceptance, spec, PyTorchJob, pods, progress) -> status.

Pure functions only, so the whole mapping is a table test. The handlers feed them what they
read and write what they return (through the `/status` subresource).

Conditions follow the Kubernetes API conventions (type, status, reason always set, message,
lastTransitionTime changing only when status changes, observedGeneration) and kstatus:

- domain: Accepted, Suspended, Running, Succeeded, Failed;
- kstatus: Ready (accepted and training healthily, or finished well: a GitOps sync never waits
  for hours of training), Reconciling (something in flight), Stalled (invalid or failed).

Completion is `Succeeded=True` (what `kubectl wait --for=condition=Succeeded` reads).
The PyTorchJob reports only replica counts, never exit codes; the exit code and the trainer's
termination message come from the pods (`exit_from_pods`), falling back to a code quoted in the
PyTorchJob's message. Under `restartPolicy: ExitCode`, 1-127 are permanent and 128-255 retried.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finetune_trainer.contract import exit_code_is_retryable

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
PHASE_STARTING = "Starting"
PHASE_RUNNING = "Running"
PHASE_RESTARTING = "Restarting"
PHASE_SUSPENDED = "Suspended"
PHASE_SUCCEEDED = "Succeeded"
PHASE_FAILED = "Failed"

# The training operator's container name and replica label (kubeflow/training-operator v1).
PYTORCH_CONTAINER = "pytorch"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"

_SIGNALS = {130: "SIGINT", 134: "SIGABRT", 137: "SIGKILL", 139: "SIGSEGV", 143: "SIGTERM"}


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
        return exit_code_retryable(self.exit_code)

    def describe(self) -> str:
        kind = "retryable" if self.retryable else "permanent"
        signal = _SIGNALS.get(self.exit_code)
        parts = [f"exit code {self.exit_code} ({kind}{', ' + signal if signal else ''})"]
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
    suspend_requested: bool = False  # its runPolicy.suspend
    messages: tuple[tuple[str, str], ...] = ()
    replicas: tuple[tuple[str, int, int, int], ...] = ()  # (type, active, succeeded, failed)

    def message(self, condition_type: str) -> str:
        return dict(self.messages).get(condition_type, "")

    def replica_summary(self) -> str:
        return ", ".join(f"{t}: {a} active, {s} succeeded, {f} failed" for t, a, s, f in self.replicas)


def exit_code_retryable(code: int) -> bool:
    """restartPolicy ExitCode: 1-127 permanent, 128-255 (signals, preemption) retried."""
    return exit_code_is_retryable(code)


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
        messages=tuple(sorted(true.items())),
        replicas=replicas,
    )


def summarize_pytorchjob(pytorchjob: Mapping[str, Any], exit_info: ExitInfo | None = None) -> dict[str, Any]:
    """What status.pytorchJob records of the child: its conditions, replica counts, whether
    it is suspended, and the trainer's last non-zero exit. Both writers of our status (the
    FineTuneJob's reconcile and the PyTorchJob's watch) derive conditions from this record."""
    status = pytorchjob.get("status") or {}
    out: dict[str, Any] = {
        "name": (pytorchjob.get("metadata") or {}).get("name", ""),
        "suspend": bool(((pytorchjob.get("spec") or {}).get("runPolicy") or {}).get("suspend")),
        "conditions": [
            {k: c[k] for k in ("type", "status", "reason", "message") if k in c} for c in status.get("conditions") or []
        ],
        "replicaStatuses": {
            rtype: {k: r[k] for k in ("active", "succeeded", "failed") if k in r}
            for rtype, r in (status.get("replicaStatuses") or {}).items()
        },
    }
    if exit_info is not None:
        out["lastExit"] = {
            "exitCode": exit_info.exit_code, "reason": exit_info.reason, "message": exit_info.message, "pod": exit_info.pod
        }
    return out


def exit_from_summary(summary: Mapping[str, Any] | None) -> ExitInfo | None:
    last = (summary or {}).get("lastExit")
    if not last or last.get("exitCode") is None:
        return None
    return ExitInfo(int(last["exitCode"]), str(last.get("reason") or ""), str(last.get("message") or ""), str(last.get("pod") or ""))


def blank_summary(summary: Mapping[str, Any]) -> bool:
    """A child nobody has reported on yet (just created): nothing beyond what its creator saw."""
    return not summary.get("conditions") and not summary.get("lastExit") and not summary.get("replicaStatuses")


def needs_pods(summary_or_job: Mapping[str, Any]) -> bool:
    """Exit codes live on the pods: read them only when the job failed or is restarting."""
    status = summary_or_job.get("status") if "status" in summary_or_job else summary_or_job
    return any(
        c.get("type") in ("Failed", "Restarting") and c.get("status") == TRUE for c in (status or {}).get("conditions") or []
    )


def _terminations(pod: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    out = []
    for cs in statuses:
        if cs.get("name") != PYTORCH_CONTAINER and len(statuses) > 1:
            continue
        for key in ("state", "lastState"):
            term = (cs.get(key) or {}).get("terminated")
            if term and term.get("exitCode") not in (None, 0):
                out.append((str(term.get("finishedAt") or ""), term))
    return out


def exit_from_pods(pods: Iterable[Mapping[str, Any]]) -> ExitInfo | None:
    """The newest non-zero exit of the trainer container across the job's pods (Master first
    on ties), with the kubelet's reason and the trainer's termination message."""
    best: tuple[tuple[str, int], ExitInfo] | None = None
    for pod in pods:
        meta = pod.get("metadata") or {}
        is_master = str((meta.get("labels") or {}).get(REPLICA_TYPE_LABEL, "")).lower() == "master"
        for finished, term in _terminations(pod):
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


# ------------------------------------------------------------------ the mapping


def find(conditions: Iterable[Mapping[str, Any]] | None, condition_type: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions or () if c.get("type") == condition_type), None)


def _cond(ctype: str, status: str, reason: str, message: str) -> dict[str, str]:
    return {"type": ctype, "status": status, "reason": reason, "message": message}


def _run_phase(job: JobState, suspend: bool) -> str:
    if job.succeeded:
        return PHASE_SUCCEEDED
    if job.failed:
        return PHASE_FAILED
    if suspend or (job.suspended and not job.running):
        return PHASE_SUSPENDED
    if job.restarting:
        return PHASE_RESTARTING
    if job.running:
        return PHASE_RUNNING
    return PHASE_STARTING


def _failure(job: JobState, exit_info: ExitInfo | None) -> tuple[str, str]:
    """(reason, message) of Failed=True: the exit code decides permanent vs retries exhausted."""
    info = exit_info or exit_from_message(job.message("Failed"))
    job_message = job.message("Failed") or "the PyTorchJob failed"
    if info is None:
        return REASON_JOB_FAILED, f"{job_message} (no exit code reported)"
    reason = REASON_RETRIES_EXHAUSTED if info.retryable else REASON_PERMANENT_ERROR
    return reason, f"trainer {info.describe()}; {job_message}"


def _with_checkpoint(message: str, progress: Mapping[str, Any] | None) -> str:
    checkpoint = (progress or {}).get("checkpointUri")
    return f"{message}; newest complete checkpoint: {checkpoint}" if checkpoint else message


def _domain(
    acceptance: Acceptance,
    suspend: bool,
    job: JobState,
    phase: str,
    exit_info: ExitInfo | None,
    progress: Mapping[str, Any] | None,
) -> list[dict[str, str]]:
    accepted = _cond(ACCEPTED, acceptance.status, acceptance.reason, acceptance.message)
    suspended = (
        _cond(SUSPENDED, TRUE, REASON_SUSPENDED, "the PyTorchJob is suspended (spec.suspend, or queued in Kueue): no pods run")
        if suspend
        else _cond(SUSPENDED, FALSE, REASON_NOT_SUSPENDED, "not suspended")
    )

    if not job.exists:
        running = _cond(RUNNING, FALSE, REASON_NOT_STARTED, "no PyTorchJob yet")
    elif job.running:
        running = _cond(RUNNING, TRUE, REASON_TRAINING, job.message("Running") or "the trainer pods run")
    elif phase == PHASE_RESTARTING:
        detail = f"; last {exit_info.describe()}" if exit_info else ""
        running = _cond(RUNNING, FALSE, REASON_RESTARTING, (job.message("Restarting") or "restarting") + detail)
    elif phase == PHASE_SUSPENDED:
        running = _cond(RUNNING, FALSE, REASON_SUSPENDED, "suspended")
    elif phase == PHASE_SUCCEEDED:
        running = _cond(RUNNING, FALSE, REASON_COMPLETED, "training finished")
    elif phase == PHASE_FAILED:
        running = _cond(RUNNING, FALSE, REASON_FAILED, "training failed")
    else:
        running = _cond(RUNNING, FALSE, REASON_STARTING, job.message("Created") or "waiting for the trainer pods")

    if phase == PHASE_SUCCEEDED:
        succeeded = _cond(SUCCEEDED, TRUE, REASON_COMPLETED, _with_checkpoint(job.message("Succeeded") or "done", progress))
        failed = _cond(FAILED, FALSE, REASON_NO_FAILURE, "")
    elif phase == PHASE_FAILED:
        reason, message = _failure(job, exit_info)
        succeeded = _cond(SUCCEEDED, FALSE, REASON_FAILED, "the run failed")
        failed = _cond(FAILED, TRUE, reason, _with_checkpoint(message, progress))
    else:
        if acceptance.status == FALSE and not job.exists:
            succeeded = _cond(SUCCEEDED, FALSE, acceptance.reason, "the job cannot run until its spec is fixed")
        else:
            succeeded = _cond(SUCCEEDED, UNKNOWN, REASON_IN_PROGRESS, "the run has not ended")
        failed = _cond(FAILED, FALSE, REASON_NO_FAILURE, "")
    return [accepted, suspended, running, succeeded, failed]


def _kstatus(
    generation: int, acceptance: Acceptance, suspend: bool, job: JobState, phase: str, failed: Mapping[str, str]
) -> list[dict[str, str]]:
    lagging = acceptance.generation < generation

    if acceptance.status != TRUE:
        ready = _cond(READY, FALSE, acceptance.reason, acceptance.message)
    elif phase == PHASE_SUCCEEDED:
        ready = _cond(READY, TRUE, REASON_SUCCEEDED, "training finished")
    elif phase == PHASE_FAILED:
        ready = _cond(READY, FALSE, REASON_FAILED, failed["message"])
    elif phase == PHASE_SUSPENDED:
        ready = _cond(READY, FALSE, REASON_SUSPENDED, "suspended")
    elif phase == PHASE_RUNNING:
        ready = _cond(READY, TRUE, REASON_RUNNING, "accepted and training")
    elif phase == PHASE_RESTARTING:
        ready = _cond(READY, FALSE, REASON_RESTARTING, "the trainer is restarting")
    else:
        ready = _cond(READY, FALSE, REASON_STARTING, "waiting for the trainer pods")

    if acceptance.status == UNKNOWN:
        reconciling = _cond(RECONCILING, TRUE, REASON_PENDING, "validating the spec")
    elif lagging:
        reconciling = _cond(
            RECONCILING, TRUE, REASON_NEW_GENERATION,
            f"generation {generation} is not reconciled yet (observed {acceptance.generation})",
        )
    elif acceptance.status == FALSE:
        reconciling = _cond(RECONCILING, FALSE, acceptance.reason, "waiting for a spec change")
    elif phase in (PHASE_SUCCEEDED, PHASE_FAILED):
        reconciling = _cond(RECONCILING, FALSE, phase, "the run has ended")
    elif suspend and job.running:
        reconciling = _cond(RECONCILING, TRUE, REASON_SUSPENDING, "waiting for the trainer pods to stop")
    elif not suspend and job.suspended:
        reconciling = _cond(RECONCILING, TRUE, REASON_RESUMING, "waiting for the PyTorchJob to resume")
    elif phase == PHASE_SUSPENDED:
        reconciling = _cond(RECONCILING, FALSE, REASON_SUSPENDED, "suspended")
    elif phase == PHASE_RESTARTING:
        reconciling = _cond(RECONCILING, TRUE, REASON_RESTARTING, "the trainer is restarting")
    elif phase == PHASE_RUNNING:
        reconciling = _cond(RECONCILING, FALSE, REASON_RUNNING, "training")
    else:
        reconciling = _cond(RECONCILING, TRUE, REASON_STARTING, "waiting for the trainer pods")

    if acceptance.status == FALSE:
        stalled = _cond(STALLED, TRUE, acceptance.reason, acceptance.message)
    elif phase == PHASE_FAILED:
        stalled = _cond(STALLED, TRUE, failed["reason"], failed["message"])
    else:
        stalled = _cond(STALLED, FALSE, REASON_AS_EXPECTED, "")
    return [ready, reconciling, stalled]


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


def phase_for(acceptance: Acceptance, suspend: bool, job: JobState) -> str:
    if not job.exists:
        if acceptance.status == UNKNOWN:
            return PHASE_PENDING
        if acceptance.status == FALSE:
            return PHASE_INVALID
        return PHASE_SUSPENDED if suspend else PHASE_STARTING
    return _run_phase(job, suspend)


def conditions_for(
    *,
    generation: int,
    acceptance: Acceptance,
    suspend: bool,
    pytorchjob: Mapping[str, Any] | None,
    progress: Mapping[str, Any] | None = None,
    previous: Iterable[Mapping[str, Any]] | None = None,
    now: str,
) -> dict[str, Any]:
    """The status fields we own: `conditions`, `phase`, `observedGeneration`.

    `acceptance` is this generation's verdict (or the recorded one, when a PyTorchJob event
    triggers the update); `pytorchjob` is the child's summary (`summarize_pytorchjob`, None
    when absent; its `lastExit` comes from the pods); `suspend` is spec.suspend, used until
    the child exists (then the child's runPolicy.suspend says what really happens);
    `previous` are the conditions in status now (for transition times)."""
    job = job_state(pytorchjob)
    exit_info = exit_from_summary(pytorchjob)
    suspend = job.suspend_requested if job.exists else suspend
    phase = phase_for(acceptance, suspend, job)
    domain = _domain(acceptance, suspend, job, phase, exit_info, progress)
    kstatus = _kstatus(generation, acceptance, suspend, job, phase, domain[-1])
    conditions = merge_transition_times(domain + kstatus, previous, now)
    for cond in conditions:
        cond["observedGeneration"] = acceptance.generation
    out: dict[str, Any] = {"observedGeneration": acceptance.generation, "phase": phase, "conditions": conditions}
    if pytorchjob is not None:
        out["pytorchJob"] = dict(pytorchjob)
    return out


# ------------------------------------------------------------------ transitions -> Events


@dataclass(frozen=True)
class Transition:
    """A domain condition whose status changed: one Kubernetes Event."""

    type: str
    status: str
    reason: str
    message: str

    @property
    def warning(self) -> bool:
        return (
            (self.type == ACCEPTED and self.status == FALSE)
            or (self.type == FAILED and self.status == TRUE)
            or (self.type == RUNNING and self.reason == REASON_RESTARTING)
        )

    @property
    def event_type(self) -> str:
        return "Warning" if self.warning else "Normal"

    def event_message(self) -> str:
        head = f"{self.type}={self.status}"
        return f"{head}: {self.message}" if self.message else head


def transitions(previous: Iterable[Mapping[str, Any]] | None, current: Iterable[Mapping[str, Any]]) -> list[Transition]:
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
        out.append(Transition(cond["type"], cond["status"], cond["reason"], str(cond.get("message") or "")))
    return out


def finished(conditions: Iterable[Mapping[str, Any]] | None) -> bool:
    """Succeeded=True or Failed=True: the run is over for good."""
    return any((find(conditions, ctype) or {}).get("status") == TRUE for ctype in (SUCCEEDED, FAILED))


def status_changed(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether writing `new` would change anything we own in `old` (avoids no-op writes)."""
    old = old or {}
    return any(old.get(key) != value for key, value in new.items())
