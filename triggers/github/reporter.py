"""What GitHub shows of a job: a commit status per model (`mlgate/<model>`), one sticky PR comment
per PR and model (found again by its hidden marker, edited on every push), and, on promotion, a
short comment on the commit (or the configured tracking issue).

A reporting failure never changes the job's outcome and is never silent: it is logged, printed
as a warning, and recorded in the summary under `github`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from automation.report import MARKER, render_markdown
from triggers.github.api import GitHubSource, GitHubUnavailable

log = logging.getLogger(__name__)


def status_context(model: str) -> str:
    return f"mlgate/{model}"


def report_links(summary: dict[str, Any], service_url: str | None) -> dict[str, str]:
    """Links a reader can open: the service's HTML report and, for an HTTP tracking server, the MLflow run."""
    links = {}
    if service_url:
        links["HTML report"] = f"{service_url.rstrip('/')}/reports/{summary['job_id']}"
    tracking = summary.get("tracking_uri") or ""
    if tracking.startswith("http") and summary.get("run_id"):
        experiment = summary.get("experiment_id")
        links["MLflow run"] = (f"{tracking.rstrip('/')}/#/experiments/{experiment}/runs/{summary['run_id']}"
                               if experiment else f"{tracking.rstrip('/')}/#/runs/{summary['run_id']}")
    return links


def status_description(summary: dict[str, Any]) -> str:
    gate = summary["gate"]
    if gate["passed"]:
        verdict = f"gate passed: {summary['chosen_variant']}, accuracy {summary['metrics']['accuracy']:.2%}"
        if summary.get("promoted"):
            verdict += f"; v{summary['version']} promoted"
    else:
        failed = [c["name"] for c in gate["checks"] if c["status"] == "failed"]
        verdict = f"gate failed: {', '.join(failed)}"
    return verdict[:140]


@dataclass
class GitHubReporter:
    github: GitHubSource
    repository: str
    service_url: str | None = None
    tracking_issue: int | None = None

    @classmethod
    def from_env(cls, tracking_issue: int | None = None) -> "GitHubReporter | None":
        """A reporter when GITHUB_REPOSITORY and GITHUB_TOKEN (or a GitHub App: GITHUB_APP_ID …) are set, else
        None (nothing to report to)."""
        repository, token = os.environ.get("GITHUB_REPOSITORY"), os.environ.get("GITHUB_TOKEN")
        if not repository or not (token or os.environ.get("GITHUB_APP_ID")):
            return None
        return cls(GitHubSource.from_env(), repository, os.environ.get("MLGATE_SERVICE_URL"), tracking_issue)

    def _attempt(self, what: str, outcomes: dict[str, str], fn: Any) -> None:
        try:
            result = fn()
            outcomes[what] = "ok" if result is None else str(result)
        except GitHubUnavailable as exc:
            outcomes[what] = f"failed: {exc}"
            log.warning("github report failed", extra={"what": what, "error": str(exc)})

    def started(self, model: str, sha: str | None) -> dict[str, str]:
        outcomes: dict[str, str] = {}
        if sha:
            self._attempt("status", outcomes, lambda: self.github.set_status(
                self.repository, sha, "pending", "mlgate job running: train, benchmark, optimize, gate",
                status_context(model)))
        return outcomes

    def finished(self, summary: dict[str, Any], statuses: bool = True) -> dict[str, str]:
        """Status (unless a check run stands for it), PR comment, promotion note; returns what happened to each
        (for the summary)."""
        outcomes: dict[str, str] = {}
        model, sha = summary["model"], summary.get("sha")
        links = report_links(summary, self.service_url)
        if sha and statuses:
            state = "success" if summary["gate"]["passed"] else "failure"
            self._attempt("status", outcomes, lambda: self.github.set_status(
                self.repository, sha, state, status_description(summary), status_context(model),
                links.get("HTML report")))
        if summary.get("trigger") == "pr" and summary.get("pr"):
            self._attempt("comment", outcomes, lambda: self._sticky_comment(summary, links))
        elif summary.get("promoted"):
            self._note("promotion note", outcomes, sha, (
                f"mlgate promoted **{model}** version **{summary['version']}** to production "
                f"({summary['chosen_variant']}, accuracy {summary['metrics']['accuracy']:.2%}, "
                f"trigger `{summary['trigger']}`, job `{summary['job_id']}`)."))
        return outcomes

    def rolled_back(self, model: str, candidate: str, production: str, reason: str, audit_id: int,
                    sha: str | None) -> dict[str, str]:
        """A rollout's rollback, where the version's promotion note went (`sha`: the version's commit)."""
        outcomes: dict[str, str] = {}
        self._note("rollback note", outcomes, sha, (
            f"mlgate rolled **{model}** back from version **{candidate}** to version **{production}** "
            f"after its staged rollout: {reason} (audit entry {audit_id})."))
        return outcomes

    def _note(self, what: str, outcomes: dict[str, str], sha: str | None, note: str) -> None:
        """On the tracking issue when there is one, else on the commit."""
        if self.tracking_issue:
            self._attempt(what, outcomes, lambda: self.github.issue_comment(
                self.repository, self.tracking_issue, note + (f" Commit {sha}." if sha else "")))
        elif sha:
            self._attempt(what, outcomes, lambda: self.github.commit_comment(self.repository, sha, note))

    def _sticky_comment(self, summary: dict[str, Any], links: dict[str, str]) -> str:
        comment_id, created = self.github.upsert_comment(
            self.repository, int(summary["pr"]), MARKER.format(model=summary["model"]),
            render_markdown(summary, links))
        return f"comment {comment_id} {'created' if created else 'edited'}"

    def final_status(self, model: str, sha: str | None, state: str, description: str) -> dict[str, str]:
        """A final status with no verdict behind it (the job failed, was cancelled, or its runner was lost)."""
        outcomes: dict[str, str] = {}
        if sha:
            self._attempt("status", outcomes, lambda: self.github.set_status(
                self.repository, sha, state, description, status_context(model)))
        return outcomes
