"""Exactly once under faults: a worker whose database refuses heartbeats stops its job before the lease
runs out, and the job that lost its lease can never promote; promotion is a compare-and-set over the
production the gate saw, a half-done move is undone, and a mover that died is settled by reconcile.
Both databases; a real MLflow registry (SQLite); real jobs where a job is the point."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from sqlalchemy import update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from automation import promote, store, tracking
from automation.config import load_config
from automation.errors import GateStale, MlgateError
from tests.conftest import (clean_tables, fast_config, git_commit, project_files, seed_mlflow_store, wait_for,
                            write_config)
from triggers.jobs import queue
from triggers.jobs.executors import LocalExecutor
from triggers.jobs.worker import Worker


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> MlflowClient:
    """One MLflow registry for the module: each test registers its own model (`versions`: a fresh name)."""
    workdir = tmp_path_factory.mktemp("registry")
    seed_mlflow_store(workdir, mlflow_template)
    return tracking.connect(workdir, "mlgate")[0]


@pytest.fixture
def engine(db_url: str) -> Any:
    clean_tables(db_url)
    return store.open_store(db_url)


def versions(client: MlflowClient, gates: list[str]) -> tuple[str, list[str]]:
    from tests.test_promote_concurrency import _register_versions

    model = f"fenced_{uuid.uuid4().hex[:8]}"
    return model, _register_versions(client, model, gates)


def intents(engine: Any, model: str) -> list[tuple[str, str | None]]:
    with Session(engine) as session:
        return [(i.state, i.version) for i in session.query(promote.PromotionIntent)
                .filter(promote.PromotionIntent.model == model).order_by(promote.PromotionIntent.id)]


def test_a_job_that_lost_its_lease_cannot_promote(registry: MlflowClient, engine: Any) -> None:
    model, (v1, v2) = versions(registry, ["passed", "passed"])
    job, _ = queue.enqueue(engine, model=model, kind="retrain", trigger="push")
    first = queue.claim(engine, "stalled-worker", lease_seconds=600)
    fence = queue.lease_fence(job.id, first.attempts)
    assert promote.promote(registry, engine, model, v1, reason="while it holds the lease", fence=fence)
    with Session(engine) as session, session.begin():   # its heartbeats stopped: the lease ran out
        session.execute(update(queue.Job).where(queue.Job.id == job.id).values(
            lease_expires_at=queue._now() - timedelta(seconds=1)))
    with pytest.raises(MlgateError, match=f"job {job.id} lost its lease"):
        promote.promote(registry, engine, model, v2, reason="too late", fence=fence)
    again = queue.claim(engine, "rescuer", lease_seconds=600)         # recovered and claimed again
    assert again.id == job.id and again.attempts == 2
    with pytest.raises(MlgateError, match="attempt 1 .* is no longer the running one"):
        promote.promote(registry, engine, model, v2, reason="the first attempt wakes up", fence=fence)
    assert promote.alias_state(registry, model).production == v1 and len(promote.audit_trail(engine, model)) == 1
    assert not queue.finish(engine, job.id, "rescuer", "succeeded", attempt=1)   # the old attempt records nothing


def test_promotion_is_a_compare_and_set_over_what_the_gate_saw(registry: MlflowClient, engine: Any) -> None:
    model, (v1, v2, v3) = versions(registry, ["passed", "passed", "passed"])
    promote.promote(registry, engine, model, v1, reason="first", expected_production=None)
    promote.promote(registry, engine, model, v2, reason="second", expected_production=v1)
    # a person rolls back while a job that gated against v2 runs
    promote.rollback(registry, engine, model, reason="v2 misbehaves")
    with pytest.raises(GateStale, match=f"production of {model} is version {v1} now, not {v2}"):
        promote.promote(registry, engine, model, v3, reason="job", expected_production=v2)
    assert promote.alias_state(registry, model).production == v1
    assert [r.action for r in promote.audit_trail(engine, model)] == ["promote", "promote", "rollback"]
    assert intents(engine, model)[-1] == ("stale", v3)


def test_a_half_done_move_is_undone_and_leaves_no_audit_row(registry: MlflowClient, engine: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    model, (v1, v2) = versions(registry, ["passed", "passed"])
    promote.promote(registry, engine, model, v1, reason="first")
    real = registry.set_registered_model_alias
    failures = iter([True])

    def registry_dies_after_production(name: str, alias: str, version: str) -> None:
        if alias == promote.PREVIOUS and next(failures, False):
            raise ConnectionError("MLflow went away between the two alias moves")
        real(name, alias, version)

    monkeypatch.setattr(registry, "set_registered_model_alias", registry_dies_after_production)
    with pytest.raises(ConnectionError):
        promote.promote(registry, engine, model, v2, reason="job")
    assert promote.alias_state(registry, model).production == v1             # undone
    assert len(promote.audit_trail(engine, model)) == 1 and intents(engine, model)[-1][0] == "failed"


def test_reconcile_settles_a_mover_that_died_mid_promotion(registry: MlflowClient, engine: Any) -> None:
    model, (v1, v2, v3) = versions(registry, ["passed", "passed", "passed"])
    promote.promote(registry, engine, model, v1, reason="first")
    # a mover recorded its intent and moved production, then was killed before confirming
    intent = promote._begin(engine, registry, model, "promote", v2, "killed mid-promotion", "job-x", None)
    promote._end(engine, intent, "moving", version=v2, replaced_version=v1)
    registry.set_registered_model_alias(model, promote.PRODUCTION, v2)
    # another waited for it; its own move of the model goes through once the dead one is settled
    assert promote.reconcile(registry, engine, model, older_than=timedelta(0)) == [
        f"{model}: version {v2} is production; audit row written"]
    trail = promote.audit_trail(engine, model)
    assert [(r.version, r.replaced_version, r.job_id) for r in trail] == [(v1, None, None), (v2, v1, "job-x")]
    assert promote.alias_state(registry, model).previous == v1
    # one that died before moving anything is abandoned: no audit row
    dead = promote._begin(engine, registry, model, "promote", v3, "killed before moving", "job-y", None)
    promote._end(engine, dead, "moving", version=v3, replaced_version=v2)
    assert promote.reconcile(registry, engine, model, older_than=timedelta(0))[0].endswith("abandoned (production is "
                                                                                          f"{v2})")
    assert len(promote.audit_trail(engine, model)) == 2 and intents(engine, model)[-1] == ("abandoned", v3)


def job_processes() -> list[Any]:
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "--job-id" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_a_database_that_refuses_heartbeats_causes_no_double_run(tmp_path: Path, db_url: str,
                                                                 monkeypatch: pytest.MonkeyPatch, mlflow_template: Path,
                                                                 single_threaded_jobs: None) -> None:
    """Worker A's heartbeats fail (its database connection is refused) for longer than the lease. A must stop
    its job before the lease runs out; B recovers the job and runs it once more; exactly one promotion."""
    clean_tables(db_url)
    config = fast_config(epochs=20, lean=True)   # a job far longer than the lease
    config["service"] = {"lease_seconds": 6, "max_attempts": 3}
    path = write_config(tmp_path, config)
    commit = git_commit(tmp_path, project_files("models"), "the service's repository")
    seed_mlflow_store(tmp_path / "state", mlflow_template)   # after the commit: the store is not part of it
    monkeypatch.setenv("MLGATE_DATABASE_URL", db_url)
    loaded = load_config(path)
    engine = store.open_store(db_url)
    job, _ = queue.enqueue(engine, model="digits_mlp", kind="retrain", trigger="push", sha=commit)
    real_heartbeat = queue.heartbeat

    def refused_for_a(engine: Any, job_id: str, worker_id: str, lease_seconds: float = 60.0) -> bool:
        if worker_id == "A":
            raise OperationalError("UPDATE jobs …", {}, ConnectionRefusedError("connection refused"))
        return real_heartbeat(engine, job_id, worker_id, lease_seconds)

    monkeypatch.setattr(queue, "heartbeat", refused_for_a)
    a = Worker(loaded, engine, LocalExecutor(loaded, str(path)), worker_id="A")
    finished = threading.Event()
    thread = threading.Thread(target=lambda: (a.run_one(), finished.set()), daemon=True)
    claimed = time.monotonic()
    thread.start()
    assert wait_for(lambda: bool(job_processes()), 60), "worker A never started the job"
    assert wait_for(lambda: not job_processes(), 60, interval=0.05), "worker A never stopped the job it could not keep"
    stopped_after = time.monotonic() - claimed
    assert stopped_after < loaded.service.lease_seconds, stopped_after    # before anyone else could claim it
    assert wait_for(finished.is_set, 60)
    assert queue.get_job(engine, job.id).state == "running"                # not A's to record anymore
    b = Worker(loaded, engine, LocalExecutor(loaded, str(path)), worker_id="B")
    assert wait_for(lambda: b.run_one() is not None, 30, interval=0.5)
    done = queue.get_job(engine, job.id)
    assert done.state == "succeeded" and done.attempts == 2 and done.worker_id == "B", done.as_dict()
    # one promotion (the audit table outlives tests on PostgreSQL: only this job's rows count)
    assert [r.version for r in promote.audit_trail(engine, "digits_mlp") if r.job_id == job.id] == ["1"]
    client = MlflowClient(tracking.tracking_uri(loaded.workdir), tracking.tracking_uri(loaded.workdir))
    assert [str(v.version) for v in client.search_model_versions("name='digits_mlp'")] == ["1"]   # A never got there
