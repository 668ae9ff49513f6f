"""Contract tests: every GitHub API call mlgate makes goes to Prism serving GitHub's official
OpenAPI description (@octokit/openapi), which answers 422 to any request the spec does not allow
(tests/prism.py says how the spec copy is served)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import JOB_THREADS, fast_config, last_json, seed_mlflow_store, wait_for, write_config
from tests.prism import prism_server
from triggers.github.api import GitHubSource, GitHubUnavailable

REPO, SHA = "octocat/Hello-World", "6dcb09b5b57875f334f61aebed695e2e4193db5e"
TOKEN = "ghp_not-a-real-token-0123456789"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prism(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with prism_server(tmp_path_factory.mktemp("prism")) as (url, _log):
        yield url


@pytest.fixture
def github(prism: str) -> GitHubSource:
    return GitHubSource(api_url=prism, token=TOKEN)


def test_a_malformed_request_is_rejected_so_the_contract_check_can_fail(github: GitHubSource) -> None:
    with pytest.raises(GitHubUnavailable) as caught:
        github.set_status(REPO, SHA, "bogus-state", "x", "mlgate/digits_mlp")
    assert caught.value.status == 422 and "ghp_" not in str(caught.value)


def test_reads_the_service_makes_are_in_the_contract(github: GitHubSource) -> None:
    files = github.pull_request_files(REPO, 1347)
    assert files and all(isinstance(f, str) for f in files)
    assert github.compare_files(REPO, "main", "feature")
    # the GitHub executor's tracking call: the spec's example run is not ours, so nothing is found
    assert github.workflow_run(REPO, "retrain.yml", "job-that-is-not-there") is None
    # accepted by the contract (an HTTP error would say so); the spec's example file content has
    # escaped newlines inside its base64, so decoding it is refused, in one clear line
    with pytest.raises(GitHubUnavailable, match="content is not valid base64") as caught:
        github.file_at(REPO, "mlgate.yaml", SHA)
    assert caught.value.status is None


def test_a_marker_planted_by_someone_else_is_not_the_sticky_comment() -> None:
    from triggers.github.api import is_own_comment

    marker = "<!-- mlgate-report model=digits_mlp -->"
    assert is_own_comment(f"{marker}\n## report", "github-actions[bot]", marker, "github-actions[bot]")
    assert not is_own_comment(f"{marker} (pre-posted to block the report)", "mallory", marker, "github-actions[bot]")
    assert not is_own_comment("an unrelated comment", "github-actions[bot]", marker, "github-actions[bot]")
    assert not is_own_comment(marker, None, marker, "github-actions[bot]")     # a deleted account


def test_pr_trust_asks_the_api_who_may_write(github: GitHubSource, tmp_path: Path) -> None:
    """The trust policy's calls are in the contract, and a label from someone with write access (the
    spec's example says admin) approves a fork's PR: it is planned from its file list like any other."""
    import copy

    import yaml

    from automation.config import parse_config
    from tests.conftest import webhook_examples
    from triggers.intake.webhooks import plan_event

    assert github.permission(REPO, "octocat") in {"admin", "maintain", "write", "triage", "read", "none"}
    config = parse_config(yaml.safe_dump(fast_config()), "mlgate.yaml", tmp_path)
    labeled = copy.deepcopy(next(p for p in webhook_examples("pull_request") if p["action"] == "labeled"))
    labeled["pull_request"]["head"]["repo"]["full_name"] = "outsider/Hello-World"
    labeled["label"]["name"] = config.service.approve_label
    plan = plan_event(config, "pull_request", labeled, github)
    # approved: planned from the spec's example file list, whose one file belongs to no model
    assert plan.outcome == "no_models" and "belongs to a model" in plan.reason, plan


def test_an_evaluate_comment_by_a_writer_plans_the_prs_head(github: GitHubSource, tmp_path: Path) -> None:
    """`/mlgate evaluate <sha>` from someone with write access (the spec's example: admin) approves that commit
    when it is the PR's head, read through the API; the PR is planned from its file list."""
    import yaml

    from automation.config import parse_config
    from tests.test_webhooks import evaluate_comment
    from triggers.intake.webhooks import plan_event

    pull = github.pull_request(REPO, 1347)
    assert pull["head"]["sha"] and pull["number"] == 1347
    config = parse_config(yaml.safe_dump(fast_config()), "mlgate.yaml", tmp_path)
    comment = evaluate_comment(f"/mlgate evaluate {pull['head']['sha']}", login="octocat")
    comment["repository"]["full_name"], comment["issue"]["number"] = REPO, 1347
    plan = plan_event(config, "issue_comment", comment, github)
    assert plan.outcome == "no_models" and "belongs to a model" in plan.reason, plan
    # naming no commit, with no head of the PR seen before the comment: approves nothing
    comment["comment"]["body"] = "/mlgate evaluate"
    assert plan_event(config, "issue_comment", comment, github).outcome == "needs_approval"


def test_writes_the_service_makes_are_in_the_contract(github: GitHubSource) -> None:
    github.set_status(REPO, SHA, "pending", "mlgate job running", "mlgate/digits_mlp",
                      target_url="https://mlgate.example/reports/abc")
    comment_id, created = github.upsert_comment(REPO, 1347, "<!-- mlgate-report model=digits_mlp -->", "body")
    assert created and comment_id
    # the spec's example comment says "Me too", written by the token's own user (octocat, per GET /user):
    # as a marker it exercises the edit-in-place path
    assert github.login() == "octocat"
    _, created = github.upsert_comment(REPO, 1347, "Me too", "edited body")
    assert not created
    assert github.commit_comment(REPO, SHA, "promoted")
    assert github.issue_comment(REPO, 1347, "promoted")
    github.dispatch_workflow(REPO, "retrain.yml", "main", {"model": "digits_mlp", "job_id": "abc123",
                                                             "attempt": "1", "trigger": "push", "sha": SHA, "pr": "",
                                                             "data_ref": "", "author_writes": "false"})
    github.cancel_workflow_run(REPO, 30433642)


def test_nothing_written_to_github_carries_a_credential(github: GitHubSource,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 7: a comment or status quoting an error (with a URL's password, a token, a secret's value) is
    masked before PyGithub is handed it; the calls still pass the contract."""
    from github.Commit import Commit
    from github.Issue import Issue

    monkeypatch.setenv("ACME_VAULT_TOKEN", "vault-token-value-123")
    sent: list[str] = []
    for cls, name in ((Issue, "create_comment"), (Commit, "create_comment"), (Commit, "create_status")):
        real = getattr(cls, name)

        def spy(self: Any, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            sent.extend(str(v) for v in (*args, *kwargs.values()))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, spy)
    leak = ("job failed: http://ci:hunter2-db@postgres:5432/mlgate refused; Authorization: Bearer ghp_"
            + "B" * 36 + "; vault-token-value-123")
    github.set_status(REPO, SHA, "failure", leak, "mlgate/digits_mlp")
    github.upsert_comment(REPO, 1347, "<!-- a marker nobody posted -->", leak)
    github.commit_comment(REPO, SHA, leak)
    github.issue_comment(REPO, 1347, leak)
    assert len(sent) >= 4 and all("***" in text for text in sent if "job failed" in text)
    for secret in ("hunter2-db", "ghp_BBBB", "vault-token-value-123"):
        assert not any(secret in text for text in sent), secret


@pytest.fixture(scope="module")
def reported_runs(prism: str, tmp_path_factory: pytest.TempPathFactory,
                  mlflow_template: Path) -> dict[str, dict[str, Any]]:
    """`mlgate run` for a push and for a PR, reporting to GitHub (Prism) as it would on a runner."""
    directory = tmp_path_factory.mktemp("reporting")
    path = write_config(directory, fast_config(epochs=5, lean=True))   # GitHub is the point, not the variants
    seed_mlflow_store(directory / "state", mlflow_template)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLGATE_", "MLFLOW_"))}
    env |= {"GITHUB_API_URL": prism, "GITHUB_TOKEN": TOKEN, "GITHUB_REPOSITORY": REPO,
            "MLGATE_SERVICE_URL": "https://mlgate.example", "MLGATE_LOG_LEVEL": "info", **JOB_THREADS}
    runs = {}
    for trigger, extra in (("push", []), ("pr", ["--pr", "1347"])):
        done = subprocess.run([sys.executable, "-m", "triggers.cli", "--config", str(path), "run", "--model",
                               "digits_mlp", "--trigger", trigger, "--sha", SHA, *extra, "--json"],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[trigger] = {"summary": last_json(done.stdout), "stderr": done.stderr, "config": path}
    return runs


def test_push_job_sets_statuses_and_announces_the_promotion(reported_runs: dict[str, dict[str, Any]]) -> None:
    run = reported_runs["push"]
    assert run["summary"]["promoted"]
    github = run["summary"]["github"]
    assert set(github) == {"status", "promotion note"} and github["status"] == "ok"
    assert github["promotion note"].isdigit()                            # the new comment's id
    assert "Warning: GitHub" not in run["stderr"]


def test_pr_job_sets_status_and_one_sticky_comment(reported_runs: dict[str, dict[str, Any]]) -> None:
    run = reported_runs["pr"]
    github = run["summary"]["github"]
    assert github["status"] == "ok" and github["comment"].startswith("comment ")
    assert "promotion note" not in github and not run["summary"]["promoted"]


def test_a_rollout_rollback_is_noted_where_the_promotion_note_went(reported_runs: dict[str, dict[str, Any]],
                                                                    github: GitHubSource) -> None:
    from automation import tracking
    from automation.config import load_config
    from triggers.github.reporter import GitHubReporter
    from triggers.serving.server import commit_of

    run = reported_runs["push"]
    config = load_config(run["config"])
    client = tracking.connect(config.workdir, config.experiment)[0]
    version = run["summary"]["version"]
    assert commit_of(client, "digits_mlp", version) == SHA         # the commit the version was trained from
    reason = f"version {version} failed its shadow stage: agreement 0.812"
    on_commit = GitHubReporter(github, REPO).rolled_back("digits_mlp", version, "0", reason, 7, SHA)
    on_issue = GitHubReporter(github, REPO, tracking_issue=1347).rolled_back("digits_mlp", version, "0", reason, 7,
                                                                           SHA)
    assert on_commit["rollback note"].isdigit() and on_issue["rollback note"].isdigit()   # the new comments' ids


def test_the_token_never_reaches_the_logs(reported_runs: dict[str, dict[str, Any]]) -> None:
    for run in reported_runs.values():
        assert TOKEN not in run["stderr"] and "not-a-real-token" not in run["stderr"]


@dataclass
class RecordingGitHub(GitHubSource):
    """Prism's GitHub, remembering what was written (Prism validates each call, but keeps nothing)."""

    written: list[tuple[str, ...]] = field(default_factory=list)

    def set_status(self, repository: str, sha: str, state: str, description: str, context: str,
                   target_url: str | None = None) -> None:
        self.written.append(("status", sha, state, description, context))
        super().set_status(repository, sha, state, description, context, target_url)

    def upsert_comment(self, repository: str, number: int, marker: str, body: str) -> tuple[int, bool]:
        self.written.append(("comment", str(number), marker))
        return super().upsert_comment(repository, number, marker, body)


class ScriptedExecutor:
    """Ends each job as the test says, the way a runner or executor would."""

    def __init__(self, script: Callable[[Any], Any]) -> None:
        self.script = script

    def run(self, job: Any, lost: Any) -> Any:
        return self.script(job)


def test_the_service_gives_every_job_it_started_a_final_status(prism: str, tmp_path: Path,
                                                               reported_runs: dict[str, dict[str, Any]]) -> None:
    import yaml

    from automation.config import parse_config
    from automation.store import open_store
    from triggers.github.job_status import JobStatusReporter, keep_summary
    from triggers.github.reporter import GitHubReporter
    from triggers.jobs import queue
    from triggers.jobs.executors import Outcome
    from triggers.jobs.worker import Worker

    config = parse_config(yaml.safe_dump(fast_config() | {"workdir": str(tmp_path)}), "mlgate.yaml", tmp_path)
    engine = open_store(f"sqlite:///{tmp_path / 'mlgate.db'}")
    github = RecordingGitHub(api_url=prism, token=TOKEN)
    reporter = JobStatusReporter(engine, GitHubReporter(github, REPO, "https://mlgate.example"), tmp_path)

    def run(script: Callable[[Any], Any], **job: Any) -> list[tuple[str, ...]]:
        github.written.clear()
        queue.enqueue(engine, **{"model": "digits_mlp", "kind": "retrain", "trigger": "push", "sha": SHA} | job)
        Worker(config, engine, ScriptedExecutor(script), reporter=reporter).run_one()
        return list(github.written)

    def crash(job: Any) -> Any:
        raise RuntimeError("the executor fell over")

    pending = ("status", SHA, "pending", "mlgate job running: train, benchmark, optimize, gate", "mlgate/digits_mlp")
    assert run(crash) == [pending, ("status", SHA, "error", "job failed: RuntimeError: the executor fell over",
                                    "mlgate/digits_mlp")]

    def cancelled(job: Any) -> None:
        queue.cancel(engine, job.id, "stopped by the operator")
        return None   # what an executor returns once its job is no longer its own

    assert run(cancelled)[-1] == ("status", SHA, "error", "cancelled: stopped by the operator", "mlgate/digits_mlp")

    def verdict(job: Any) -> Any:   # a PR's verdict, as the runner reported it (the summary the service kept)
        keep_summary(tmp_path, job.id, reported_runs["pr"]["summary"] | {"sha": "f" * 40, "pr": 99})
        return Outcome("succeeded")

    written = run(verdict, trigger="pr", kind="evaluate", pr=1347)
    # the job record decides the commit and PR, never the summary a job's code wrote
    assert written[-2][:3] == ("status", SHA, "success") and written[-1][:2] == ("comment", "1347")

    # the worker died after `pending`; the runner's result ended the job: the next sweep posts the final status
    job, _ = queue.enqueue(engine, model="digits_mlp", kind="retrain", trigger="push", sha=SHA, dedupe_key="lost")
    claimed = queue.claim(engine, "a-worker-that-dies")
    reporter.started(claimed)
    queue.record_result(engine, job.id, "failed", attempt=1, error="workflow run ended 'cancelled' without a result")
    github.written.clear()
    assert reporter.sweep() == 1 and reporter.sweep() == 0
    assert github.written == [("status", SHA, "error", "job failed: workflow run ended 'cancelled' without a result",
                               "mlgate/digits_mlp")]


def test_a_pr_that_touches_no_model_gets_success_on_every_context(prism: str, tmp_path: Path) -> None:
    """So `mlgate/<model>` can be a required check: a PR no job will come for is not left waiting."""
    import copy
    from types import SimpleNamespace

    import yaml

    from automation.config import parse_config
    from tests.conftest import webhook_examples
    from triggers.github.job_status import report_unaffected
    from triggers.github.reporter import GitHubReporter
    from triggers.intake.webhooks import plan_event

    github = RecordingGitHub(api_url=prism, token=TOKEN)
    config = parse_config(yaml.safe_dump(fast_config()), "mlgate.yaml", tmp_path)
    opened = copy.deepcopy(next(p for p in webhook_examples("pull_request") if p["action"] == "opened"))
    opened["repository"]["full_name"] = opened["pull_request"]["head"]["repo"]["full_name"] = REPO
    plan = plan_event(config, "pull_request", opened, github)
    assert plan.outcome == "no_models" and plan.sha == opened["pull_request"]["head"]["sha"]
    report_unaffected(GitHubReporter(github, REPO), list(config.models))(SimpleNamespace(event="pull_request"), plan)
    assert github.written == [("status", plan.sha, "success", "no model affected by this change", f"mlgate/{m}")
                              for m in config.models]


@dataclass
class RecordingApp(GitHubSource):
    """Prism's GitHub, as a GitHub App, remembering the check-run and comment calls."""

    written: list[tuple[Any, ...]] = field(default_factory=list)

    def create_check_run(self, repository: str, sha: str, name: str, external_id: str, summary: str,
                         details_url: str | None = None) -> int:
        check_run_id = super().create_check_run(repository, sha, name, external_id, summary, details_url)
        self.written.append(("create", sha, name, external_id, check_run_id))
        return check_run_id

    def update_check_run(self, repository: str, check_run_id: int, title: str, summary: str,
                         conclusion: str | None = None, text: str | None = None) -> None:
        super().update_check_run(repository, check_run_id, title, summary, conclusion, text)
        self.written.append(("update", check_run_id, title, conclusion, summary))

    def set_status(self, *args: Any, **kwargs: Any) -> None:
        self.written.append(("status",))
        super().set_status(*args, **kwargs)

    def upsert_comment(self, repository: str, number: int, marker: str, body: str) -> tuple[int, bool]:
        self.written.append(("comment", number))
        return super().upsert_comment(repository, number, marker, body)


def _app_key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def test_as_a_github_app_a_job_is_a_check_run_with_progress_a_verdict_and_a_rerun(
        prism: str, tmp_path: Path, reported_runs: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Installation tokens from the app's key, then the Checks calls, each validated by Prism against GitHub's
    description: created in_progress, progress updates (throttled), the verdict with the report's Markdown,
    and GitHub's "Re-run" (`check_run.rerequested`, a real payload) queues the job again."""
    import copy

    import yaml
    from fastapi.testclient import TestClient

    from automation.config import parse_config
    from automation.store import open_store
    from tests.conftest import webhook_examples
    from tests.test_webhooks import SECRET, deliver
    from triggers.app import ServiceState, create_app
    from triggers.github.api import GitHubApp
    from triggers.github.check_runs import CheckRunReporter
    from triggers.github.job_status import keep_summary
    from triggers.github.reporter import GitHubReporter
    from triggers.jobs import queue
    from triggers.metrics import ServiceMetrics

    monkeypatch.setenv("GITHUB_APP_ID", "1")
    config = parse_config(yaml.safe_dump(fast_config() | {"workdir": str(tmp_path)}), "mlgate.yaml", tmp_path)
    engine = open_store(f"sqlite:///{tmp_path / 'mlgate.db'}")
    github = RecordingApp(api_url=prism, token=None, app=GitHubApp("1", _app_key(), 42))
    reporter = CheckRunReporter(engine, GitHubReporter(github, REPO, "https://mlgate.example"), tmp_path)

    job, _ = queue.enqueue(engine, model="digits_mlp", kind="evaluate", trigger="pr", sha=SHA, pr=1347,
                           payload={"repository": REPO, "author_writes": True})
    claimed = queue.claim(engine, "w")
    reporter.started(claimed)
    [created] = github.written
    assert created[:4] == ("create", SHA, "mlgate/digits_mlp", job.id) and isinstance(created[4], int)

    assert reporter.progress(claimed) is False                       # nothing reported yet
    queue.record_progress(engine, job.id, 1, {"stage": "train", "epoch": 3, "epochs": 8, "val_accuracy": 0.91,
                                              "eta_seconds": 50})
    assert reporter.progress(claimed) is True
    assert reporter.progress(claimed) is False                       # throttled: at most every 15 s
    assert github.written[-1][1:4] == (created[4], "training: epoch 3/8", None)
    assert "validation accuracy 91.00%" in github.written[-1][4]

    keep_summary(tmp_path, job.id, reported_runs["pr"]["summary"])
    assert queue.record_result(engine, job.id, "succeeded", attempt=1)
    github.written.clear()
    outcomes = reporter.ended(queue.get_job(engine, job.id))
    assert outcomes["check run"] == "success" and outcomes["comment"].startswith("comment")
    [(_, number), (_, check_run_id, title, conclusion, summary)] = github.written
    assert number == 1347 and check_run_id == created[4] and conclusion == "success"
    assert "### Gate" in summary and ("status",) not in github.written   # the report; no commit status
    assert reporter.ended(queue.get_job(engine, job.id)) == {} and reporter.sweep() == 0   # once

    # "Re-run" on the check: a signed check_run.rerequested (GitHub's own example payload) queues it again
    state = ServiceState(config=config, engine=engine, webhook_secret=SECRET, metrics=ServiceMetrics(engine))
    client = TestClient(create_app(state))
    rerun = copy.deepcopy(next(p for p in webhook_examples("check_run") if p["action"] == "rerequested"))
    rerun["check_run"] |= {"external_id": job.id, "name": "mlgate/digits_mlp", "head_sha": SHA, "app": {"id": 1}}
    rerun["repository"]["full_name"] = REPO
    answer = deliver(client, "check_run", rerun)
    assert answer.status_code == 202, answer.text
    [again] = answer.json()["jobs"]
    repeated = queue.get_job(engine, again)
    assert (repeated.model, repeated.sha, repeated.pr, repeated.trigger, repeated.state) == \
        ("digits_mlp", SHA, 1347, "pr", "queued")
    assert json.loads(repeated.payload)["author_writes"] is True and json.loads(repeated.payload)["rerun_of"] == job.id
    # not ours: another app's check run, a job this service never ran, another commit
    for change, reason in (({"app": {"id": 2}}, "another app's"), ({"external_id": "nope"}, "no such job"),
                           ({"head_sha": "0" * 40}, "no such job")):
        forged = copy.deepcopy(rerun)
        forged["check_run"] |= change
        answer = deliver(client, "check_run", forged)
        assert answer.status_code == 200 and answer.json()["jobs"] == [], answer.text
        assert reason in answer.json()["reason"]
