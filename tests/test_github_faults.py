"""GitHub misbehaving: rate limits park the work (never a sleep until the reset, never taken for a "no"),
and a status GitHub did not take (5xx) stays owed until the sweep posts it. The API is a local HTTP server
that answers as GitHub does when it refuses (its documented rate-limit headers and messages)."""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from automation.config import parse_config
from automation.store import open_store
from tests.conftest import FAST_CONFIG, webhook_examples
from triggers.github.api import GitHubRateLimited, GitHubSource
from triggers.github.job_status import JobStatusReporter, OwedStatus
from triggers.github.reporter import GitHubReporter
from triggers.intake import deliveries
from triggers.jobs import queue

REPO, SHA = "Codertocat/Hello-World", "ec26c3e57ca3a959ca5aad62de7213c562f8c821"


class FakeGitHub(ThreadingHTTPServer):
    """Answers every request per `mode`: "rate_limited" (403 with GitHub's primary rate-limit answer),
    "too_many" (429 with Retry-After), "down" (502), or "ok" (201 for a status)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode, self.requests = "ok", []
        self.reset_at = int(time.time()) + 3600
        # a short poll interval: shutdown() returns within 50 ms rather than the default half second
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeGitHub

    def _answer(self) -> None:
        self.server.requests.append((self.command, self.path))
        mode = self.server.mode
        if mode == "rate_limited":
            status, headers = 403, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(self.server.reset_at)}
            body = {"message": "API rate limit exceeded for user ID 1.",
                    "documentation_url": "https://docs.github.com/rest/overview/resources-in-the-rest-api"}
        elif mode == "too_many":
            status, headers, body = 429, {"retry-after": "120"}, {"message": "Too many requests"}
        elif mode == "down":
            status, headers, body = 502, {}, {"message": "Server Error"}
        else:
            status, headers, body = 201, {}, {"id": 1, "state": "success", "context": "mlgate/digits_mlp"}
        data = json.dumps(body).encode()
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def api() -> Iterator[FakeGitHub]:
    server = FakeGitHub()
    yield server
    server.shutdown()


def test_a_rate_limit_is_reported_at_once_with_githubs_reset(api: FakeGitHub) -> None:
    github = GitHubSource(api_url=api.url, token="t")
    api.mode = "rate_limited"
    with pytest.raises(GitHubRateLimited) as limited:
        github.permission(REPO, "someone")
    assert limited.value.retry_at == api.reset_at and len(api.requests) == 1   # asked once: no sleeping retries
    api.mode = "too_many"
    with pytest.raises(GitHubRateLimited) as limited:
        github.pull_request_files(REPO, 1)
    assert 100 < limited.value.retry_at - time.time() <= 120


@pytest.mark.usefixtures("no_retry_backoff")   # 5xx answers: retried, without the waits
def test_a_rate_limited_plan_stays_pending_and_holds_up_nothing_else(api: FakeGitHub, tmp_path: Path) -> None:
    config = parse_config(yaml.safe_dump(copy.deepcopy(FAST_CONFIG)), "mlgate.yaml", tmp_path)
    engine = open_store(f"sqlite:///{tmp_path / 'mlgate.db'}")
    payload = next(p for p in webhook_examples("pull_request") if p["action"] == "opened")
    body = json.dumps(payload).encode()
    deliveries.record_deliveries(engine, config, [deliveries.Incoming.parse(config, "d1", "pull_request", payload,
                                                                            body)])
    api.mode = "rate_limited"
    with pytest.raises(GitHubRateLimited):
        deliveries.plan_pending(engine, config, GitHubSource(api_url=api.url, token="t"))
    # not a "no": the PR is neither refused nor approved, it waits for GitHub's reset
    assert deliveries.get_delivery(engine, "d1").status == "pending"
    api.mode = "down"   # GitHub answers, badly (5xx): the same-repository PR is evaluated on every model
    assert deliveries.plan_pending(engine, config, GitHubSource(api_url=api.url, token="t")) == 1
    planned = deliveries.get_delivery(engine, "d1")
    assert planned.status == "jobs" and "HTTP 502" in planned.reason and "evaluating every model" in planned.reason


@pytest.mark.usefixtures("no_retry_backoff")   # 5xx answers: retried, without the waits
def test_a_status_github_did_not_take_is_posted_by_the_sweep(api: FakeGitHub, tmp_path: Path) -> None:
    engine = open_store(f"sqlite:///{tmp_path / 'mlgate.db'}")
    reporter = JobStatusReporter(engine, GitHubReporter(GitHubSource(api_url=api.url, token="t"), REPO), tmp_path)
    job, _ = queue.enqueue(engine, model="digits_mlp", kind="retrain", trigger="push", sha=SHA)
    claimed = queue.claim(engine, "w")
    reporter.started(claimed)
    queue.finish(engine, job.id, "w", "failed", error="out of memory")
    api.mode = "down"
    outcomes = reporter.ended(queue.get_job(engine, job.id))
    assert outcomes["status"].startswith("failed: GitHub API set status mlgate/digits_mlp")
    from sqlalchemy.orm import Session

    with Session(engine) as session:
        assert session.get(OwedStatus, job.id).posted == "pending"   # still owed
    api.mode, api.requests = "ok", []
    assert reporter.sweep() == 1
    assert api.requests == [("POST", f"/repos/{REPO}/statuses/{SHA}")] and reporter.sweep() == 0


class ScriptedRuns:
    """The GitHub calls the executor makes (their requests are checked against GitHub's OpenAPI in
    test_github_contract), answering from a script: each `workflow_run` pops the next answer."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers, self.calls = answers, []

    def dispatch_workflow(self, repository: str, workflow: str, ref: str, inputs: dict[str, str]) -> None:
        # every job of the run reads the inputs (the outsider's build too): none may be a credential
        assert not any(word in name for name in inputs for word in ("token", "secret", "key")), inputs
        self.calls.append(("dispatch", inputs["job_id"], inputs["attempt"]))

    def workflow_run(self, repository: str, workflow: str, job_id: str) -> Any:
        answer = self.answers.pop(0) if self.answers else self.answers_end
        if isinstance(answer, Exception):
            raise answer
        return answer

    def cancel_workflow_run(self, repository: str, run_id: int) -> None:
        self.calls.append(("cancel", run_id))


def github_executor(tmp_path: Path, github: ScriptedRuns) -> tuple[Any, Any]:
    from triggers.jobs.github_executor import GitHubExecutor

    config = parse_config(yaml.safe_dump(copy.deepcopy(FAST_CONFIG)), "mlgate.yaml", tmp_path)
    engine = open_store(f"sqlite:///{tmp_path / 'mlgate.db'}")
    return GitHubExecutor(config, engine, github, REPO, poll_seconds=0.01), engine


def test_the_github_executor_rides_out_api_errors_and_cancels_what_it_abandons(tmp_path: Path) -> None:
    from triggers.github.api import GitHubUnavailable, WorkflowRun

    running, done = WorkflowRun(7, "in_progress", None), WorkflowRun(7, "completed", "failure")
    github = ScriptedRuns([GitHubUnavailable("GitHub API find the run: HTTP 502"), GitHubRateLimited("limited", 0),
                           running])
    github.answers_end = done
    executor, engine = github_executor(tmp_path, github)
    job, _ = queue.enqueue(engine, model="digits_mlp", kind="retrain", trigger="push", sha=SHA)
    claimed = queue.claim(engine, "w")
    outcome = executor.run(claimed, threading.Event())
    # two unreadable polls did not fail the job: only the run's own end did
    assert outcome.state == "failed" and outcome.fields["error"] == "workflow run ended 'failure' without reporting a result"
    assert github.calls == [("dispatch", job.id, "1")]

    # the job is recovered after a lost lease while the first run still goes: that run is cancelled first
    queue.finish(engine, job.id, "w", "failed")
    again, _ = queue.enqueue(engine, model="digits_mlp", kind="retrain", trigger="push", sha=SHA)
    first = queue.claim(engine, "w1")
    from sqlalchemy import update as sql_update
    from sqlalchemy.orm import Session

    with Session(engine) as session, session.begin():   # w1 died; its lease ran out
        session.execute(sql_update(queue.Job).where(queue.Job.id == again.id).values(lease_expires_at=queue._now()))
    second = queue.claim(engine, "w2")
    assert second.id == first.id == again.id and second.attempts == 2
    github.answers, github.calls = [running, done], []
    stop = threading.Event()
    stop.set()   # the job is no longer this worker's at its first poll: the executor returns at once
    assert executor.run(second, stop) is None
    assert github.calls == [("cancel", 7), ("dispatch", again.id, "2")]

    # `mlgate cancel` of a job whose run goes on cancels the run too
    github.answers, github.calls = [running], []
    github.answers_end = running
    third, _ = queue.enqueue(engine, model="digits_cnn", kind="retrain", trigger="push", sha=SHA)
    claimed = queue.claim(engine, "w3")
    assert claimed.id == third.id
    queue.cancel(engine, third.id, "stopped by the operator")
    assert executor.run(claimed, threading.Event()) is None
    assert github.calls == [("dispatch", third.id, "1"), ("cancel", 7)]
