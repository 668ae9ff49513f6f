"""Drift events (CloudEvents 1.0, structured JSON) and the per-model retrain policy.

One transaction decides a whole batch: each event is recorded once by its id (the dedupe
key), and at most one drift retrain per model is queued or running at a time (a burst
coalesces into it), none starts inside the cooldown, and none for a drift share below the
model's threshold. Callers commit their Kafka offsets only after `decide_batch` returns.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Connection, DateTime, Engine, Float, String, Text, bindparam, insert, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from automation.config import MlgateConfig
from automation.store import Base, locked_connection
from triggers.jobs.queue import CLAIM_LOCK, Job, as_utc, insert_jobs, job_row

log = logging.getLogger(__name__)

EVENT_TYPE = "mlgate.drift.detected"
MAX_EVENT_BYTES = 64 * 1024   # the same cap as over HTTP (request_guard.EVENT_LIMIT)


class BadEvent(ValueError):
    """Not a drift event mlgate can act on; goes to the dead-letter topic (or a 4xx over HTTP)."""


class UnknownModel(BadEvent):
    """Well-formed, but for a model mlgate.yaml does not have."""


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


def parse_event(raw: bytes | str | dict[str, Any] | None, config: MlgateConfig) -> DriftEvent:
    """Validate one event, whatever arrived (a Kafka record's value may be anything); BadEvent names what
    is wrong in one line."""
    if raw is None:
        raise BadEvent("empty record (null value)")
    if isinstance(raw, (bytes, str)) and len(raw) > MAX_EVENT_BYTES:
        raise BadEvent(f"record of {len(raw)} bytes is over the {MAX_EVENT_BYTES}-byte limit")
    try:
        body = raw if isinstance(raw, dict) else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:   # invalid UTF-8 is a UnicodeDecodeError
        raise BadEvent(f"not JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise BadEvent("JSON nested too deeply") from None
    try:
        event = DriftEvent.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])[:200] or "(event)"
        raise BadEvent(f"not a drift CloudEvent: {where}: {first['msg']}") from None
    except RecursionError:
        raise BadEvent("JSON nested too deeply") from None
    if event.data.model not in config.models:
        raise UnknownModel(f"unknown model '{event.data.model}' (known: {', '.join(sorted(config.models))})")
    if event.data.data_ref is not None:
        event.data.data_ref = confine_data_ref(event.data.data_ref, config.service.data_roots)
    return event


def confine_data_ref(ref: str, roots: list[str]) -> str:
    """`ref`, normalized, if it lies under one of `roots`; BadEvent otherwise. A local path (plain or
    file://) is made absolute and normalized first, so `..` cannot climb out of a root."""
    if not roots:
        raise BadEvent("data_ref is not accepted: no data roots are configured (service.data_roots)")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in ref + unquote(ref)):
        raise BadEvent(f"data_ref {ref!r} contains a NUL or control character")
    parsed = urlsplit(ref)
    local = parsed.scheme in ("", "file")
    if local:
        path = unquote(parsed.path) if parsed.scheme == "file" else ref
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise BadEvent(f"data_ref {ref!r}: a file:// URI must name a local path")
        if not posixpath.isabs(path):
            raise BadEvent(f"data_ref {ref!r} is not an absolute path")
        # symbolic links resolved first: a link under a root may point anywhere
        normalized = os.path.realpath(posixpath.normpath(path))
    elif ".." in parsed.path.split("/") or parsed.query or parsed.fragment:
        raise BadEvent(f"data_ref {ref!r} must not contain '..', a query or a fragment")
    for root in roots:
        root_parts = urlsplit(root)
        if local and root_parts.scheme in ("", "file"):
            base = os.path.realpath(posixpath.normpath(unquote(root_parts.path) if root_parts.scheme == "file"
                                                       else root))
            if normalized == base or normalized.startswith(base.rstrip("/") + "/"):
                return normalized if parsed.scheme == "" else f"file://{normalized}"
        elif not local and root_parts.scheme == parsed.scheme and ref.startswith(root.rstrip("/") + "/"):
            return ref
    raise BadEvent(f"data_ref {ref!r} is outside the configured data roots")


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


_DRIFT_JOBS = (select(Job.id, Job.state, Job.payload, Job.created_at, Job.finished_at)
               .where(Job.model == bindparam("model"), Job.trigger == "drift").order_by(Job.created_at.desc()))
_ACTIVE_DRIFT_JOB = _DRIFT_JOBS.where(Job.state.in_(("queued", "running"))).limit(1)
_LAST_DRIFT_JOB = _DRIFT_JOBS.limit(1)
_SET_PAYLOAD = update(Job).where(Job.id == bindparam("job_id")).values(payload=bindparam("new_payload"))


@dataclass
class _ModelState:
    """One model's drift jobs as the batch goes: read once, then kept up to date in memory."""

    active: dict[str, Any] | None           # the queued or running drift retrain: id, state, payload
    last_id: str | None
    last_ended: datetime | None
    payload_changed: bool = False

    @classmethod
    def read(cls, conn: Connection, model: str) -> "_ModelState":
        active = conn.execute(_ACTIVE_DRIFT_JOB, {"model": model}).mappings().first()
        last = conn.execute(_LAST_DRIFT_JOB, {"model": model}).mappings().first()
        return cls(active={"id": active["id"], "state": active["state"], "payload": json.loads(active["payload"])}
                   if active else None, last_id=last["id"] if last else None,
                   last_ended=as_utc(last["finished_at"] or last["created_at"]) if last else None)


def _known_events(conn: Connection, ids: list[str]) -> dict[str, Decision]:
    known: dict[str, Decision] = {}
    for start in range(0, len(ids), 500):   # bounded IN lists
        rows = conn.execute(select(DriftRecord.id, DriftRecord.outcome, DriftRecord.job_id, DriftRecord.reason)
                            .where(DriftRecord.id.in_(ids[start:start + 500])))
        known |= {r.id: Decision(r.id, r.outcome, r.job_id, r.reason, duplicate=True) for r in rows}
    return known


def _decide(conn: Connection, config: MlgateConfig, event: DriftEvent, state: _ModelState,
            now: datetime) -> Decision:
    model, share = event.data.model, event.data.drift_share
    policy = config.model(model).drift
    if share < policy.threshold:
        return Decision(event.id, "below_threshold", None,
                        f"drift share {share:.2f} < threshold {policy.threshold:.2f}")
    if state.active is not None:
        active = state.active
        if active["state"] == "queued":       # a running job keeps what it started with
            payload = active["payload"]
            payload["coalesced"] = int(payload.get("coalesced", 0)) + 1
            payload["last_event_id"] = event.id
            if event.data.data_ref:             # the queued job trains on the newest data
                payload["data_ref"] = event.data.data_ref
            state.payload_changed = True
        return Decision(event.id, "coalesced", active["id"], f"drift retrain {active['id']} is already {active['state']}")
    if state.last_ended is not None and now - state.last_ended < timedelta(minutes=policy.cooldown_minutes):
        return Decision(event.id, "cooldown", None,
                        f"drift retrain {state.last_id} ended less than {policy.cooldown_minutes:g} min ago")
    payload = {"event_id": event.id, "drift_share": share, "data_ref": event.data.data_ref,
               "window_end": event.data.window_end.isoformat(), "coalesced": 0}
    row = job_row(model=model, kind="retrain", trigger="drift", payload=payload, dedupe_key=drift_dedupe_key(event.id),
                  max_attempts=config.service.max_attempts)
    insert_jobs(conn, [row])
    state.active, state.last_id, state.last_ended = {"id": row["id"], "state": "queued", "payload": payload}, \
        row["id"], now
    return Decision(event.id, "job", row["id"], f"drift share {share:.2f} >= threshold {policy.threshold:.2f}")


def drift_dedupe_key(event_id: str) -> str:
    """The job's dedupe key: `drift:<id>`, or its digest when that would not fit the column (200)."""
    import hashlib

    key = f"drift:{event_id}"
    return key if len(key) <= 200 else f"drift:sha256:{hashlib.sha256(event_id.encode()).hexdigest()}"


def decide_batch(engine: Engine, config: MlgateConfig, events: list[DriftEvent], source: str) -> list[Decision]:
    """Record and decide every event in one transaction (durable when this returns)."""
    if not events:
        return []
    with locked_connection(engine, CLAIM_LOCK) as conn:
        now = datetime.now(timezone.utc)
        known = _known_events(conn, list({e.id for e in events}))
        states: dict[str, _ModelState] = {}
        decisions, records = [], []
        for event in events:
            if event.id in known:
                decisions.append(known[event.id])
                continue
            state = states.get(event.data.model) or states.setdefault(event.data.model,
                                                                       _ModelState.read(conn, event.data.model))
            decision = _decide(conn, config, event, state, now)
            known[event.id] = Decision(decision.event_id, decision.outcome, decision.job_id, decision.reason,
                                       duplicate=True)        # a replay later in the same batch
            decisions.append(decision)
            records.append({"id": event.id, "model": event.data.model, "drift_share": event.data.drift_share,
                            "outcome": decision.outcome, "job_id": decision.job_id, "reason": decision.reason,
                            "source": source, "received_at": now})
        for state in states.values():
            if state.payload_changed and state.active is not None:
                conn.execute(_SET_PAYLOAD, {"job_id": state.active["id"],
                                            "new_payload": json.dumps(state.active["payload"])})
        if records:
            conn.execute(insert(DriftRecord), records)
    if log.isEnabledFor(logging.INFO):
        for d in decisions:
            log.info("drift event decided", extra={"event_id": d.event_id, "outcome": d.outcome,
                                                   "job_id": d.job_id, "duplicate": d.duplicate})
    return decisions


def list_drift_events(engine: Engine, limit: int = 50) -> list[DriftRecord]:
    with Session(engine) as session:
        return list(session.scalars(select(DriftRecord).order_by(DriftRecord.received_at.desc()).limit(limit)))
