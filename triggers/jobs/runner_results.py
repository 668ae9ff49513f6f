"""How a GPU runner reports a job back, and how the service knows the report is that job's.

When the service dispatches a job it mints a credential for it: `<job>.<attempt>.<expiry>.<mac>`,
an HMAC (key: MLGATE_RESULT_SECRET, which only the service holds) over the job id, its attempt
number and an expiry. The runner sends it as a bearer token with a body naming the same job and
attempt. The service accepts it once, for that job's current attempt, before the expiry: a token
from another job, an earlier attempt, or a replay of a recorded result gets nothing. The runner
never holds a secret that could forge a result for any other job, or sign webhooks.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automation.errors import MlgateError
from automation.redaction import redact, redact_url

TOKEN_ENV = "MLGATE_RESULT_TOKEN"      # on the runner: the job's credential (a workflow input)
SECRET_ENV = "MLGATE_RESULT_SECRET"    # on the service: mints and checks the credentials
MAX_REPORT_BYTES = 6 * 1024 * 1024     # under request_guard.RESULT_LIMIT with the summary
TOKEN_SHAPE = re.compile(r"([A-Za-z0-9_-]{1,100})\.([0-9]{1,6})\.([0-9]{1,12})\.([0-9a-f]{64})", re.ASCII)


class BadResultToken(Exception):
    """The credential does not authorize a result for this job (the message says why; answered 401)."""


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
        return cls(job_id=str(data["job_id"]), attempt=int(data["attempt"]), exit_code=int(data["exit_code"]),
                   summary=summary, error=None if data.get("error") is None else str(data["error"])[:2000],
                   report_html=report)


def _runner_token() -> tuple[str, int]:
    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise MlgateError(f"--report-to needs {TOKEN_ENV}, the job's result credential (a workflow input)")
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
    for attempt_no in range(1, 4):
        try:
            response = httpx.post(url, content=body, timeout=30, headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
        except httpx.HTTPError as exc:
            if attempt_no == 3:
                raise MlgateError(f"could not report the result to {shown}: {type(exc).__name__}") from None
            time.sleep(2 * attempt_no)
            continue
        if response.status_code < 300 or response.status_code == 409:   # 409: already recorded
            return
        if response.status_code < 500 or attempt_no == 3:
            raise MlgateError(f"{shown} answered {response.status_code}: {redact(response.text[:200])}")
        time.sleep(2 * attempt_no)
