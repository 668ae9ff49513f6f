"""Putting proposed deploy-file changes (automation/proposals.py) into git.

`commit` mode: a one-file commit on top of `service.branch`, pushed as a fast-forward (a push that raced
another is retried on the new head at the next pass). `pull_request` mode: the same commit on the model's
promotion branch `<branch_prefix>/<stage>/<model>`, force-pushed, and one pull request from it, opened or
updated in place, with the model report as its body and a passing `mlgate/promotion` verdict on its head.
Without GitHub (no GITHUB_TOKEN) the branch is pushed and the pull request is left to a person.

Each step can be repeated: a restart between the push and the bookkeeping finds the change already in the
branch (done) or the pull request already open (updated, never a second one).

A job's change is published once the job has ended, so the pull request's body has the job's report (the job
records its proposal before it writes the report). In `pull_request` mode the pushed branch is recorded
(`pushed`) before GitHub is asked for the pull request: when GitHub refuses or is unreachable, that step alone
is retried, with backoff, and the other proposals and the reconcile that follows go on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import Engine

from automation import proposals
from automation.config import MlgateConfig
from automation.deploy_file import MAX_DEPLOY_FILE_BYTES, deploy_path
from triggers.github.api import GitHubRateLimited, GitHubUnavailable
from triggers.gitops import git_tree

log = logging.getLogger(__name__)
MAX_REPORT_IN_BODY = 60_000
GITHUB_RETRY_SECONDS = (5.0, 300.0)   # the first wait after GitHub failed a pull request step, and the longest


@dataclass
class GitHubTarget:
    source: Any        # triggers.github.api.GitHubSource
    repository: str    # owner/name


class Publisher:
    def __init__(self, config: MlgateConfig, repo: Path, engine: Engine, github: GitHubTarget | None) -> None:
        self.config, self.repo, self.engine, self.github = config, repo, engine, github
        self.gitops = config.service.gitops
        self._github_failures: dict[int, tuple[int, float]] = {}   # proposal id -> (failures, retry at)
        self._queue_here: bool | None = None   # whether the job queue's table is in this database

    def run(self) -> list[str]:
        """One pass over the open proposals; one line per change made. Replicas publish one at a time: on
        PostgreSQL a row lock is held for the pass (nothing else waits on it); SQLite is one service's."""
        if not proposals.open_proposals(self.engine):
            return []
        if self.engine.dialect.name == "sqlite":   # its lock would stop every writer for the pass
            return self._run()
        from automation.store import locked

        with locked(self.engine, "gitops:publisher"):
            return self._run()

    def _run(self) -> list[str]:
        open_now = proposals.open_proposals(self.engine)
        head = git_tree.branch_head(self.repo, self.config.service.branch)
        done = []
        for proposal in open_now:
            try:
                line = self._publish(proposal, head)
            except git_tree.GitFailed as exc:   # a raced push or an unreachable remote: the next pass retries
                log.warning("deploy-file change not pushed yet", extra={"proposal": proposal.id,
                                                                        "error": str(exc)})
                continue
            except (GitHubUnavailable, GitHubRateLimited) as exc:   # this proposal waits, the others go on
                from automation.redaction import redact

                failures = self._github_failures.get(proposal.id, (0, 0.0))[0] + 1
                first, longest = GITHUB_RETRY_SECONDS
                delay = min(longest, first * 2 ** (failures - 1))
                if isinstance(exc, GitHubRateLimited):   # not before GitHub's reset
                    delay = max(delay, exc.retry_at - time.time())
                self._github_failures[proposal.id] = (failures, time.monotonic() + delay)
                log.error("promotion pull request not opened yet", extra={
                    "proposal": proposal.id, "retry_in": delay,
                    "error": redact(f"{type(exc).__name__}: {exc}")[:500]})
                continue
            if line:
                done.append(line)
                log.info("deploy-file change", extra={"proposal": proposal.id, "model": proposal.model,
                                                      "stage": proposal.stage, "outcome": line})
        return done

    def _publish(self, proposal: proposals.ProposalView, head: str) -> str | None:
        path = deploy_path(self.gitops.folder, proposal.stage, proposal.model)
        declared = declared_version(git_tree.file_at(self.repo, head, path, MAX_DEPLOY_FILE_BYTES))
        if declared == proposal.version:   # merged, committed before a restart, or declared by hand
            proposals.settle(self.engine, proposal.id, proposal.state, "done", f"{path} at {head[:12]} declares it")
            return f"{proposal.model} v{proposal.version} is declared in {proposal.stage} at {head[:12]}"
        title = change_title(proposal)
        if proposal.state == "pushed" and self.github is not None and proposal.branch and proposal.commit_sha:
            return self._open(proposal, proposal.branch, proposal.commit_sha, title)   # GitHub failed last time
        if proposal.state != "pending":
            return None   # a pull request or branch waits for a person
        if self._job_running(proposal.job_id):
            return None   # published once the job ended: its report is the pull request's body
        if proposal.kind == "promote" and proposal.stage == "production" and declared is not None \
                and declared != proposal.replaces:
            proposals.settle(self.engine, proposal.id, "pending", "superseded",
                             f"git declares v{declared} now, not v{proposal.replaces} as when the gate ran")
            return f"{proposal.model} v{proposal.version} not proposed: production moved to v{declared} in git"
        mode = self.config.model(proposal.model).promotion.mode
        author = (self.gitops.author_name, self.gitops.author_email)
        commit = git_tree.commit_file(self.repo, head, path, proposal.content,
                                      f"{title}\n\n{commit_body(proposal)}", author)
        if mode == "commit":
            git_tree.push(self.repo, commit, self.config.service.branch)
            proposals.settle(self.engine, proposal.id, "pending", "done", "committed", commit_sha=commit)
            return f"{title}: committed {commit[:12]} to {self.config.service.branch}"
        branch = f"{self.gitops.branch_prefix}/{proposal.stage}/{proposal.model}"
        git_tree.push(self.repo, commit, branch, force=True)
        if self.github is None:
            proposals.settle(self.engine, proposal.id, "pending", "pushed",
                             "no GitHub configured: open the pull request by hand", branch=branch, commit_sha=commit)
            return f"{title}: branch {branch} pushed (no GitHub: open the pull request by hand)"
        if not proposals.settle(self.engine, proposal.id, "pending", "pushed",
                                "branch pushed; opening its pull request", branch=branch, commit_sha=commit):
            return None   # settled meanwhile by another replica
        return self._open(proposal, branch, commit, title)

    def _open(self, proposal: proposals.ProposalView, branch: str, commit: str, title: str) -> str | None:
        """The pull request for a pushed branch (found and updated, or opened), then the proposal `opened`."""
        retry_at = self._github_failures.get(proposal.id, (0, 0.0))[1]
        if time.monotonic() < retry_at:
            return None
        number = self._pull_request(proposal, branch, title, commit)
        self._github_failures.pop(proposal.id, None)
        proposals.settle(self.engine, proposal.id, "pushed", "opened", f"pull request #{number}",
                         pr_number=number)
        return f"{title}: pull request #{number}"

    def _job_running(self, job_id: str | None) -> bool:
        """Whether the job that proposed the change is still queued or running here (its report not written)."""
        from sqlalchemy import inspect

        from triggers.jobs import queue

        if not job_id:
            return False
        if self._queue_here is None:   # `mlgate reconcile` on a store without the service's queue
            self._queue_here = inspect(self.engine).has_table(queue.Job.__tablename__)
        if not self._queue_here:
            return False
        job = queue.get_job(self.engine, job_id)
        return job is not None and job.state in ("queued", "running")

    def _pull_request(self, proposal: proposals.ProposalView, branch: str, title: str, commit: str) -> int:
        assert self.github is not None
        source, repository = self.github.source, self.github.repository
        body = pull_request_body(self.config.workdir, proposal)
        number = source.find_pull_request(repository, branch, self.config.service.branch)
        if number is None:
            number = source.open_pull_request(repository, branch, self.config.service.branch, title, body)
        else:
            source.update_pull_request(repository, number, title, body)
        gates = yaml.safe_load(proposal.content).get("evidence", {}).get("gates", [])
        summary = "\n".join(g.get("line") or f"{g.get('name')}: {g.get('status')}" for g in gates) or title
        try:   # the evidence on the change itself; a failed post leaves the pull request as it is
            source.commit_verdict(repository, commit, "mlgate/promotion", title, summary, passed=True)
        except Exception as exc:
            log.error("promotion verdict not posted", extra={"pr": number, "error": f"{type(exc).__name__}: {exc}"})
        return number


def declared_version(text: bytes | None) -> str | None:
    """The version a deploy file's text names, leniently (the reconciler is where files are judged)."""
    if text is None:
        return None
    try:
        data = yaml.safe_load(text.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        return None
    version = data.get("version") if isinstance(data, dict) else None
    return str(version) if version is not None else None


def change_title(proposal: proposals.ProposalView) -> str:
    verb = "Roll back" if proposal.kind == "rollback" else "Promote"
    return f"{verb} {proposal.model} to v{proposal.version} in {proposal.stage}"


def commit_body(proposal: proposals.ProposalView) -> str:
    lines = [f"mlgate-proposal: {proposal.id}"]
    if proposal.job_id:
        lines.insert(0, f"Gate passed in job {proposal.job_id}.")
    if proposal.replaces:
        lines.append(f"Replaces: v{proposal.replaces}")
    return "\n".join(lines)


def pull_request_body(workdir: Path, proposal: proposals.ProposalView) -> str:
    """The model report of the job that gated the version (when kept here), then the deploy file itself."""
    parts = [f"**{change_title(proposal)}**. Merging this pull request promotes: the service reconciles "
             f"the registry with the deploy file once it is on the branch. `git revert` the merge to roll back."]
    if proposal.job_id and proposal.job_id.isalnum():   # a path derived from the job id, nothing else
        report = workdir / "reports" / proposal.job_id / "report.md"
        if report.is_file() and not report.is_symlink():
            parts.append(report.read_text(encoding="utf-8", errors="replace")[:MAX_REPORT_IN_BODY])
    parts.append(f"<details><summary>deploy file</summary>\n\n```yaml\n{proposal.content}```\n</details>")
    return "\n\n".join(parts)
