"""The SQL store (SQLAlchemy): SQLite file by default, PostgreSQL via MLGATE_DATABASE_URL."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Connection, Engine, String, create_engine, event, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


class Base(DeclarativeBase):
    pass


class NamedLock(Base):
    """One row per lock name; holding it = holding a row lock inside an open transaction."""

    __tablename__ = "locks"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)


_KNOWN_LOCKS: set[tuple[object, str]] = set()   # lock rows known to exist: skip the insert attempt
_SQLITE_WRITERS: dict[object, threading.RLock] = {}


def _ensure_lock_row(engine: Engine, name: str) -> None:
    if (engine.url, name) not in _KNOWN_LOCKS:
        try:
            with Session(engine) as session, session.begin():
                session.add(NamedLock(name=name))
        except IntegrityError:
            pass   # the row exists already; that is all we needed
        _KNOWN_LOCKS.add((engine.url, name))


@contextmanager
def _one_writer_per_process(engine: Engine) -> Iterator[None]:
    """SQLite: threads queue on a lock instead of SQLite's sleeping busy handler (long tail latency)."""
    if engine.dialect.name != "sqlite":
        yield
        return
    with _SQLITE_WRITERS.setdefault(engine.url, threading.RLock()):
        yield


@contextmanager
def locked(engine: Engine, name: str) -> Iterator[Session]:
    """An ORM transaction holding the lock `name`; commits on success, rolls back on any error.

    PostgreSQL: SELECT … FOR UPDATE on the lock row. SQLite: the transaction began with
    BEGIN IMMEDIATE (see make_engine), which already excludes every other writer.
    """
    _ensure_lock_row(engine, name)
    with _one_writer_per_process(engine), Session(engine, expire_on_commit=False) as session, session.begin():
        session.execute(select(NamedLock).where(NamedLock.name == name).with_for_update())
        yield session


@contextmanager
def locked_connection(engine: Engine, name: str) -> Iterator[Connection]:
    """`locked` for Core statements: the hot paths (webhook intake) skip the ORM's per-row cost."""
    _ensure_lock_row(engine, name)
    with _one_writer_per_process(engine), engine.begin() as conn:
        if engine.dialect.name != "sqlite":   # SQLite's BEGIN IMMEDIATE already excludes every writer
            conn.execute(select(NamedLock.name).where(NamedLock.name == name).with_for_update())
        yield conn



def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(moment: datetime) -> datetime:
    """A stored time as UTC: SQLite hands back naive datetimes for what was written aware."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def database_url(workdir: Path) -> str:
    return os.environ.get("MLGATE_DATABASE_URL") or f"sqlite:///{(workdir / 'mlgate.db').resolve()}"


@lru_cache(maxsize=8)
def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None      # let SQLAlchemy's BEGIN below be the only one
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
            dbapi_conn.execute("PRAGMA busy_timeout=30000")

        @event.listens_for(engine, "begin")
        def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
            # take the write lock at BEGIN, so read-then-write transactions serialize
            # instead of failing with "database is locked" on upgrade
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        engine = create_engine(url, pool_pre_ping=True)
    return engine


def open_store(url: str) -> Engine:
    """The engine, with every table whose module is imported created if missing.

    Callers import the module that defines their tables (promote, queue) before calling,
    which they must anyway to use it; create_all is idempotent.
    """
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    return engine
