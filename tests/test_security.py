"""The security review's findings (issue 19), each tried as an attacker would: what reaches the service
from outside, and what a message leaving it may carry."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient

from automation.logs import JsonFormatter
from automation.redaction import redact, redact_value
from tests.test_webhooks import RESULT_SECRET, client, post_result, service  # noqa: F401  (fixtures)
from triggers.app import ServiceState, create_app
from triggers.jobs import queue
from triggers.jobs.runner_results import BadResultToken, check_token, mint_token

URL_SECRET = "hunter2-in-a-url"
# what these attack is the HTTP surface, the same on either store: SQLite only (the planner's tests run on both)
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
ENV_SECRET = "value-of-a-secret-the-filter-never-heard-of"


@pytest.fixture
def secrets_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Secrets by the names finding 3 listed as missed by a deny-list, plus one nobody listed."""
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "kafka-sasl-pass-123")
    monkeypatch.setenv("MLGATE_FEEDBACK_TOKEN", "feedback-token-456")
    monkeypatch.setenv("ACME_VAULT_TOKEN", ENV_SECRET)


# --- finding 10: bad credentials are a 401, never a 500 -------------------------------------------------------

@SQLITE_ONLY
@pytest.mark.parametrize("forge", [
    lambda t: t[:-1] + "é",                                      # a non-ASCII MAC: compare_digest raised TypeError
    lambda t: t.replace(".1.", ".².", 1),                        # a non-ASCII digit: int() raised after isdigit()
    lambda t: ".".join([*t.split(".")[:2], "١٢٣٤٥٦٧٨٩٠", t.split(".")[3]]),   # Arabic-Indic digits
    lambda t: t + "\x00",
    lambda t: "a" * 10_000,
])
def test_a_forged_result_token_is_refused_as_malformed(forge: object, service: ServiceState) -> None:
    service.result_secret = RESULT_SECRET
    app = TestClient(create_app(service), raise_server_exceptions=False)
    job, _ = queue.enqueue(service.engine, model="digits_mlp", kind="retrain", trigger="push")
    queue.claim(service.engine, "github-executor")
    forged = forge(mint_token(RESULT_SECRET, job.id, 1, 600))   # type: ignore[operator]
    with pytest.raises(BadResultToken):
        check_token(RESULT_SECRET, forged, job.id)
    header = {"Authorization": f"Bearer {forged}".encode()}   # bytes: the client refuses non-ASCII text
    for answer in (app.post(f"/jobs/{job.id}/result", json={}, headers=header),
                   app.get(f"/jobs/{job.id}/production", headers=header)):
        assert answer.status_code == 401, answer.text


@SQLITE_ONLY
def test_a_non_ascii_content_length_is_a_4xx(client: TestClient) -> None:
    answer = client.post("/webhooks/github", content=b"{}", headers={"Content-Length": "²".encode(), "X-GitHub-Event": "push"})
    assert 400 <= answer.status_code < 500


# --- finding 8: production is served to PR jobs only -----------------------------------------------------------

@SQLITE_ONLY
def test_a_retrain_token_does_not_open_the_production_snapshot(service: ServiceState) -> None:
    service.result_secret = RESULT_SECRET
    app = TestClient(create_app(service))
    retrain, _ = queue.enqueue(service.engine, model="digits_mlp", kind="retrain", trigger="push")
    queue.claim(service.engine, "github-executor")
    answer = app.get(f"/jobs/{retrain.id}/production",
                     headers={"Authorization": f"Bearer {mint_token(RESULT_SECRET, retrain.id, 1, 600)}"})
    assert answer.status_code == 403 and "for PR jobs only" in answer.json()["error"]


# --- finding 7: nothing that leaves carries a credential --------------------------------------------------------

LEAKY = (f"MlflowException: API request to http://ci:{URL_SECRET}@mlflow:5000/api failed; "
         f"Authorization: Bearer ghp_{'A' * 36}; retry with token {ENV_SECRET} or "
         f"https://hooks.example/x?token=abcdef123456&x=1")


@pytest.mark.usefixtures("secrets_in_env")
def test_redaction_masks_url_credentials_token_shapes_and_secret_values() -> None:
    shown = redact(LEAKY + " kafka-sasl-pass-123 feedback-token-456 " + "job1.2.1900000000." + "ab" * 32)
    for secret in (URL_SECRET, "ghp_", ENV_SECRET, "abcdef123456", "kafka-sasl-pass-123", "feedback-token-456",
                   "ab" * 32):
        assert secret not in shown, (secret, shown)
    assert "http://ci:***@mlflow:5000" not in shown and "://***@mlflow:5000/api" in shown   # where it was stays
    # ordinary text is untouched: a commit SHA, a job id, numbers
    plain = "job 3f2a9c1b7e0d at 0123456789abcdef0123456789abcdef01234567 took 12.5 s"
    assert redact(plain) == plain
    assert redact_value({"a": [LEAKY, 3, None]})["a"][1:] == [3, None]


@pytest.mark.usefixtures("secrets_in_env")
def test_a_log_record_never_carries_a_credential() -> None:
    record = logging.makeLogRecord({"msg": "loading failed: %s", "args": (LEAKY,), "levelname": "ERROR",
                                    "error": LEAKY, "nested": {"why": [LEAKY]}, "github_token": "x"})
    try:
        raise RuntimeError(LEAKY)
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    for secret in (URL_SECRET, "ghp_A", ENV_SECRET):
        assert secret not in line
    entry = json.loads(line)
    assert entry["github_token"] == "***" and "://***@mlflow" in entry["error"] and "RuntimeError" in entry["exc"]


@SQLITE_ONLY
@pytest.mark.usefixtures("secrets_in_env")
def test_the_job_api_never_answers_a_credential(service: ServiceState) -> None:
    app = TestClient(create_app(service))
    job, _ = queue.enqueue(service.engine, model="digits_mlp", kind="retrain", trigger="push")
    queue.claim(service.engine, "worker-1")
    queue.finish(service.engine, job.id, "worker-1", "failed", error=LEAKY)
    for answer in (app.get(f"/jobs/{job.id}"), app.get("/jobs")):
        assert answer.status_code == 200 and "://***@mlflow" in answer.text
        assert URL_SECRET not in answer.text and ENV_SECRET not in answer.text and "ghp_A" not in answer.text


# --- finding 5: events from another repository plan nothing ---------------------------------------------------

def test_a_signed_push_from_another_repository_is_recorded_as_ignored(client: TestClient, service: ServiceState,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_webhooks import deliver, push_to_default
    from triggers.intake import deliveries

    payload = push_to_default(["models/digits_mlp.py"])
    ours = payload["repository"]["full_name"]
    monkeypatch.setenv("GITHUB_REPOSITORY", ours.upper())   # owner/name compare case-insensitively
    payload["repository"]["full_name"] = "mallory/" + ours.split("/")[1]   # the same org secret signs a fork
    answer = deliver(client, "push", payload, delivery="fork-push")
    assert answer.status_code == 200 and answer.json()["status"] == "ignored"
    recorded = deliveries.get_delivery(service.engine, "fork-push")
    assert recorded.status == "ignored" and "is not this service's repository" in recorded.reason
    assert queue.list_jobs(service.engine) == []
    payload["repository"]["full_name"] = ours
    assert deliver(client, "push", payload, delivery="our-push").status_code == 202   # ours still plans a job
    assert len(queue.list_jobs(service.engine)) == 1


# --- finding 6: a report is untrusted content -------------------------------------------------------------------

HOSTILE_REPORT = """<html><body><h1>gate passed</h1>
<script>document.body.setAttribute("data-pwned", "script ran, origin " + document.domain);
fetch("/jobs").then(r => r.text()).then(t => document.body.setAttribute("data-read", t.length));</script>
<img src="x" onerror="document.body.setAttribute('data-onerror', '1')">
</body></html>"""


@SQLITE_ONLY
def test_a_hostile_report_runs_no_script_in_a_real_browser(service: ServiceState, tmp_path) -> None:
    from tests.conftest import app_on_a_port, headless_chromium
    from triggers.routes.state import report_file

    job, _ = queue.enqueue(service.engine, model="digits_mlp", kind="evaluate", trigger="pr", pr=9)
    path = report_file(service, job.id)
    path.parent.mkdir(parents=True)
    path.write_text(HOSTILE_REPORT)
    answer = TestClient(create_app(service)).get(f"/reports/{job.id}")
    policy = answer.headers["Content-Security-Policy"]
    assert answer.status_code == 200 and policy.startswith("sandbox;") and "allow-" not in policy
    assert "default-src 'none'" in policy and answer.headers["X-Content-Type-Options"] == "nosniff"

    with app_on_a_port(create_app(service)) as port:
        dom = headless_chromium(tmp_path / "chromium", "--virtual-time-budget=5000", "--dump-dom",
                                f"http://127.0.0.1:{port}/reports/{job.id}")
    assert "gate passed" in dom   # the page rendered
    assert "<body>" in dom and "<body data-" not in dom, dom   # no script and no handler set an attribute


# --- finding 11: data_ref is confined as a path, not as a string -----------------------------------------------

def test_data_ref_resolves_links_and_refuses_control_characters(tmp_path) -> None:
    from triggers.drift.events import BadEvent, confine_data_ref

    root = tmp_path / "windows"
    (root / "ok").mkdir(parents=True)
    (root / "ok" / "w1.npz").touch()
    (root / "escape").symlink_to("/etc", target_is_directory=True)
    (root / "passwd.npz").symlink_to("/etc/passwd")
    roots = [str(root)]
    assert confine_data_ref(f"{root}/ok/w1.npz", roots) == f"{root}/ok/w1.npz"
    assert confine_data_ref(f"file://{root}/ok/w1.npz", roots) == f"file://{root}/ok/w1.npz"
    for ref in (f"{root}/escape/passwd", f"{root}/passwd.npz", f"file://{root}/escape/shadow",
                f"file://{root}/ok/w1.npz%00.png", f"{root}/ok/w1.npz\x00", f"{root}/ok/\nw1.npz",
                f"file://{root}/ok/%0aw1.npz", f"{root}/ok/w1\x7f.npz"):
        with pytest.raises(BadEvent, match="data_ref"):
            confine_data_ref(ref, roots)


# --- findings 2 and 12: an approval is of one commit, and never of a change to the judge -----------------------

class StubGitHub:
    """GitHub's answers for one PR: who may write, its head now, its files. (The calls themselves are
    checked against GitHub's OpenAPI description in test_github_contract.)"""

    def __init__(self, head: str, files: list[str], roles: dict[str, str]) -> None:
        self.head, self.files, self.roles = head, files, roles

    def permission(self, repository: str, login: str) -> str:
        return self.roles.get(login, "read")

    def pull_request(self, repository: str, number: int) -> dict:
        return {"number": number, "head": {"sha": self.head, "repo": {"full_name": "outsider/Hello-World"}},
                "base": {"sha": "b" * 40}, "user": {"login": "outsider"}}

    def pull_request_files(self, repository: str, number: int) -> list[str]:
        return self.files


def outsider_pr_then_comment(client: TestClient, body: str, head: str = "a" * 40) -> dict:
    """An outsider's PR at `head` (recorded from its signed delivery), then a maintainer's comment after it."""
    from tests.test_webhooks import deliver, evaluate_comment, fork_pr

    opened = fork_pr()
    opened["pull_request"]["head"]["sha"], opened["pull_request"]["updated_at"] = head, "2026-11-28T10:00:00Z"
    assert deliver(client, "pull_request", opened).json()["status"] == "pending"
    comment = evaluate_comment(body)
    comment["issue"]["number"] = opened["number"]
    comment["repository"]["full_name"] = opened["repository"]["full_name"]
    comment["comment"]["created_at"] = "2026-11-28T10:05:00Z"
    return comment


def plan_comment(service: ServiceState, comment: dict, github: StubGitHub):
    from triggers.intake import deliveries
    from triggers.intake.webhooks import plan_event

    return plan_event(service.config, "issue_comment", comment, github,   # type: ignore[arg-type]
                      lambda repo, pr, moment: deliveries.head_at(service.engine, repo, pr, moment))


def test_a_push_after_an_evaluate_comment_runs_nothing(client: TestClient, service: ServiceState) -> None:
    comment = outsider_pr_then_comment(client, "/mlgate evaluate")
    roles = {"maintainer": "write"}
    # the head the maintainer saw is still the head: approved, planned at that commit
    plan = plan_comment(service, comment, StubGitHub("a" * 40, ["models/digits_mlp.py"], roles))
    assert plan.outcome == "jobs" and {j.sha for j in plan.jobs} == {"a" * 40}
    # the outsider pushed after the comment, before planning ran: nothing runs, and the reason says why
    pushed = plan_comment(service, comment, StubGitHub("c" * 40, ["models/digits_mlp.py"], roles))
    assert pushed.outcome == "needs_approval" and "a push after an approval needs a new one" in pushed.reason
    # a head mlgate never saw before the comment (it was pushed later, even if recorded first) approves nothing
    comment["comment"]["created_at"] = "2026-11-28T09:00:00Z"
    early = plan_comment(service, comment, StubGitHub("a" * 40, ["models/digits_mlp.py"], roles))
    assert early.outcome == "needs_approval" and "<sha>" in early.reason


def test_an_evaluate_comment_naming_a_commit_approves_that_commit_only(client: TestClient,
                                                                       service: ServiceState) -> None:
    head = "c0ffee1" + "0" * 33
    comment = outsider_pr_then_comment(client, f"/mlgate evaluate {head.upper()}")
    roles = {"maintainer": "write"}
    plan = plan_comment(service, comment, StubGitHub(head, ["models/digits_mlp.py"], roles))
    assert plan.outcome == "jobs"
    moved = plan_comment(service, comment, StubGitHub("d" * 40, ["models/digits_mlp.py"], roles))
    assert moved.outcome == "needs_approval" and f"approves {head}, but the head is now dddddddddddd" in moved.reason
    for not_a_sha in ("/mlgate evaluate please", "/mlgate evaluate abc", "/mlgate evaluate " + "g" * 40):
        comment["comment"]["body"] = not_a_sha
        assert plan_comment(service, comment, StubGitHub("a" * 40, [], roles)).outcome == "ignored"


def test_a_prefix_approves_no_head_that_shares_it(client: TestClient, service: ServiceState) -> None:
    """Finding 8: `/mlgate evaluate c0ffee1` approved any later head starting with those seven digits."""
    comment = outsider_pr_then_comment(client, "/mlgate evaluate C0FFEE1")
    roles = {"maintainer": "write"}
    for later_head in ("c0ffee1" + "0" * 33, "c0ffee1" + "f" * 33):
        plan = plan_comment(service, comment, StubGitHub(later_head, ["models/digits_mlp.py"], roles))
        assert plan.outcome == "needs_approval" and "whole 40-digit SHA" in plan.reason, plan
    comment["comment"]["body"] = "/mlgate evaluate " + "c0ffee1" + "0" * 32   # 39 digits: a prefix too
    plan = plan_comment(service, comment, StubGitHub("c0ffee1" + "0" * 33, ["models/digits_mlp.py"], roles))
    assert plan.outcome == "needs_approval"


@pytest.mark.parametrize("changed", ["triggers/cli.py", ".github/workflows/retrain.yml", "Makefile",
                                     "automation/gate.py"])
def test_an_approved_outsider_pr_that_changes_mlgate_itself_is_never_green(
        changed: str, client: TestClient, service: ServiceState) -> None:
    from triggers.github.job_status import report_unaffected

    comment = outsider_pr_then_comment(client, "/mlgate evaluate")
    plan = plan_comment(service, comment, StubGitHub("a" * 40, ["models/digits_mlp.py", changed],
                                                     {"maintainer": "write"}))
    assert plan.outcome == "judge_changed" and changed in plan.reason and plan.jobs == []

    class Statuses:
        repository = plan.repository
        posted: list[tuple[str, str, str]] = []

        def final_status(self, model: str, sha: str, state: str, description: str) -> None:
            self.posted.append((model, sha, state))

    reporter = Statuses()
    report_unaffected(reporter, list(service.config.models))(  # type: ignore[arg-type]
        type("D", (), {"event": "issue_comment"})(), plan)
    assert {(m, s) for m, _, s in reporter.posted} == {(m, "failure") for m in service.config.models}
    # the same change by someone who can write is planned, and touches every model
    trusted = plan_comment(service, comment, StubGitHub("a" * 40, [changed], {"maintainer": "write",
                                                                              "outsider": "write"}))
    assert trusted.outcome == "jobs" and {j.model for j in trusted.jobs} == set(service.config.models)


# --- finding 9: unauthenticated bodies cannot hold the service's memory ----------------------------------------

@SQLITE_ONLY
def test_slow_or_piled_up_unsigned_bodies_are_dropped(service: ServiceState, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from tests.conftest import app_on_a_port, wait_for
    from triggers import request_guard

    monkeypatch.setattr(request_guard, "BODY_TIMEOUT_SECONDS", 2.0)
    monkeypatch.setattr(request_guard, "UNVERIFIED_BUDGET", 4 * 1024 * 1024)

    def start_body(port: int, declared: int, sent: int) -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn.sendall(f"POST /webhooks/github HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: push\r\nX-GitHub-Delivery: d\r\n"
                     # well-formed but forged: a malformed header is refused before its body is read
                     f"X-Hub-Signature-256: sha256={'0' * 64}\r\nContent-Length: {declared}\r\n\r\n".encode()
                     + b"{" * sent)
        return conn

    def answer(conn: socket.socket) -> bytes:
        """What the server answered before it closed the connection; a reset while we still sent counts too."""
        received = b""
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except ConnectionResetError:   # closed with our body unread: the kernel resets it
            received = received or b"RESET"
        return received

    with app_on_a_port(create_app(service)) as port:
        slow = start_body(port, 1_000_000, 100)   # then nothing more: a trickle that never ends
        dropped = answer(slow)   # a 408 is the body time-out's own answer: no clock needed to tell
        assert dropped.startswith(b"HTTP/1.1 408"), dropped[:200]
        # bodies that pile up past the budget: the one that would pass it is refused at once
        held = [start_body(port, 3 * 1024 * 1024, 2 * 1024 * 1024) for _ in range(2)]
        assert wait_for(lambda: request_guard.unverified_bytes() >= 4 * 1024 * 1024 - 65536, 5)
        third = start_body(port, 3 * 1024 * 1024, 1024 * 1024)
        refused = answer(third)
        assert refused.startswith(b"HTTP/1.1 503") or refused == b"RESET", refused[:200]
        assert request_guard.unverified_bytes() <= 4 * 1024 * 1024
        for conn in held:   # and the held ones time out too, giving their bytes back
            assert answer(conn).startswith(b"HTTP/1.1 408")
        assert wait_for(lambda: request_guard.unverified_bytes() == 0, 5)


# --- finding 1: the artifact an untrusted build hands over is checked before ONNX Runtime sees it --------------

def candidate_folder(folder, *, domain: str = "", external: bool = False, shape: list[int] | None = None,
                     in_subgraph: bool = False):
    import onnx
    from onnx import TensorProto, helper

    weights = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], [0.1] * 12)
    if external:   # weights "stored" in a file the judge can read: /etc/passwd
        weights.ClearField("float_data")
        weights.data_location = TensorProto.EXTERNAL
        weights.external_data.add(key="location", value="../../../../etc/passwd")
    node = helper.make_node("MatMul", ["x", "w"], ["logits"], domain=domain)
    if in_subgraph:   # the custom operator hidden inside an If's branch
        branch = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], domain="evil.ops")], "b", [],
                                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        node = helper.make_node("If", ["cond"], ["logits"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])], [weights])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(folder / "model.onnx"))
    (folder / "candidate.json").write_text(json.dumps({"input_shape": shape or [4], "dtype": "float32",
                                                       "classes": ["a", "b", "c"]}))
    return folder


def test_a_candidate_is_refused_unless_it_is_one_self_contained_standard_onnx_file(tmp_path) -> None:
    from automation.candidate import BadCandidate, read_candidate

    def read(folder):
        return read_candidate(folder, (4,), "float32", ("a", "b", "c"), text=False)

    assert read(candidate_folder(tmp_path / "good")).input_shape == (4,)
    cases = {"external": ({"external": True}, "external data"),
             "custom domain": ({"domain": "evil.ops"}, "operator domains"),
             "custom op in a subgraph": ({"in_subgraph": True}, "operator domains"),
             "other input": ({"shape": [5]}, r"the candidate takes float32 \[5\]")}
    for name, (kwargs, message) in cases.items():
        with pytest.raises(BadCandidate, match=message):
            read(candidate_folder(tmp_path / name.replace(" ", "-"), **kwargs))
    linked = candidate_folder(tmp_path / "linked")
    (linked / "model.onnx").unlink()
    (linked / "model.onnx").symlink_to(tmp_path / "good" / "model.onnx")
    with pytest.raises(BadCandidate, match="not a regular file"):
        read(linked)
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "candidate.json").write_text('{"input_shape": [4], "dtype": "float32", "classes": ["a","b","c"]}')
    (tmp_path / "garbage" / "model.onnx").write_bytes(b"\x00\xff" * 100)
    with pytest.raises(BadCandidate, match="not an ONNX model"):
        read(tmp_path / "garbage")
    with pytest.raises(BadCandidate, match="has no candidate.json"):
        read(tmp_path / "nothing-there")


@pytest.mark.parametrize("repository", [None, "", "not-owner-slash-repo"])
def test_the_service_refuses_to_start_unpinned(tmp_path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch, repository: str | None) -> None:
    """Finding 13: without GITHUB_REPOSITORY the service only warned, and planned jobs for signed events from any
    repository an organisation's shared webhook secret signs."""
    from tests.conftest import error_lines, run_cli, write_config

    monkeypatch.setenv("GITHUB_WEBHOOK_SECRET", "a-secret")
    if repository is None:
        monkeypatch.delenv("GITHUB_REPOSITORY", raising=False)
    else:
        monkeypatch.setenv("GITHUB_REPOSITORY", repository)
    code, _, err = run_cli(capsys, "serve", "--config", str(write_config(tmp_path)), "--port", "9")
    [line, _hint] = error_lines(err)
    assert code == 2 and line.startswith("Error: GITHUB_REPOSITORY") and "Traceback" not in err
    assert "a-secret" not in err
