"""Webhook deliveries, recorded durably with the jobs they make, in one transaction.

The request path (`record_delivery`) never calls out: it verifies, records and enqueues in
milliseconds. A delivery whose plan needs the GitHub API is stored `pending` with its payload;
`plan_pending` (a thread in `mlgate serve`, restart-safe) finishes it later.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import DateTime, Engine, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from automation.config import MlgateConfig
from automation.store import Base, locked
from triggers.github_api import GitHubSource
from triggers.queue import CLAIM_LOCK, enqueue_in
from triggers.webhooks import Plan, plan_event

log = logging.getLogger(__name__)


class Delivery(Base):
    __tablename__ = "deliveries"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)     # X-GitHub-Delivery
    event: Mapped[str] = mapped_column(String(64))
    action: Mapped[str | None] = mapped_column(String(64), nullable=True)
    repository: Mapped[str | None] = mapped_column(String(200), nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)        # jobs | no_models | ignored | pending
    reason: Mapped[str] = mapped_column(Text, default="")
    job_ids: Mapped[str] = mapped_column(Text, default="[]")
    payload: Mapped[str | None] = mapped_column(Text, nullable=True)   # kept only while pending
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    planned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    def as_dict(self) -> dict[str, Any]:
        return {"delivery": self.id, "event": self.event, "action": self.action, "repository": self.repository,
                "status": self.status, "reason": self.reason, "jobs": json.loads(self.job_ids)}


@dataclass
class Recorded:
    delivery: Delivery
    duplicate: bool


def _enqueue_plan(session: Session, config: MlgateConfig, delivery: Delivery, plan: Plan) -> None:
    ids = []
    for job in plan.jobs:
        record, _ = enqueue_in(session, model=job.model, kind=job.kind, trigger=job.trigger, sha=job.sha, pr=job.pr,
                               payload={"delivery": delivery.id, "repository": plan.repository,
                                        "reason": plan.reason},
                               dedupe_key=f"{delivery.id}:{job.model}", supersede_key=job.supersede_key,
                               max_attempts=config.service.max_attempts)
        ids.append(record.id)
    delivery.status, delivery.reason, delivery.job_ids = plan.outcome, plan.reason, json.dumps(ids)
    delivery.repository = delivery.repository or plan.repository
    if plan.outcome != "pending":
        delivery.payload, delivery.planned_at = None, datetime.now(timezone.utc)


def record_delivery(engine: Engine, config: MlgateConfig, delivery_id: str, event: str,
                    payload: Any) -> Recorded:
    """Record one verified delivery and its jobs; a known delivery id changes nothing.

    Raises webhooks.BadPayload (before anything is written) when the body has the wrong shape.
    """
    plan = plan_event(config, event, payload)
    with locked(engine, CLAIM_LOCK) as session:
        existing = session.get(Delivery, delivery_id)
        if existing is not None:
            return Recorded(existing, duplicate=True)
        delivery = Delivery(id=delivery_id, event=event, received_at=datetime.now(timezone.utc),
                            action=payload.get("action") if isinstance(payload.get("action"), str) else None,
                            status=plan.outcome, repository=plan.repository,
                            payload=json.dumps(payload) if plan.outcome == "pending" else None)
        session.add(delivery)
        session.flush()
        _enqueue_plan(session, config, delivery, plan)
    log.info("webhook delivery recorded", extra={"delivery": delivery_id, "event": event, "status": delivery.status,
                                                 "reason": delivery.reason})
    return Recorded(delivery, duplicate=False)


def plan_pending(engine: Engine, config: MlgateConfig, github: GitHubSource, limit: int = 20) -> int:
    """Plan pending deliveries in the order they came, calling the API outside any lock. Returns how many."""
    with Session(engine) as session:
        pending = list(session.scalars(select(Delivery).where(Delivery.status == "pending")
                                       .order_by(Delivery.received_at).limit(limit)))
    for delivery in pending:
        plan = plan_event(config, delivery.event, json.loads(delivery.payload or "{}"), github)
        with locked(engine, CLAIM_LOCK) as session:
            current = session.get(Delivery, delivery.id)
            if current is None or current.status != "pending":
                continue   # another replica planned it first
            _enqueue_plan(session, config, current, plan)
        log.info("webhook delivery planned", extra={"delivery": delivery.id, "status": plan.outcome,
                                                    "reason": plan.reason})
    return len(pending)


def get_delivery(engine: Engine, delivery_id: str) -> Delivery | None:
    with Session(engine) as session:
        return session.get(Delivery, delivery_id)


def list_deliveries(engine: Engine, limit: int = 50) -> list[Delivery]:
    with Session(engine) as session:
        return list(session.scalars(select(Delivery).order_by(Delivery.received_at.desc()).limit(limit)))
