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


def _register_versions(client: MlflowClient, model: str, gates: list[str]) -> list[str]:
    client.create_registered_model(model)
    versions = []
    for verdict in gates:
        mv = client.create_model_version(model, source="file:///nonexistent/model")
        client.set_model_version_tag(model, mv.version, promote.GATE_TAG, verdict)
        versions.append(str(mv.version))
    return versions


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


@pytest.mark.parametrize("attempt", range(3))
def test_concurrent_promotions_serialize(tmp_path: Path, db_url: str, attempt: int) -> None:
    client, _ = tracking.connect(tmp_path, "mlgate")
    model = f"race_{uuid.uuid4().hex[:8]}"
    v1, v2, v3, failed = _register_versions(client, model, ["passed", "passed", "passed", "failed"])
    engine = store.open_store(db_url)
    promote.promote(client, engine, model, v1, reason="initial")

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_promote_worker, args=(str(tmp_path), db_url, model, v, barrier, results))
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
