"""The durable job queue (SQLAlchemy): SQLite by default, PostgreSQL via MLGATE_DATABASE_URL.

- `enqueue` is idempotent on `dedupe_key` (a webhook delivery id, a drift event id), and a new
  job with the same `supersede_key` (say, a newer push to the same PR) supersedes queued ones.
- `claim` hands out one job at a time under a queue-wide lock, so no job is claimed twice by
  any number of workers, and never a job whose model already has one running.
- A claimed job holds a lease that `heartbeat` extends; a job whose lease expired (its worker
  died) is requeued by the next claim, until `max_attempts`, then marked failed.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from collections.abc import Callable
from typing import Any, Literal

from sqlalchemy import (Connection, DateTime, Engine, Float, Index, Integer, String, Text, bindparam, func, insert,
                        select, update)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from automation.redaction import redact_value
from automation.store import Base, locked, locked_connection

State = Literal["queued", "running", "succeeded", "gate_failed", "gate_stale", "failed", "cancelled", "superseded",
                "preempted"]
FINAL_STATES = ("succeeded", "gate_failed", "gate_stale", "failed", "cancelled", "superseded")
CLAIM_LOCK = "__queue_claim__"


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(moment: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything stored here is UTC
    return moment.replace(tzinfo=timezone.utc) if moment is not None and moment.tzinfo is None else moment


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_supersede_state", "supersede_key", "state"),   # supersede: queued jobs of one change
        Index("ix_jobs_model_state", "model", "state"),               # claim, coalescing: a model's active jobs
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    model: Mapped[str] = mapped_column(String(200), index=True)
    kind: Mapped[str] = mapped_column(String(16))                   # retrain | evaluate
    trigger: Mapped[str] = mapped_column(String(16))                # push | pr | drift | manual
    sha: Mapped[str | None] = mapped_column(String(64), nullable=True)
    pr: Mapped[int | None] = mapped_column(Integer, nullable=True)
    payload: Mapped[str] = mapped_column(Text, default="{}")       # JSON: what the job needs (e.g. data ref)
    state: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    dedupe_key: Mapped[str | None] = mapped_column(String(200), unique=True, nullable=True)
    supersede_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    report_path: Mapped[str | None] = mapped_column(Text, nullable=True)

    def as_dict(self) -> dict[str, Any]:
        data = {c.name: getattr(self, c.name) for c in self.__table__.columns}
        data["payload"] = json.loads(self.payload or "{}")
        # an error quotes what failed, which may quote a URL with its credentials: never answered as is
        return redact_value({k: as_utc(v).isoformat() if isinstance(v, datetime) else v for k, v in data.items()})



class JobAttempt(Base):
    """One attempt at a job: who ran it, how it ended (`preempted`, `lost` (its lease), or the job's final
    state) and, while it runs, its progress (JSON: stage, epoch k/N, validation metric, ETA)."""

    __tablename__ = "job_attempts"

    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    state: Mapped[str] = mapped_column(String(16), default="running")
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    progress: Mapped[str | None] = mapped_column(Text, nullable=True)

    def as_dict(self) -> dict[str, Any]:
        started, ended = as_utc(self.started_at), as_utc(self.ended_at)
        return redact_value({"attempt": self.attempt, "worker_id": self.worker_id, "state": self.state,
                             "started_at": started.isoformat() if started else None,
                             "ended_at": ended.isoformat() if ended else None,
                             "seconds": round(((ended or _now()) - started).total_seconds(), 1) if started else None,
                             "error": self.error, "progress": json.loads(self.progress) if self.progress else None})


class RunnerAdoption(Base):
    """An attempt that re-attached to the runner an earlier attempt started (a Kubernetes Job, a Ray
    submission still running after the service restarted) instead of starting a second one: that runner's
    credential, minted for `runner_attempt`, reports for `attempt`."""

    __tablename__ = "runner_adoptions"

    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    runner_attempt: Mapped[int] = mapped_column(Integer)


def adopt_runner(engine: Engine, job_id: str, attempt: int, runner_attempt: int) -> None:
    """Record that `attempt` goes on with the runner of `runner_attempt` (itself possibly adopted)."""
    with Session(engine) as session, session.begin():
        original = session.get(RunnerAdoption, (job_id, runner_attempt))
        origin = original.runner_attempt if original is not None else runner_attempt
        if session.get(RunnerAdoption, (job_id, attempt)) is None:
            session.add(RunnerAdoption(job_id=job_id, attempt=attempt, runner_attempt=origin))


def runner_origin(engine: Engine, job_id: str, attempt: int) -> int:
    """The attempt whose runner `attempt` runs on: itself, unless it adopted an earlier one's."""
    with Session(engine) as session:
        adopted = session.get(RunnerAdoption, (job_id, attempt))
        return adopted.runner_attempt if adopted is not None else attempt


def adoption_pending(engine: Engine, job_id: str, runner_attempt: int) -> bool:
    """A later attempt of a still-running job has not (yet) adopted this earlier attempt's runner: it is
    deciding whether that runner still runs. A report now is too early, not too late."""
    current = get_job(engine, job_id)
    return current is not None and current.state == "running" and current.attempts > runner_attempt \
        and runner_origin(engine, job_id, current.attempts) == current.attempts


def attempt_for_runner(engine: Engine, job_id: str, runner_attempt: int) -> int:
    """The attempt a runner started for `runner_attempt` reports for: the job's current attempt when that
    attempt is, or adopted, this runner; else `runner_attempt` itself (which is then no longer running)."""
    current = get_job(engine, job_id)
    if current is None:
        return runner_attempt
    origin = runner_origin(engine, job_id, current.attempts)
    if origin == runner_attempt:
        return current.attempts
    # the current attempt runs on an earlier attempt's runner: a credential minted for it names no runner
    return 0 if runner_attempt == current.attempts else runner_attempt


def _end_attempt(session: Session, job_id: str, attempt: int, state: str, error: str | None, now: datetime) -> None:
    session.execute(update(JobAttempt).where(JobAttempt.job_id == job_id, JobAttempt.attempt == attempt,
                                             JobAttempt.ended_at.is_(None))
                    .values(state=state, ended_at=now, error=error))


def attempts(engine: Engine, job_id: str) -> list[JobAttempt]:
    with Session(engine) as session:
        return list(session.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id)
                                    .order_by(JobAttempt.attempt)))


def running_progress(engine: Engine, job_ids: list[str]) -> dict[str, Any]:
    """The progress of each of these jobs' running attempt, where it has reported any."""
    if not job_ids:
        return {}
    with Session(engine) as session:
        rows = session.execute(select(JobAttempt.job_id, JobAttempt.progress)
                               .where(JobAttempt.job_id.in_(job_ids), JobAttempt.ended_at.is_(None),
                                      JobAttempt.progress.is_not(None))).all()
    return {job_id: json.loads(progress) for job_id, progress in rows}


def record_progress(engine: Engine, job_id: str, attempt: int, progress: dict[str, Any]) -> bool:
    """The running attempt's progress, as the job last wrote it; False once that attempt has ended."""
    with Session(engine) as session, session.begin():
        return session.execute(update(JobAttempt).where(JobAttempt.job_id == job_id, JobAttempt.attempt == attempt,
                                                        JobAttempt.ended_at.is_(None))
                               .values(progress=json.dumps(progress))).rowcount == 1


class JobStat(Base):
    """Running totals of jobs that ran to an end, kept as they end, so /metrics reads a few rows per
    scrape however long the history (and whatever retention pruned)."""

    __tablename__ = "job_stats"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)   # ended:<state>, seconds_{sum,count,le:<b>}
    value: Mapped[float] = mapped_column(Float, default=0.0)


DURATION_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)


def _count_end(session: Session, state: str, started_at: datetime | None, now: datetime) -> None:
    """Add one ended job to the totals (inside the transaction that ended it)."""
    bumps = {f"ended:{state}": 1.0}
    if started_at is not None:
        seconds = max(0.0, (now - as_utc(started_at)).total_seconds())   # type: ignore[operator]
        bumps["seconds_sum"], bumps["seconds_count"] = seconds, 1.0
        bumps |= {f"seconds_le:{b:g}": 1.0 for b in DURATION_BUCKETS if seconds <= b}
    _bump(session, bumps)


def _bump(session: Session, bumps: dict[str, float]) -> None:
    for name, amount in bumps.items():
        if session.execute(update(JobStat).where(JobStat.name == name)
                           .values(value=JobStat.value + amount)).rowcount == 0:
            try:
                with session.begin_nested():
                    session.add(JobStat(name=name, value=amount))
            except IntegrityError:   # another writer created it first
                session.execute(update(JobStat).where(JobStat.name == name).values(value=JobStat.value + amount))


COST_STATS = ("wall_seconds", "cpu_seconds", "gpu_seconds", "gpu_energy_joules")


def add_job_cost(engine: Engine, cost: Any) -> None:
    """A finished attempt's cost (the summary's `cost`) into the running totals /metrics reads."""
    if not isinstance(cost, dict):
        return
    gpu = cost.get("gpu") if isinstance(cost.get("gpu"), dict) else {}
    values = {"wall_seconds": cost.get("wall_seconds"), "cpu_seconds": cost.get("cpu_seconds"),
              "gpu_seconds": gpu.get("seconds"), "gpu_energy_joules": gpu.get("energy_joules")}
    bumps = {f"cost:{k}": float(v) for k, v in values.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e12}
    if bumps:
        with Session(engine) as session, session.begin():
            _bump(session, bumps)


def job_stats(engine: Engine) -> dict[str, float]:
    with Session(engine) as session:
        return {row.name: row.value for row in session.scalars(select(JobStat))}


def active_counts(engine: Engine) -> dict[str, int]:
    """Queued and running jobs (an index range: bounded by the active jobs, not by history)."""
    with Session(engine) as session:
        return dict(session.execute(select(Job.state, func.count()).where(Job.state.in_(("queued", "running")))
                                    .group_by(Job.state)).all())


SUPERSEDED = "superseded by a newer job for the same change"
# built once: a statement object caches its compiled form, and the webhook path runs these per delivery
_SUPERSEDE = (update(Job).where(Job.supersede_key == bindparam("key"), Job.state == "queued")
              .values(state="superseded", finished_at=bindparam("now"), error=SUPERSEDED))
_INSERT = insert(Job)
_BY_DEDUPE_KEY = select(Job.id).where(Job.dedupe_key == bindparam("key"))


def job_row(*, model: str, kind: str, trigger: str, sha: str | None = None, pr: int | None = None,
            payload: dict[str, Any] | None = None, dedupe_key: str | None = None,
            supersede_key: str | None = None, max_attempts: int = 3) -> dict[str, Any]:
    """A new queued job, as a row for `insert_jobs`."""
    return {"id": new_job_id(), "model": model, "kind": kind, "trigger": trigger, "sha": sha, "pr": pr,
            "payload": json.dumps(payload or {}), "state": "queued", "attempts": 0, "max_attempts": max_attempts,
            "dedupe_key": dedupe_key, "supersede_key": supersede_key, "created_at": _now(), "finished_at": None,
            "error": None}


def insert_jobs(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert new jobs, in order, inside a transaction holding CLAIM_LOCK. Each supersedes the queued
    jobs that share its supersede_key, earlier rows of the same batch included."""
    if not rows:
        return
    now = _now()
    keys = {row["supersede_key"] for row in rows if row["supersede_key"]}
    if keys:
        conn.execute(_SUPERSEDE, [{"key": key, "now": now} for key in keys])
    newest: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = row["supersede_key"]
        if key and key in newest:
            newest[key].update(state="superseded", finished_at=now, error=SUPERSEDED)
        if key:
            newest[key] = row
    conn.execute(_INSERT, rows)


def enqueue(engine: Engine, **job: Any) -> tuple[Job, bool]:
    """Record one job (the keyword arguments of `job_row`); returns (job, created).
    A known dedupe_key returns the existing job."""
    with locked_connection(engine, CLAIM_LOCK) as conn:
        existing = conn.execute(_BY_DEDUPE_KEY, {"key": job["dedupe_key"]}).scalar() \
            if job.get("dedupe_key") is not None else None
        if existing is None:
            row = job_row(**job)
            insert_jobs(conn, [row])
    return get_job(engine, existing or row["id"]), existing is None   # type: ignore[return-value]


def _recover_expired(session: Session, now: datetime) -> None:
    expired = session.scalars(select(Job).where(Job.state == "running", Job.lease_expires_at < now)).all()
    for job in expired:
        _end_attempt(session, job.id, job.attempts, "lost", f"worker {job.worker_id} lost its lease", now)
        if job.attempts >= job.max_attempts:
            job.state, job.finished_at = "failed", now
            job.error = f"worker {job.worker_id} lost its lease {job.attempts} times; giving up"
        else:
            job.state, job.error = "queued", f"worker {job.worker_id} lost its lease; requeued"
        job.worker_id, job.lease_expires_at = None, None


def claim(engine: Engine, worker_id: str, lease_seconds: float = 60.0,
          max_concurrent_retrains: int | None = None) -> Job | None:
    """The oldest queued job whose model has nothing running, now running under a lease.

    With `max_concurrent_retrains`, retrain jobs wait while that many retrains already run.
    """
    with locked(engine, CLAIM_LOCK) as session:
        now = _now()
        _recover_expired(session, now)
        session.flush()
        busy = select(Job.model).where(Job.state == "running")
        query = select(Job).where(Job.state == "queued", Job.model.not_in(busy))
        if max_concurrent_retrains is not None:
            running = session.scalar(select(func.count()).select_from(Job)
                                     .where(Job.state == "running", Job.kind == "retrain"))
            if running >= max_concurrent_retrains:
                query = query.where(Job.kind != "retrain")
        job = session.scalars(query.order_by(Job.created_at, Job.id).limit(1)).first()
        if job is not None:
            job.state, job.worker_id, job.attempts = "running", worker_id, job.attempts + 1
            job.started_at, job.lease_expires_at = now, now + timedelta(seconds=lease_seconds)
            session.add(JobAttempt(job_id=job.id, attempt=job.attempts, worker_id=worker_id, started_at=now))
    return job


def heartbeat(engine: Engine, job_id: str, worker_id: str, lease_seconds: float = 60.0) -> bool:
    """Extend the lease; False means the job is no longer this worker's (recovered or cancelled)."""
    with Session(engine) as session, session.begin():
        result = session.execute(update(Job).where(Job.id == job_id, Job.worker_id == worker_id,
                                                   Job.state == "running")
                                 .values(lease_expires_at=_now() + timedelta(seconds=lease_seconds)))
        return result.rowcount == 1


def finish(engine: Engine, job_id: str, worker_id: str, state: State, *, attempt: int | None = None,
           **fields: Any) -> bool:
    """Record the outcome; ignored (False) when the worker no longer owns the job (or, with `attempt`,
    that attempt is no longer the running one)."""
    if state not in FINAL_STATES:
        raise ValueError(f"not a final state: {state}")
    fields.setdefault("error", None)   # a retried job that succeeds drops the earlier attempt's error
    condition = [Job.id == job_id, Job.worker_id == worker_id, Job.state == "running"]
    if attempt is not None:
        condition.append(Job.attempts == attempt)
    return _end(engine, job_id, condition, state, fields)


def _end(engine: Engine, job_id: str, condition: list[Any], state: str, fields: dict[str, Any]) -> bool:
    now = _now()
    with Session(engine) as session, session.begin():
        started_at, attempt = session.execute(select(Job.started_at, Job.attempts).where(Job.id == job_id)).first() \
            or (None, 0)
        ended = session.execute(update(Job).where(*condition)
                                .values(state=state, finished_at=now, lease_expires_at=None, **fields)).rowcount == 1
        if ended:
            _count_end(session, state, started_at, now)
            _end_attempt(session, job_id, attempt, state, fields.get("error"), now)
        return ended


def preempt(engine: Engine, job_id: str, attempt: int, reason: str, max_preemptions: int,
            worker_id: str | None = None) -> str | None:
    """The running `attempt` was preempted (its runner went away after a checkpoint): requeue the job, to
    resume there. A preemption is not a failure: it does not use up `max_attempts`, but past `max_preemptions`
    the job fails. Returns the job's new state, or None when that attempt was no longer the running one."""
    now = _now()
    with locked(engine, CLAIM_LOCK) as session:
        job = session.get(Job, job_id)
        if job is None or job.state != "running" or job.attempts != attempt or \
                (worker_id is not None and job.worker_id != worker_id):
            return None
        _end_attempt(session, job_id, attempt, "preempted", reason, now)
        session.flush()
        count = session.scalar(select(func.count()).select_from(JobAttempt)
                               .where(JobAttempt.job_id == job_id, JobAttempt.state == "preempted"))
        job.worker_id, job.lease_expires_at = None, None
        _bump(session, {"preempted": 1.0})
        if count > max_preemptions:
            job.state, job.finished_at = "failed", now
            job.error = f"preempted {count} times (service.max_preemptions is {max_preemptions}); giving up"
            _count_end(session, "failed", job.started_at, now)
        else:
            job.state, job.error = "queued", f"preempted ({reason}); requeued to resume from its checkpoint"
            job.max_attempts += 1   # this attempt does not count toward the job's retries
        return job.state


def record_result(engine: Engine, job_id: str, state: State, *, attempt: int | None = None, **fields: Any) -> bool:
    """The outcome reported by the job itself (a GitHub runner calling back), whoever claimed it. With
    `attempt`, only while that attempt is the running one: a late or replayed report changes nothing."""
    if state not in FINAL_STATES:
        raise ValueError(f"not a final state: {state}")
    fields.setdefault("error", None)
    condition = [Job.id == job_id, Job.state.in_(("queued", "running"))]
    if attempt is not None:
        condition = [Job.id == job_id, Job.state == "running", Job.attempts == attempt]
    return _end(engine, job_id, condition, state, fields)


def lease_fence(job_id: str, attempt: int) -> Callable[[Session], str | None]:
    """A promote.Fence for one attempt of a job: it may promote only while that attempt is the running one
    and its lease has not expired (read under the promotion's lock, in the same database)."""
    def refusal(session: Session) -> str | None:
        row = session.execute(select(Job.state, Job.attempts, Job.lease_expires_at).where(Job.id == job_id)).first()
        if row is None:
            return f"job {job_id} is not in the queue"
        if row.state != "running" or row.attempts != attempt:
            return f"attempt {attempt} of job {job_id} is no longer the running one (now {row.state}, attempt {row.attempts})"
        expires = as_utc(row.lease_expires_at)
        if expires is None or expires < _now():
            return f"job {job_id} lost its lease"
        return None

    return refusal


def cancel(engine: Engine, job_id: str, reason: str) -> bool:
    """Cancel a queued or running job; a running job's worker sees it at its next heartbeat."""
    return record_result(engine, job_id, "cancelled", error=reason)


def get_job(engine: Engine, job_id: str) -> Job | None:
    with Session(engine) as session:
        return session.get(Job, job_id)


def list_jobs(engine: Engine, *, limit: int = 50, state: str | None = None) -> list[Job]:
    with Session(engine) as session:
        query = select(Job).order_by(Job.created_at.desc(), Job.id).limit(limit)
        if state:
            query = query.where(Job.state == state)
        return list(session.scalars(query))
