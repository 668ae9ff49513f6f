"""`mlgate serve-model MODEL`: the promoted version of a model behind `POST /predict`.

A watcher follows the `production` alias. When it moves (promotion or rollback) the new version is
downloaded and loaded in the background, checked on a probe batch, and only then swapped in with
one reference assignment: a request uses the model it started with, so none fails or sees a
half-loaded model, and a version that fails its check is never served. A load that fails for any
other reason (the registry or the network) is retried with backoff. `/healthz` is the readiness
probe: 503 while the version served is not production; `/livez` only says the process is up.
Inference runs on inference threads, never on the event loop; so does parsing a body over 16 KB.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI

from automation.config import MlgateConfig
from automation.predictors import RegisteredModel, predict
from automation.redaction import redact
from automation.threads import policy as thread_policy
from triggers.serving import feedback
from triggers.serving.fast_path import InferenceFastPath
from triggers.serving.requests import FEEDBACK_TOKEN_ENV, feedback_enabled

log = logging.getLogger(__name__)

MAX_BATCH = 1024
MAX_RETRY_SECONDS = 300.0   # a version that failed to load for a transient reason is tried again at least this often


class ProbeFailed(ValueError):
    """The version loaded but answers a probe batch wrongly, or its files are not what git declares: it is never
    served (no retry helps)."""


class NotDeclared(ValueError):
    """Git declares another version than the alias names (the reconciler will move one of them): retried."""


def pinned_deploy(config: MlgateConfig, model: str, stage: str = "production") -> Any:
    """The `stage` deploy file git declares for `model` (automation/deploy_file.py): read at the head of
    `service.branch` where the config lives in a clone (fetched from origin), else from the file on disk (an
    image built from the commit). None when there is none."""
    from automation.deploy_file import MAX_DEPLOY_FILE_BYTES, DeployRefused, deploy_path, parse_deploy_file
    from triggers.gitops import git_tree
    from triggers.jobs.checkout import CheckoutFailed, repository_root

    path = deploy_path(config.service.gitops.folder, stage, model)
    try:
        repo = repository_root(config.root)
    except CheckoutFailed:
        on_disk = config.root / path
        text = on_disk.read_bytes() if on_disk.is_file() and not on_disk.is_symlink() else None
    else:
        head = git_tree.branch_head(repo, config.service.branch)
        text = git_tree.file_at(repo, head, path, MAX_DEPLOY_FILE_BYTES)
    if text is None:
        raise NotDeclared(f"{path} declares nothing: no version is served until git declares one")
    try:
        return parse_deploy_file(path, text, config.service.gitops.folder, set(config.models))
    except DeployRefused as exc:
        raise NotDeclared(str(exc)) from None


@dataclass
class Served:
    loaded: RegisteredModel
    since: float
    classes: int = 0   # logits per example, from the probe


@dataclass
class LoadFailure:
    reason: str
    attempts: int
    retry_at: float | None   # None: permanent (the version failed its check)

    def as_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "attempts": self.attempts,
                "retry_in_seconds": None if self.retry_at is None else max(0.0, round(self.retry_at - time.time(), 1))}


class ModelServer:
    """Holds the version being served and swaps it when the production alias moves."""

    def __init__(self, config: MlgateConfig, model: str, poll_seconds: float = 2.0,
                 stage: str = "production") -> None:
        self.config, self.model, self.poll_seconds = config, model, poll_seconds
        # which alias this server follows: `production`, or `staging` (promotion.stages), whose passed rollout
        # proposes the version for production
        self.stage = stage
        self.rollout_key = model if stage == "production" else f"{model}@{stage}"   # rollouts kept apart per stage
        self.current: Served | None = None
        self.production: str | None = None        # where the alias pointed at the last look
        # staged rollout (the model's `rollout:` block): the new version, compared with `current` on live traffic
        self.rollout_config = config.model(model).rollout
        check_rollout_labels(model, self.rollout_config)
        self.candidate: Served | None = None
        self.rollout: Any = None                  # rollout.RolloutView while one runs
        self.tally: Any = None
        self._engine: Any = None
        self.failed: dict[str, LoadFailure] = {}  # version -> why it is not (yet) swapped in
        self.swaps = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mlflow: Any = None
        self._device: Any = None
        # git declares production (promotion.mode): serve only the declared version, with the declared digest
        self.pinned = config.model(model).promotion.mode != "registry"
        self.declared: str | None = None          # the version git declared at the last load
        self._digests: dict[str, str] = {}        # version -> its files' digest, as checked at its load

    def _client(self) -> Any:
        """One MLflow client for the watcher's life (connect checks the store; once is enough)."""
        if self._mlflow is None:
            from automation import tracking

            self._mlflow = tracking.connect(self.config.workdir, self.config.experiment)[0]
        return self._mlflow

    @property
    def device(self) -> Any:
        """Decided once, the same way a job decides it (the model's `device:` block)."""
        if self._device is None:
            from automation.device import select_device

            self._device = select_device(self.config.model(self.model).device)
        return self._device

    def load(self, version: str) -> RegisteredModel:
        """Download, load and check a version (a probe batch must give finite logits of the right shape). Where
        git declares production, only the declared version with the declared digest is loaded."""
        import mlflow

        from automation.predictors import load_downloaded

        pinned = pinned_deploy(self.config, self.model, self.stage) if self.pinned else None
        self.declared = None if pinned is None else pinned.version
        if pinned is not None and pinned.version != version:
            raise NotDeclared(f"the registry's {self.stage} is version {version}, but git declares version "
                              f"{pinned.version}: not served")
        tags = self._client().get_model_version(self.model, version).tags
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{self.model}/{version}",
            dst_path=str(self.config.workdir / "serving" / self.model / f"v{version}")))
        if pinned is not None:
            from automation.deploy_file import artifact_digest

            found = artifact_digest(local)
            if found != pinned.digest:
                raise ProbeFailed(f"version {version}'s files have digest {found[:19]}…, not {pinned.digest[:19]}… "
                                  "as its deploy file declares: the registry changed behind git's back")
            self._digests[version] = found   # what a proposal for it declares, without downloading it again
        # serving's thread policy (automation/threads.py): requests run side by side on the inference threads
        loaded = load_downloaded(local, self.model, version, tags, self.device,
                                 cpu_threads=thread_policy().serve_intra_op)
        logits = predict(loaded.predictor, loaded.network_input(loaded.probe_input(2)))
        if logits.ndim != 2 or logits.shape[0] != 2 or not np.isfinite(logits).all():
            raise ProbeFailed(f"version {version} answers a probe batch with {logits.shape} non-finite or "
                             "misshapen logits")
        if loaded.classes and len(loaded.classes) != logits.shape[1]:   # answers would be named wrongly
            raise ProbeFailed(f"version {version} names {len(loaded.classes)} classes but answers "
                              f"{logits.shape[1]} logits per example")
        return loaded

    def engine(self) -> Any:
        """The job database: where a rollout's stage and counts live, shared by every replica."""
        if self._engine is None:
            from automation import promote, proposals, store  # noqa: F401  (promote, proposals: their tables)
            from triggers.serving import rollout  # noqa: F401  (its tables)

            self._engine = store.open_store(store.database_url(self.config.workdir))
        return self._engine

    def sync(self) -> bool:
        """Serve the version `production` points at now; True when a swap happened."""
        from automation import promote

        target = promote.alias_version(self._client(), self.model, self.stage)
        self.production = target
        if self.candidate is not None and target != self.candidate.loaded.version:
            self.candidate, self.rollout = None, None   # rolled back (here or by another replica), or moved on
        if target is None or (self.current and self.current.loaded.version == target):
            return False
        if self.rollout_config is not None and self.current is not None:
            self._begin_rollout(target)
            return False
        loaded = self._load_checked(target)
        if loaded is None:   # keep serving what works; `failed` says why the new version is not served
            return False
        first = self.current is None
        self._swap_in(loaded, target)
        if first and self.stage == "staging" and self.pinned:   # nothing to compare the first staging version with
            self._propose_production(target, {"analysis": None, "reason": "the first version in staging: no "
                                                                          "earlier version to compare it with"})
        return True

    def _load_checked(self, target: str) -> RegisteredModel | None:
        """The version loaded and checked, or None: it failed its probe (never retried), or failed to load
        for another reason (retried with backoff); `failed` says which and why."""
        failure = self.failed.get(target)
        if failure is not None and (failure.retry_at is None or time.time() < failure.retry_at):
            return None
        try:
            loaded = self.load(target)
        except Exception as exc:
            attempts = failure.attempts + 1 if failure else 1
            delay = min(MAX_RETRY_SECONDS, self.poll_seconds * 2 ** attempts)
            self.failed[target] = LoadFailure(redact(f"{type(exc).__name__}: {exc}")[:500], attempts,
                                              None if isinstance(exc, ProbeFailed) else time.time() + delay)
            log.error("new production version not loaded", extra={
                "model": self.model, "version": target, "error": self.failed[target].reason,
                "retry_in": None if isinstance(exc, ProbeFailed) else delay})
            return None
        self.failed.pop(target, None)
        return loaded

    def _begin_rollout(self, target: str) -> None:
        from triggers.serving import rollout

        if self.candidate is not None and self.candidate.loaded.version == target:
            return
        loaded = self._load_checked(target)
        if loaded is None:
            return
        assert self.current is not None and self.rollout_config is not None
        self.tally = self.tally or rollout.Tally(keep_predictions=feedback_enabled())
        self.rollout = rollout.begin(self.engine(), self.rollout_key, self.current.loaded.version, target,
                                     self.rollout_config)
        self.candidate = Served(loaded, time.time(), self._classes(loaded))
        log.info("rollout started", extra={"model": self.model, "candidate": target,
                                           "baseline": self.current.loaded.version})

    def tick(self) -> None:
        """A running rollout: add this replica's counts, let the stage be judged, act on the verdict."""
        from triggers.serving import rollout

        if self.tally is not None:   # also the last requests of a rollout that just ended
            self.tally.flush(self.engine())
        if self.rollout is None or self.candidate is None or self.rollout_config is None:
            return
        view, failure = rollout.advance(self.engine(), self.rollout.id, self.rollout_config)
        self.rollout = view
        if failure:
            self._roll_back(view, failure)
        elif view.state == "done":
            candidate, self.candidate, self.rollout = self.candidate, None, None
            self._swap_in(candidate.loaded, candidate.loaded.version)
            if self.stage == "staging" and self.pinned:   # the analysis passed: production may be proposed
                self._propose_production(candidate.loaded.version, {"analysis": view.as_dict(),
                                                                    "reason": view.reason})
        elif view.state == "rolled_back":
            self.candidate, self.rollout = None, None

    def _roll_back(self, view: Any, reason: str) -> None:
        from automation import promote
        from automation.errors import GateStale

        self.candidate, self.rollout = None, None
        if self.stage == "staging":   # staging goes back to what it served; production was never proposed
            promote.set_staging(self._client(), self.engine(), self.model, view.baseline, reason=f"rollout: {reason}")
            self._propose(view.baseline, "rollback", view.candidate, rolled_back=f"rollout of v{view.candidate}: "
                                                                                 f"{reason}")
            return
        try:
            record = promote.rollback(self._client(), self.engine(), self.model, reason=f"rollout: {reason}",
                                      expected_production=view.candidate)
        except GateStale:   # production moved meanwhile (another replica, or a person): nothing to undo
            return
        log.warning("rollout failed; production rolled back", extra={
            "model": self.model, "candidate": view.candidate, "production": record.version, "reason": reason})
        if self.pinned:   # git must follow: the service commits (or opens a pull request for) the rollback
            self._propose(record.version, "rollback", view.candidate,
                          rolled_back=f"rollout of v{view.candidate}: {reason}")
        announce_rollback(self.config, self._client(), self.model, view, record, reason)

    def _propose_production(self, version: str, rollout_evidence: dict[str, Any]) -> None:
        """Staging passed: the production deploy file for `version`, carrying the staging evidence."""
        from automation import promote

        production = promote.alias_version(self._client(), self.model, promote.PRODUCTION)
        self._propose(version, "promote", production, stage="production", rollout=rollout_evidence)

    def _propose(self, version: str, kind: str, replaces: str | None, stage: str | None = None,
                 **evidence: Any) -> None:
        """A deploy-file change for git (automation/proposals.py): the service commits it or opens its pull
        request. The version's evidence tag (its job, commit and gate) goes with it."""
        import tempfile

        from automation import proposals
        from automation.deploy_file import DeployFile, Evidence, version_digest

        try:
            digest = self._digests.get(version)
            if digest is None:   # a version this replica never loaded
                with tempfile.TemporaryDirectory(prefix="mlgate-digest-") as scratch:
                    digest = version_digest(self.model, version, Path(scratch))
            tags = self._client().get_model_version(self.model, version).tags
            gated = version_evidence(tags)
            declared = DeployFile(model=self.model, stage=stage or self.stage, version=version, digest=digest,
                                  variant=tags.get("mlgate.variant"),
                                  evidence=Evidence(job_id=gated.get("job_id"), commit=gated.get("commit"),
                                                    trigger=gated.get("trigger"), report=gated.get("report"),
                                                    **evidence))
            proposed = proposals.propose(self.engine(), declared, replaces=replaces, kind=kind,
                                         job_id=gated.get("job_id"))
            log.warning("deploy-file change proposed to git", extra={
                "model": self.model, "stage": declared.stage, "version": version, "kind": kind,
                "proposal": proposed.id})
        except Exception as exc:   # serving already acted; the reconciler reports any difference with git
            log.error("deploy-file change not proposed to git", extra={
                "model": self.model, "error": redact(f"{type(exc).__name__}: {exc}")})

    def _classes(self, loaded: RegisteredModel) -> int:
        return int(predict(loaded.predictor, loaded.network_input(loaded.probe_input(1))).shape[1])

    def _swap_in(self, loaded: RegisteredModel, target: str) -> None:
        previous = self.current.loaded.version if self.current else None
        self.current = Served(loaded, time.time(), self._classes(loaded))   # the swap: one reference assignment
        self.swaps += 1
        log.info("serving new version", extra={"model": self.model, "version": target, "previous": previous,
                                               "variant": loaded.variant})

    def start(self) -> None:
        def watch() -> None:
            while not self._stop.is_set():
                try:
                    self.sync()
                    self.tick()
                except Exception as exc:   # registry unreachable: keep serving, try again
                    log.warning("cannot check the production alias", extra={"error": f"{type(exc).__name__}: {exc}"})
                self._stop.wait(self.poll_seconds)

        self._thread = threading.Thread(target=watch, name="alias-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.tally is not None and self._engine is not None:
            try:   # the last requests' counts and predictions, so labels for them still find them
                self.tally.flush(self._engine)
            except Exception as exc:
                log.warning("last rollout counts not written", extra={"error": f"{type(exc).__name__}: {exc}"})


def announce_rollback(config: MlgateConfig, client: Any, model: str, view: Any, record: Any, reason: str) -> None:
    """A rollback is news: a CloudEvent on `mlgate.rollout` (when Kafka is configured) and a GitHub note
    where the promotion note went (when GitHub is). Neither failing undoes anything."""
    import uuid

    event = {"specversion": "1.0", "type": "mlgate.rollout.rolled_back", "source": f"mlgate/serve-model/{model}",
             "id": uuid.uuid4().hex, "datacontenttype": "application/json",
             "data": {"model": model, "candidate": view.candidate, "production": record.version,
                      "audit_id": record.id, "reason": reason}}
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if bootstrap:
        try:
            from triggers.drift.consumer import publish

            publish(bootstrap, rollout_topic(config.service.kafka.topic), [event])
        except Exception as exc:
            log.error("rollback event not published", extra={"error": f"{type(exc).__name__}: {exc}"})
    from triggers.github.reporter import GitHubReporter

    reporter = GitHubReporter.from_env(config.reporting.tracking_issue)
    if reporter is not None:
        outcomes = reporter.rolled_back(model, view.candidate, record.version, reason, record.id,
                                        commit_of(client, model, view.candidate))
        log.info("rollback reported on github", extra={"outcomes": outcomes})


def rollout_topic(drift_topic: str) -> str:
    """The drift topic's sibling: `mlgate.drift` → `mlgate.rollout`."""
    prefix, dot, _ = drift_topic.rpartition(".")
    return f"{prefix}{dot}rollout"


def version_evidence(tags: dict[str, str]) -> dict[str, Any]:
    """The evidence tag its job put on a version (job id, commit, trigger, report); {} when absent or not JSON."""
    try:
        evidence = json.loads(tags.get("mlgate.evidence") or "{}")
    except ValueError:
        return {}
    return evidence if isinstance(evidence, dict) else {}


def commit_of(client: Any, model: str, version: str) -> str | None:
    """The commit a registered version was trained from (its job's evidence tag), if known."""
    try:
        return version_evidence(client.get_model_version(model, version).tags).get("commit")
    except Exception as exc:   # the note then goes without the commit; nothing else depends on it
        log.warning("commit of version not found", extra={"version": version, "error": f"{type(exc).__name__}: {exc}"})
        return None


def check_rollout_labels(model: str, config: Any) -> None:
    """A stage that waits for labels needs a way for them to come: refused at start, in one line."""
    from automation.errors import UsageError

    if config is not None and any(stage.min_labels for stage in config.stages) and not feedback_enabled():
        raise UsageError(f"models.{model}.rollout: a stage waits for labels (min_labels) but POST /feedback is off: "
                         f"set {FEEDBACK_TOKEN_ENV}")


def create_serving_app(server: ModelServer, inference_log: Any = None, max_batch: int = MAX_BATCH,
                       batch_delay_ms: float | None = None) -> Any:
    """`POST /predict` and the Open Inference Protocol (`/v2/…`), both through one data plane (data_plane.py);
    health, metrics and feedback. With `batch_delay_ms`, concurrent requests are batched together
    (triggers/serving/batching.py) up to `max_batch` examples."""
    from triggers.serving import health, metrics, open_inference, predict_route
    from triggers.serving.data_plane import DataPlane

    app = FastAPI(title=f"mlgate serving: {server.model}")
    plane = DataPlane(server, metrics.ServingMetrics(), inference_log, max_batch, batch_delay_ms)
    app.state.plane, app.state.batchers = plane, plane.batchers
    for router in (predict_route.router, health.router, open_inference.router, metrics.router):
        app.include_router(router)
    feedback.add_route(app, server, max_batch)
    return InferenceFastPath(app, [*predict_route.FAST_ROUTES, *open_inference.FAST_ROUTES])
