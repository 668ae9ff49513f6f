"""The GitHub webhook receiver, fed real payloads from @octokit/webhooks-examples, on SQLite and PostgreSQL."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from automation.config import parse_config
from automation.store import open_store
from tests.conftest import FAST_CONFIG, clean_tables, webhook_examples
from triggers.jobs import queue
from triggers.intake import deliveries
from triggers.intake.changes import affected_models
from triggers.github.api import GitHubSource
from triggers.metrics import ServiceMetrics
from triggers.app import ServiceState, create_app
from triggers.request_guard import sign

SECRET = "s3cret-for-tests"


@pytest.fixture
def service(db_url: str, tmp_path: Path) -> ServiceState:
    import yaml

    clean_tables(db_url)
    config = parse_config(yaml.safe_dump(FAST_CONFIG), "mlgate.yaml", tmp_path)
    engine = open_store(db_url)
    return ServiceState(config=config, engine=engine, webhook_secret=SECRET, metrics=ServiceMetrics(engine))


@pytest.fixture
def client(service: ServiceState) -> TestClient:
    return TestClient(create_app(service))


def deliver(client: TestClient, event: str, payload: Any, *, delivery: str | None = None,
            secret: str | None = SECRET, body: bytes | None = None) -> Any:
    raw = body if body is not None else json.dumps(payload).encode()
    headers = {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
               "Content-Type": "application/json"}
    if secret is not None:
        headers["X-Hub-Signature-256"] = sign(secret, raw)
    return client.post("/webhooks/github", content=raw, headers=headers)


def push_to_default(files: list[str]) -> dict[str, Any]:
    """The real push example (refs/heads/master, the default branch), its commit touching `files`."""
    payload = copy.deepcopy(next(p for p in webhook_examples("push") if p["ref"] == "refs/heads/master"))
    payload["before"] = "1" * 40      # not a new branch: the commit list is the whole change
    payload["commits"][0].update(added=[], removed=[], modified=files)
    return payload


def jobs(service: ServiceState) -> list[queue.Job]:
    return queue.list_jobs(service.engine, limit=500)


def test_missing_or_wrong_signature_is_refused_and_nothing_recorded(client: TestClient,
                                                                     service: ServiceState) -> None:
    payload = push_to_default(["models/digits_mlp.py"])
    assert deliver(client, "push", payload, secret=None).status_code == 401
    assert deliver(client, "push", payload, secret="not-the-secret").status_code == 401
    tampered = json.dumps(payload).encode()
    response = client.post("/webhooks/github", content=tampered + b" ", headers={
        "X-GitHub-Event": "push", "X-GitHub-Delivery": "d-1", "X-Hub-Signature-256": sign(SECRET, tampered)})
    assert response.status_code == 401
    assert jobs(service) == [] and deliveries.list_deliveries(service.engine) == []


def test_ping_is_answered_and_recorded(client: TestClient, service: ServiceState) -> None:
    response = deliver(client, "ping", webhook_examples("ping")[0], delivery="ping-1")
    assert response.status_code == 200 and response.json()["status"] == "ignored"
    assert deliveries.get_delivery(service.engine, "ping-1").reason.startswith("ping")


def test_malformed_body_is_a_400_and_nothing_recorded(client: TestClient, service: ServiceState) -> None:
    response = deliver(client, "push", None, body=b'{"ref": "refs/heads/master", ')
    assert response.status_code == 400 and "malformed push payload" in response.json()["error"]
    no_repository = {k: v for k, v in push_to_default(["models/digits_mlp.py"]).items() if k != "repository"}
    response = deliver(client, "push", no_repository)
    assert response.status_code == 400 and "repository" in response.json()["error"]
    assert deliver(client, "push", None, body=b"[1, 2]").status_code == 400
    assert jobs(service) == [] and deliveries.list_deliveries(service.engine) == []


def test_push_touching_one_model_retrains_only_that_model(client: TestClient, service: ServiceState) -> None:
    payload = push_to_default(["models/digits_mlp.py", "README.md"])
    response = deliver(client, "push", payload, delivery="push-1")
    assert response.status_code == 202, response.text
    [job] = jobs(service)
    assert (job.model, job.kind, job.trigger, job.sha) == ("digits_mlp", "retrain", "push", payload["after"])
    assert response.json()["jobs"] == [job.id]
    assert "models/digits_mlp.py changed" in deliveries.get_delivery(service.engine, "push-1").reason


def test_duplicate_delivery_is_acknowledged_without_a_second_job(client: TestClient,
                                                                 service: ServiceState) -> None:
    payload = push_to_default(["models/digits_cnn.py"])
    first = deliver(client, "push", payload, delivery="redelivered")
    again = deliver(client, "push", payload, delivery="redelivered")
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["duplicate"] is True and again.json()["jobs"] == first.json()["jobs"]
    assert len(jobs(service)) == 1


def test_push_touching_no_model_makes_no_job_and_says_why(client: TestClient, service: ServiceState) -> None:
    response = deliver(client, "push", push_to_default(["README.md", "docs/intro.md"]), delivery="docs")
    assert response.status_code == 200 and response.json()["status"] == "no_models"
    assert jobs(service) == []
    assert "no changed file belongs to a model" in deliveries.get_delivery(service.engine, "docs").reason


def test_push_touching_shared_code_retrains_every_model(client: TestClient, service: ServiceState) -> None:
    response = deliver(client, "push", push_to_default(["automation/train.py"]))
    assert response.status_code == 202
    assert sorted(j.model for j in jobs(service)) == ["digits_cnn", "digits_mlp"]
    assert all(j.trigger == "push" for j in jobs(service))


def test_tags_branch_deletions_and_other_branches_make_no_job(client: TestClient, service: ServiceState) -> None:
    examples = webhook_examples("push")
    tag = next(p for p in examples if p["ref"].startswith("refs/tags/") and not p["deleted"])
    deletion = copy.deepcopy(next(p for p in examples if p["deleted"]))
    deletion["ref"] = "refs/heads/feature"
    feature = push_to_default(["models/digits_mlp.py"])
    feature["ref"] = "refs/heads/feature"
    reasons = [deliver(client, "push", p).json()["reason"] for p in (tag, deletion, feature)]
    assert reasons[0].startswith("tag push") and reasons[1].startswith("branch deletion")
    assert "not the default branch" in reasons[2]
    assert jobs(service) == []


def test_other_events_are_acknowledged_and_recorded(client: TestClient, service: ServiceState) -> None:
    closed = next(p for p in webhook_examples("pull_request") if p["action"] == "closed")
    response = deliver(client, "pull_request", closed, delivery="closed")
    assert response.status_code == 200 and response.json()["status"] == "ignored"
    star = webhook_examples("star")[0]
    response = deliver(client, "star", star, delivery="star")
    assert response.status_code == 200 and "does not start jobs" in response.json()["reason"]
    assert jobs(service) == [] and len(deliveries.list_deliveries(service.engine)) == 2


@pytest.mark.usefixtures("no_retry_backoff")   # GitHub unreachable: retried, without the waits
def test_pr_opened_then_synchronize_supersedes_the_queued_job(client: TestClient, service: ServiceState,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    examples = webhook_examples("pull_request")
    opened = copy.deepcopy(next(p for p in examples if p["action"] == "opened"))
    synchronize = copy.deepcopy(next(p for p in examples if p["action"] == "synchronize"))
    synchronize["number"] = opened["number"]
    synchronize["pull_request"]["head"]["sha"] = "b" * 40
    for payload in (opened, synchronize):
        response = deliver(client, "pull_request", payload)
        assert response.status_code == 200 and response.json()["status"] == "pending"
    assert jobs(service) == []          # the request never waits for the GitHub API
    # the planner asks GitHub for the PR's files; here the API is unreachable, so every model is evaluated
    monkeypatch.setenv("GITHUB_API_URL", "http://127.0.0.1:9")
    assert deliveries.plan_pending(service.engine, service.config, GitHubSource.from_env()) == 2
    by_sha = {(j.sha, j.model): j for j in jobs(service)}
    assert len(by_sha) == 4
    old_sha = opened["pull_request"]["head"]["sha"]
    assert {by_sha[(old_sha, m)].state for m in ("digits_mlp", "digits_cnn")} == {"superseded"}
    assert {by_sha[("b" * 40, m)].state for m in ("digits_mlp", "digits_cnn")} == {"queued"}
    new = by_sha[("b" * 40, "digits_mlp")]
    assert (new.kind, new.trigger, new.pr) == ("evaluate", "pr", opened["number"])
    reasons = [d.reason for d in deliveries.list_deliveries(service.engine)]
    assert all("evaluating every model" in r for r in reasons)


def test_mlgate_yaml_change_retrains_only_the_models_whose_block_changed(tmp_path: Path) -> None:
    import yaml

    config = parse_config(yaml.safe_dump(FAST_CONFIG), "mlgate.yaml", tmp_path)
    after = copy.deepcopy(FAST_CONFIG)
    after["models"]["digits_cnn"]["params"]["channels"] = 12
    before_text, after_text = yaml.safe_dump(FAST_CONFIG), yaml.safe_dump(after)
    affected = affected_models(config, ["mlgate.yaml"], lambda: (before_text, after_text))
    assert affected.models == ["digits_cnn"]
    after["defaults"]["train"]["epochs"] = 3
    affected = affected_models(config, ["mlgate.yaml"], lambda: (before_text, yaml.safe_dump(after)))
    assert sorted(affected.models) == ["digits_cnn", "digits_mlp"]
    affected = affected_models(config, ["mlgate.yaml"])     # no API: conservative, and says so
    assert sorted(affected.models) == ["digits_cnn", "digits_mlp"] and "could not be compared" in affected.note


def test_metrics_count_events_by_type_and_outcome(client: TestClient) -> None:
    deliver(client, "push", push_to_default(["models/digits_mlp.py"]))
    deliver(client, "push", push_to_default(["models/digits_mlp.py"]), secret="wrong")
    text = client.get("/metrics").text
    assert 'mlgate_events_total{outcome="jobs",source="github",type="push"} 1.0' in text
    assert 'mlgate_events_total{outcome="bad_signature",source="github",type="push"} 1.0' in text
    assert 'mlgate_jobs{state="queued"} 1.0' in text and "mlgate_queue_depth 1.0" in text


RESULT_SECRET = "result-minting-secret"


def post_result(client: TestClient, url_job: str, token: str, **fields: Any) -> Any:
    body = {"job_id": url_job, "attempt": int(token.split(".")[1]), "exit_code": 3, "error": None,
            "summary": {"run_id": "abc", "version": "7", "reports": {"html": "/etc/passwd"}},
            "report_html": "<html>the runner's report</html>"} | fields
    return client.post(f"/jobs/{url_job}/result", json=body, headers={"Authorization": f"Bearer {token}"})


def test_a_runner_result_is_accepted_once_for_its_job_and_attempt_only(service: ServiceState) -> None:
    from triggers.jobs.runner_results import mint_token

    service.result_secret = RESULT_SECRET
    client = TestClient(create_app(service))
    job, _ = queue.enqueue(service.engine, model="digits_mlp", kind="retrain", trigger="push")
    other, _ = queue.enqueue(service.engine, model="digits_cnn", kind="retrain", trigger="push")
    queue.claim(service.engine, "github-executor")
    queue.claim(service.engine, "github-executor")
    token = mint_token(RESULT_SECRET, job.id, 1, 600)
    # the webhook secret no longer signs results, and a token must be genuine, this job's, and unexpired
    signed = json.dumps({"job_id": job.id, "attempt": 1, "exit_code": 0}).encode()
    assert client.post(f"/jobs/{job.id}/result", content=signed,
                       headers={"X-Mlgate-Signature-256": sign(SECRET, signed)}).status_code == 401
    assert post_result(client, job.id, mint_token("guessed", job.id, 1, 600)).status_code == 401
    assert post_result(client, job.id, mint_token(RESULT_SECRET, other.id, 1, 600)).status_code == 401
    assert post_result(client, job.id, mint_token(RESULT_SECRET, job.id, 1, -1)).status_code == 401
    assert post_result(client, job.id, token, job_id=other.id).status_code == 401    # body names another job
    assert post_result(client, job.id, token, attempt=2).status_code == 401
    assert client.post(f"/jobs/{job.id}/result", content=b"{" * 100_000,
                       headers={"Authorization": f"Bearer {token}"}).status_code == 400
    assert queue.get_job(service.engine, job.id).state == "running"
    accepted = post_result(client, job.id, token)
    assert accepted.status_code == 200 and accepted.json()["state"] == "gate_failed"
    done = client.get(f"/jobs/{job.id}").json()
    assert (done["state"], done["run_id"], done["version"]) == ("gate_failed", "abc", "7")
    # the report is the one the runner uploaded, kept where the service chose: never a path it named
    report = client.get(f"/reports/{job.id}")
    assert report.status_code == 200 and report.text == "<html>the runner's report</html>"
    assert post_result(client, job.id, token).status_code == 409                       # single use
    # a token for an attempt that is no longer the running one (the job was retried) gets nothing
    stale = mint_token(RESULT_SECRET, other.id, 0, 600)
    assert post_result(client, other.id, stale).status_code == 409
    assert queue.get_job(service.engine, other.id).state == "running"


def test_runner_results_are_off_without_a_result_secret(client: TestClient, service: ServiceState) -> None:
    job, _ = queue.enqueue(service.engine, model="digits_mlp", kind="retrain", trigger="push")
    assert post_result(client, job.id, f"{job.id}.1.9999999999.x").status_code == 403


def test_a_replayed_signed_body_under_new_delivery_ids_makes_no_new_job(client: TestClient,
                                                                        service: ServiceState) -> None:
    body = json.dumps(push_to_default(["models/digits_mlp.py"])).encode()
    first = deliver(client, "push", None, body=body, delivery="original")
    assert first.status_code == 202 and len(first.json()["jobs"]) == 1
    for i in range(5):   # X-GitHub-Delivery is not signed: an attacker can pick new ones at will
        replay = deliver(client, "push", None, body=body, delivery=f"forged-{i}")
        assert replay.status_code == 200 and replay.json()["jobs"] == []
        assert replay.json()["reason"] == "replay: the same signed body arrived as delivery original"
    assert len(jobs(service)) == 1
    redelivery = deliver(client, "push", None, body=body, delivery="original")   # GitHub's redelivery
    assert redelivery.json()["duplicate"] is True and len(jobs(service)) == 1


def test_bodies_over_the_limit_are_refused_before_they_are_read(client: TestClient, service: ServiceState) -> None:
    huge = b"{" + b" " * (25 * 1024 * 1024) + b"}"
    response = client.post("/webhooks/github", content=huge, headers={
        "X-GitHub-Event": "push", "X-GitHub-Delivery": "big", "X-Hub-Signature-256": sign(SECRET, huge)})
    assert response.status_code == 413 and deliveries.list_deliveries(service.engine) == []


def test_outsiders_cannot_grow_the_metric_label_set(client: TestClient) -> None:
    for i in range(30):
        deliver(client, f"made-up-event-{i}", {"zen": "x"}, secret="wrong")
    text = client.get("/metrics").text
    assert "made-up-event" not in text
    assert 'mlgate_events_total{outcome="bad_signature",source="github",type="other"} 30.0' in text


@pytest.mark.parametrize("limit", ["-1", "0", "501", "many"])
def test_list_limits_are_validated(client: TestClient, limit: str) -> None:
    for path in ("/jobs", "/deliveries", "/drift-events"):
        assert client.get(path, params={"limit": limit}).status_code == 422


def fork_pr(action: str = "opened") -> dict[str, Any]:
    """The real example PR, as if opened from a fork by someone with no access to the repository."""
    payload = copy.deepcopy(next(p for p in webhook_examples("pull_request") if p["action"] == action))
    payload["pull_request"]["head"]["repo"]["full_name"] = "outsider/Hello-World"
    payload["pull_request"]["user"]["login"] = payload["sender"]["login"] = "outsider"
    payload["pull_request"]["author_association"] = "CONTRIBUTOR"
    return payload


@pytest.mark.usefixtures("no_retry_backoff")   # GitHub unreachable: retried, without the waits
def test_a_fork_pr_runs_no_code_until_its_author_is_known_to_have_write_access(
        client: TestClient, service: ServiceState, monkeypatch: pytest.MonkeyPatch) -> None:
    assert deliver(client, "pull_request", fork_pr()).json()["status"] == "pending"
    # the planner cannot ask GitHub who the author is: it fails closed, and says so
    monkeypatch.setenv("GITHUB_API_URL", "http://127.0.0.1:9")
    assert deliveries.plan_pending(service.engine, service.config, GitHubSource.from_env()) == 1
    [delivery] = deliveries.list_deliveries(service.engine)
    assert delivery.status == "needs_approval" and jobs(service) == []
    assert delivery.reason.startswith("could not check outsider's access")
    # a label other than the approval label approves nothing, and is not even sent to the API
    labeled = fork_pr("labeled")
    assert labeled["label"]["name"] != service.config.service.approve_label
    assert deliver(client, "pull_request", labeled).json()["status"] == "ignored"


def evaluate_comment(body: str = "/mlgate evaluate", login: str = "maintainer") -> dict[str, Any]:
    """The real issue_comment example, as if written on a pull request."""
    payload = copy.deepcopy(next(p for p in webhook_examples("issue_comment") if p["action"] == "created"))
    payload["issue"]["pull_request"] = {"url": "https://api.github.com/repos/Codertocat/Hello-World/pulls/1"}
    payload["comment"]["body"], payload["comment"]["user"]["login"] = body, login
    return payload


class OneAnswerGitHub(GitHubSource):
    """The API's answer to "who may write" fixed to one role; every other call fails as if GitHub were down.
    (The calls themselves are checked against GitHub's OpenAPI description in test_github_contract.)"""

    def __init__(self, role: str) -> None:
        super().__init__(api_url="http://127.0.0.1:9", token=None)
        self.role, self.asked = role, []

    def permission(self, repository: str, login: str) -> str:
        self.asked.append(login)
        return self.role


def test_only_an_evaluate_comment_from_a_writer_approves_a_pr(client: TestClient, service: ServiceState) -> None:
    # a comment that is not the command, or a command on an issue, is recorded and ignored without the API
    assert deliver(client, "issue_comment", evaluate_comment("looks good to me")).json()["status"] == "ignored"
    on_issue = evaluate_comment()
    on_issue["issue"].pop("pull_request")
    assert deliver(client, "issue_comment", on_issue).json()["status"] == "ignored"
    edited = evaluate_comment() | {"action": "edited"}     # editing an old comment into the command approves nothing
    assert deliver(client, "issue_comment", edited).json()["status"] == "ignored"
    # the command itself waits for the planner, which asks GitHub who wrote it
    assert deliver(client, "issue_comment", evaluate_comment(login="outsider")).json()["status"] == "pending"
    reader = OneAnswerGitHub("read")
    assert deliveries.plan_pending(service.engine, service.config, reader) == 1
    [delivery] = [d for d in deliveries.list_deliveries(service.engine) if d.status != "ignored"]
    assert reader.asked == ["outsider"] and delivery.status == "needs_approval"
    assert delivery.reason == "'/mlgate evaluate' from outsider, who has read access: not an approval"
    assert jobs(service) == []


@pytest.mark.usefixtures("no_retry_backoff")   # GitHub unreachable: retried, without the waits
def test_an_evaluate_command_fails_closed_when_the_pr_cannot_be_read(service: ServiceState) -> None:
    from triggers.intake.webhooks import plan_event

    plan = plan_event(service.config, "issue_comment", evaluate_comment(), OneAnswerGitHub("write"))
    assert plan.outcome == "needs_approval" and plan.reason.startswith("could not check '/mlgate evaluate' from "
                                                                       "maintainer (GitHub API read")


def test_an_optional_read_token_guards_the_api_and_dashboard(service: ServiceState) -> None:
    import base64

    service.read_token = "read-only-token"
    client = TestClient(create_app(service))
    job, _ = queue.enqueue(service.engine, model="digits_mlp", kind="retrain", trigger="push")
    paths = ["/", "/jobs", f"/jobs/{job.id}", "/deliveries", "/drift-events", "/metrics", f"/reports/{job.id}"]
    for path in paths:
        refused = client.get(path)
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic"), path
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/jobs", headers={"Authorization": "Bearer read-only-token"}).status_code == 200
    basic = base64.b64encode(b"anyone:read-only-token").decode()
    assert client.get("/", headers={"Authorization": f"Basic {basic}"}).status_code == 200   # a browser
    assert client.get("/healthz").status_code in (200, 503)          # probes need no token
    # secrets never appear in a response
    body = client.get("/jobs", headers={"Authorization": "Bearer read-only-token"}).text
    assert "read-only-token" not in body and SECRET not in body



def test_a_read_credential_that_is_not_text_is_a_401(service: ServiceState) -> None:
    """Finding 12: `Authorization: Basic \\xff\\xfe` (bytes that are neither ASCII base64 nor UTF-8) was a 500."""
    service.read_token = "read-only-token"
    client = TestClient(create_app(service), raise_server_exceptions=False)
    job, _ = queue.enqueue(service.engine, model="digits_mlp", kind="retrain", trigger="push")
    for path in ["/", "/jobs", f"/jobs/{job.id}", "/models", "/deliveries",
                 "/drift-events", "/metrics", f"/reports/{job.id}"]:
        for header in (b"Basic \xff\xfe", b"Bearer \xff\xfe", b"Basic w7/Dvg==", b"Basic \xc3\xbf:x"):
            answer = client.get(path, headers={"Authorization": header})
            assert answer.status_code == 401, (path, header, answer.status_code)
    assert client.get("/healthz", headers={"Authorization": b"Basic \xff\xfe"}).status_code == 200   # open, redacted


def test_a_delivery_the_database_refuses_fails_alone_in_its_batch(service: ServiceState, db_url: str) -> None:
    """Group commit records up to 64 deliveries in one transaction; one the database refuses (here a
    repository name longer than its column, which PostgreSQL enforces) must not fail its neighbours."""
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite does not enforce column lengths, so nothing here makes it refuse a delivery")
    good = [push_to_default(["models/digits_mlp.py"]) for _ in range(2)]
    good[1]["after"] = "2" * 40
    bad = push_to_default(["README.md"])
    bad["repository"]["full_name"] = "x" * 300
    items = [deliveries.Incoming.parse(service.config, delivery, "push", payload, json.dumps(payload).encode())
             for delivery, payload in (("good-1", good[0]), ("bad", bad), ("good-2", good[1]))]
    recorder = deliveries.GroupCommitRecorder(service.engine, service.config)
    results = recorder._record(items)
    assert isinstance(results[1], Exception) and [r.delivery["delivery"] for r in (results[0], results[2])] == [
        "good-1", "good-2"]
    assert {d.id for d in deliveries.list_deliveries(service.engine)} == {"good-1", "good-2"}
    assert len(jobs(service)) == 2


@pytest.mark.parametrize("prefix", [7, 12, 39])
def test_an_evaluate_comment_naming_a_prefix_approves_nothing_and_says_why(
        client: TestClient, service: ServiceState, prefix: int) -> None:
    """Issue 29, finding 8: `/mlgate evaluate c0ffee1` approved whatever head started with those digits, so an
    outsider could push another commit sharing them. Planned as the service plans it, and recorded."""
    from tests.test_security import StubGitHub

    head = "c0ffee1" + "9" * 33
    opened = fork_pr()
    opened["pull_request"]["head"]["sha"], opened["pull_request"]["updated_at"] = head, "2026-11-28T10:00:00Z"
    assert deliver(client, "pull_request", opened).json()["status"] == "pending"
    comment = evaluate_comment(f"/mlgate evaluate {head[:prefix]}")
    comment["issue"]["number"], comment["repository"]["full_name"] = opened["number"], opened["repository"]["full_name"]
    comment["comment"]["created_at"] = "2026-11-28T10:05:00Z"
    named = deliver(client, "issue_comment", comment, delivery="by-prefix").json()
    assert named["status"] == "pending"
    github = StubGitHub(head, ["models/digits_mlp.py"], {"maintainer": "write"})
    assert deliveries.plan_pending(service.engine, service.config, github) == 2   # type: ignore[arg-type]
    delivery = deliveries.get_delivery(service.engine, "by-prefix")
    assert delivery is not None and delivery.status == "needs_approval" and jobs(service) == []
    assert f"names a commit by a {prefix}-digit prefix" in delivery.reason
    assert "whole 40-digit SHA" in delivery.reason and "\n" not in delivery.reason
    # the whole SHA, as GitHub shows it, approves that commit
    comment["comment"]["body"] = f"/mlgate evaluate {head.upper()}"
    assert deliver(client, "issue_comment", comment, delivery="by-sha").json()["status"] == "pending"
    assert deliveries.plan_pending(service.engine, service.config, github) == 1   # type: ignore[arg-type]
    assert {(j.sha, j.pr) for j in jobs(service)} == {(head, opened["number"])}
