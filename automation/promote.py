"""Promote: MLflow registry aliases (`production`, `previous`) plus an append-only audit trail.

A move is a compare-and-set in three steps, so production and the audit trail always agree:

1. *Intent*: under a per-model lock (SELECT … FOR UPDATE on PostgreSQL, BEGIN IMMEDIATE on SQLite),
   check the caller's fence (a job that lost its lease may not promote) and that no other move of
   the model is under way, and record the intent. The lock is held only for that: never across an
   MLflow call, so a slow registry cannot stall other writers (heartbeats among them).
2. *Move*: outside the lock; the intent row keeps other movers of the model waiting. If production is
   no longer the version the caller gated against (say a person rolled back meanwhile), nothing moves
   and the caller gets GateStale. A move that fails half-way is undone.
3. *Confirm*: the audit row and the intent's end commit together.

A mover that died between 1 and 3 leaves its intent; `reconcile` (run by every mover after a while,
and at service start) reads the registry and writes the audit row if production did move, or marks
the intent abandoned if it did not.
"""

from __future__ import annotations

import getpass
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import DateTime, Engine, Integer, String, Text, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from automation.errors import GateStale, MlgateError, UsageError
from automation.store import Base, as_utc, locked, utc_now

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

PRODUCTION, PREVIOUS, STAGING = "production", "previous", "staging"
GATE_TAG = "mlgate.gate"
UNCHANGED = object()                      # `expected_production` not given: promote over whatever is there
INTENT_STALE = timedelta(minutes=2)       # an unconfirmed move this old is reconciled by the next mover
WAIT_SECONDS = 120.0                      # how long a mover waits for another move of the same model
Fence = Callable[[Session], "str | None"]   # why the caller may not promote (read under the lock), or None


class PromotionIntent(Base):
    __tablename__ = "promotion_intents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200), index=True)
    action: Mapped[str] = mapped_column(String(32))
    version: Mapped[str | None] = mapped_column(String(32), nullable=True)     # None: a rollback, not yet known
    replaced_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    actor: Mapped[str] = mapped_column(String(200), default="")
    state: Mapped[str] = mapped_column(String(16), index=True)   # moving | done | stale | failed | abandoned
    detail: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PromotionRecord(Base):
    __tablename__ = "promotions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200), index=True)
    action: Mapped[str] = mapped_column(String(32))           # promote | manual_promote | rollback | retire | git | stage
    version: Mapped[str] = mapped_column(String(32))          # now in production ("" after a retire)
    replaced_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    actor: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True),
                                                 default=utc_now)

    def as_dict(self) -> dict[str, object]:
        return {"id": self.id, "model": self.model, "action": self.action, "version": self.version,
                "replaced_version": self.replaced_version, "job_id": self.job_id, "reason": self.reason,
                "actor": self.actor, "created_at": self.created_at.isoformat()}


@dataclass
class AliasState:
    production: str | None
    previous: str | None


# the registry's answers that mean "not there"; anything else (INTERNAL_ERROR, a timeout) is an outage
ABSENT = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})


def alias_version(client: "MlflowClient", model: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model, alias).version)
    except MlflowException as exc:
        if exc.error_code in ABSENT:   # no such alias, or no such registered model yet
            return None
        raise   # an unreachable or failing registry is not "no production": the caller keeps what it has


def _begin(engine: Engine, client: "MlflowClient", model: str, action: str, version: str | None, reason: str,
           job_id: str | None, fence: Fence | None) -> int:
    """Step 1: the intent, once no other move of the model is under way. Returns its id."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        with locked(engine, model) as session:
            if fence is not None:
                refusal = fence(session)
                if refusal:
                    raise MlgateError(f"not promoting {model}: {refusal}")
            other = session.scalars(select(PromotionIntent).where(PromotionIntent.model == model,
                                                                  PromotionIntent.state == "moving")).first()
            if other is None:
                intent = PromotionIntent(model=model, action=action, version=version, job_id=job_id, reason=reason,
                                         actor=getpass.getuser(), state="moving", created_at=utc_now())
                session.add(intent)
                session.flush()
                return intent.id
            stale = utc_now() - as_utc(other.created_at) > INTENT_STALE
        if stale:
            reconcile(client, engine, model)
        elif time.monotonic() > deadline:
            raise MlgateError(f"another move of {model} (intent {other.id}, {other.action}) has not finished "
                              f"within {WAIT_SECONDS:g} s")
        else:
            time.sleep(0.2)


def _end(engine: Engine, intent_id: int, state: str, detail: str = "", **values: Any) -> None:
    with Session(engine) as session, session.begin():
        session.execute(update(PromotionIntent).where(PromotionIntent.id == intent_id)
                        .values(state=state, detail=detail[:2000], **values))


def _confirm(engine: Engine, intent: PromotionIntent, version: str, replaced: str | None,
             detail: str = "") -> PromotionRecord:
    """Step 3: the audit row and the intent's end, in one transaction."""
    with locked(engine, intent.model) as session:
        record = PromotionRecord(model=intent.model, action=intent.action, version=version, replaced_version=replaced,
                                 job_id=intent.job_id, reason=intent.reason, actor=intent.actor)
        session.add(record)
        session.execute(update(PromotionIntent).where(PromotionIntent.id == intent.id)
                        .values(state="done", version=version, replaced_version=replaced, detail=detail))
        session.flush()
    return record


def _rollback_target(engine: Engine, client: "MlflowClient", model: str) -> tuple[str, str | None]:
    """(the version to roll back to, what becomes `previous` then): walking back one promotion at a time."""
    version = alias_version(client, model, PREVIOUS)
    if version is None:
        raise UsageError(f"cannot roll back {model}: it has no '@{PREVIOUS}' version")
    with Session(engine) as session:
        before = session.scalars(select(PromotionRecord.replaced_version).where(
            PromotionRecord.model == model, PromotionRecord.version == version,
            PromotionRecord.action != "rollback").order_by(PromotionRecord.id.desc()).limit(1)).first()
    return version, (before if before and before != version else None)


def _set_aliases(client: "MlflowClient", model: str, production: str, previous: str | None) -> None:
    client.set_registered_model_alias(model, PRODUCTION, production)
    if previous:
        client.set_registered_model_alias(model, PREVIOUS, previous)
    elif alias_version(client, model, PREVIOUS) is not None:
        client.delete_registered_model_alias(model, PREVIOUS)


def _move(client: "MlflowClient", engine: Engine, model: str, version: str | None, *, action: str,
          reason: str, job_id: str | None, require_passed: bool, rollback: bool = False,
          expected_production: Any = UNCHANGED, fence: Fence | None = None) -> PromotionRecord:
    intent_id = _begin(engine, client, model, action, version, reason, job_id, fence)
    try:
        current = alias_version(client, model, PRODUCTION)
        previous_before = alias_version(client, model, PREVIOUS)
        if expected_production is not UNCHANGED and current != expected_production:
            raise GateStale(f"production of {model} is version {current} now, not {expected_production} as when "
                            f"the gate ran; version {version} was not promoted")
        if rollback:
            version, new_previous = _rollback_target(engine, client, model)
        else:
            assert version is not None
            mv = client.get_model_version(model, version)
            if require_passed and mv.tags.get(GATE_TAG) != "passed":
                raise MlgateError(f"{model} version {version} did not pass its gate; refusing to promote it")
            new_previous = current if current != version else previous_before
        _end(engine, intent_id, "moving", version=version, replaced_version=current)
    except GateStale as exc:
        _end(engine, intent_id, "stale", str(exc))
        raise
    except BaseException as exc:
        _end(engine, intent_id, "failed", f"{type(exc).__name__}: {exc}")
        raise
    return _apply(client, engine, model, intent_id, lambda: _set_aliases(client, model, version, new_previous),
                  production=current, previous=previous_before, version=version)


def _apply(client: "MlflowClient", engine: Engine, model: str, intent_id: int, change: Any, *,
           production: str | None, previous: str | None, version: str) -> PromotionRecord:
    """Make the alias change an intent decided (undone if it fails half-way), then write its audit record."""
    try:
        change()
    except BaseException as exc:
        _undo(client, engine, model, intent_id, production, previous, exc)
        raise
    with Session(engine) as session:
        intent = session.get(PromotionIntent, intent_id)
    assert intent is not None
    return _confirm(engine, intent, version, production)


def _undo(client: "MlflowClient", engine: Engine, model: str, intent_id: int, production: str | None,
          previous: str | None, exc: BaseException) -> None:
    """Put back the aliases a half-done move left, so production and the audit trail still agree."""
    try:
        if production is not None:
            _set_aliases(client, model, production, previous)
        _end(engine, intent_id, "failed", f"{type(exc).__name__}: {exc}; undone")
    except Exception as undo:   # the registry is unreachable: reconcile settles it later
        log.error("promotion undo failed; left for reconcile", extra={"model": model, "intent": intent_id,
                                                                     "error": f"{type(undo).__name__}: {undo}"})


def require_reason(action: str, reason: str | None) -> None:
    """A person's move says why: the audit trail is where the next person looks."""
    if not (reason or "").strip():
        raise UsageError(f"mlgate {action} needs --reason TEXT: why, recorded in the audit trail")


def reconcile(client: "MlflowClient", engine: Engine, model: str | None = None,
              older_than: timedelta = INTENT_STALE) -> list[str]:
    """Settle moves whose mover died: production moved → the audit row is written; else abandoned.
    Returns what was done, one line per intent."""
    with Session(engine) as session:
        query = select(PromotionIntent).where(PromotionIntent.state == "moving")
        if model:
            query = query.where(PromotionIntent.model == model)
        intents = [i for i in session.scalars(query) if utc_now() - as_utc(i.created_at) >= older_than]
    done = []
    for intent in intents:
        production = alias_version(client, intent.model, PRODUCTION)
        if intent.action == "retire" and production is None and intent.replaced_version:   # it did happen
            _confirm(engine, intent, "", intent.replaced_version, "confirmed by reconcile")
            done.append(f"{intent.model}: retired; audit row written")
        elif intent.version is not None and production == intent.version and intent.replaced_version != production:
            if intent.action != "rollback" and intent.replaced_version:   # the mover may have died before this
                client.set_registered_model_alias(intent.model, PREVIOUS, intent.replaced_version)
            _confirm(engine, intent, intent.version, intent.replaced_version, "confirmed by reconcile")
            done.append(f"{intent.model}: version {intent.version} is production; audit row written")
        else:
            _end(engine, intent.id, "abandoned", f"reconcile: production is {production}, the move did not happen")
            done.append(f"{intent.model}: intent {intent.id} abandoned (production is {production})")
        log.warning("promotion reconciled", extra={"intent": intent.id, "outcome": done[-1]})
    return done


def promote(client: "MlflowClient", engine: Engine, model: str, version: str, *, reason: str,
            job_id: str | None = None, manual: bool = False, expected_production: Any = UNCHANGED,
            fence: Fence | None = None) -> PromotionRecord:
    """Make `version` production. Automatic promotion requires its gate tag to say passed; with
    `expected_production` (a version, or None for "no production"), only if production still is that
    (else GateStale); with `fence`, only if the fence does not refuse under the lock."""
    if manual:
        require_reason("promote", reason)
    return _move(client, engine, model, str(version), action="manual_promote" if manual else "promote",
                 reason=reason, job_id=job_id, require_passed=not manual, expected_production=expected_production,
                 fence=fence)


def declare(client: "MlflowClient", engine: Engine, model: str, version: str, *, reason: str,
            expected_production: Any = UNCHANGED) -> PromotionRecord:
    """Make `version` production because the deploy file in git says so (triggers/gitops/reconcile.py): audited
    as action `git`. No gate tag is required: the reviewed, merged deploy file is the approval. With
    `expected_production`, only over that (GateStale otherwise: another replica's reconciler moved it)."""
    return _move(client, engine, model, str(version), action="git", reason=reason, job_id=None,
                 require_passed=False, expected_production=expected_production)


def set_staging(client: "MlflowClient", engine: Engine, model: str, version: str, *, reason: str) -> PromotionRecord:
    """Point `@staging` at `version` (git declares it), audited as action `stage`."""
    replaced = alias_version(client, model, STAGING)
    client.set_registered_model_alias(model, STAGING, str(version))   # never under the lock (see the top)
    with locked(engine, model) as session:
        record = PromotionRecord(model=model, action="stage", version=str(version), replaced_version=replaced,
                                 reason=reason, actor=getpass.getuser())
        session.add(record)
        session.flush()
    return record


def rollback(client: "MlflowClient", engine: Engine, model: str, *, reason: str,
             expected_production: Any = UNCHANGED) -> PromotionRecord:
    """Move production back to `@previous` (with `expected_production`, only if production still is that)."""
    require_reason("rollback", reason)
    return _move(client, engine, model, None, action="rollback", reason=reason, job_id=None,
                 require_passed=False, rollback=True, expected_production=expected_production)


def retire(client: "MlflowClient", engine: Engine, model: str, *, reason: str) -> PromotionRecord:
    """Take `@production` away (audited, action "retire"): the next job runs with nothing in production. The
    retired version becomes `@previous`, so `mlgate rollback` can bring it back."""
    require_reason("retire", reason)
    intent_id = _begin(engine, client, model, "retire", None, reason, None, None)
    try:
        current = alias_version(client, model, PRODUCTION)
        previous_before = alias_version(client, model, PREVIOUS)
        if current is None:
            raise UsageError(f"cannot retire {model}: nothing is in production")
        _end(engine, intent_id, "moving", replaced_version=current)
    except BaseException as exc:
        _end(engine, intent_id, "failed", f"{type(exc).__name__}: {exc}")
        raise

    def take_away() -> None:
        client.delete_registered_model_alias(model, PRODUCTION)
        client.set_registered_model_alias(model, PREVIOUS, current)

    # no version is in production now: the record's version is empty, the retired one is what it replaced
    return _apply(client, engine, model, intent_id, take_away, production=current, previous=previous_before,
                  version="")


def version_contract(model: str, version: str, dest: Path) -> dict[str, Any]:
    """A registered version's data contract (its MLmodel `mlgate` metadata), downloading the MLmodel file only."""
    import mlflow

    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model}/{version}/MLmodel", dst_path=str(dest))
    return read_contract(Path(local))


def version_rows(client: "MlflowClient", model: str) -> list[dict[str, Any]]:
    """Each registered version of `model`, oldest first: its alias, gate verdict, logged test accuracy and data
    contract (what `mlgate versions` lists). A version whose files or run are gone still lists, saying so."""
    import tempfile

    state = alias_state(client, model)
    aliases = {v: name for v, name in ((state.previous, PREVIOUS), (state.production, PRODUCTION)) if v}
    found = sorted(client.search_model_versions(f"name = '{model}'"), key=lambda v: int(v.version))
    with tempfile.TemporaryDirectory() as scratch:
        return [_version_row(client, model, mv, aliases.get(str(mv.version)), Path(scratch)) for mv in found]


def _version_row(client: "MlflowClient", model: str, mv: Any, alias: str | None, scratch: Path) -> dict[str, Any]:
    from automation.errors import one_line
    from automation.gate import contract_text

    version = str(mv.version)
    try:   # the MLmodel file only, not the model
        contract: dict[str, Any] | None = version_contract(model, version, scratch / version)
        signature = contract_text(contract) if contract else "no mlgate contract recorded"
    except Exception as exc:   # its artifacts are gone: it still lists
        contract, signature = None, f"unreadable ({one_line(f'{type(exc).__name__}: {exc}', 160)})"
    try:
        accuracy = client.get_run(mv.run_id).data.metrics.get("test_accuracy") if mv.run_id else None
    except Exception:   # the run was deleted: the version lists without it
        accuracy = None
    return {"version": version, "alias": alias, "gate": mv.tags.get(GATE_TAG), "accuracy": accuracy,
            "signature": signature, "contract": contract}


def read_contract(mlmodel: Path) -> dict[str, Any]:
    """The `mlgate` metadata of an MLmodel file; {} for a version logged without it."""
    import yaml

    metadata = (yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}).get("metadata") or {}
    return dict(metadata.get("mlgate") or {})


def audit_trail(engine: Engine, model: str | None = None) -> list[PromotionRecord]:
    with Session(engine) as session:
        query = select(PromotionRecord).order_by(PromotionRecord.id)
        if model:
            query = query.where(PromotionRecord.model == model)
        return list(session.scalars(query))


def alias_state(client: "MlflowClient", model: str) -> AliasState:
    return AliasState(alias_version(client, model, PRODUCTION), alias_version(client, model, PREVIOUS))
