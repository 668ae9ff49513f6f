"""What GitHub shows of the service's jobs, posted by the service itself, never by the job.

A job runs a commit's code (a PR's, possibly from outside), so it holds no GitHub token: the worker
posts `pending` when it claims a job and the final status, PR comment and promotion note when the
job ends, from the summary the service kept. Which commits are still owed a final status is kept in
the database, so a job that ends while no worker is looking (a lost runner, a cancellation, a
service restart) still gets one from the next sweep: a required `mlgate/<model>` check never hangs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Engine, String, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from automation.store import Base
from automation.summary import JobSummary
from triggers.github.reporter import GitHubReporter, status_context
from triggers.jobs.queue import FINAL_STATES, Job, get_job

log = logging.getLogger(__name__)
STALE = timedelta(minutes=10)   # a report taken this long ago by a caller that never finished it is taken again


class OwedStatus(Base):
    """A commit whose `mlgate/<model>` status says pending until the job's final status is posted."""

    __tablename__ = "owed_statuses"

    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    posted: Mapped[str] = mapped_column(String(16), index=True)    # pending | posting | final
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def summary_file(workdir: Path, job_id: str) -> Path:
    """Where the service keeps a job's summary: derived from the job id, written only by the service."""
    return workdir / "reports" / job_id / "summary.json"


def keep_summary(workdir: Path, job_id: str, summary: dict[str, Any] | None) -> None:
    if summary:
        path = summary_file(workdir, job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, default=str), encoding="utf-8")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def ending(job: Job) -> tuple[str, str]:
    """The final status of a job that left no gate verdict: (state, description)."""
    if job.state == "cancelled":
        return "error", f"cancelled: {job.error or 'no reason given'}"
    if job.state == "superseded":
        return "error", "superseded by a newer job for the same change"
    return "error", f"job {job.state}: {job.error or 'no reason recorded'}"


class JobStatusReporter:
    def __init__(self, engine: Engine, reporter: GitHubReporter, workdir: Path) -> None:
        self.engine, self.reporter, self.workdir = engine, reporter, workdir

    def progress(self, job: Job) -> bool:
        """A commit status has nowhere to show progress: the check run reporter has."""
        return False

    def started(self, job: Job) -> None:
        if not job.sha:
            return
        with Session(self.engine) as session, session.begin():
            session.merge(OwedStatus(job_id=job.id, posted="pending", updated_at=_now()))
        self.reporter.started(job.model, job.sha)

    def ended(self, job: Job) -> dict[str, str]:
        """Post the job's final status (and comment or note), once; returns what happened to each."""
        if not job.sha or not self._take(job.id):
            return {}
        summary = self._summary(job)
        if summary is not None:
            outcomes = self.reporter.finished(summary)
        else:
            state, description = ending(job)
            outcomes = self.reporter.final_status(job.model, job.sha, state, description)
        # a status GitHub did not take stays owed: the sweep tries again
        posted = "pending" if outcomes.get("status", "").startswith("failed") else "final"
        with Session(self.engine) as session, session.begin():
            session.merge(OwedStatus(job_id=job.id, posted=posted, updated_at=_now()))
        log.info("github report", extra={"job_id": job.id, "context": status_context(job.model),
                                         "outcomes": outcomes})
        return outcomes

    def _summary(self, job: Job) -> dict[str, Any] | None:
        """The kept summary, if it holds a verdict and the job's state is one a verdict gives; who/what/where
        come from the job record, never from it."""
        path = summary_file(self.workdir, job.id)
        try:
            summary = JobSummary.parse(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None
        except ValueError:
            return None
        if summary is None or summary.gate is None or job.state not in ("succeeded", "gate_failed"):
            return None
        return summary.as_dict() | {"job_id": job.id, "model": job.model, "sha": job.sha, "trigger": job.trigger,
                                    "pr": job.pr, "version": job.version,
                                    "promoted": summary.promoted and job.version is not None}

    def _take(self, job_id: str) -> bool:
        """Claim the final report for this caller: the worker that ran the job, or one sweeper. A job that
        never showed `pending` (no commit when it started) is anyone's; one taken by a caller that then
        died is taken again after STALE."""
        with Session(self.engine) as session, session.begin():
            row = session.get(OwedStatus, job_id)
            if row is None:
                session.add(OwedStatus(job_id=job_id, posted="posting", updated_at=_now()))
                return True
            return session.execute(update(OwedStatus).where(
                OwedStatus.job_id == job_id, (OwedStatus.posted == "pending")
                | ((OwedStatus.posted == "posting") & (OwedStatus.updated_at < _now() - STALE)))
                .values(posted="posting", updated_at=_now())).rowcount == 1

    def _owed(self) -> list[str]:
        """The jobs whose final report has not been posted yet."""
        with Session(self.engine) as session:
            return list(session.scalars(select(OwedStatus.job_id).where(OwedStatus.posted != "final")))

    def sweep(self) -> int:
        """Post the final report of every ended job still owed one; returns how many."""
        posted = 0
        for job_id in self._owed():
            job = get_job(self.engine, job_id)
            if job is not None and job.state in FINAL_STATES and self.ended(job):
                posted += 1
        return posted


def report_unaffected(reporter: GitHubReporter, models: list[str]) -> Callable[[Any, Any], None]:
    """A planned delivery's hook for PRs that make no job, so a required check never waits for one that will
    not come: touching no model is `success` on every `mlgate/<model>` context; changing mlgate itself,
    by an author who cannot write, is `failure` on every one (the judge is not the PR's to change)."""
    verdicts = {"no_models": ("success", "no model affected by this change"),
                "judge_changed": ("failure", "changes mlgate itself: a maintainer must review it")}

    def on_planned(delivery: Any, plan: Any) -> None:
        if (delivery.event in ("pull_request", "issue_comment") and plan.outcome in verdicts and plan.sha
                and plan.repository == reporter.repository):
            state, description = verdicts[plan.outcome]
            for model in models:
                reporter.final_status(model, plan.sha, state, description)

    return on_planned
