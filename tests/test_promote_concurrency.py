"""Two jobs finishing at once: production must point at a passed version and no audit entry is lost.

Runs against SQLite (the default store) and the PostgreSQL server on this machine, with
real processes racing through `promote()` against a shared MLflow registry.
"""

from __future__ import annotations

import multiprocessing as mp
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from mlflow import MlflowClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from automation import promote, store, tracking
from tests.conftest import seed_mlflow_store


def _register_versions(client: MlflowClient, model: str, gates: list[str]) -> list[str]:
    client.create_registered_model(model)
    versions = []
    for verdict in gates:
        mv = client.create_model_version(model, source="file:///nonexistent/model")
        client.set_model_version_tag(model, mv.version, promote.GATE_TAG, verdict)
        versions.append(str(mv.version))
    return versions


# what a racer imports, preloaded by the fork server (by names it can import: it does not get pytest's sys.path)
RACER_IMPORTS = ["pytest", "mlflow", "mlflow.store.tracking.sqlalchemy_store",
                 "mlflow.store.model_registry.sqlalchemy_store", "automation.promote", "automation.store",
                 "automation.tracking", "tests.conftest"]


def _promote_worker(workdir: str, db_url: str, model: str, version: str, barrier, results) -> None:
    import os

    os.environ["MLGATE_DATABASE_URL"] = db_url
    client, _ = tracking.connect(Path(workdir), "mlgate")
    engine = store.open_store(db_url)
    barrier.wait()
    try:
        record = promote.promote(client, engine, model, version, reason="race", job_id=f"job-{version}")
        results.put(("ok", version, record.replaced_version))
    except Exception as exc:  # reported to the parent, which asserts on it
        results.put(("error", version, str(exc)))


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Path:
    """One MLflow registry (SQLite) for the module: each race registers its own model, under a fresh name."""
    workdir = tmp_path_factory.mktemp("registry")
    seed_mlflow_store(workdir, mlflow_template)
    return workdir


@pytest.mark.parametrize("attempt", range(3))
def test_concurrent_promotions_serialize(registry_dir: Path, db_url: str, attempt: int) -> None:
    client, _ = tracking.connect(registry_dir, "mlgate")
    model = f"race_{uuid.uuid4().hex[:8]}"
    v1, v2, v3, failed = _register_versions(client, model, ["passed", "passed", "passed", "failed"])
    engine = store.open_store(db_url)
    promote.promote(client, engine, model, v1, reason="initial")

    # separate processes, forked from a server that imported MLflow once for the session rather than a fresh
    # interpreter importing it per racer; each racer still opens its own store and connections
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(RACER_IMPORTS)
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_promote_worker, args=(str(registry_dir), db_url, model, v, barrier, results))
             for v in (v2, v3, failed)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)

    assert [o[:2] for o in outcomes] == [("error", failed), ("ok", v2), ("ok", v3)]
    assert "did not pass its gate" in outcomes[0][2]
    trail = promote.audit_trail(engine, model)
    assert len(trail) == 3                                   # initial + both racers, none lost
    first, second = trail[1], trail[2]
    # serialized: each racer saw the state the other left behind
    assert first.replaced_version == v1 and second.replaced_version == first.version
    state = promote.alias_state(client, model)
    assert state.production == second.version and state.previous == first.version
    assert client.get_model_version(model, state.production).tags[promote.GATE_TAG] == "passed"


def test_retire_is_an_audited_move_that_rollback_undoes(registry_dir: Path, db_url: str) -> None:
    from automation.errors import UsageError

    client, _ = tracking.connect(registry_dir, "mlgate")
    model = f"retire_{uuid.uuid4().hex[:8]}"
    v1, v2 = _register_versions(client, model, ["passed", "passed"])
    engine = store.open_store(db_url)
    promote.promote(client, engine, model, v1, reason="initial")
    promote.promote(client, engine, model, v2, reason="next")

    with pytest.raises(UsageError, match="mlgate retire needs --reason TEXT"):
        promote.retire(client, engine, model, reason=" ")
    record = promote.retire(client, engine, model, reason="wrong input layout")
    assert (record.action, record.version, record.replaced_version) == ("retire", "", v2)
    assert promote.alias_state(client, model) == promote.AliasState(None, v2)   # production gone, v2 kept
    with pytest.raises(UsageError, match="nothing is in production"):
        promote.retire(client, engine, model, reason="again")

    back = promote.rollback(client, engine, model, reason="it was fine")
    assert back.version == v2 and promote.alias_state(client, model).production == v2
    assert [r.action for r in promote.audit_trail(engine, model)] == ["promote", "promote", "retire", "rollback"]
    # every intent ended: the refused retire too, so the next mover does not wait on it
    with Session(engine) as session:
        states = session.scalars(select(promote.PromotionIntent.state)
                                 .where(promote.PromotionIntent.model == model)).all()
    assert sorted(states) == ["done"] * 4 + ["failed"]


def test_reconcile_settles_a_retire_whose_mover_died(registry_dir: Path, db_url: str) -> None:
    client, _ = tracking.connect(registry_dir, "mlgate")
    model = f"retire_{uuid.uuid4().hex[:8]}"
    (v1,) = _register_versions(client, model, ["passed"])
    engine = store.open_store(db_url)
    promote.promote(client, engine, model, v1, reason="initial")

    # a retire that died before moving anything: abandoned, production stays
    unmoved = promote._begin(engine, client, model, "retire", None, "died early", None, None)
    promote._end(engine, unmoved, "moving", replaced_version=v1)
    assert promote.reconcile(client, engine, model, older_than=timedelta(0)) == [
        f"{model}: intent {unmoved} abandoned (production is {v1})"]
    # one that died after removing the alias: its audit row is written
    died = promote._begin(engine, client, model, "retire", None, "died late", None, None)
    promote._end(engine, died, "moving", replaced_version=v1)
    client.delete_registered_model_alias(model, promote.PRODUCTION)
    assert promote.reconcile(client, engine, model, older_than=timedelta(0)) == [f"{model}: retired; audit row written"]
    last = promote.audit_trail(engine, model)[-1]
    assert (last.action, last.version, last.replaced_version, last.reason) == ("retire", "", v1, "died late")


def test_a_retire_that_fails_half_way_is_undone(registry_dir: Path, db_url: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    client, _ = tracking.connect(registry_dir, "mlgate")
    model = f"retire_{uuid.uuid4().hex[:8]}"
    (v1,) = _register_versions(client, model, ["passed"])
    engine = store.open_store(db_url)
    promote.promote(client, engine, model, v1, reason="initial")
    set_alias = client.set_registered_model_alias

    def registry_fails_on_previous(name: str, alias: str, version: str) -> None:
        if alias == promote.PREVIOUS:
            raise RuntimeError("registry unavailable")
        set_alias(name, alias, version)

    monkeypatch.setattr(client, "set_registered_model_alias", registry_fails_on_previous)
    with pytest.raises(RuntimeError, match="registry unavailable"):
        promote.retire(client, engine, model, reason="bad layout")
    assert promote.alias_state(client, model).production == v1   # put back: production and the trail agree
    assert [r.action for r in promote.audit_trail(engine, model)] == ["promote"]
    with Session(engine) as session:
        intent = session.scalars(select(promote.PromotionIntent).where(promote.PromotionIntent.model == model)
                                 .order_by(promote.PromotionIntent.id.desc())).first()
    assert intent is not None and intent.state == "failed" and intent.detail.endswith("; undone")
