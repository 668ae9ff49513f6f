"""GitHub webhooks → jobs: signature check, payload shape, and which jobs an event makes.

A push to the default branch retrains the models its commits touch; a pull request
(opened/synchronize/reopened) evaluates the models its files touch, on the head SHA, and a
newer push to the PR supersedes the older queued job. A PR from outside waits for a maintainer's
approval: the approval label, or an `/mlgate evaluate` comment. Everything else is recorded and ignored.
Planning that needs the GitHub API (a PR's file list, the previous mlgate.yaml) is deferred to
the intake planner so the request itself stays fast.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from automation.config import MlgateConfig
from triggers.intake.changes import CONFIG_FILE, Affected, affected_models
from triggers.github.api import GitHubSource, GitHubUnavailable

PR_ACTIONS = ("opened", "synchronize", "reopened")
EVALUATE_COMMAND = "/mlgate evaluate"
EVALUATE_LINE = re.compile(r"(?i)/mlgate evaluate(?:\s+([0-9a-f]{7,40}))?", re.ASCII)
MAX_WEBHOOK_COMMITS = 20   # GitHub lists at most 20 commits in a push payload
ZERO_SHA = "0" * 40


class BadPayload(ValueError):
    """Signed, but not a payload this event type can have: answered with 400."""


# Only the fields mlgate reads are declared; GitHub adds fields freely, so the rest is ignored.
class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Repository(_Loose):
    full_name: str
    default_branch: str


class _Commit(_Loose):
    id: str
    added: list[str] = []
    removed: list[str] = []
    modified: list[str] = []


class PushEvent(_Loose):
    ref: str
    before: str
    after: str
    deleted: bool = False
    forced: bool = False
    commits: list[_Commit] = []
    repository: _Repository


class _HeadRepo(_Loose):
    full_name: str


class _Head(_Loose):
    sha: str
    repo: _HeadRepo | None = None          # None when the fork was deleted


class _User(_Loose):
    login: str


class _Label(_Loose):
    name: str


class _PullRequest(_Loose):
    head: _Head
    base: _Head | None = None
    user: _User | None = None
    updated_at: datetime | None = None     # on a pull_request event: when its head last changed, at the latest


class PullRequestEvent(_Loose):
    action: str
    number: int
    pull_request: _PullRequest
    repository: _Repository
    sender: _User | None = None
    label: _Label | None = None


class _Comment(_Loose):
    body: str = ""
    user: _User | None = None
    created_at: datetime | None = None


class _Issue(_Loose):
    number: int
    pull_request: dict[str, Any] | None = None   # present only when the issue is a pull request


class IssueCommentEvent(_Loose):
    action: str
    issue: _Issue
    comment: _Comment
    repository: _Repository

    @property
    def is_evaluate_command(self) -> bool:
        lines = [line.strip() for line in self.comment.body.strip().splitlines()]
        return (self.action == "created" and self.issue.pull_request is not None and bool(lines)
                and EVALUATE_LINE.fullmatch(lines[0]) is not None)

    @property
    def named_sha(self) -> str | None:
        """The commit `/mlgate evaluate <sha>` names, lower-cased (recognized at 7 to 40 hex digits, so that a
        prefix is refused with its reason; only 40 approve); None when it names none."""
        match = EVALUATE_LINE.fullmatch(self.comment.body.strip().splitlines()[0].strip())
        return match[1].lower() if match and match[1] else None


class _CheckRunApp(_Loose):
    id: int


class _CheckRun(_Loose):
    name: str
    head_sha: str
    external_id: str | None = None
    app: _CheckRunApp


class CheckRunEvent(_Loose):
    action: str
    check_run: _CheckRun
    repository: _Repository


@dataclass
class PlannedJob:
    model: str
    kind: str                      # retrain | evaluate
    trigger: str                   # push | pr
    sha: str
    pr: int | None = None
    supersede_key: str | None = None
    author_writes: bool = False    # a PR's author may write: its own code may judge it (else the base branch's)
    payload: dict[str, Any] | None = None   # carried over from the job a re-run repeats (its data_ref, …)


@dataclass
class Plan:
    outcome: str                   # jobs | no_models | judge_changed | needs_approval | ignored | pending
    reason: str
    jobs: list[PlannedJob] = field(default_factory=list)
    repository: str | None = None
    sha: str | None = None          # the commit the plan is about (a PR's head): "no model affected" goes there
    rerun_of: str | None = None     # outcome "rerun": the job whose check run someone re-ran (resolved on record)


def parse(event: str, payload: Any) -> PushEvent | PullRequestEvent | IssueCommentEvent | CheckRunEvent | None:
    model = {"push": PushEvent, "pull_request": PullRequestEvent, "issue_comment": IssueCommentEvent,
             "check_run": CheckRunEvent}.get(event)
    if model is None:
        return None
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BadPayload(f"not a {event} payload: {where}: {first['msg']}") from None


def _pushed_files(push: PushEvent) -> list[str]:
    return [path for c in push.commits for path in (*c.added, *c.removed, *c.modified)]


# (repository, PR number, moment) -> the PR's head at that moment, as its pull_request deliveries said
HeadAt = Callable[[str, int, datetime], "str | None"]


def plan_event(config: MlgateConfig, event: str, payload: Any, github: GitHubSource | None = None,
               head_at: HeadAt | None = None) -> Plan:
    """What this delivery should do. Without `github`, events that need the API plan as `pending`.
    `head_at` tells what an `/mlgate evaluate` comment approved: the head when it was written."""
    if not isinstance(payload, dict):
        raise BadPayload("the body is not a JSON object")
    if event == "ping":
        return Plan("ignored", "ping: webhook configured")
    parsed = parse(event, payload)
    if parsed is not None:
        foreign = _foreign_repository(parsed.repository.full_name)
        if foreign:   # a shared (org-level) secret signs every repository's events: only ours plan jobs
            return Plan("ignored", foreign, repository=parsed.repository.full_name)
    if isinstance(parsed, PushEvent):
        return _plan_push(config, parsed, github)
    if isinstance(parsed, PullRequestEvent):
        return _plan_pull_request(config, parsed, github)
    if isinstance(parsed, IssueCommentEvent) and parsed.is_evaluate_command:
        return _plan_evaluate_command(config, parsed, github, head_at)
    if isinstance(parsed, CheckRunEvent) and parsed.action == "rerequested":
        return _plan_rerun(parsed)
    action = payload.get("action")
    return Plan("ignored", f"event '{event}{'.' + action if action else ''}' does not start jobs")


def _plan_rerun(event: CheckRunEvent) -> Plan:
    """GitHub's "Re-run" on one of this service's check runs (only someone with write access sees it): the job
    it showed, once more. Which job comes from the check run's external id; the recording resolves it."""
    run, repo = event.check_run, event.repository.full_name
    app_id = os.environ.get("GITHUB_APP_ID", "").strip()
    if not app_id or str(run.app.id) != app_id:
        return Plan("ignored", f"check run '{run.name[:100]}' is another app's", repository=repo)
    if not run.external_id or not run.name.startswith("mlgate/"):
        return Plan("ignored", f"check run '{run.name[:100]}' names no mlgate job", repository=repo)
    return Plan("rerun", f"re-run of job {run.external_id[:40]} requested on GitHub", repository=repo,
                sha=run.head_sha, rerun_of=run.external_id[:40])


def _foreign_repository(full_name: str) -> str | None:
    """Why an event from `full_name` is not this service's (GITHUB_REPOSITORY), or None when it is (or none is set)."""
    pinned = os.environ.get("GITHUB_REPOSITORY", "").strip()
    if pinned and full_name.casefold() != pinned.casefold():   # GitHub's owner/name compare case-insensitively
        return f"repository {full_name[:200]} is not this service's repository ({pinned})"
    return None


def _plan_push(config: MlgateConfig, push: PushEvent, github: GitHubSource | None) -> Plan:
    repo = push.repository.full_name
    if push.ref.startswith("refs/tags/"):
        return Plan("ignored", f"tag push {push.ref}", repository=repo)
    if push.deleted or push.after == ZERO_SHA:
        return Plan("ignored", f"branch deletion {push.ref}", repository=repo)
    if push.ref != f"refs/heads/{push.repository.default_branch}":
        return Plan("ignored", f"push to {push.ref}, not the default branch "
                    f"{push.repository.default_branch}", repository=repo)
    files = _pushed_files(push)
    incomplete = len(push.commits) >= MAX_WEBHOOK_COMMITS or push.forced or not push.commits
    needs_api = incomplete or CONFIG_FILE in files
    if needs_api and github is None:
        return Plan("pending", "needs the GitHub API for the full change", repository=repo)
    note = ""
    if incomplete and push.before != ZERO_SHA:
        try:
            files = github.compare_files(repo, push.before, push.after)   # type: ignore[union-attr]
        except GitHubUnavailable as exc:
            note = f"the payload may not list every file and {exc}"
    elif incomplete:
        note = "a new branch's first push lists only its last commits"
    affected = affected_models(config, files, _config_versions(github, repo, push.before, push.after)
                               if github is not None else None)
    if note:
        affected.note = "; ".join(filter(None, (affected.note, note)))
    return _jobs(affected, "retrain", "push", push.after, None, repo, lambda m: f"push:{repo}:{m}")


def _plan_pull_request(config: MlgateConfig, pr: PullRequestEvent, github: GitHubSource | None) -> Plan:
    repo = pr.repository.full_name
    approval = pr.action == "labeled" and pr.label is not None and pr.label.name == config.service.approve_label
    if pr.action not in PR_ACTIONS and not approval:
        return Plan("ignored", f"pull_request.{pr.action} does not start jobs", repository=repo)
    if github is None:
        return Plan("pending", "needs the GitHub API (PR author's access, file list)", repository=repo)
    refusal = _untrusted(config, pr, github, approval)
    if refusal is not None:
        return Plan("needs_approval", refusal, repository=repo)
    # trusted without an approval: _untrusted found the author may write; an approval says nothing of the author
    return _plan_pr_jobs(config, repo, pr.number, pr.pull_request, github,
                         author_writes=None if approval else True)


def _plan_evaluate_command(config: MlgateConfig, event: IssueCommentEvent, github: GitHubSource | None,
                           head_at: HeadAt | None) -> Plan:
    """`/mlgate evaluate [sha]` on a PR: an approval when its author has write access, of one commit only:
    the one it names, or else the PR's head when the comment was written (planning may come an hour
    later). A push since then needs a new approval: the pushed code was never looked at."""
    repo, number = event.repository.full_name, event.issue.number
    if github is None:
        return Plan("pending", "needs the GitHub API (commenter's access, the PR's head)", repository=repo)
    who = event.comment.user.login if event.comment.user else None
    if who is None:
        return Plan("needs_approval", f"'{EVALUATE_COMMAND}' from an unknown user: not an approval", repository=repo)
    try:
        permission = github.permission(repo, who)
        if permission not in WRITE_ACCESS:
            return Plan("needs_approval", f"'{EVALUATE_COMMAND}' from {who}, who has {permission} access: "
                        f"not an approval", repository=repo)
        pull = _PullRequest.model_validate(github.pull_request(repo, number))
    except GitHubUnavailable as exc:   # fail closed
        return Plan("needs_approval", f"could not check '{EVALUATE_COMMAND}' from {who} ({exc}); not evaluated",
                    repository=repo)
    except ValidationError:
        return Plan("needs_approval", f"the API's answer for #{number} is not a pull request; not evaluated",
                    repository=repo)
    refusal = _approved_commit_is_head(event, who, pull.head.sha, head_at)
    if refusal is not None:
        return Plan("needs_approval", refusal, repository=repo)
    return _plan_pr_jobs(config, repo, number, pull, github)


def _approved_commit_is_head(event: IssueCommentEvent, who: str, head: str, head_at: HeadAt | None) -> str | None:
    """Why the commit `who` approved is not the PR's head now, or None when it is."""
    named = event.named_sha
    if named is not None:
        if len(named) != 40:   # a prefix would approve any later head that happens to share it
            return (f"'{EVALUATE_COMMAND} {named}' from {who} names a commit by a {len(named)}-digit prefix: "
                    "an approval names the whole 40-digit SHA (or no SHA: the head when the comment is written)")
        if head.lower() == named:
            return None
        return (f"'{EVALUATE_COMMAND} {named}' from {who} approves {named}, but the head is now {head[:12]}: "
                "approve the new head")
    seen = head_at(event.repository.full_name, event.issue.number, event.comment.created_at) \
        if head_at is not None and event.comment.created_at is not None else None
    if seen is None:
        return (f"'{EVALUATE_COMMAND}' from {who} names no commit, and mlgate saw no head of this PR before the "
                f"comment: comment '{EVALUATE_COMMAND} <sha>' naming the commit you reviewed")
    if seen != head:
        return (f"'{EVALUATE_COMMAND}' from {who} approved {seen[:12]}, the head when it was written; the head is "
                f"now {head[:12]}: a push after an approval needs a new one")
    return None


def _plan_pr_jobs(config: MlgateConfig, repo: str, number: int, pull: _PullRequest, github: GitHubSource,
                  author_writes: bool | None = None) -> Plan:
    """Evaluate jobs for the models a (trusted or approved) PR touches, at its head. A PR that changes mlgate
    itself, by an author who cannot write, is never green: an approval lets its model be measured, never
    its judge be rewritten. `author_writes`: already known, or None to ask the API."""
    head = pull.head.sha
    try:
        files = github.pull_request_files(repo, number)
        affected = affected_models(config, files,
                                   _config_versions(github, repo, pull.base.sha if pull.base else None, head))
    except GitHubUnavailable as exc:
        affected = Affected(models=list(config.models), reasons={m: "file list unavailable" for m in config.models},
                            note=f"{exc}; evaluating every model")
    writes = _author_writes(repo, pull, github) if author_writes is None else author_writes
    if affected.judge and not writes:
        shown = ", ".join(affected.judge[:3]) + (f" and {len(affected.judge) - 3} more" if len(affected.judge) > 3
                                                  else "")
        return Plan("judge_changed", f"changes mlgate itself ({shown}); its author cannot write to {repo}, so no "
                    "model is judged by it: a maintainer reviews and merges such a change", repository=repo, sha=head)
    return _jobs(affected, "evaluate", "pr", head, number, repo, lambda m: f"pr:{repo}:{number}:{m}", writes)


def _author_writes(repo: str, pull: _PullRequest, github: GitHubSource) -> bool:
    """The PR comes from a branch of this repository, or its author has write access (unanswered: no)."""
    if pull.head.repo is not None and pull.head.repo.full_name == repo:
        return True
    if pull.user is None:
        return False
    try:
        return github.permission(repo, pull.user.login) in WRITE_ACCESS
    except GitHubUnavailable:
        return False


WRITE_ACCESS = frozenset({"admin", "maintain", "write"})


def _untrusted(config: MlgateConfig, pr: PullRequestEvent, github: GitHubSource, approval: bool) -> str | None:
    """Why this PR's code may not run yet, or None. Like GitHub's own rule for workflows from forks: a
    branch of this repository (pushing one needs write access) or an author with write access runs at once;
    anyone else waits until someone with write access adds the approval label, checked through the API."""
    repo = pr.repository.full_name
    who = pr.sender.login if approval and pr.sender else (pr.pull_request.user.login if pr.pull_request.user else None)
    head = pr.pull_request.head.repo.full_name if pr.pull_request.head.repo else None
    if not approval and head == repo:
        return None
    if who is None:
        return "the payload names no user to check"
    try:
        permission = github.permission(repo, who)
    except GitHubUnavailable as exc:   # fail closed: no code runs on an unanswered question
        return f"could not check {who}'s access ({exc}); not evaluated"
    if permission in WRITE_ACCESS:
        return None
    if approval:
        return f"label '{config.service.approve_label}' added by {who}, who has {permission} access: not an approval"
    return (f"PR from {head or 'a deleted fork'} by {who} ({permission} access) waits for approval: someone with "
            f"write access adds the label '{config.service.approve_label}' or comments '{EVALUATE_COMMAND}'")


def _config_versions(github: GitHubSource, repo: str, before: str | None,
                     after: str) -> Callable[[], tuple[str | None, str | None]]:
    def fetch() -> tuple[str | None, str | None]:
        if not before or before == ZERO_SHA:
            raise LookupError("there is no previous commit to compare mlgate.yaml with")
        return github.file_at(repo, CONFIG_FILE, before), github.file_at(repo, CONFIG_FILE, after)

    return fetch


def _jobs(affected: Affected, kind: str, trigger: str, sha: str, pr: int | None, repo: str,
          supersede_key: Callable[[str], str], author_writes: bool = False) -> Plan:
    if not affected.models:
        return Plan("no_models", affected.reason(), repository=repo, sha=sha)
    jobs = [PlannedJob(model=m, kind=kind, trigger=trigger, sha=sha, pr=pr, supersede_key=supersede_key(m),
                       author_writes=author_writes) for m in affected.models]
    return Plan("jobs", affected.reason(), jobs, repository=repo, sha=sha)
