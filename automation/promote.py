"""Promote: MLflow registry aliases (`production`, `previous`) plus an append-only audit trail.

Every alias move happens inside one database transaction that holds a per-model lock
(SELECT … FOR UPDATE on PostgreSQL, BEGIN IMMEDIATE on SQLite) and writes the audit row,
so two jobs finishing at once are serialized: each sees the other's result, production
only ever points at a version whose gate passed (or a recorded manual override), and
no audit entry is lost.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from sqlalchemy import DateTime, Engine, Integer, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from automation.errors import MlgateError, UsageError
from automation.store import Base, locked

if TYPE_CHECKING:
    from mlflow import MlflowClient

PRODUCTION, PREVIOUS = "production", "previous"
GATE_TAG = "mlgate.gate"


class PromotionRecord(Base):
    __tablename__ = "promotions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200), index=True)
    action: Mapped[str] = mapped_column(String(32))           # promote | manual_promote | rollback
    version: Mapped[str] = mapped_column(String(32))          # now in production
    replaced_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    actor: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True),
                                                 default=lambda: datetime.now(timezone.utc))

    def as_dict(self) -> dict[str, object]:
        return {"id": self.id, "model": self.model, "action": self.action, "version": self.version,
                "replaced_version": self.replaced_version, "job_id": self.job_id, "reason": self.reason,
                "actor": self.actor, "created_at": self.created_at.isoformat()}


@dataclass
class AliasState:
    production: str | None
    previous: str | None


def alias_version(client: "MlflowClient", model: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model, alias).version)
    except MlflowException:   # no such alias, or no such registered model yet
        return None


def _move(client: "MlflowClient", engine: Engine, model: str, version: str | None, *, action: str,
          reason: str, job_id: str | None, require_passed: bool, rollback: bool = False) -> PromotionRecord:
    with locked(engine, model) as session:
        current = alias_version(client, model, PRODUCTION)
        if rollback:
            version = alias_version(client, model, PREVIOUS)
            if version is None:
                raise UsageError(f"cannot roll back {model}: it has no '@{PREVIOUS}' version")
        if version is None:
            raise UsageError("a version is required")
        mv = client.get_model_version(model, version)
        if require_passed and mv.tags.get(GATE_TAG) != "passed":
            raise MlgateError(f"{model} version {version} did not pass its gate; refusing to promote it")
        record = PromotionRecord(model=model, action=action, version=version, replaced_version=current,
                                 job_id=job_id, reason=reason, actor=getpass.getuser())
        session.add(record)
        session.flush()
        if rollback:
            # the version that `previous` replaced, so a second rollback keeps walking back
            before = session.scalars(select(PromotionRecord.replaced_version).where(
                PromotionRecord.model == model, PromotionRecord.version == version,
                PromotionRecord.action != "rollback").order_by(PromotionRecord.id.desc()).limit(1)).first()
            new_previous = before if before and before != version else None
        else:
            new_previous = current if current != version else alias_version(client, model, PREVIOUS)
        # alias moves happen while the lock is held; the audit row commits with the block
        client.set_registered_model_alias(model, PRODUCTION, version)
        if new_previous:
            client.set_registered_model_alias(model, PREVIOUS, new_previous)
        elif alias_version(client, model, PREVIOUS) is not None:
            client.delete_registered_model_alias(model, PREVIOUS)
    return record


def promote(client: "MlflowClient", engine: Engine, model: str, version: str, *, reason: str,
            job_id: str | None = None, manual: bool = False) -> PromotionRecord:
    """Make `version` production. Automatic promotion requires its gate tag to say passed."""
    return _move(client, engine, model, str(version), action="manual_promote" if manual else "promote",
                 reason=reason, job_id=job_id, require_passed=not manual)


def rollback(client: "MlflowClient", engine: Engine, model: str, *, reason: str) -> PromotionRecord:
    """Move production back to `@previous`."""
    return _move(client, engine, model, None, action="rollback", reason=reason, job_id=None,
                 require_passed=False, rollback=True)


def audit_trail(engine: Engine, model: str | None = None) -> list[PromotionRecord]:
    with Session(engine) as session:
        query = select(PromotionRecord).order_by(PromotionRecord.id)
        if model:
            query = query.where(PromotionRecord.model == model)
        return list(session.scalars(query))


def alias_state(client: "MlflowClient", model: str) -> AliasState:
    return AliasState(alias_version(client, model, PRODUCTION), alias_version(client, model, PREVIOUS))
