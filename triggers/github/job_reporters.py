"""Who tells GitHub of a job's start, progress and end: one protocol, two implementations (a commit status,
job_status.py; a check run, check_runs.py), and the choice between them from the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Engine

from triggers.github.check_runs import CheckRunReporter
from triggers.github.job_status import JobStatusReporter
from triggers.github.reporter import GitHubReporter
from triggers.jobs import queue


class JobReporter(Protocol):
    """Who hears of a job's start and end (a commit status or a check run)."""

    def started(self, job: queue.Job) -> None: ...
    def progress(self, job: queue.Job) -> Any: ...
    def ended(self, job: queue.Job) -> Any: ...
    def sweep(self) -> int: ...


def job_reporter_from_env(engine: Engine, workdir: Path, tracking_issue: int | None) -> JobReporter | None:
    """The service's reporter when GITHUB_REPOSITORY and a credential are set, else None: check runs for a
    GitHub App, commit statuses for a token."""
    reporter = GitHubReporter.from_env(tracking_issue)
    if reporter is None:
        return None
    if reporter.github.is_app:
        return CheckRunReporter(engine, reporter, workdir)
    return JobStatusReporter(engine, reporter, workdir)
