"""Issue 29, finding 2: on the `github` executor the runner's credential is a GitHub Actions OIDC token that
only the reporting job (the judge, for an outsider's PR) can obtain. Nothing the outsider's `build` job can
read, the dispatch's inputs above all, authorizes a result or a production snapshot.

GitHub's issuer is played by a local HTTP server: an RSA key generated here, its public half served as a
JWKS, and tokens signed with it carrying the claims GitHub documents (repository, run_id, ref,
job_workflow_ref). The service is the real FastAPI app, the executor the real GitHubExecutor."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient

from automation.config import parse_config
from automation.store import open_store
from tests.conftest import FAST_CONFIG, wait_for
from triggers.app import ServiceState, create_app
from triggers.jobs import queue
from triggers.metrics import ServiceMetrics

REPO = "mlgate-tests/mlgate"
ISSUER = "https://token.actions.githubusercontent.com"
RUN_ID = 4242
JUDGE_REF = f"{REPO}/.github/workflows/judge.yml@refs/heads/main"
RETRAIN_REF = f"{REPO}/.github/workflows/retrain.yml@refs/heads/main"   # every job of retrain.yml: build too
RESULT_SECRET = "result-minting-secret"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Issuer:
    """GitHub's OIDC issuer, locally: `/jwks` (its public keys) and `/token` (what a job with
    `id-token: write` calls via ACTIONS_ID_TOKEN_REQUEST_URL; the claims are the ones set for the job)."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "test-key-1"
        self.request_token = secrets.token_urlsafe(16)
        self.claims: dict[str, Any] = {}
        self.issued: list[str] = []
        self.jwks_fetches = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:   # noqa: N802
                url = urlparse(self.path)
                if url.path == "/jwks":
                    issuer.jwks_fetches += 1
                    return self._send(200, issuer.jwks())
                if url.path == "/token" and self.headers.get("Authorization") == f"Bearer {issuer.request_token}":
                    audience = parse_qs(url.query).get("audience", ["https://github.com/mlgate-tests"])[0]
                    token = issuer.token(aud=audience)
                    issuer.issued.append(token)
                    return self._send(200, {"count": 1, "value": token})
                return self._send(401, {"message": "no"})

            def _send(self, status: int, body: dict[str, Any]) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def jwks(self) -> dict[str, Any]:
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [public | {"kid": self.kid, "use": "sig", "alg": "RS256"}]}

    def token(self, key: Any = None, headers: dict[str, Any] | None = None, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": "mlgate", "iat": now, "nbf": now - 5, "exp": now + 300,
                "jti": secrets.token_hex(8), "sub": f"repo:{REPO}:ref:refs/heads/main", "repository": REPO,
                "repository_owner": REPO.split("/")[0], "run_id": str(RUN_ID), "run_attempt": "1",
                "ref": "refs/heads/main", "ref_type": "branch", "event_name": "workflow_dispatch",
                "workflow_ref": RETRAIN_REF, "job_workflow_ref": JUDGE_REF} | self.claims | claims
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, key or self.key, algorithm="RS256", headers={"kid": self.kid} | (headers or {}))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    serving = Issuer()
    yield serving
    serving.stop()


def oidc_config(tmp_path: Path, issuer: Issuer) -> Any:
    raw = copy.deepcopy(FAST_CONFIG)
    raw.setdefault("service", {})["github"] = {"oidc_jwks_url": f"{issuer.url}/jwks"}
    return parse_config(yaml.safe_dump(raw), "mlgate.yaml", tmp_path)


class OneRun:
    """The GitHub calls the executor makes: it dispatches, then sees run RUN_ID going."""

    def __init__(self) -> None:
        self.inputs: dict[str, str] | None = None
        self.titles: list[str] = []

    def dispatch_workflow(self, repository: str, workflow: str, ref: str, inputs: dict[str, str]) -> None:
        self.inputs = inputs

    def workflow_run(self, repository: str, workflow: str, title: str) -> Any:
        from triggers.github.api import WorkflowRun

        self.titles.append(title)
        return WorkflowRun(RUN_ID, "in_progress", None) if self.inputs else None

    def cancel_workflow_run(self, repository: str, run_id: int) -> None:
        pass


class Dispatched:
    """A running job dispatched by the real GitHubExecutor (in a thread, until the job ends) and the app."""

    def __init__(self, tmp_path: Path, issuer: Issuer, *, trigger: str, author_writes: bool = False) -> None:
        from triggers.jobs.github_executor import GitHubExecutor

        self.config = oidc_config(tmp_path, issuer)
        self.engine = open_store(f"sqlite:///{tmp_path / 'mlgate.db'}")
        state = ServiceState(config=self.config, engine=self.engine, webhook_secret="webhook-secret",
                             metrics=ServiceMetrics(self.engine), result_secret=RESULT_SECRET)
        self.client = TestClient(create_app(state), raise_server_exceptions=False)
        job, _ = queue.enqueue(self.engine, model="digits_mlp", kind="evaluate" if trigger == "pr" else "retrain",
                               trigger=trigger, pr=7 if trigger == "pr" else None, sha="a" * 40,
                               payload={"author_writes": author_writes})
        self.job = queue.claim(self.engine, "github-executor")
        assert self.job is not None and self.job.id == job.id
        self.github = OneRun()
        executor = GitHubExecutor(self.config, self.engine, self.github, REPO, poll_seconds=0.01)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=executor.run, args=(self.job, self.stop), daemon=True)
        self.thread.start()
        # the executor has dispatched, and finished a poll that saw the run it started
        assert wait_for(lambda: len(self.github.titles) >= 2, 30)

    def post(self, token: str, **fields: Any) -> Any:
        body = {"job_id": self.job.id, "attempt": 1, "exit_code": 0, "error": None, "summary": None} | fields
        return self.client.post(f"/jobs/{self.job.id}/result", json=body, headers={"Authorization": f"Bearer {token}"})

    def production(self, token: str) -> Any:
        return self.client.get(f"/jobs/{self.job.id}/production", headers={"Authorization": f"Bearer {token}"})

    def running(self) -> bool:
        return queue.get_job(self.engine, self.job.id).state == "running"

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)


@pytest.fixture
def outsider_pr(tmp_path: Path, issuer: Issuer) -> Iterator[Dispatched]:
    dispatched = Dispatched(tmp_path, issuer, trigger="pr", author_writes=False)
    yield dispatched
    dispatched.close()


# --- what the outsider's build job can read ---------------------------------------------------------------------

def test_nothing_in_the_dispatch_authorizes_a_result_or_production(outsider_pr: Dispatched) -> None:
    """The attack of finding 2: `build` reads its event payload ($GITHUB_EVENT_PATH: the dispatch's inputs)
    and tries each value as the credential, on both routes. (Before: the `result_token` input was accepted.)"""
    inputs = outsider_pr.github.inputs
    assert inputs is not None and not any("token" in name or "secret" in name for name in inputs)
    for value in inputs.values():
        assert outsider_pr.post(value).status_code in (401, 403), value
        assert outsider_pr.production(value).status_code in (401, 403), value
    assert outsider_pr.running()


def test_a_minted_token_does_not_stand_in_for_oidc_on_a_dispatched_job(outsider_pr: Dispatched) -> None:
    from triggers.jobs.runner_results import mint_token

    minted = mint_token(RESULT_SECRET, outsider_pr.job.id, 1, 600)
    answer = outsider_pr.post(minted)
    assert answer.status_code == 401 and "only its OIDC token" in answer.json()["error"]
    assert outsider_pr.production(minted).status_code == 401
    assert outsider_pr.running()


# --- each claim, and the signature ------------------------------------------------------------------------------

def hs256_with_the_public_key(issuer: Issuer) -> str:
    """The classic confusion: HS256 with the issuer's public key (PEM) as the HMAC secret."""
    pem = issuer.key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    claims = jwt.decode(issuer.token(), options={"verify_signature": False})
    signing = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT', 'kid': issuer.kid}).encode())}." \
              f"{b64(json.dumps(claims).encode())}"
    return f"{signing}.{b64(hmac.new(pem, signing.encode(), hashlib.sha256).digest())}"


def alg_none(issuer: Issuer) -> str:
    claims = jwt.decode(issuer.token(), options={"verify_signature": False})
    return f"{b64(json.dumps({'alg': 'none', 'typ': 'JWT', 'kid': issuer.kid}).encode())}." \
           f"{b64(json.dumps(claims).encode())}."


WRONG: dict[str, Any] = {
    "other repository": lambda i: i.token(repository="someone/else"),
    "other run": lambda i: i.token(run_id=str(RUN_ID + 1)),
    "the build job's workflow (retrain.yml)": lambda i: i.token(job_workflow_ref=RETRAIN_REF),
    "judge.yml from a PR branch": lambda i: i.token(job_workflow_ref=JUDGE_REF.replace("main", "pr-branch")),
    "other ref": lambda i: i.token(ref="refs/heads/pr-branch"),
    "no job_workflow_ref": lambda i: i.token(job_workflow_ref=None),
    "wrong audience": lambda i: i.token(aud="https://github.com/mlgate-tests"),
    "other issuer": lambda i: i.token(iss="https://issuer.example"),
    "expired": lambda i: i.token(iat=int(time.time()) - 1200, nbf=int(time.time()) - 1200,
                                 exp=int(time.time()) - 600),
    "not valid yet": lambda i: i.token(iat=int(time.time()) + 600, nbf=int(time.time()) + 600,
                                       exp=int(time.time()) + 900),
    "no exp": lambda i: i.token(exp=None),
    "signed by another key": lambda i: i.token(key=rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    "unknown kid": lambda i: i.token(headers={"kid": "not-published"}),
    "alg none": alg_none,
    "HS256 with the public key": hs256_with_the_public_key,
    "garbage": lambda i: "e30.e30." + "x" * 20,
}


@pytest.mark.parametrize("case", list(WRONG))
def test_a_token_with_any_wrong_claim_or_signature_is_refused(case: str, outsider_pr: Dispatched,
                                                              issuer: Issuer) -> None:
    token = WRONG[case](issuer)
    for answer in (outsider_pr.post(token), outsider_pr.production(token)):
        assert answer.status_code == 401, (case, answer.text)
        signature = token.split(".")[-1]
        assert token not in answer.text and (not signature or signature not in answer.text)   # never echoed
    assert outsider_pr.running()


def test_the_judges_token_reports_once(outsider_pr: Dispatched, issuer: Issuer) -> None:
    token = issuer.token()
    assert outsider_pr.post(token, attempt=2).status_code == 401          # the body names another attempt
    accepted = outsider_pr.post(token, exit_code=1, error="the judge failed")
    assert accepted.status_code == 200, accepted.text
    assert queue.get_job(outsider_pr.engine, outsider_pr.job.id).state == "failed"
    assert outsider_pr.post(token).status_code == 409                      # recorded once
    outsider_pr.thread.join(30)
    assert not outsider_pr.thread.is_alive()   # the executor saw the job end and returned


def test_a_retrains_token_names_retrain_yml_and_a_judge_token_does_not_pass_for_it(tmp_path: Path,
                                                                                  issuer: Issuer) -> None:
    retrain = Dispatched(tmp_path, issuer, trigger="push")
    try:
        assert retrain.github.inputs is not None and retrain.github.inputs["attempt"] == "1"
        assert retrain.post(issuer.token()).status_code == 401              # judge.yml may report for PRs only
        assert retrain.post(issuer.token(job_workflow_ref=RETRAIN_REF), exit_code=1).status_code == 200
    finally:
        retrain.close()


def test_the_key_set_is_fetched_once_and_a_forged_kid_cannot_make_it_refetch_in_a_loop(
        outsider_pr: Dispatched, issuer: Issuer) -> None:
    for _ in range(5):
        assert outsider_pr.post(issuer.token(headers={"kid": "not-published"})).status_code == 401
    assert outsider_pr.post(issuer.token(), exit_code=1).status_code == 200
    assert issuer.jwks_fetches <= 2   # unknown kids refetch at most once a minute


def test_an_unreachable_issuer_is_a_503_the_runner_retries(tmp_path: Path, issuer: Issuer) -> None:
    from triggers.jobs import oidc

    dispatched = Dispatched(tmp_path, issuer, trigger="pr")
    try:
        token = issuer.token()
        oidc.JWKS.__init__()   # a fresh cache: the issuer's keys are not known yet
        issuer.stop()
        answer = dispatched.post(token)
        assert answer.status_code == 503 and "could not be fetched" in answer.json()["error"]
        assert dispatched.running()
    finally:
        dispatched.close()


def test_a_key_set_over_the_size_bound_is_refused() -> None:
    from triggers.jobs import oidc

    cache = oidc.JwksCache(fetch=lambda url: b'{"keys": []}')
    with pytest.raises(oidc.BadOidcToken):
        cache.key("http://127.0.0.1:9/jwks", "any")
    served = b"x" * (oidc.MAX_JWKS_BYTES + 1)

    class Big(BaseHTTPRequestHandler):
        def do_GET(self) -> None:   # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(served)))
            self.end_headers()
            self.wfile.write(served)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Big)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(oidc.OidcUnavailable, match="over"):
            oidc.fetch_bounded(f"http://127.0.0.1:{server.server_address[1]}/jwks")
    finally:
        server.shutdown()
        server.server_close()


# --- the runner's side: it asks GitHub for a token at each call --------------------------------------------------

def test_the_runner_asks_the_actions_runtime_for_a_token_with_the_audience(issuer: Issuer,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from automation.errors import MlgateError
    from triggers.jobs.runner_results import _runner_token

    monkeypatch.delenv("MLGATE_RESULT_TOKEN", raising=False)
    with pytest.raises(MlgateError, match="id-token: write"):
        _runner_token()   # a job without the permission (build) has nothing to send
    monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_URL", f"{issuer.url}/token?api-version=2.0")
    monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_TOKEN", issuer.request_token)
    monkeypatch.setenv("MLGATE_JOB_ATTEMPT", "3")
    monkeypatch.setenv("MLGATE_OIDC_AUDIENCE", "mlgate-prod")
    token, attempt = _runner_token()
    assert attempt == 3 and token == issuer.issued[-1]
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == "mlgate-prod"


# --- finding 12 (part): numbers in a runner's result that were a 500 ----------------------------------------------

@pytest.mark.parametrize("field", ["attempt", "exit_code"])
@pytest.mark.parametrize("number", ["Infinity", "-Infinity", "NaN", "1e400", "2.5", "true", '"1"', "1" + "0" * 40])
def test_a_result_with_a_number_that_is_not_a_small_integer_is_a_400_naming_it(field: str, number: str,
                                                                                tmp_path: Path) -> None:
    """Before: `attempt: Infinity` or `exit_code: 1e400` raised OverflowError in int(), answered 500."""
    from triggers.jobs.runner_results import mint_token

    config = parse_config(yaml.safe_dump(copy.deepcopy(FAST_CONFIG)), "mlgate.yaml", tmp_path)
    engine = open_store(f"sqlite:///{tmp_path / 'mlgate.db'}")
    state = ServiceState(config=config, engine=engine, webhook_secret="webhook-secret",
                         metrics=ServiceMetrics(engine), result_secret=RESULT_SECRET)
    client = TestClient(create_app(state), raise_server_exceptions=False)
    job, _ = queue.enqueue(engine, model="digits_mlp", kind="retrain", trigger="push")
    queue.claim(engine, "runner-started-by-hand")
    values = {"attempt": "1", "exit_code": "0"} | {field: number}
    body = f'{{"job_id": "{job.id}", "attempt": {values["attempt"]}, "exit_code": {values["exit_code"]}}}'
    answer = client.post(f"/jobs/{job.id}/result", content=body.encode(), headers={
        "Authorization": f"Bearer {mint_token(RESULT_SECRET, job.id, 1, 600)}", "Content-Type": "application/json"})
    assert answer.status_code == 400 and field in answer.json()["error"], answer.text
    assert queue.get_job(engine, job.id).state == "running"
