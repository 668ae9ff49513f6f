"""A worker: claim a job, run it with its executor while heartbeating the lease, record the outcome.

Any number of workers (threads of `mlgate serve`, `mlgate worker` processes, replicas) can share
one database: `queue.claim` hands each job to exactly one of them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from automation.config import MlgateConfig
from triggers.jobs import queue
from triggers.github.job_reporters import JobReporter
from triggers.jobs.executors import Executor, Outcome


log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    SWEEP_SECONDS = 60.0

    def __init__(self, config: MlgateConfig, engine: Engine, executor: Executor, worker_id: str | None = None,
                 reporter: JobReporter | None = None) -> None:
        self.config, self.engine, self.executor = config, engine, executor
        self.worker_id = worker_id or worker_name()
        self.reporter = reporter
        self._last_sweep = 0.0
        self.lease = config.service.lease_seconds
        self._stop = threading.Event()
        self._running: dict[str, threading.Event] = {}   # job id → its `lost` event

    def stop(self) -> None:
        """Stop claiming; the running job goes on to its end."""
        self._stop.set()

    def preempt(self) -> None:
        """This worker's machine is going away: stop claiming, and stop the running job the way a spot notice
        does (SIGTERM: it checkpoints and exits 75), so it is requeued as preempted and resumes elsewhere."""
        self._stop.set()
        for lost in list(self._running.values()):
            lost.set()

    def _heartbeat(self, job: queue.Job, lost: threading.Event, done: threading.Event,
                   timed_out: threading.Event, lease_lost: threading.Event) -> None:
        """Renew the lease every quarter lease. A renewal that fails is retried every tenth of a lease; once
        half the lease has gone unrenewed the job is stopped, well before another worker may claim it, and
        its promotion is fenced anyway. Past `service.job_timeout_minutes` the job is stopped too."""
        started = last_renewed = time.monotonic()
        timeout = self.config.service.job_timeout_minutes * 60
        interval = self.lease / 4
        while not done.wait(interval):
            if time.monotonic() - started > timeout:
                timed_out.set()
                lost.set()
                return
            try:
                renewed = queue.heartbeat(self.engine, job.id, self.worker_id, self.lease)
            except Exception as exc:
                if time.monotonic() - last_renewed > self.lease / 2:
                    log.error("lease not renewed for half its length; stopping the job",
                              extra={"job_id": job.id, "error": f"{type(exc).__name__}: {exc}"})
                    lease_lost.set()
                    lost.lease_lost = True   # type: ignore[attr-defined]   # the executor kills at once
                    lost.set()
                    return
                log.warning("heartbeat failed; retrying", extra={"job_id": job.id, "error": type(exc).__name__})
                interval = self.lease / 10
                continue
            if not renewed:   # cancelled (a graceful stop), or recovered by another worker after a stall
                lease_lost.set()
                lost.set()
                return
            last_renewed, interval = time.monotonic(), self.lease / 4
            self._report("progress", lambda: self.reporter.progress(job))   # type: ignore[union-attr]

    def run_one(self) -> queue.Job | None:
        """Claim and run one job; None when nothing was claimable."""
        job = queue.claim(self.engine, self.worker_id, self.lease, self.config.service.max_concurrent_retrains)
        if job is None:
            return None
        self._report("started", lambda: self.reporter.started(job))   # type: ignore[union-attr]
        lost, done, timed_out, lease_lost = threading.Event(), threading.Event(), threading.Event(), threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job, lost, done, timed_out, lease_lost), daemon=True)
        beat.start()
        self._running[job.id] = lost
        try:
            outcome = self.executor.run(job, lost)
        except Exception as exc:   # an executor failure fails this job, never the worker
            log.exception("executor failed", extra={"job_id": job.id})
            outcome = Outcome("failed", {"error": f"{type(exc).__name__}: {exc}"[:2000]})
        finally:
            self._running.pop(job.id, None)
            done.set()
            beat.join()
        if timed_out.is_set():
            minutes = self.config.service.job_timeout_minutes
            outcome = Outcome("failed", {"error": f"timed out after {minutes:g} min (service.job_timeout_minutes); "
                                                  "the job was stopped"})
        if outcome is not None and outcome.state == "preempted" and lease_lost.is_set():
            outcome = None   # its checkpoint stands, but the job is no longer this worker's to requeue
        if outcome is not None and outcome.state == "preempted":
            now = queue.preempt(self.engine, job.id, job.attempts, outcome.fields.get("error", "preempted"),
                                self.config.service.max_preemptions, worker_id=self.worker_id)
            log.warning("job preempted", extra={"job_id": job.id, "model": job.model, "attempt": job.attempts,
                                                "now": now})
        elif outcome is not None and queue.finish(self.engine, job.id, self.worker_id, outcome.state,
                                                  attempt=job.attempts, **outcome.fields):
            log.info("job finished", extra={"job_id": job.id, "model": job.model, "state": outcome.state})
        ended = queue.get_job(self.engine, job.id)
        # ended in this attempt, by this worker, the runner's result or a cancellation: not requeued after a lost lease
        if ended is not None and ended.state in queue.FINAL_STATES and ended.attempts == job.attempts:
            self._report("ended", lambda: self.reporter.ended(ended))   # type: ignore[union-attr]
        return job

    def _report(self, what: str, call: Callable[[], Any]) -> None:
        """A report that fails never fails the job or the worker; the sweep posts what is still owed."""
        if self.reporter is None:
            return
        try:
            call()
        except Exception as exc:
            log.error("job report failed", extra={"what": what, "error": f"{type(exc).__name__}: {exc}"})

    def sweep(self) -> None:
        if self.reporter is not None and time.monotonic() - self._last_sweep >= self.SWEEP_SECONDS:
            self._last_sweep = time.monotonic()
            self._report("sweep", self.reporter.sweep)

    def run(self, idle_seconds: float = 1.0) -> None:
        log.info("worker started", extra={"worker": self.worker_id})
        while not self._stop.is_set():
            try:
                if self.run_one() is None:
                    self.sweep()
                    self._stop.wait(idle_seconds)
            except Exception as exc:   # the database went away: keep trying, the queue is durable
                log.error("worker could not reach the queue", extra={"error": f"{type(exc).__name__}: {exc}"})
                self._stop.wait(min(30.0, idle_seconds * 5))
        log.info("worker stopped", extra={"worker": self.worker_id})

