"""The `github` executor's runner credential: a GitHub Actions OIDC token, never a secret in the dispatch.

A job that may report (the retrain, a writer's PR evaluation, or the judge of an outsider's PR) has
`permissions: id-token: write` and asks GitHub for an ID token with the service's audience. GitHub signs it
with its key and writes into it which repository, which workflow run, which ref and which workflow file
(`job_workflow_ref`: the reusable judge.yml for the judge) the job is. No job holds anything it could hand
to another, and the outsider's `build` job (no `id-token` permission) cannot ask for one at all.

The service verifies the signature against the issuer's published keys (JWKS), then each claim against what
it recorded when it dispatched this attempt: the pinned repository, the run it dispatched (`run_id`), the ref
and the one workflow file allowed to report for this kind of job.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from sqlalchemy import BigInteger, DateTime, Engine, Integer, String, delete, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from automation.store import Base

GITHUB_ISSUER = "https://token.actions.githubusercontent.com"
GITHUB_JWKS_URL = f"{GITHUB_ISSUER}/.well-known/jwks"
ALGORITHMS = ["RS256"]               # what GitHub signs with; `none` and HS256 (the public key as a secret) never
LEEWAY_SECONDS = 60                  # clock skew between GitHub and the service
MAX_TOKEN_CHARS = 8192               # GitHub's tokens are about 1-2 KB
MAX_JWKS_BYTES = 64 * 1024           # GitHub's key set is a few KB: anything larger is not it
JWKS_TIMEOUT_SECONDS = 10.0
JWKS_TTL_SECONDS = 3600.0            # keys rotate rarely; an unknown `kid` refetches sooner (see JwksCache)
JWKS_REFETCH_SECONDS = 60.0          # at most one refetch a minute for an unknown kid: no fetch storm from forgeries
KEEP_DISPATCHES_DAYS = 90
JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]{1,4096}\.[A-Za-z0-9_-]{1,8192}\.[A-Za-z0-9_-]{0,4096}", re.ASCII)


class BadOidcToken(Exception):
    """The token does not authorize this job's runner (the message says why, and never quotes the token)."""


class OidcUnavailable(Exception):
    """The token cannot be checked now (the issuer's keys could not be fetched, or the dispatched run is not
    known yet): answered 503, so the runner tries again."""


@dataclass(frozen=True)
class OidcSettings:
    audience: str
    issuer: str = GITHUB_ISSUER
    jwks_url: str = GITHUB_JWKS_URL


class DispatchedRun(Base):
    """What the `github` executor dispatched for one attempt of a job: the only run, repository, ref and
    workflow file whose token may report for it. `run_id` is filled in once the executor has seen the run."""

    __tablename__ = "github_dispatches"

    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    repository: Mapped[str] = mapped_column(String(200))
    ref: Mapped[str] = mapped_column(String(255))                # refs/heads/main
    workflow_ref: Mapped[str] = mapped_column(String(500))       # the job_workflow_ref allowed to report
    run_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    dispatched_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


_TABLE_READY: set[str] = set()
_TABLE_LOCK = threading.Lock()


def _table(engine: Engine) -> None:
    # made on first use: the service creates the tables of the modules it imported before this one was
    key = str(engine.url)
    if key not in _TABLE_READY:
        with _TABLE_LOCK:
            DispatchedRun.__table__.create(engine, checkfirst=True)   # type: ignore[attr-defined]
            _TABLE_READY.add(key)


def full_ref(ref: str) -> str:
    return ref if ref.startswith("refs/") else f"refs/heads/{ref}"


def workflow_ref(repository: str, workflow_file: str, ref: str) -> str:
    """The `job_workflow_ref` claim of a job defined in `workflow_file` run at `ref`."""
    return f"{repository}/.github/workflows/{workflow_file}@{full_ref(ref)}"


def record_dispatch(engine: Engine, job_id: str, attempt: int, repository: str, ref: str,
                    allowed_workflow_ref: str) -> None:
    """Before the dispatch: which repository, ref and workflow file may report for this attempt."""
    _table(engine)
    now = datetime.now(timezone.utc)
    with Session(engine) as session, session.begin():
        session.execute(delete(DispatchedRun).where(
            DispatchedRun.dispatched_at < now - timedelta(days=KEEP_DISPATCHES_DAYS)))
        session.merge(DispatchedRun(job_id=job_id, attempt=attempt, repository=repository, ref=full_ref(ref),
                                    workflow_ref=allowed_workflow_ref, run_id=None, dispatched_at=now))


def record_run(engine: Engine, job_id: str, attempt: int, run_id: int) -> bool:
    """The run GitHub started for this attempt, as the executor first saw it; never replaced afterwards."""
    _table(engine)
    with Session(engine) as session, session.begin():
        return session.execute(update(DispatchedRun).where(
            DispatchedRun.job_id == job_id, DispatchedRun.attempt == attempt, DispatchedRun.run_id.is_(None))
            .values(run_id=run_id)).rowcount == 1


def dispatches(engine: Engine, job_id: str) -> list[DispatchedRun]:
    _table(engine)
    with Session(engine) as session:
        return list(session.scalars(select(DispatchedRun).where(DispatchedRun.job_id == job_id)
                                    .order_by(DispatchedRun.attempt)))


Fetch = Callable[[str], bytes]


def fetch_bounded(url: str) -> bytes:
    """GET `url` with a time-out, reading at most MAX_JWKS_BYTES (a larger answer is refused, not truncated)."""
    import urllib.error
    import urllib.request

    if not url.startswith(("https://", "http://")):
        raise OidcUnavailable("the OIDC key set URL is not http(s)")
    try:
        with urllib.request.urlopen(url, timeout=JWKS_TIMEOUT_SECONDS) as response:   # noqa: S310 (checked above)
            body = response.read(MAX_JWKS_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise OidcUnavailable(f"the OIDC key set answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise OidcUnavailable(f"the OIDC key set could not be fetched: {type(exc).__name__}") from None
    if len(body) > MAX_JWKS_BYTES:
        raise OidcUnavailable(f"the OIDC key set is over {MAX_JWKS_BYTES} bytes")
    return body


class JwksCache:
    """The issuer's public keys by `kid`, refreshed hourly, or on an unknown `kid` at most once a minute."""

    def __init__(self, fetch: Fetch = fetch_bounded) -> None:
        self.fetch = fetch
        self._keys: dict[str, dict[str, Any]] = {}
        self._fetched_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def _load(self, url: str) -> dict[str, Any]:
        from jwt import PyJWK
        from jwt.exceptions import PyJWKError

        try:
            data = json.loads(self.fetch(url))
        except ValueError:
            raise OidcUnavailable("the OIDC key set is not JSON") from None
        keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(keys, list):
            raise OidcUnavailable("the OIDC key set has no keys")
        loaded: dict[str, Any] = {}
        for entry in keys[:100]:
            if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str) or entry.get("kty") != "RSA":
                continue
            try:
                loaded[entry["kid"]] = PyJWK(entry, algorithm="RS256")
            except PyJWKError:
                continue   # a key of another kind: not one GitHub signs runner tokens with
        return loaded

    def key(self, url: str, kid: str) -> Any:
        with self._lock:
            now = time.monotonic()
            age = now - self._fetched_at.get(url, float("-inf"))
            keys = self._keys.get(url)
            if keys is None or age > JWKS_TTL_SECONDS or (kid not in keys and age > JWKS_REFETCH_SECONDS):
                self._keys[url] = keys = self._load(url)
                self._fetched_at[url] = now
            if kid not in keys:
                raise BadOidcToken("the OIDC token is signed by a key the issuer does not publish")
            return keys[kid]


JWKS = JwksCache()   # one per process: the keys are the issuer's, not a job's


def looks_like_jwt(token: str) -> bool:
    return len(token) <= MAX_TOKEN_CHARS and JWT_SHAPE.fullmatch(token) is not None


def verify(token: str, settings: OidcSettings, keys: JwksCache = JWKS) -> dict[str, Any]:
    """The token's claims once its signature, issuer, audience and times are good (no job claim checked yet)."""
    import jwt

    if not looks_like_jwt(token):
        raise BadOidcToken("malformed OIDC token")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise BadOidcToken("malformed OIDC token") from None
    if header.get("alg") not in ALGORITHMS:   # checked first: a `none` or HS256 token never reaches a key
        raise BadOidcToken(f"an OIDC token is signed with {' or '.join(ALGORITHMS)}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise BadOidcToken("the OIDC token names no key (kid)")
    key = keys.key(settings.jwks_url, kid)
    try:
        return jwt.decode(token, key.key, algorithms=ALGORITHMS, audience=settings.audience,
                          issuer=settings.issuer, leeway=LEEWAY_SECONDS,
                          options={"require": ["exp", "iat", "iss", "aud"]})
    except jwt.ExpiredSignatureError:
        raise BadOidcToken("the OIDC token has expired") from None
    except jwt.InvalidAudienceError:
        raise BadOidcToken("the OIDC token is for another audience") from None
    except jwt.InvalidIssuerError:
        raise BadOidcToken("the OIDC token is from another issuer") from None
    except jwt.ImmatureSignatureError:
        raise BadOidcToken("the OIDC token is not valid yet") from None
    except jwt.InvalidSignatureError:
        raise BadOidcToken("the OIDC token's signature is not the issuer's") from None
    except jwt.PyJWTError as exc:
        raise BadOidcToken(f"invalid OIDC token ({type(exc).__name__})") from None


def attempt_for(engine: Engine, token: str, job_id: str, settings: OidcSettings, keys: JwksCache = JWKS) -> int:
    """The attempt of `job_id` this token may report for: a genuine token of the run the service dispatched
    for that attempt, in the pinned repository, at the dispatched ref, from the one workflow file allowed."""
    claims = verify(token, settings, keys)
    runs = dispatches(engine, job_id)
    if not runs:
        raise BadOidcToken(f"job {job_id} was not dispatched to GitHub: no OIDC token reports for it")
    run_id = str(claims.get("run_id", ""))
    dispatched = next((r for r in runs if r.run_id is not None and str(r.run_id) == run_id), None)
    if dispatched is None:
        if runs[-1].run_id is None:   # the executor has not yet seen the run it dispatched: the runner retries
            raise OidcUnavailable(f"the service has not yet seen the run of job {job_id}; try again")
        raise BadOidcToken(f"the OIDC token is from another run than job {job_id}'s")
    if claims.get("repository") != dispatched.repository:
        raise BadOidcToken("the OIDC token is from another repository")
    if claims.get("ref") != dispatched.ref:
        raise BadOidcToken("the OIDC token is for another ref than the dispatched one")
    if claims.get("job_workflow_ref") != dispatched.workflow_ref:
        raise BadOidcToken(f"the OIDC token is from a job that may not report for job {job_id} "
                           f"(only {dispatched.workflow_ref.split('/.github/workflows/', 1)[-1]} may)")
    return dispatched.attempt
