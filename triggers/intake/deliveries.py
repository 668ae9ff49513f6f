"""Webhook deliveries, recorded durably with the jobs they make, in one transaction.

The request path (`Incoming.parse`, then `record_deliveries` through the group-commit writer)
never calls out: it verifies, records and enqueues in milliseconds. A delivery whose plan needs the GitHub API is stored `pending` with its payload;
`plan_pending` (a thread in `mlgate serve`, restart-safe) finishes it later.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import queue as queue_module
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import DateTime, Engine, Integer, String, Text, delete, insert, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from automation.config import MlgateConfig
from automation.store import Base, locked_connection
from triggers.github.api import GitHubRateLimited, GitHubSource
from triggers.jobs.queue import CLAIM_LOCK, as_utc, insert_jobs, job_row
from triggers.intake.webhooks import Plan, plan_event

log = logging.getLogger(__name__)


class Delivery(Base):
    __tablename__ = "deliveries"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)     # X-GitHub-Delivery
    event: Mapped[str] = mapped_column(String(64))
    action: Mapped[str | None] = mapped_column(String(64), nullable=True)
    repository: Mapped[str | None] = mapped_column(String(200), nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)        # jobs | no_models | ignored | pending | needs_approval
    reason: Mapped[str] = mapped_column(Text, default="")
    job_ids: Mapped[str] = mapped_column(Text, default="[]")
    payload: Mapped[str | None] = mapped_column(Text, nullable=True)   # kept only while pending
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    planned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    def as_dict(self) -> dict[str, Any]:
        return delivery_view(vars(self))


class SeenBody(Base):
    """Signed webhook bodies already accepted. `X-GitHub-Delivery` is not covered by the signature, so a
    captured body replayed under fresh delivery ids is recognised by its hash instead."""

    __tablename__ = "webhook_bodies"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    delivery_id: Mapped[str] = mapped_column(String(100))
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class PullRequestHead(Base):
    """Each head a pull request had, as its signed pull_request deliveries said, with the time GitHub gave
    it. What an `/mlgate evaluate` comment approves is the head at the comment's time, not a later push."""

    __tablename__ = "pull_request_heads"

    repository: Mapped[str] = mapped_column(String(200), primary_key=True)
    pr: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha: Mapped[str] = mapped_column(String(64), primary_key=True)
    since: Mapped[datetime] = mapped_column(DateTime(timezone=True))   # the first delivery's updated_at
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


def _pull_request_head(item: "Incoming", now: datetime) -> dict[str, Any] | None:
    """The head a pull_request delivery shows, as a PullRequestHead row, or None when it shows none."""
    if item.event != "pull_request":
        return None
    try:
        pull, repository = item.payload["pull_request"], item.payload["repository"]["full_name"]
        since = datetime.fromisoformat(pull["updated_at"].replace("Z", "+00:00"))
        return {"repository": repository, "pr": int(item.payload["number"]), "sha": str(pull["head"]["sha"]),
                "since": as_utc(since), "recorded_at": now}
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def head_at(engine: Engine, repository: str, pr: int, moment: datetime) -> str | None:
    """The PR's head at `moment`: the newest head recorded with a time at or before it."""
    with Session(engine) as session:
        return session.scalar(select(PullRequestHead.sha).where(
            PullRequestHead.repository == repository, PullRequestHead.pr == pr,
            PullRequestHead.since <= as_utc(moment)).order_by(PullRequestHead.since.desc()).limit(1))


def delivery_view(row: Any) -> dict[str, Any]:
    """What the API shows of a delivery row (an ORM object's vars, or a plain row mapping)."""
    return {"delivery": row["id"], "event": row["event"], "action": row["action"], "repository": row["repository"],
            "status": row["status"], "reason": row["reason"], "jobs": json.loads(row["job_ids"])}


@dataclass
class Recorded:
    delivery: dict[str, Any]      # delivery_view() of the stored row
    duplicate: bool


def _job_rows(config: MlgateConfig, delivery_id: str, plan: Plan) -> list[dict[str, Any]]:
    return [job_row(model=job.model, kind=job.kind, trigger=job.trigger, sha=job.sha, pr=job.pr,
                    payload=(job.payload or {})
                    | {"delivery": delivery_id, "repository": plan.repository, "reason": plan.reason}
                    | ({"author_writes": True} if job.author_writes else {}),
                    dedupe_key=f"{delivery_id}:{job.model}", supersede_key=job.supersede_key,
                    max_attempts=config.service.max_attempts)
            for job in plan.jobs]


def _rerun(conn: Any, plan: Plan) -> Plan:
    """A re-requested check run's job, planned again as it was: same model, commit, PR and payload (a drift
    retrain keeps its data). The job must be this service's, for that commit, in that repository."""
    from triggers.intake.webhooks import PlannedJob
    from triggers.jobs.queue import Job

    row = conn.execute(select(Job.model, Job.kind, Job.trigger, Job.sha, Job.pr, Job.payload)
                       .where(Job.id == plan.rerun_of)).first()
    payload = json.loads(row.payload or "{}") if row is not None else {}
    if row is None or row.sha != plan.sha or payload.get("repository", plan.repository) != plan.repository:
        return Plan("ignored", f"re-run of {plan.rerun_of}: no such job of this service for commit "
                    f"{(plan.sha or '')[:7]}", repository=plan.repository)
    kept = {k: v for k, v in payload.items() if k in ("data_ref", "author_writes", "event_id", "drift_share")}
    return Plan("jobs", plan.reason, [PlannedJob(model=row.model, kind=row.kind, trigger=row.trigger, sha=row.sha,
                                                 pr=row.pr, supersede_key=None, payload=kept | {"rerun_of": plan.rerun_of})],
                repository=plan.repository, sha=plan.sha)


@dataclass
class Incoming:
    """A verified delivery, already planned (so a bad payload was refused before any write)."""

    delivery_id: str
    event: str
    payload: dict[str, Any]
    plan: Plan
    body_sha256: str

    @classmethod
    def parse(cls, config: MlgateConfig, delivery_id: str, event: str, payload: Any, body: bytes) -> "Incoming":
        """Raises webhooks.BadPayload when the body has the wrong shape for its event."""
        return cls(delivery_id, event, payload, plan_event(config, event, payload), hashlib.sha256(body).hexdigest())


def record_deliveries(engine: Engine, config: MlgateConfig, batch: list[Incoming]) -> list[Recorded]:
    """Record deliveries and their jobs in one transaction (one commit for the whole batch); a known
    delivery id changes nothing."""
    now = datetime.now(timezone.utc)
    results: list[Recorded] = []
    with locked_connection(engine, CLAIM_LOCK) as conn:
        ids = list({item.delivery_id for item in batch})
        known = {row["id"]: delivery_view(row) for row in conn.execute(
            select(Delivery.__table__).where(Delivery.id.in_(ids))).mappings()}
        window_start = now - timedelta(hours=config.service.replay_window_hours)
        seen, stale = {}, []
        for sha, delivery_id, seen_at in conn.execute(select(SeenBody.sha256, SeenBody.delivery_id, SeenBody.seen_at)
                                                      .where(SeenBody.sha256.in_({i.body_sha256 for i in batch}))):
            if as_utc(seen_at) >= window_start:
                seen[sha] = delivery_id
            else:
                stale.append(sha)
        if stale:   # seen before the window: it may be accepted again, so forget the old sighting
            conn.execute(delete(SeenBody).where(SeenBody.sha256.in_(stale)))
        rows, jobs, bodies, heads = [], [], [], {}
        for item in batch:
            if item.delivery_id in known:
                results.append(Recorded(known[item.delivery_id], duplicate=True))
                continue
            plan, action = item.plan, item.payload.get("action")
            if plan.outcome == "rerun":
                plan = _rerun(conn, plan)
            if item.body_sha256 in seen:
                plan = Plan("ignored", f"replay: the same signed body arrived as delivery {seen[item.body_sha256]}",
                            repository=plan.repository)
            else:
                seen[item.body_sha256] = item.delivery_id
                bodies.append({"sha256": item.body_sha256, "delivery_id": item.delivery_id, "seen_at": now})
                head = _pull_request_head(item, now)
                if head is not None:   # the earliest sighting of a head says since when it was the head
                    key = (head["repository"], head["pr"], head["sha"])
                    if key not in heads or head["since"] < heads[key]["since"]:
                        heads[key] = head
            values: dict[str, Any] = {
                "id": item.delivery_id, "event": item.event, "action": action if isinstance(action, str) else None,
                "repository": plan.repository, "status": plan.outcome, "reason": plan.reason, "received_at": now,
                "payload": json.dumps(item.payload) if plan.outcome == "pending" else None,
                "planned_at": None if plan.outcome == "pending" else now,
                "job_ids": "[]"}
            # a new delivery id: its jobs' dedupe keys (delivery:model) cannot exist yet
            new_jobs = _job_rows(config, item.delivery_id, plan)
            values["job_ids"] = json.dumps([job["id"] for job in new_jobs])
            jobs.extend(new_jobs)
            rows.append(values)
            known[item.delivery_id] = delivery_view(values)     # a redelivery inside the same batch
            results.append(Recorded(known[item.delivery_id], duplicate=False))
        insert_jobs(conn, jobs)
        if rows:
            conn.execute(insert(Delivery), rows)
        if bodies:
            conn.execute(insert(SeenBody), bodies)
        _insert_new_heads(conn, list(heads.values()))
    for r in results:
        log.info("webhook delivery recorded", extra={"delivery": r.delivery["delivery"], "event": r.delivery["event"],
                                                     "status": r.delivery["status"], "duplicate": r.duplicate})
    return results


def _insert_new_heads(conn: Any, heads: list[dict[str, Any]]) -> None:
    for head in heads:
        known = conn.execute(select(PullRequestHead.since).where(
            PullRequestHead.repository == head["repository"], PullRequestHead.pr == head["pr"],
            PullRequestHead.sha == head["sha"])).scalar()
        if known is None:
            conn.execute(insert(PullRequestHead), [head])


class GroupCommitRecorder:
    """Deliveries arriving together share one transaction and one fsync: a writer thread drains
    what is waiting (up to `max_batch`) and records it at once. Each request still gets its
    answer only after its delivery is committed."""

    def __init__(self, engine: Engine, config: MlgateConfig, max_batch: int = 64) -> None:
        self.engine, self.config, self.max_batch = engine, config, max_batch
        self._waiting: queue_module.SimpleQueue[tuple[Incoming, asyncio.Future[Recorded]]] = queue_module.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="delivery-writer", daemon=True)
        self._thread.start()

    async def record(self, item: Incoming) -> Recorded:
        future: asyncio.Future[Recorded] = asyncio.get_running_loop().create_future()
        self._waiting.put((item, future))
        return await future

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while True:
            batch = [self._waiting.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._waiting.get_nowait())
                except queue_module.Empty:
                    break
            results = self._record([item for item, _ in batch])
            for (_, future), result in zip(batch, results):
                future.get_loop().call_soon_threadsafe(_settle, future, result)


    def _record(self, items: list[Incoming]) -> list[Any]:
        """Record a batch in one transaction; if it fails, each delivery alone, so only the one the database
        refuses answers 503 (and GitHub shows that delivery as failed, to redeliver)."""
        try:
            return record_deliveries(self.engine, self.config, items)
        except Exception as exc:
            log.error("recording deliveries failed", extra={"error": f"{type(exc).__name__}: {exc}",
                                                            "batch": len(items)})
            if len(items) == 1:
                return [exc]
        results: list[Any] = []
        for item in items:
            try:
                results.extend(record_deliveries(self.engine, self.config, [item]))
            except Exception as exc:
                results.append(exc)
        return results


def _settle(future: asyncio.Future[Recorded], result: Any) -> None:
    if future.done():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)


def plan_pending(engine: Engine, config: MlgateConfig, github: GitHubSource, limit: int = 20,
                 on_planned: Callable[[Delivery, Plan], None] | None = None) -> int:
    """Plan pending deliveries in the order they came, calling the API outside any lock. Returns how many.

    A delivery that cannot be planned is recorded `error` with the reason, so it never holds up the ones
    behind it. A rate limit (GitHubRateLimited) propagates: the caller parks planning until GitHub's reset,
    and the deliveries stay pending."""
    with Session(engine) as session:
        pending = list(session.scalars(select(Delivery).where(Delivery.status == "pending")
                                       .order_by(Delivery.received_at).limit(limit)))
    for delivery in pending:
        try:
            plan = plan_event(config, delivery.event, json.loads(delivery.payload or "{}"), github,
                              lambda repo, pr, moment: head_at(engine, repo, pr, moment))
        except GitHubRateLimited:
            raise
        except Exception as exc:   # a bug or a payload planning cannot read: this delivery's alone
            log.error("webhook delivery could not be planned", extra={"delivery": delivery.id,
                                                                     "error": f"{type(exc).__name__}: {exc}"})
            plan = Plan("error", f"could not be planned: {type(exc).__name__}: {str(exc)[:300]}")
        with locked_connection(engine, CLAIM_LOCK) as conn:
            status = conn.execute(select(Delivery.status).where(Delivery.id == delivery.id)).scalar()
            if status != "pending":
                continue   # another replica planned it first
            jobs = _job_rows(config, delivery.id, plan)
            insert_jobs(conn, jobs)
            ids = [job["id"] for job in jobs]
            conn.execute(update(Delivery).where(Delivery.id == delivery.id).values(
                status=plan.outcome, reason=plan.reason, job_ids=json.dumps(ids), payload=None,
                planned_at=datetime.now(timezone.utc), repository=delivery.repository or plan.repository))
        log.info("webhook delivery planned", extra={"delivery": delivery.id, "status": plan.outcome,
                                                    "reason": plan.reason})
        if on_planned is not None:
            on_planned(delivery, plan)
    return len(pending)


def get_delivery(engine: Engine, delivery_id: str) -> Delivery | None:
    with Session(engine) as session:
        return session.get(Delivery, delivery_id)


def list_deliveries(engine: Engine, limit: int = 50) -> list[Delivery]:
    with Session(engine) as session:
        return list(session.scalars(select(Delivery).order_by(Delivery.received_at.desc()).limit(limit)))
