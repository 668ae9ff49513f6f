"""What the executors that run a job on another engine (kubernetes, ray) share: the runner's `mlgate run`
arguments, its per-attempt credential, and waiting for the report it posts back.

A runner reports as the `github` executor's do (`POST /jobs/{id}/result`, triggers/jobs/runner_results.py),
with a credential minted for its job and attempt (MLGATE_RESULT_SECRET stays in the service). An outsider's
build is given no credential at all: it never reports, and only its candidate's files cross to the judge.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Literal

from sqlalchemy import Engine

from automation.errors import UsageError
from triggers.jobs.queue import Job, get_job

Role = Literal["job", "build", "judge"]
# on a runner the platform restarts after an eviction (Kubernetes' podFailurePolicy), a preempted run exits 75
# without reporting: the same attempt goes on in the next pod, from its checkpoint
RESUMED_BY_ENV = "MLGATE_RESUMED_BY"
CANDIDATE = "candidate"   # the folder name an outsider's build exports to, under the exchange folder


def outsider_pr(job: Job) -> bool:
    """A PR whose author cannot write: its code only builds; the base branch's code judges."""
    return job.trigger == "pr" and json.loads(job.payload or "{}").get("author_writes") is not True


def result_token(job: Job, runner_attempt: int, timeout_minutes: float) -> str:
    """The runner's credential for one attempt, valid for the job's time-out and an hour's margin."""
    from triggers.jobs.runner_results import SECRET_ENV, mint_token

    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        raise UsageError(f"the {job.id} runner needs a result credential: set {SECRET_ENV} on the service")
    return mint_token(secret, job.id, runner_attempt, timeout_minutes * 60 + 3600)


def runner_arguments(job: Job, role: Role, service_url: str, *, sha: str | None = None,
                     exchange: str | None = None) -> list[str]:
    """`mlgate run` arguments on a runner. `job`: a retrain or a writer's PR, reporting itself, checkpointing
    to the MLflow artifact store (the next pod or node resumes from there). `build`: an outsider's PR, which
    only trains and exports its candidate under `exchange` (its checkpoints stay there too) and reports
    nothing. `judge`: the base branch's code judging that candidate, and reporting."""
    if role != "build" and not service_url:
        raise UsageError("a remote runner reports to the service: set service.kubernetes.service_url or "
                         "service.ray.service_url to the URL pods and Ray workers reach it at")
    trigger = job.trigger if job.trigger in ("push", "pr", "drift") else "manual"
    args = ["--model", job.model, "--trigger", trigger, "--job-id", job.id, "--json"]
    if sha or job.sha:
        args += ["--sha", sha or job.sha]   # type: ignore[list-item]
    if job.pr is not None and job.trigger == "pr":
        args += ["--pr", str(job.pr)]
    data_ref = json.loads(job.payload or "{}").get("data_ref")
    if data_ref and role == "job":
        args += ["--extra-train", data_ref.removeprefix("file://")]
    if role == "build":
        return [*args, "--export-candidate", f"{exchange}/{CANDIDATE}", "--checkpoint-dir", f"{exchange}/checkpoints"]
    if role == "judge":
        return [*args, "--judge", f"{exchange}/{CANDIDATE}", "--report-to", service_url]
    return [*args, "--checkpoint-store", "mlflow", "--report-to", service_url]


@dataclass
class RunnerEnd:
    """How a runner ended as its engine tells it: `failed` with the engine's reason, or done."""
    failed: bool
    reason: str


def wait_for_report(engine: Engine, job: Job, lost: threading.Event, poll_seconds: float,
                    runner_ended: Callable[[], RunnerEnd | None], grace_seconds: float = 30.0) -> str | None:
    """Wait until the runner's report ends the job (None), or the runner ended without one (the engine's
    reason, after `grace_seconds` for a report still in flight), or `lost` is set ("lost")."""
    ended_at: float | None = None
    while True:
        current = get_job(engine, job.id)
        if current is None or current.state != "running" or current.attempts != job.attempts:
            return None   # reported (or cancelled, or recovered by another worker)
        end = runner_ended()
        if end is not None:
            ended_at = ended_at or time.monotonic()
            if time.monotonic() - ended_at > (grace_seconds if not end.failed else min(grace_seconds, 5.0)):
                return end.reason
        if lost.wait(poll_seconds):
            return "lost"
