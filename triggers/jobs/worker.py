"""A worker: claim a job, run it with its executor while heartbeating the lease, record the outcome.

Any number of workers (threads of `mlgate serve`, `mlgate worker` processes, replicas) can share
one database: `queue.claim` hands each job to exactly one of them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable

from sqlalchemy import Engine

from automation.config import MlgateConfig
from triggers.jobs import queue
from triggers.jobs.executors import Executor, Outcome

log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(self, config: MlgateConfig, engine: Engine, executor: Executor, worker_id: str | None = None,
                 on_finish: Callable[[queue.Job, Outcome], None] | None = None) -> None:
        self.config, self.engine, self.executor = config, engine, executor
        self.worker_id = worker_id or worker_name()
        self.on_finish = on_finish
        self.lease = config.service.lease_seconds
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def _heartbeat(self, job_id: str, lost: threading.Event, done: threading.Event) -> None:
        while not done.wait(self.lease / 4):
            if not queue.heartbeat(self.engine, job_id, self.worker_id, self.lease):
                lost.set()   # cancelled, or recovered by another worker after a stall
                return

    def run_one(self) -> queue.Job | None:
        """Claim and run one job; None when nothing was claimable."""
        job = queue.claim(self.engine, self.worker_id, self.lease, self.config.service.max_concurrent_retrains)
        if job is None:
            return None
        lost, done = threading.Event(), threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job.id, lost, done), daemon=True)
        beat.start()
        try:
            outcome = self.executor.run(job, lost)
        except Exception as exc:   # an executor failure fails this job, never the worker
            log.exception("executor failed", extra={"job_id": job.id})
            outcome = Outcome("failed", {"error": f"{type(exc).__name__}: {exc}"[:2000]})
        finally:
            done.set()
            beat.join()
        if outcome is not None and queue.finish(self.engine, job.id, self.worker_id, outcome.state, **outcome.fields):
            log.info("job finished", extra={"job_id": job.id, "model": job.model, "state": outcome.state})
            if self.on_finish:
                self.on_finish(job, outcome)
        return job

    def run(self, idle_seconds: float = 1.0) -> None:
        log.info("worker started", extra={"worker": self.worker_id})
        while not self._stop.is_set():
            try:
                if self.run_one() is None:
                    self._stop.wait(idle_seconds)
            except Exception as exc:   # the database went away: keep trying, the queue is durable
                log.error("worker could not reach the queue", extra={"error": f"{type(exc).__name__}: {exc}"})
                self._stop.wait(min(30.0, idle_seconds * 5))
        log.info("worker stopped", extra={"worker": self.worker_id})

