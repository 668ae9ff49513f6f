"""Drift events (CloudEvents 1.0, structured JSON) and the per-model retrain policy.

One transaction decides a whole batch: each event is recorded once by its id (the dedupe
key), and at most one drift retrain per model is queued or running at a time (a burst
coalesces into it), none starts inside the cooldown, and none for a drift share below the
model's threshold. Callers commit their Kafka offsets only after `decide_batch` returns.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import DateTime, Engine, Float, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from automation.config import MlgateConfig
from automation.store import Base, locked
from triggers.queue import CLAIM_LOCK, Job, enqueue_in

log = logging.getLogger(__name__)

EVENT_TYPE = "mlgate.drift.detected"


class BadEvent(ValueError):
    """Not a drift event mlgate can act on; goes to the dead-letter topic (or a 4xx over HTTP)."""


class DriftedColumn(BaseModel):
    model_config = ConfigDict(extra="allow")
    column: str
    score: float
    method: str
    threshold: float
    drifted: bool = True


class DriftData(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    drift_share: float = Field(ge=0, le=1)
    drifted_columns: list[DriftedColumn] = []
    window_start: datetime
    window_end: datetime
    data_ref: str | None = None        # labelled fresh data (npz with x, y) to add to the training split


class DriftEvent(BaseModel):
    model_config = ConfigDict(extra="allow")   # CloudEvents extension attributes are allowed
    specversion: Literal["1.0"]
    type: Literal["mlgate.drift.detected"]
    source: str = Field(min_length=1)
    id: str = Field(min_length=1, max_length=200)
    time: datetime | None = None
    datacontenttype: Literal["application/json"] = "application/json"
    data: DriftData


def parse_event(raw: bytes | str | dict[str, Any], config: MlgateConfig) -> DriftEvent:
    """Validate one event; BadEvent names what is wrong in one line."""
    try:
        body = raw if isinstance(raw, dict) else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadEvent(f"not JSON: {exc}") from None
    try:
        event = DriftEvent.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(event)"
        raise BadEvent(f"not a drift CloudEvent: {where}: {first['msg']}") from None
    if event.data.model not in config.models:
        raise BadEvent(f"unknown model '{event.data.model}' (known: {', '.join(sorted(config.models))})")
    return event


def make_event(model: str, drift_share: float, columns: Iterable[dict[str, Any]], window_start: datetime,
               window_end: datetime, data_ref: str | None = None, source: str = "mlgate/monitor") -> dict[str, Any]:
    return {"specversion": "1.0", "type": EVENT_TYPE, "source": source, "id": uuid.uuid4().hex,
            "time": datetime.now(timezone.utc).isoformat(), "datacontenttype": "application/json",
            "data": {"model": model, "drift_share": drift_share, "drifted_columns": list(columns),
                     "window_start": window_start.isoformat(), "window_end": window_end.isoformat(),
                     "data_ref": data_ref}}


class DriftRecord(Base):
    __tablename__ = "drift_events"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)     # the CloudEvent id
    model: Mapped[str] = mapped_column(String(200), index=True)
    drift_share: Mapped[float] = mapped_column(Float)
    outcome: Mapped[str] = mapped_column(String(20))                   # job | coalesced | below_threshold | cooldown
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(String(16))                    # kafka | http
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "drift_share": self.drift_share, "outcome": self.outcome,
                "job_id": self.job_id, "reason": self.reason, "source": self.source}


@dataclass
class Decision:
    event_id: str
    outcome: str
    job_id: str | None
    reason: str
    duplicate: bool = False


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _decide(session: Session, config: MlgateConfig, event: DriftEvent, source: str, now: datetime) -> Decision:
    known = session.get(DriftRecord, event.id)
    if known is not None:
        return Decision(event.id, known.outcome, known.job_id, known.reason, duplicate=True)
    model, share = event.data.model, event.data.drift_share
    policy = config.model(model).drift
    job_id: str | None = None
    drift_jobs = select(Job).where(Job.model == model, Job.trigger == "drift")
    active = session.scalars(drift_jobs.where(Job.state.in_(("queued", "running")))
                             .order_by(Job.created_at.desc())).first()
    last = session.scalars(drift_jobs.order_by(Job.created_at.desc())).first()
    if share < policy.threshold:
        outcome, reason = "below_threshold", f"drift share {share:.2f} < threshold {policy.threshold:.2f}"
    elif active is not None:
        outcome, reason, job_id = "coalesced", f"drift retrain {active.id} is already {active.state}", active.id
        if active.state == "queued" and event.data.data_ref:   # the queued job trains on the newest data
            payload = json.loads(active.payload or "{}")
            payload.update(data_ref=event.data.data_ref, event_id=event.id)
            payload["coalesced"] = [*payload.get("coalesced", []), event.id]
            active.payload = json.dumps(payload)
    elif last is not None and now - _aware(last.finished_at or last.created_at) < timedelta(
            minutes=policy.cooldown_minutes):
        outcome = "cooldown"
        reason = f"drift retrain {last.id} ended less than {policy.cooldown_minutes:g} min ago"
    else:
        job_id, _ = enqueue_in(session.connection(), model=model, kind="retrain", trigger="drift",
                            payload={"event_id": event.id, "drift_share": share, "data_ref": event.data.data_ref,
                                     "window_end": event.data.window_end.isoformat(), "coalesced": []},
                            dedupe_key=f"drift:{event.id}", max_attempts=config.service.max_attempts)
        outcome, reason = "job", f"drift share {share:.2f} >= threshold {policy.threshold:.2f}"
    session.add(DriftRecord(id=event.id, model=model, drift_share=share, outcome=outcome, job_id=job_id,
                            reason=reason, source=source, received_at=now))
    session.flush()
    return Decision(event.id, outcome, job_id, reason)


def decide_batch(engine: Engine, config: MlgateConfig, events: list[DriftEvent], source: str) -> list[Decision]:
    """Record and decide every event in one transaction (durable when this returns)."""
    if not events:
        return []
    with locked(engine, CLAIM_LOCK) as session:
        now = datetime.now(timezone.utc)
        decisions = [_decide(session, config, event, source, now) for event in events]
    for d in decisions:
        log.info("drift event decided", extra={"event_id": d.event_id, "outcome": d.outcome, "job_id": d.job_id,
                                               "duplicate": d.duplicate})
    return decisions


def list_drift_events(engine: Engine, limit: int = 50) -> list[DriftRecord]:
    with Session(engine) as session:
        return list(session.scalars(select(DriftRecord).order_by(DriftRecord.received_at.desc()).limit(limit)))
