"""A job as a GitHub check run, when the service runs as a GitHub App (GITHUB_APP_ID and its key).

`in_progress` when a worker claims the job, with its stage, epoch k/N, validation accuracy and ETA as they
change (at most every PROGRESS_EVERY); then the verdict, with the report's Markdown as the output. GitHub's
"Re-run" on the check sends `check_run.rerequested`, which queues the job again (triggers/intake). The PR
comment and promotion notes are posted as with a token; commit statuses give way to the check run.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Engine, Integer, String, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from automation.store import Base
from triggers.github.api import GitHubUnavailable
from triggers.github.job_status import STALE, JobStatusReporter, ending
from automation.report import render_markdown
from triggers.github.reporter import GitHubReporter, report_links, status_context, status_description
from triggers.jobs.queue import Job, running_progress

log = logging.getLogger(__name__)
PROGRESS_EVERY = timedelta(seconds=15)
# a job's end state, when it left no verdict, as a check run conclusion
CONCLUSIONS = {"cancelled": "cancelled", "superseded": "skipped", "failed": "failure", "gate_stale": "neutral"}


class CheckRun(Base):
    """The check run that shows a job on GitHub, and whether its verdict has been posted."""

    __tablename__ = "check_runs"

    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    check_run_id: Mapped[int] = mapped_column(Integer)
    concluded: Mapped[str] = mapped_column(String(16), index=True, default="no")   # no | posting | yes
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def progress_text(progress: dict[str, Any]) -> tuple[str, str]:
    """(title, summary) of a running job's progress."""
    stage = str(progress.get("stage") or "running")
    if stage == "train" and progress.get("epochs"):
        title = f"training: epoch {progress.get('epoch', 0)}/{progress['epochs']}"
        parts = [title]
        if isinstance(progress.get("val_accuracy"), (int, float)):
            parts.append(f"validation accuracy {progress['val_accuracy']:.2%}")
        if isinstance(progress.get("eta_seconds"), (int, float)):
            parts.append(f"about {progress['eta_seconds'] / 60:.1f} min of training left")
        return title, " · ".join(parts)
    if stage == "queued":   # a cluster's queue (Kueue) holds it until admitted
        return "queued: waiting for the cluster's admission", str(progress.get("detail") or "")[:300]
    return f"stage: {stage}", f"The job is at its `{stage[:40]}` stage."


class CheckRunReporter(JobStatusReporter):
    """JobStatusReporter's duties, with a check run in place of the commit status."""

    def __init__(self, engine: Engine, reporter: GitHubReporter, workdir: Path) -> None:
        super().__init__(engine, reporter, workdir)
        self.github, self.repository = reporter.github, reporter.repository

    def _row(self, job_id: str) -> CheckRun | None:
        with Session(self.engine) as session:
            return session.get(CheckRun, job_id)

    def started(self, job: Job) -> None:
        if not job.sha:
            return
        row = self._row(job.id)
        summary = f"mlgate job `{job.id}`, attempt {job.attempts}: train, optimize, benchmark, gate."
        if row is None:
            self._create(job, summary)
            return
        # a retry (preempted, lost runner): the same check run goes on
        self.github.update_check_run(self.repository, row.check_run_id, "running", summary)
        with Session(self.engine) as session, session.begin():
            session.execute(update(CheckRun).where(CheckRun.job_id == job.id)
                            .values(concluded="no", updated_at=_now()))

    def _create(self, job: Job, summary: str) -> None:
        links = report_links({"job_id": job.id}, self.reporter.service_url)
        check_run_id = self.github.create_check_run(self.repository, job.sha, status_context(job.model), job.id,
                                                     summary, links.get("HTML report"))   # type: ignore[arg-type]
        with Session(self.engine) as session, session.begin():
            session.merge(CheckRun(job_id=job.id, check_run_id=check_run_id, concluded="no", updated_at=_now()))

    def progress(self, job: Job) -> bool:
        """The running job's progress onto its check run, at most every PROGRESS_EVERY; True when posted."""
        progress = running_progress(self.engine, [job.id]).get(job.id)
        if progress is None:
            return False
        with Session(self.engine) as session, session.begin():   # one poster per interval, whoever asks
            taken = session.execute(update(CheckRun).where(
                CheckRun.job_id == job.id, CheckRun.concluded == "no",
                CheckRun.progress_at.is_(None) | (CheckRun.progress_at < _now() - PROGRESS_EVERY))
                .values(progress_at=_now())).rowcount == 1
            check_run_id = session.scalar(select(CheckRun.check_run_id).where(CheckRun.job_id == job.id)) \
                if taken else None
        if check_run_id is None:
            return False
        title, summary = progress_text(progress)
        self.github.update_check_run(self.repository, check_run_id, title, summary)
        return True

    def ended(self, job: Job) -> dict[str, str]:
        """The verdict onto the check run (and the PR comment or promotion note), once."""
        if not job.sha:
            return {}
        if self._row(job.id) is None:   # GitHub did not take the check run when the job started: one now
            try:
                self._create(job, f"mlgate job `{job.id}`")
            except GitHubUnavailable as exc:
                return {"check run": f"failed: {exc}"}
        if not self._take_check(job.id):
            return {}
        row = self._row(job.id)
        outcomes: dict[str, str] = {}
        summary = self._summary(job)
        if summary is not None:
            links = report_links(summary, self.reporter.service_url)
            conclusion = "success" if summary["gate"]["passed"] else "failure"
            title, text = status_description(summary), render_markdown(summary, links)
            outcomes |= self.reporter.finished(summary, statuses=False)
        else:
            state, title = ending(job)
            timed_out = job.state == "failed" and "timed out" in (job.error or "")
            conclusion, text = "timed_out" if timed_out else CONCLUSIONS.get(job.state, "failure"), title
        try:
            self.github.update_check_run(self.repository, row.check_run_id, title, title if summary is None else
                                         f"{title}\n\n{text}", conclusion)   # type: ignore[union-attr]
            outcomes["check run"] = f"{conclusion}"
            done = "yes"
        except GitHubUnavailable as exc:   # the sweep tries again
            outcomes["check run"] = f"failed: {exc}"
            done = "no"
        with Session(self.engine) as session, session.begin():
            session.execute(update(CheckRun).where(CheckRun.job_id == job.id)
                            .values(concluded=done, updated_at=_now()))
        log.info("github check run", extra={"job_id": job.id, "context": status_context(job.model),
                                            "outcomes": outcomes})
        return outcomes

    def _take_check(self, job_id: str) -> bool:
        with Session(self.engine) as session, session.begin():
            return session.execute(update(CheckRun).where(
                CheckRun.job_id == job_id, (CheckRun.concluded == "no")
                | ((CheckRun.concluded == "posting") & (CheckRun.updated_at < _now() - STALE)))
                .values(concluded="posting", updated_at=_now())).rowcount == 1

    def _owed(self) -> list[str]:
        with Session(self.engine) as session:
            return list(session.scalars(select(CheckRun.job_id).where(CheckRun.concluded != "yes")))
