"""Prometheus metrics. Event counters are per process; job figures are read from the shared
database at scrape time, so every replica reports the same queue."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from triggers.jobs.queue import FINAL_STATES, Job

STATES = ("queued", "running", *FINAL_STATES)
DURATION_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)


class JobsCollector:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        with Session(self.engine) as session:
            counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            durations = [(f - s).total_seconds() for s, f in session.execute(
                select(Job.started_at, Job.finished_at).where(Job.started_at.is_not(None),
                                                              Job.finished_at.is_not(None))).all()]
        jobs = GaugeMetricFamily("mlgate_jobs", "Jobs by state", labels=["state"])
        for state in STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        yield GaugeMetricFamily("mlgate_queue_depth", "Jobs waiting for a worker", value=counts.get("queued", 0))
        buckets, total = [], 0
        for bound in DURATION_BUCKETS:
            buckets.append((str(bound), sum(d <= bound for d in durations)))
        buckets.append(("+Inf", len(durations)))
        total = sum(durations)
        yield HistogramMetricFamily("mlgate_job_duration_seconds", "Wall time of finished jobs (started to finished)",
                                    buckets=buckets, sum_value=total)


class ServiceMetrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter("mlgate_events", "Events received, by source, type and outcome",
                              ["source", "type", "outcome"], registry=self.registry)
        self.webhook_seconds = Histogram("mlgate_webhook_seconds", "Time to verify, record and enqueue a delivery",
                                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
                                         registry=self.registry)
        self.registry.register(JobsCollector(engine))   # type: ignore[arg-type]
