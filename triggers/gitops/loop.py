"""The service's GitOps loop: publish proposed deploy-file changes, then reconcile the registry with git.

It reconciles on every push webhook the replica receives (the intake route wakes it; the registry is shared, so
one replica's pass is enough), after publishing a change, and every `service.gitops.reconcile_seconds`. Each new
head gets one `mlgate/deploy` verdict on its commit: success with what is declared, or failure with one line per
refused file.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import Engine

from automation.config import MlgateConfig
from triggers.gitops.publish import GitHubTarget, Publisher
from triggers.gitops.reconcile import Reconciled, Reconciler, git_models, summary_text

log = logging.getLogger(__name__)
PROPOSAL_POLL_SECONDS = 2.0


def held_rollbacks(engine: Engine) -> Callable[[str, str], str | None]:
    """(model, stage) -> the version an open rollback proposal names: serving moved there, git will follow."""
    from automation import proposals

    def held(model: str, stage: str) -> str | None:
        found = [p for p in proposals.open_proposals(engine, model) if p.stage == stage and p.kind == "rollback"]
        return found[-1].version if found else None

    return held


class GitOpsLoop:
    def __init__(self, config: MlgateConfig, engine: Engine, repo: Path, client: Callable[[], Any],
                 github: GitHubTarget | None) -> None:
        self.config, self.github = config, github
        self.reconciler = Reconciler(config, repo, engine, client, held=held_rollbacks(engine))
        self.publisher = Publisher(config, repo, engine, github)
        self.wake = threading.Event()
        self._stop = threading.Event()
        self.reconciles = 0
        # (model, stage, outcome) -> drift found (an alias moved outside git), counted once per move
        self.drift_events: dict[tuple[str, str, str], int] = {}
        self._drifted: dict[tuple[str, str], str | None] = {}   # (model, stage) -> the registry's version then
        self.error: str | None = None
        self._reported_head: str | None = None
        self._thread: threading.Thread | None = None

    @property
    def last(self) -> Reconciled | None:
        return self.reconciler.last

    def pass_once(self, reconcile: bool = True) -> tuple[list[str], Reconciled | None]:
        """Publish what is proposed; then, if asked (or anything was published), reconcile."""
        published = self.publisher.run()
        if not (reconcile or published):
            return published, None
        result = self.reconciler.run()
        self.reconciles += 1
        self._count_drift(result)
        self._report(result)
        return published, result

    def _count_drift(self, result: Reconciled) -> None:
        """A restored drift lasts one pass on the gauge (a scrape can miss it): the counter keeps every one.
        A drift left alone (`on_drift: report`) counts once, not once per pass, until the alias moves again."""
        for state in result.states:
            key = (state.model, state.stage)
            if not state.outcome.startswith("drift"):
                self._drifted.pop(key, None)
                continue
            if key in self._drifted and self._drifted[key] == state.registry:
                continue
            self._drifted[key] = None if state.outcome == "drift_restored" else state.registry
            counted = (state.model, state.stage, state.outcome)
            self.drift_events[counted] = self.drift_events.get(counted, 0) + 1

    def run(self) -> None:
        due = 0.0
        while not self._stop.is_set():
            woken = self.wake.is_set()
            self.wake.clear()
            try:
                if self.pass_once(reconcile=woken or time.monotonic() >= due)[1] is not None:
                    due = time.monotonic() + self.config.service.gitops.reconcile_seconds
                self.error = None
            except Exception as exc:   # git or the registry unreachable: production stays; try again
                from automation.redaction import redact

                self.error = redact(f"{type(exc).__name__}: {exc}")[:500]
                log.error("gitops pass failed", extra={"error": self.error})
                due = time.monotonic() + min(30.0, self.config.service.gitops.reconcile_seconds)
            self.wake.wait(PROPOSAL_POLL_SECONDS)

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()

    def _report(self, result: Reconciled) -> None:
        if self.github is None or result.head == self._reported_head:
            return
        title, summary = summary_text(result)
        try:
            self.github.source.commit_verdict(self.github.repository, result.head, "mlgate/deploy", title, summary,
                                              passed=not result.refused)
            self._reported_head = result.head
        except Exception as exc:   # posted again at the next pass
            log.error("deploy verdict not posted", extra={"head": result.head, "error": f"{type(exc).__name__}: {exc}"})

    def view(self) -> dict[str, Any]:
        last = self.last
        return {"models": sorted(git_models(self.config)), "branch": self.config.service.branch,
                "folder": self.config.service.gitops.folder, "reconciles": self.reconciles, "error": self.error,
                "last": None if last is None else last.as_dict()}


class GitOpsCollector:
    """/metrics: drift between git and the registry, refused deploy files, reconcile passes."""

    def __init__(self, loop: GitOpsLoop) -> None:
        self.loop = loop

    def collect(self) -> Iterator[Any]:
        last = self.loop.last
        drift = GaugeMetricFamily("mlgate_gitops_drift", "1 where a registry alias differs from what git declares "
                                  "(moved outside git), by model and stage", labels=["model", "stage"])
        for state in last.states if last else []:
            drift.add_metric([state.model, state.stage], 1.0 if state.outcome.startswith("drift") else 0.0)
        yield drift
        events = CounterMetricFamily("mlgate_gitops_drift_events", "Registry aliases found moved outside git, by "
                                     "model, stage and what was done (drift_restored, drift_reported)",
                                     labels=["model", "stage", "outcome"])
        for (model, stage, outcome), count in sorted(self.loop.drift_events.items()):
            events.add_metric([model, stage, outcome], count)
        yield events
        yield GaugeMetricFamily("mlgate_gitops_refused_files", "Deploy files refused at the tracked branch's head",
                                value=len(last.refused) if last else 0)
        yield CounterMetricFamily("mlgate_gitops_reconciles", "Reconcile passes", value=self.loop.reconciles)
        yield GaugeMetricFamily("mlgate_gitops_last_reconcile_timestamp_seconds", "When the last pass ended",
                                value=last.at if last else 0)


def gitops_loop(config: MlgateConfig, engine: Engine, client: Callable[[], Any]) -> GitOpsLoop | None:
    """The loop, when some model's production is declared in git; None otherwise."""
    import os

    from automation.errors import UsageError
    from triggers.github.api import GitHubSource
    from triggers.jobs.checkout import CheckoutFailed, repository_root

    from automation import proposals  # noqa: F401  (its table)
    from automation.store import Base

    models = git_models(config)
    if not models:
        return None
    Base.metadata.create_all(engine)   # the proposals' and the reconciler's tables
    try:
        repo = repository_root(config.root)
    except CheckoutFailed:
        raise UsageError(f"{', '.join(sorted(models))} promote through git (promotion.mode), but {config.root} is "
                         "not in a git repository", hint="run the service in a clone whose origin is the "
                         "repository; or use promotion.mode: registry") from None
    source = GitHubSource.from_env()
    repository = os.environ.get("GITHUB_REPOSITORY", "").strip()
    github = GitHubTarget(source, repository) if (source.token or source.is_app) and repository.count("/") == 1 \
        else None
    return GitOpsLoop(config, engine, repo, client, github)
