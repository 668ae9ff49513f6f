"""How a GPU runner reports a job back, and how the service knows the report is that job's.

On the `github` executor the runner's credential is a GitHub Actions OIDC token (triggers/jobs/oidc.py): the
job asks GitHub for one when it calls the service, and nothing in the dispatch carries a credential, so the
outsider's `build` job (which may not ask) has nothing to read. The service checks it against the run it
dispatched for the job's current attempt and the one workflow file allowed to report.

A minted credential is still accepted for a job that was not dispatched to GitHub: `<job>.<attempt>.<expiry>.
<mac>`, an HMAC (key: MLGATE_RESULT_SECRET, which only the service holds) over the job id, its attempt number
and an expiry. Nothing in the service hands one out any more; it is for a runner an operator starts by hand.
Either way the body names the same job and attempt, and the result is accepted once, for that job's current
attempt: a token from another job, an earlier attempt, or a replay of a recorded result gets nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from automation.errors import MlgateError
from automation.redaction import redact, redact_url

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from automation.config import MlgateConfig

TOKEN_ENV = "MLGATE_RESULT_TOKEN"      # on a runner started by hand: a minted credential
ATTEMPT_ENV = "MLGATE_JOB_ATTEMPT"     # on an Actions runner: the attempt the service dispatched (an input)
AUDIENCE_ENV = "MLGATE_OIDC_AUDIENCE"  # on an Actions runner: the audience the service verifies
# what GitHub gives a job that has `permissions: id-token: write`, and no other job
OIDC_REQUEST_URL_ENV, OIDC_REQUEST_TOKEN_ENV = "ACTIONS_ID_TOKEN_REQUEST_URL", "ACTIONS_ID_TOKEN_REQUEST_TOKEN"
SECRET_ENV = "MLGATE_RESULT_SECRET"    # on the service: mints and checks the credentials
MAX_REPORT_BYTES = 6 * 1024 * 1024     # under request_guard.RESULT_LIMIT with the summary
TOKEN_SHAPE = re.compile(r"([A-Za-z0-9_-]{1,100})\.([0-9]{1,6})\.([0-9]{1,12})\.([0-9a-f]{64})", re.ASCII)


class RunnerAuthError(Exception):
    """The runner's credential is not accepted; `status` is the answer, the message says why (never the token)."""

    status = 401


class BadResultToken(RunnerAuthError):
    """The credential does not authorize a result for this job (the message says why; answered 401)."""


class RunnerAuthOff(RunnerAuthError):
    status = 403


class RunnerAuthLater(RunnerAuthError):
    """It cannot be checked now (the issuer's keys, or the run not seen yet): 503, the runner retries."""

    status = 503


def _mac(secret: str, job_id: str, attempt: int, expires: int) -> str:
    return hmac.new(secret.encode(), f"{job_id}:{attempt}:{expires}".encode(), hashlib.sha256).hexdigest()


def mint_token(secret: str, job_id: str, attempt: int, ttl_seconds: float) -> str:
    expires = int(time.time() + ttl_seconds)
    return f"{job_id}.{attempt}.{expires}.{_mac(secret, job_id, attempt, expires)}"


def check_token(secret: str, token: str, job_id: str) -> int:
    """The attempt the token was minted for, if it is genuine, for `job_id` and unexpired."""
    match = TOKEN_SHAPE.fullmatch(token)
    if match is None:   # ASCII only: str.isdigit() admits "²", and compare_digest raises on non-ASCII text
        raise BadResultToken("malformed result token")
    token_job, attempt, expires, mac = match[1], int(match[2]), int(match[3]), match[4]
    if not hmac.compare_digest(_mac(secret, token_job, attempt, expires), mac):
        raise BadResultToken("invalid result token")
    if token_job != job_id:
        raise BadResultToken("the result token is for another job")
    if expires < time.time():
        raise BadResultToken("the result token has expired")
    return attempt


def runner_attempt(config: "MlgateConfig", engine: "Engine", result_secret: str, authorization: str,
                   job_id: str) -> int:
    """The attempt of `job_id` the request's `Authorization: Bearer` credential may report for (both runner
    routes call this). A GitHub Actions OIDC token for a job the `github` executor dispatched; a minted token
    only for a job that was not dispatched to GitHub (a leaked or replayed one never stands in for OIDC)."""
    from triggers.jobs import oidc, queue

    token = authorization.removeprefix("Bearer ")
    if oidc.looks_like_jwt(token):
        github = config.service.github
        settings = oidc.OidcSettings(audience=github.oidc_audience, issuer=github.oidc_issuer,
                                     jwks_url=github.oidc_jwks_url)
        try:
            return oidc.attempt_for(engine, token, job_id, settings)
        except oidc.BadOidcToken as exc:
            raise BadResultToken(str(exc)) from None
        except oidc.OidcUnavailable as exc:
            raise RunnerAuthLater(str(exc)) from None
    if not result_secret:
        raise RunnerAuthOff("runner results are off: set MLGATE_RESULT_SECRET, or dispatch to GitHub (OIDC)")
    attempt = check_token(result_secret, token, job_id)
    if oidc.dispatches(engine, job_id):
        raise BadResultToken(f"job {job_id} was dispatched to GitHub: only its OIDC token reports for it")
    attempt_now = queue.attempt_for_runner(engine, job_id, attempt)   # a runner re-attached to after a restart
    if config.service.executor in ("kubernetes", "ray") and attempt_now == attempt \
            and queue.adoption_pending(engine, job_id, attempt):
        # a restarted service's new attempt is still looking for this runner: retried, the report lands once
        # it is adopted; if the attempt started a runner of its own instead, the retries run out
        raise RunnerAuthLater(f"job {job_id} is at a later attempt that has not re-attached to attempt {attempt}'s "
                              "runner yet")
    return attempt_now


def _whole_number(data: dict[str, Any], field: str, low: int, high: int) -> int:
    """An integer in [low, high]: `Infinity`, `1e400`, `NaN`, 2.5 and true are refused, naming the field."""
    value = data[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be an integer")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ValueError(f"{field} must be a finite integer")
    if not low <= value <= high:
        raise ValueError(f"{field} must be between {low} and {high}")
    return int(value)


@dataclass
class RunnerResult:
    job_id: str
    attempt: int
    exit_code: int
    summary: dict[str, Any] | None
    error: str | None
    report_html: str | None

    @classmethod
    def parse(cls, body: bytes) -> "RunnerResult":
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("a result is a JSON object")
        summary, report = data.get("summary"), data.get("report_html")
        if (summary is not None and not isinstance(summary, dict)) or (report is not None and not isinstance(report, str)):
            raise ValueError("summary must be an object and report_html a string")
        # a number the JSON parser reads as inf (1e400, Infinity) or NaN made int() raise outside ValueError: a 500
        return cls(job_id=str(data["job_id"]), attempt=_whole_number(data, "attempt", 0, 1_000_000),
                   exit_code=_whole_number(data, "exit_code", -255, 255),
                   summary=summary, error=None if data.get("error") is None else str(data["error"])[:2000],
                   report_html=report)


def _oidc_token() -> str:
    """A fresh ID token from GitHub, asked for at each call: it lives minutes, a job hours."""
    import httpx

    url, bearer = os.environ[OIDC_REQUEST_URL_ENV], os.environ[OIDC_REQUEST_TOKEN_ENV]
    try:
        # the URL carries its own query (api-version): the audience is added to it, not put in its place
        asked = httpx.URL(url).copy_merge_params({"audience": os.environ.get(AUDIENCE_ENV) or "mlgate"})
        response = httpx.get(asked, timeout=30, headers={"Authorization": f"Bearer {bearer}"})
        token = response.json().get("value") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        raise MlgateError(f"could not get an OIDC token from the Actions runner: {type(exc).__name__}") from None
    if not isinstance(token, str) or not token:
        raise MlgateError(f"the Actions runner gave no OIDC token (HTTP {response.status_code})")
    return token


def _runner_token() -> tuple[str, int]:
    """The credential and the attempt it is for: an OIDC token where the job may ask for one, else minted."""
    if os.environ.get(OIDC_REQUEST_URL_ENV) and os.environ.get(OIDC_REQUEST_TOKEN_ENV):
        try:
            attempt = int(os.environ.get(ATTEMPT_ENV, ""))
        except ValueError:
            raise MlgateError(f"--report-to with an OIDC token needs {ATTEMPT_ENV} (the workflow input attempt)") \
                from None
        return _oidc_token(), attempt
    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise MlgateError(f"--report-to needs the job's credential: an Actions job with `permissions: id-token: "
                          f"write`, or {TOKEN_ENV}")
    try:
        return token, int(token.split(".")[1])
    except (IndexError, ValueError):
        raise MlgateError(f"{TOKEN_ENV} is not a result token") from None


def fetch_production(service_url: str, job_id: str, dest: Path) -> None:
    """The runner's side of `GET /jobs/{id}/production`: the production snapshot a PR job compares against,
    fetched with the job's credential, so the PR's code never holds a registry credential."""
    import httpx

    from automation.production import unpack

    token, _ = _runner_token()
    url = f"{service_url.rstrip('/')}/jobs/{job_id}/production"
    try:
        response = httpx.get(url, timeout=300, headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError as exc:
        raise MlgateError(f"could not fetch production from {redact_url(url)}: {type(exc).__name__}") from None
    if response.status_code != 200:
        raise MlgateError(f"{redact_url(url)} answered {response.status_code}: {redact(response.text[:200])}")
    unpack(response.content, dest)


def post_result(service_url: str, job_id: str, exit_code: int, summary: dict[str, Any] | None,
                error: str | None) -> None:
    """The runner's side of `POST /jobs/{id}/result`, with the job's credential and its HTML report."""
    import httpx

    token, attempt = _runner_token()
    report_html = None
    report_path = ((summary or {}).get("reports") or {}).get("html")
    if report_path and os.path.isfile(report_path) and os.path.getsize(report_path) <= MAX_REPORT_BYTES:
        with open(report_path, encoding="utf-8", errors="replace") as handle:
            report_html = handle.read()
    body = json.dumps({"job_id": job_id, "attempt": attempt, "exit_code": exit_code, "summary": summary,
                       "error": error, "report_html": report_html}, default=str).encode()
    url = f"{service_url.rstrip('/')}/jobs/{job_id}/result"
    shown = redact_url(url)
    tries = 6   # 2+4+…+10 s: a 503 (the service has not seen this run yet) outlasts a GitHub listing's lag
    for attempt_no in range(1, tries + 1):
        if attempt_no > 1:
            token, _ = _runner_token()   # a fresh OIDC token each try: one lives minutes
        try:
            response = httpx.post(url, content=body, timeout=30, headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
        except httpx.HTTPError as exc:
            if attempt_no == tries:
                raise MlgateError(f"could not report the result to {shown}: {type(exc).__name__}") from None
            time.sleep(2 * attempt_no)
            continue
        if response.status_code < 300 or response.status_code == 409:   # 409: already recorded
            return
        if response.status_code < 500 or attempt_no == tries:
            raise MlgateError(f"{shown} answered {response.status_code}: {redact(response.text[:200])}")
        time.sleep(2 * attempt_no)
