"""The durable job queue against SQLite and the PostgreSQL server on this machine."""

from __future__ import annotations

import multiprocessing as mp
import time
import uuid
from pathlib import Path

import pytest

from automation.store import open_store
from triggers.jobs import queue

from tests.conftest import clean_tables


@pytest.fixture(autouse=True)
def _empty_tables(db_url: str) -> None:
    clean_tables(db_url)


def test_enqueue_is_idempotent_on_dedupe_key(db_url: str) -> None:
    engine = open_store(db_url)
    first, created = queue.enqueue(engine, model="m", kind="retrain", trigger="push", dedupe_key="delivery-1")
    again, created_again = queue.enqueue(engine, model="m", kind="retrain", trigger="push", dedupe_key="delivery-1")
    assert created and not created_again and again.id == first.id
    assert len(queue.list_jobs(engine)) == 1


def test_newer_pr_push_supersedes_queued_job(db_url: str) -> None:
    engine = open_store(db_url)
    old, _ = queue.enqueue(engine, model="m", kind="evaluate", trigger="pr", pr=7, sha="a", supersede_key="pr:7:m")
    other, _ = queue.enqueue(engine, model="m", kind="evaluate", trigger="pr", pr=8, sha="c", supersede_key="pr:8:m")
    new, _ = queue.enqueue(engine, model="m", kind="evaluate", trigger="pr", pr=7, sha="b", supersede_key="pr:7:m")
    assert queue.get_job(engine, old.id).state == "superseded"
    assert queue.get_job(engine, other.id).state == "queued"
    assert queue.get_job(engine, new.id).state == "queued"


def test_claim_order_and_one_running_job_per_model(db_url: str) -> None:
    engine = open_store(db_url)
    a1, _ = queue.enqueue(engine, model="a", kind="retrain", trigger="push")
    a2, _ = queue.enqueue(engine, model="a", kind="retrain", trigger="drift")
    b1, _ = queue.enqueue(engine, model="b", kind="retrain", trigger="push")
    assert queue.claim(engine, "w1").id == a1.id
    assert queue.claim(engine, "w2").id == b1.id          # a2 waits: model a is busy
    assert queue.claim(engine, "w3") is None
    assert queue.finish(engine, a1.id, "w1", "succeeded", version="3")
    assert queue.claim(engine, "w3").id == a2.id
    done = queue.get_job(engine, a1.id)
    assert done.state == "succeeded" and done.version == "3" and done.attempts == 1 and done.finished_at


def test_expired_lease_is_recovered_then_given_up(db_url: str) -> None:
    engine = open_store(db_url)
    job, _ = queue.enqueue(engine, model="m", kind="retrain", trigger="push", max_attempts=2)
    assert queue.claim(engine, "dead-1", lease_seconds=0.05).id == job.id
    time.sleep(0.1)
    assert not queue.finish(engine, job.id, "someone-else", "succeeded")   # only the owner may finish
    again = queue.claim(engine, "w2", lease_seconds=0.05)                   # recovered and retried
    assert again.id == job.id and again.attempts == 2 and "lost its lease" in again.error
    assert not queue.heartbeat(engine, job.id, "dead-1")                     # the dead worker's lease is gone
    assert queue.heartbeat(engine, job.id, "w2", lease_seconds=0.05)
    time.sleep(0.1)
    assert queue.claim(engine, "w3") is None
    final = queue.get_job(engine, job.id)
    assert final.state == "failed" and "giving up" in final.error


def _claim_all(db_url: str, worker: str, barrier, results) -> None:
    engine = open_store(db_url)
    barrier.wait()
    claimed = []
    while (job := queue.claim(engine, worker)) is not None:
        claimed.append(job.id)
        queue.finish(engine, job.id, worker, "succeeded")
    results.put(claimed)


def test_workers_in_separate_processes_never_claim_the_same_job(db_url: str) -> None:
    engine = open_store(db_url)
    ids = {queue.enqueue(engine, model=f"m{i}", kind="retrain", trigger="push")[0].id for i in range(40)}
    # separate processes, forked from a server that imported what a worker needs once for the session, rather
    # than a fresh interpreter importing it all per worker; each worker still opens its own engine
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["pytest", "sqlalchemy", "automation.store", "triggers.jobs.queue", "tests.conftest"])
    barrier, results = ctx.Barrier(3), ctx.Queue()
    workers = [ctx.Process(target=_claim_all, args=(db_url, f"w{i}-{uuid.uuid4().hex[:4]}", barrier, results))
               for i in range(3)]
    for w in workers:
        w.start()
    claimed = [results.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    flat = [job_id for batch in claimed for job_id in batch]
    assert sorted(flat) == sorted(ids)                    # every job once, none twice
    assert all(j.state == "succeeded" and j.attempts == 1 for j in queue.list_jobs(engine, limit=100))


def test_cap_on_concurrent_retrains_lets_evaluations_through(db_url: str) -> None:
    engine = open_store(db_url)
    for model in ("a", "b", "c"):
        queue.enqueue(engine, model=model, kind="retrain", trigger="drift")
    evaluation, _ = queue.enqueue(engine, model="d", kind="evaluate", trigger="pr", pr=1)
    first = queue.claim(engine, "w1", max_concurrent_retrains=2)
    second = queue.claim(engine, "w2", max_concurrent_retrains=2)
    third = queue.claim(engine, "w3", max_concurrent_retrains=2)
    assert {first.kind, second.kind} == {"retrain"} and third.id == evaluation.id
    assert queue.claim(engine, "w4", max_concurrent_retrains=2) is None     # the third retrain waits
    queue.finish(engine, first.id, "w1", "succeeded")
    assert queue.claim(engine, "w4", max_concurrent_retrains=2).kind == "retrain"


def test_result_reported_by_the_runner_ends_the_job_and_the_worker_lets_go(db_url: str) -> None:
    engine = open_store(db_url)
    job, _ = queue.enqueue(engine, model="m", kind="retrain", trigger="push")
    queue.claim(engine, "dispatcher")
    assert queue.record_result(engine, job.id, "gate_failed", run_id="r1", version="4")
    assert not queue.record_result(engine, job.id, "succeeded")              # a second report changes nothing
    assert not queue.heartbeat(engine, job.id, "dispatcher")                 # the worker sees it is over
    done = queue.get_job(engine, job.id)
    assert (done.state, done.run_id, done.version) == ("gate_failed", "r1", "4")
    other, _ = queue.enqueue(engine, model="n", kind="retrain", trigger="push")
    assert queue.cancel(engine, other.id, "not needed") and queue.get_job(engine, other.id).state == "cancelled"


def test_retention_prunes_what_ended_long_ago_and_keeps_the_rest(db_url: str, tmp_path: Path) -> None:
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import update
    from sqlalchemy.orm import Session

    from tests.conftest import clean_tables
    from triggers.jobs.retention import prune

    clean_tables(db_url)
    engine = open_store(db_url)
    old, _ = queue.enqueue(engine, model="m1", kind="retrain", trigger="push")
    recent, _ = queue.enqueue(engine, model="m2", kind="retrain", trigger="push")
    active, _ = queue.enqueue(engine, model="m3", kind="retrain", trigger="push")
    for job in (old, recent):
        queue.claim(engine, "w")
        queue.finish(engine, job.id, "w", "succeeded")
    long_ago = datetime.now(timezone.utc) - timedelta(days=100)
    with Session(engine) as session, session.begin():
        session.execute(update(queue.Job).where(queue.Job.id.in_([old.id, active.id]))
                        .values(finished_at=long_ago, created_at=long_ago))
    (tmp_path / "reports" / old.id).mkdir(parents=True)
    (tmp_path / "reports" / recent.id).mkdir(parents=True)
    assert prune(engine, tmp_path, days=90)["jobs"] == 1
    assert queue.get_job(engine, old.id) is None and not (tmp_path / "reports" / old.id).exists()
    assert queue.get_job(engine, recent.id) is not None and (tmp_path / "reports" / recent.id).exists()
    assert queue.get_job(engine, active.id).state == "queued"          # never an active job, however old
    # the totals /metrics reads outlive the rows
    assert queue.job_stats(engine)["ended:succeeded"] == 2.0


def test_an_adopted_runner_reports_for_the_attempt_that_adopted_it_and_no_other_credential_does(db_url: str) -> None:
    """A restarted service re-attaches to the runner an earlier attempt started (a Kubernetes Job, a Ray
    submission): that runner's credential, minted for attempt 1, reports for attempt 2. Without adoption, or
    for a credential minted for the adopting attempt itself, nothing is accepted."""
    engine = open_store(db_url)
    job, _ = queue.enqueue(engine, model="m", kind="retrain", trigger="push", max_attempts=3)
    queue.claim(engine, "died", lease_seconds=0.05)
    time.sleep(0.1)
    assert queue.claim(engine, "restarted", lease_seconds=30).attempts == 2
    assert queue.attempt_for_runner(engine, job.id, 1) == 1   # not adopted: attempt 1 is over
    assert not queue.record_result(engine, job.id, "succeeded", attempt=queue.attempt_for_runner(engine, job.id, 1))
    queue.adopt_runner(engine, job.id, 2, 1)
    queue.adopt_runner(engine, job.id, 2, 1)   # idempotent: a second look finds the same runner
    assert queue.runner_origin(engine, job.id, 2) == 1
    assert queue.attempt_for_runner(engine, job.id, 2) == 0   # no runner holds attempt 2's credential
    assert queue.attempt_for_runner(engine, job.id, 1) == 2
    assert queue.record_result(engine, job.id, "succeeded", attempt=queue.attempt_for_runner(engine, job.id, 1))
    assert not queue.record_result(engine, job.id, "failed", attempt=queue.attempt_for_runner(engine, job.id, 1))


def test_a_runner_reporting_before_the_new_attempt_adopted_it_is_told_to_retry(db_url: str) -> None:
    """Between a restarted service's claim and its adoption, the old runner's report is early, not late: 503
    (post_result retries), never the 409 that means "already recorded" and would drop the result."""
    from automation.config import parse_config
    from triggers.jobs.runner_results import RunnerAuthLater, mint_token, runner_attempt

    engine = open_store(db_url)
    config = parse_config("models: {m: {module: models.digits_mlp}}\nservice: {executor: kubernetes}",
                          "mlgate.yaml", Path.cwd())
    job, _ = queue.enqueue(engine, model="m", kind="retrain", trigger="push")
    queue.claim(engine, "died", lease_seconds=0.05)
    time.sleep(0.1)
    queue.claim(engine, "restarted", lease_seconds=30)
    token = f"Bearer {mint_token('s3cret', job.id, 1, 600)}"
    with pytest.raises(RunnerAuthLater):
        runner_attempt(config, engine, "s3cret", token, job.id)
    queue.adopt_runner(engine, job.id, 2, 1)
    assert runner_attempt(config, engine, "s3cret", token, job.id) == 2
