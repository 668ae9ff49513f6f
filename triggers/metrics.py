"""Prometheus metrics. Event counters are per process; job figures are read from the shared
database at scrape time, so every replica reports the same queue."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import Engine

from triggers.jobs import queue

class JobsCollector:
    """Read at scrape time from the shared database, in O(1): the active jobs through the state index, and
    the running totals kept as jobs end (`queue.JobStat`), so every replica reports the same figures."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        active = queue.active_counts(self.engine)
        totals = queue.job_stats(self.engine)
        jobs = GaugeMetricFamily("mlgate_jobs", "Jobs waiting or running, by state", labels=["state"])
        for state in ("queued", "running"):
            jobs.add_metric([state], active.get(state, 0))
        yield jobs
        yield GaugeMetricFamily("mlgate_queue_depth", "Jobs waiting for a worker", value=active.get("queued", 0))
        ended = CounterMetricFamily("mlgate_jobs_ended", "Jobs that ran to an end, by final state", labels=["state"])
        for state in queue.FINAL_STATES:
            ended.add_metric([state], totals.get(f"ended:{state}", 0.0))
        yield ended
        buckets = [(str(b), totals.get(f"seconds_le:{b:g}", 0.0)) for b in queue.DURATION_BUCKETS]
        buckets.append(("+Inf", totals.get("seconds_count", 0.0)))
        yield HistogramMetricFamily("mlgate_job_duration_seconds", "Wall time of ended jobs (started to finished)",
                                    buckets=buckets, sum_value=totals.get("seconds_sum", 0.0))
        yield CounterMetricFamily("mlgate_job_preemptions", "Attempts preempted (checkpointed, requeued to resume)",
                                  value=totals.get("preempted", 0.0))
        for name in queue.COST_STATS:   # what jobs cost, from their summaries' cost sections
            unit = "joules" if "joules" in name else "seconds"
            yield CounterMetricFamily(f"mlgate_job_cost_{name.removesuffix('_' + unit)}_{unit}",
                                      f"Summed over jobs' attempts: {name.replace('_', ' ')}",
                                      value=totals.get(f"cost:{name}", 0.0))


class ServiceMetrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter("mlgate_events", "Events received, by source, type and outcome",
                              ["source", "type", "outcome"], registry=self.registry)
        self.webhook_seconds = Histogram("mlgate_webhook_seconds", "Time to verify, record and enqueue a delivery",
                                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
                                         registry=self.registry)
        self.registry.register(JobsCollector(engine))   # type: ignore[arg-type]
