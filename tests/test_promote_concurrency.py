"""Two jobs finishing at once: production must point at a passed version and no audit entry is lost.

Runs against SQLite (the default store) and the PostgreSQL server on this machine, with
real processes racing through `promote()` against a shared MLflow registry.
"""

from __future__ import annotations

import multiprocessing as mp
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

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
