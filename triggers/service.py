"""`mlgate serve`: the HTTP app plus its background loops (delivery planner, Kafka drift
consumer, in-process workers), each a thread whose health `/healthz` reports."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from automation.config import MlgateConfig
from automation.errors import UsageError
from automation.redaction import redact_url
from triggers.app import ServiceState, create_app
from triggers.github.api import GitHubSource
from triggers.metrics import ServiceMetrics

log = logging.getLogger(__name__)


@dataclass
class Loop:
    """A background loop in a daemon thread."""

    name: str
    target: Callable[[], None]
    stop: Callable[[], None]
    thread: threading.Thread | None = field(default=None, init=False)

    def start(self) -> "Loop":
        self.thread = threading.Thread(target=self.target, name=self.name, daemon=True)
        self.thread.start()
        return self

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


def make_executor(config: MlgateConfig, config_path: str | None, engine: Engine) -> Any:
    from triggers.jobs.executors import LocalExecutor
    from triggers.jobs.github_executor import GitHubExecutor

    if config.service.executor == "local":
        return LocalExecutor(config, config_path, engine)
    if config.service.executor == "ray":
        from triggers.jobs.ray_executor import RayExecutor

        return RayExecutor(config, config_path, engine)
    if config.service.executor == "kubernetes":
        from triggers.jobs.kubernetes_executor import executor_from_env

        return executor_from_env(config, config_path, engine)
    repository = os.environ.get("GITHUB_REPOSITORY")
    if not repository or not os.environ.get("GITHUB_TOKEN"):
        raise UsageError("service.executor is 'github' but GITHUB_REPOSITORY or GITHUB_TOKEN is not set",
                         hint="export GITHUB_REPOSITORY=owner/repo and a GITHUB_TOKEN that may dispatch workflows")
    # the runner's credential is a GitHub OIDC token (triggers/jobs/oidc.py): no secret to mint one with
    return GitHubExecutor(config, engine, GitHubSource.from_env(), repository)


def planner_loop(state: ServiceState, github: GitHubSource, stop: threading.Event) -> None:
    from triggers.github.api import GitHubRateLimited
    from triggers.github.job_status import report_unaffected
    from triggers.github.reporter import GitHubReporter
    from triggers.intake.deliveries import plan_pending

    reporter = GitHubReporter.from_env()
    on_planned = report_unaffected(reporter, list(state.config.models)) if reporter else None
    while not stop.is_set():
        try:
            while plan_pending(state.engine, state.config, github, on_planned=on_planned):
                pass
        except GitHubRateLimited as exc:   # parked, not slept on: the deliveries stay pending until GitHub's reset
            park = min(3600.0, max(5.0, exc.retry_at - time.time()))
            log.warning("planning parked by a GitHub rate limit", extra={"error": str(exc), "seconds": round(park)})
            stop.wait(park)
            continue
        except Exception as exc:   # the deliveries stay pending in the database; try again
            log.error("planning deliveries failed", extra={"error": f"{type(exc).__name__}: {exc}"})
        state.planner_wake.wait(5.0)
        state.planner_wake.clear()


def retention_loop(state: ServiceState, stop: threading.Event, every_seconds: float = 3600.0) -> None:
    from triggers.jobs.retention import prune

    while not stop.is_set():
        try:
            prune(state.engine, state.config.workdir, state.config.service.retention_days)
        except Exception as exc:   # the next pass tries again
            log.error("pruning failed", extra={"error": f"{type(exc).__name__}: {exc}"})
        stop.wait(every_seconds)


def build_service(config: MlgateConfig, config_path: str | None, engine: Engine, webhook_secret: str,
                  kafka_bootstrap: str | None) -> tuple[Any, list[Loop]]:
    """The app and its loops (not started)."""
    from triggers.github.job_reporters import job_reporter_from_env
    from triggers.drift.consumer import DriftConsumer
    from triggers.jobs.worker import Worker

    state = ServiceState(config=config, engine=engine, webhook_secret=webhook_secret,
                         metrics=ServiceMetrics(engine), drift_secret=os.environ.get("MLGATE_DRIFT_SECRET", ""),
                         drift_token=os.environ.get("MLGATE_DRIFT_TOKEN", ""),
                         result_secret=os.environ.get("MLGATE_RESULT_SECRET", ""),
                         read_token=os.environ.get("MLGATE_READ_TOKEN", ""))
    app = create_app(state)
    stop_planner = threading.Event()

    def stop_planning() -> None:
        stop_planner.set()
        state.planner_wake.set()

    stop_pruning = threading.Event()
    loops = [Loop("planner", lambda: planner_loop(state, GitHubSource.from_env(), stop_planner), stop_planning),
             Loop("retention", lambda: retention_loop(state, stop_pruning), stop_pruning.set)]
    if kafka_bootstrap:
        def count(outcome: str) -> None:
            state.metrics.events.labels("kafka", "drift", outcome).inc()

        consumer = DriftConsumer(config, engine, kafka_bootstrap, on_decision=count)
        loops.append(Loop("kafka-consumer", consumer.run, consumer.stop))
    from triggers.gitops.loop import GitOpsCollector, gitops_loop

    state.gitops = gitops_loop(config, engine, state.mlflow_client)
    if state.gitops is not None:
        loops.append(Loop("gitops", state.gitops.run, state.gitops.stop))
        state.metrics.registry.register(GitOpsCollector(state.gitops))   # type: ignore[arg-type]
    executor = make_executor(config, config_path, engine) if config.service.workers else None
    reporter = job_reporter_from_env(engine, config.workdir, config.reporting.tracking_issue)
    for i in range(config.service.workers):
        worker = Worker(config, engine, executor, reporter=reporter)
        # stopping the service preempts its running jobs: they checkpoint, and resume once it is back
        loops.append(Loop(f"worker-{i}", worker.run, worker.preempt))
    for loop in loops:
        state.components[loop.name] = loop
    return app, loops


def webhook_secret_from_env() -> str:
    secret = os.environ.get("GITHUB_WEBHOOK_SECRET")
    if not secret:
        raise UsageError("GITHUB_WEBHOOK_SECRET is not set; every webhook would be refused",
                         hint="use the secret configured on the GitHub webhook (Settings → Webhooks)")
    return secret


def repository_from_env() -> str:
    """The one repository whose events plan jobs. Required: a webhook secret shared by an organisation signs
    every repository's events, so an unpinned service would plan jobs for all of them."""
    repository = os.environ.get("GITHUB_REPOSITORY", "").strip()
    if not repository or repository.count("/") != 1:
        raise UsageError("GITHUB_REPOSITORY is not set to owner/repo; the service takes GitHub webhooks and must "
                         "be pinned to one repository",
                         hint="export GITHUB_REPOSITORY=owner/repo (the repository whose webhook this is)")
    return repository


def serve(config: MlgateConfig, config_path: str | None, host: str, port: int) -> None:
    import uvicorn

    from automation import store
    from triggers.jobs import queue, retention  # noqa: F401  (their tables: retention imports every pruned one)
    from triggers.intake import deliveries  # noqa: F401
    from triggers.drift import events  # noqa: F401
    from triggers.serving import rollout  # noqa: F401  (the model cards read serve-model's rollouts)
    from automation import proposals  # noqa: F401
    from triggers.gitops import reconcile  # noqa: F401

    secret = webhook_secret_from_env()
    repository_from_env()
    engine = store.open_store(store.database_url(config.workdir))
    app, loops = build_service(config, config_path, engine, secret, os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))
    for loop in loops:
        loop.start()
    log.info("service started", extra={"host": host, "port": port, "loops": [loop.name for loop in loops],
                                       "database": redact_url(store.database_url(config.workdir))})
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        for loop in loops:
            loop.stop()
        grace = max((m.train.preemption_grace_seconds for m in config.models.values()), default=30.0)
        for loop in loops:   # a preempted job needs its grace period to checkpoint and be requeued
            if loop.name.startswith("worker-") and loop.thread is not None:
                loop.thread.join(grace + 15)
