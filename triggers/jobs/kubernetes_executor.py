"""The `kubernetes` executor: each attempt of a job is a batch/v1 Job (triggers/jobs/kubernetes_manifests.py),
created with the official client, watched until its runner reports back (`POST /jobs/{id}/result`).

- Kueue: with `service.kubernetes.queue_name` the Job stays suspended until Kueue admits it; meanwhile the
  job's progress (and its check run) says it is queued.
- Preemption is Kubernetes' fact: an evicted pod (`DisruptionTarget`) does not count against backoffLimit;
  the Job's next pod resumes from the checkpoint the evicted one wrote in its grace period.
- A restarted service finds a Job an earlier attempt started still running, by its labels and deterministic
  name, and adopts it (queue.adopt_runner) instead of creating a second one.
- Watching is list-then-watch from the list's resourceVersion; `410 Gone` means list again.
- Cancelling (or the job's time-out) deletes the Job and its pods, each pod given the model's grace period.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import Engine

from automation.config import MlgateConfig
from triggers.jobs import queue
from triggers.jobs.executors import Outcome
from triggers.jobs.job_end import finish_job
from triggers.jobs.kubernetes_manifests import (GRACE_MARGIN_SECONDS, LABEL, Attempt, Phase, build_job,
                                                build_network_policy, exchange_claim, exchange_claim_name,
                                                fetch_job, rendezvous_service, result_secret, trusted_job)
from triggers.jobs.queue import Job, get_job
from triggers.jobs.remote import RunnerEnd, outsider_pr, result_token, wait_for_report

log = logging.getLogger(__name__)
FINISHED = {"Complete": False, "SuccessCriteriaMet": False, "Failed": True, "FailureTarget": True}


def api_client(context: str | None = None) -> Any:
    """In a pod: the pod's service account; elsewhere the kubeconfig (KUBECONFIG, its current or named context)."""
    from kubernetes import client, config

    if os.environ.get("KUBERNETES_SERVICE_HOST") and context is None:
        config.load_incluster_config()
        return client.ApiClient()
    return config.new_client_from_config(context=context)


def job_end(job: dict[str, Any] | None) -> RunnerEnd | None:
    """A finished Job's end from its conditions (None while it runs; a deleted Job has failed)."""
    if job is None:
        return RunnerEnd(True, "its Kubernetes Job was deleted")
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in FINISHED:
            failed = FINISHED[condition["type"]]
            why = ": ".join(p for p in (condition.get("reason"), condition.get("message")) if p)
            return RunnerEnd(failed, f"Kubernetes Job {job['metadata']['name']} "
                                     f"{'failed' if failed else 'completed'}{f' ({why})' if why else ''}")
    return None


def _is_active(job: dict[str, Any]) -> bool:
    return job_end(job) is None and not (job.get("metadata") or {}).get("deletionTimestamp")


class JobWatch:
    """One Job's latest state, kept by list-then-watch on its own thread: a watch starts at the list's
    resourceVersion, ends after `timeout` (the server's, or the client's read timeout), and `410 Gone` (the
    version was compacted away) lists again. `latest` is None once the Job is gone."""

    def __init__(self, batch: Any, namespace: str, name: str, timeout: float) -> None:
        self.batch, self.namespace, self.name, self.timeout = batch, namespace, name, timeout
        self.latest: dict[str, Any] | None = None
        self.seen = threading.Event()
        self.relists = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{name}", daemon=True)

    def __enter__(self) -> "JobWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # not waited for: a watch blocked in its read ends at its own time-out, and writes nothing but `latest`
        # (waiting cost up to `timeout` at every phase's end: about 10 s per outsider's pull request)
        self._stop.set()
        self._thread.join(0.5)

    def _list(self) -> str | None:
        listed = self.batch.list_namespaced_job(self.namespace, field_selector=f"metadata.name={self.name}")
        mine = [j for j in listed.items if j.metadata.name == self.name]   # an API that ignores selectors
        self.latest = self.batch.api_client.sanitize_for_serialization(mine[0]) if mine else None
        self.seen.set()
        self.relists += 1
        return listed.metadata.resource_version

    def _run(self) -> None:
        from kubernetes import watch
        from kubernetes.client import ApiException
        from urllib3.exceptions import HTTPError

        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._list()
                stream = watch.Watch().stream(
                    self.batch.list_namespaced_job, self.namespace, field_selector=f"metadata.name={self.name}",
                    resource_version=version, allow_watch_bookmarks=True, timeout_seconds=int(self.timeout),
                    _request_timeout=self.timeout + 5)
                for event in stream:
                    if self._stop.is_set():
                        return
                    version = self._apply(event) or version
            except ApiException as exc:
                if exc.status != 410:
                    log.warning("watch failed; listing again", extra={"job": self.name, "status": exc.status})
                    self._stop.wait(1.0)
                else:   # 410 Gone: our version was compacted away
                    log.info("watch expired (410 Gone); listing again", extra={"k8s_job": self.name})
                version = None
            except (HTTPError, OSError):   # the read timed out, or the connection dropped: list and watch again
                version = None

    def _apply(self, event: dict[str, Any]) -> str | None:
        raw = event.get("raw_object") or {}
        if event.get("type") == "ERROR":
            from kubernetes.client import ApiException

            raise ApiException(status=int(raw.get("code") or 500), reason=str(raw.get("reason") or "watch error"))
        metadata = raw.get("metadata") or {}
        if metadata.get("name") != self.name:
            return metadata.get("resourceVersion")
        if event.get("type") == "DELETED":
            self.latest = None
        elif event.get("type") in ("ADDED", "MODIFIED"):
            self.latest = raw
        self.seen.set()
        return metadata.get("resourceVersion")


class PodLogs:
    """Every pod of one Job, its log followed into the job's log (each pod capped), on threads of its own."""

    def __init__(self, core: Any, namespace: str, selector: dict[str, str], job_log: Any, limit_bytes: int) -> None:
        self.core, self.namespace, self.selector = core, namespace, selector
        self.job_log, self.limit = job_log, limit_bytes
        self.followed: set[str] = set()

    def poll(self) -> None:
        from kubernetes.client import ApiException

        from triggers.jobs.job_log import CappedStream

        try:
            pods = self.core.list_namespaced_pod(
                self.namespace, label_selector=",".join(f"{k}={v}" for k, v in self.selector.items())).items
        except ApiException:
            return
        for pod in pods:
            labels = pod.metadata.labels or {}
            if any(labels.get(k) != v for k, v in self.selector.items()) or pod.metadata.name in self.followed:
                continue
            if (pod.status.phase if pod.status else None) not in ("Running", "Succeeded", "Failed"):
                continue
            try:
                stream = self.core.read_namespaced_pod_log(pod.metadata.name, self.namespace, container="mlgate",
                                                           follow=True, _preload_content=False)
            except ApiException:
                continue
            self.followed.add(pod.metadata.name)
            self.job_log.write(f"\n[mlgate: pod {pod.metadata.name}]\n".encode())
            capped = CappedStream(f"pod {pod.metadata.name}", stream, self.job_log, self.limit // 2, self.limit // 2)
            self.job_log.streams.append(capped)
            capped.thread.start()


@dataclass
class Cluster:
    """The API groups the executor talks to, over one client."""
    batch: Any
    core: Any
    networking: Any

    @classmethod
    def over(cls, client: Any) -> "Cluster":
        from kubernetes import client as k8s

        return cls(k8s.BatchV1Api(client), k8s.CoreV1Api(client), k8s.NetworkingV1Api(client))


class KubernetesExecutor:
    def __init__(self, config: MlgateConfig, config_path: str | None, engine: Engine, client: Any = None,
                 repository: str | None = None) -> None:
        self.config, self.config_path, self.engine = config, config_path, engine
        self.settings = config.service.kubernetes
        self.namespace = self.settings.namespace
        self.cluster = Cluster.over(client if client is not None else api_client(self.settings.context))
        self.repository = repository or os.environ.get("GITHUB_REPOSITORY")
        self._queued_noted: set[tuple[str, int, str]] = set()

    # --- the attempt ------------------------------------------------------------------------------------
    def run(self, job: Job, lost: threading.Event) -> Outcome | None:
        from triggers.jobs.checkout import CheckoutFailed

        try:
            attempt, config_file = self._attempt(job)
        except CheckoutFailed as exc:
            return Outcome("failed", {"error": str(exc)[:2000]})
        from triggers.jobs.job_log import JobLog

        log_path = self.config.workdir / "jobs" / job.id / "job.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with JobLog(log_path) as job_log:
            if outsider_pr(job):
                return self._outsider(job, attempt, config_file, lost, job_log)
            manifest = trusted_job(self.config, attempt, config_file, self.repository)
            if self.config.model(job.model).train.nodes > 1:
                self._create(self.cluster.core.create_namespaced_service, rendezvous_service(attempt))
            return self._reported(job, attempt, "job", manifest, lost, job_log)

    def _attempt(self, job: Job) -> tuple[Attempt, str]:
        """This attempt, or the earlier one whose Jobs are still running (adopted: one runner per job)."""
        from triggers.jobs.checkout import repository_root, resolve_commit

        config_file = Path(self.config_path or "mlgate.yaml").resolve()
        repo = repository_root(config_file.parent)
        relative = str(config_file.relative_to(repo))
        running = self._running_attempts(job)
        if running:
            origin = running[0]
            queue.adopt_runner(self.engine, job.id, job.attempts, origin[0])
            log.warning("re-attached to the Kubernetes Job of an earlier attempt",
                        extra={"job_id": job.id, "attempt": job.attempts, "runner_attempt": origin[0]})
            sha, base = origin[1], origin[2]
            return Attempt(job, origin[0], sha, base), relative
        sha = resolve_commit(repo, job.sha, self.config.service.branch)
        base = resolve_commit(repo, None, self.config.service.branch) if outsider_pr(job) else None
        return Attempt(job, queue.runner_origin(self.engine, job.id, job.attempts), sha, base), relative

    def _running_attempts(self, job: Job) -> list[tuple[int, str, str | None]]:
        """(attempt, sha, base sha) of earlier attempts of this job whose Jobs still run, newest first."""
        listed = self.cluster.batch.list_namespaced_job(self.namespace, label_selector=f"{LABEL}/job-id={job.id}")
        found: dict[int, tuple[int, str, str | None]] = {}
        for item in listed.items:
            raw = self.cluster.batch.api_client.sanitize_for_serialization(item)
            labels, notes = raw["metadata"].get("labels") or {}, raw["metadata"].get("annotations") or {}
            if labels.get(f"{LABEL}/job-id") != job.id or not _is_active(raw):
                continue
            runner = int(labels.get(f"{LABEL}/attempt", "0"))
            if runner < job.attempts:
                found[runner] = (runner, notes.get(f"{LABEL}/sha", ""), notes.get(f"{LABEL}/base-sha"))
        return [found[k] for k in sorted(found, reverse=True)]

    # --- phases ----------------------------------------------------------------------------------------
    def _outsider(self, job: Job, attempt: Attempt, config_file: str, lost: threading.Event,
                  job_log: Any) -> Outcome | None:
        """fetch (git) → build (the PR's code, isolated) → judge (the base branch's code, which reports).
        However the build ended, the judge looks for a candidate: the build's own account is never read."""
        self._create(self.cluster.core.create_namespaced_persistent_volume_claim, exchange_claim(self.config, attempt))
        outcome: Outcome | None = None
        try:
            for phase, manifest in (("fetch", fetch_job(self.config, attempt, self.repository)),
                                    ("build", build_job(self.config, attempt, config_file))):
                end = self._run_phase(job, attempt, phase, manifest, lost, job_log)   # type: ignore[arg-type]
                if end == "lost":   # stopped (its Jobs deleted) or left for the next attempt: no next phase
                    return None
                if phase == "fetch" and end is not None and end.failed:   # type: ignore[union-attr]
                    outcome = self._failed(job, f"could not fetch the pull request's commit: {end.reason}")   # type: ignore[union-attr]
                    return outcome
            judge = trusted_job(self.config, attempt, config_file, self.repository, role="judge", phase="judge")
            outcome = self._reported(job, attempt, "judge", judge, lost, job_log)
            return outcome
        finally:
            ended = get_job(self.engine, job.id)
            if outcome is not None or ended is None or ended.state in queue.FINAL_STATES:   # else adopted later
                self._delete(self.cluster.core.delete_namespaced_persistent_volume_claim, exchange_claim_name(attempt))

    def _run_phase(self, job: Job, attempt: Attempt, phase: Phase, manifest: dict[str, Any], lost: threading.Event,
                   job_log: Any) -> RunnerEnd | str | None:
        """Run one Job that reports nothing (fetch, build) to its end; "lost" when this worker must let go."""
        created = self._start(manifest, attempt, phase, token=None)
        logs = self._pod_logs(job, attempt, phase, job_log)
        with JobWatch(self.cluster.batch, self.namespace, created, self._watch_seconds()) as watch:
            while True:
                logs.poll()
                self._note_admission(job, watch.latest, phase)
                if watch.seen.is_set() and (end := job_end(watch.latest)) is not None:
                    return end
                if lost.wait(self.settings.poll_seconds):
                    self._stopping(job, attempt)
                    return "lost"

    def _reported(self, job: Job, attempt: Attempt, phase: Phase, manifest: dict[str, Any], lost: threading.Event,
                  job_log: Any) -> Outcome | None:
        """Run the Job whose runner reports (a trusted job, the judge) until its report ends the job."""
        token = result_token(job, attempt.runner_attempt, self.config.service.job_timeout_minutes)
        name = self._start(manifest, attempt, phase, token=token)
        logs = self._pod_logs(job, attempt, phase, job_log)
        with JobWatch(self.cluster.batch, self.namespace, name, self._watch_seconds()) as watch:
            def ended() -> RunnerEnd | None:
                logs.poll()
                self._note_admission(job, watch.latest, phase)
                return job_end(watch.latest) if watch.seen.is_set() else None

            why = wait_for_report(self.engine, job, lost, self.settings.poll_seconds, ended)
        if why == "lost" or self._cancelled(job):
            return self._stopping(job, attempt)
        if why is None:
            return None   # the runner's report ended the job
        return self._failed(job, f"{why} without reporting a result")

    def _pod_logs(self, job: Job, attempt: Attempt, phase: Phase, job_log: Any) -> PodLogs:
        return PodLogs(self.cluster.core, self.namespace, {f"{LABEL}/job-id": job.id,
                                                           f"{LABEL}/attempt": str(attempt.runner_attempt),
                                                           "app.kubernetes.io/component": phase},
                       job_log, self.settings.log_limit_kb * 1024)

    # --- the API ---------------------------------------------------------------------------------------
    def _start(self, manifest: dict[str, Any], attempt: Attempt, phase: Phase, token: str | None) -> str:
        """Create the Job suspended (or find it: a name is an attempt's), put its owned Secret in place, then
        let it go unless Kueue admits it."""
        name = manifest["metadata"]["name"]
        created = self._create(self.cluster.batch.create_namespaced_job, manifest)
        job = created if created is not None else self.cluster.batch.api_client.sanitize_for_serialization(
            self.cluster.batch.read_namespaced_job(name, self.namespace))
        if token is not None:
            self._create(self.cluster.core.create_namespaced_secret, result_secret(attempt, phase, token, job))
        if phase == "build":
            self._create(self.cluster.networking.create_namespaced_network_policy, build_network_policy(attempt, job))
        if not self.settings.queue_name and (job.get("spec") or {}).get("suspend"):
            self.cluster.batch.patch_namespaced_job(name, self.namespace, {"spec": {"suspend": False}})
        log.info("kubernetes job started", extra={"job_id": attempt.job.id, "k8s_job": name, "phase": phase,
                                                  "queue": self.settings.queue_name})
        return name

    def _create(self, create: Callable[..., Any], manifest: dict[str, Any]) -> dict[str, Any] | None:
        """The object as created, or None when it exists already (the same attempt's, by its name)."""
        from kubernetes.client import ApiException

        manifest = {**manifest, "metadata": {**manifest["metadata"], "namespace": self.namespace}}
        try:
            return self.cluster.batch.api_client.sanitize_for_serialization(create(self.namespace, manifest))
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise

    def _delete(self, delete: Callable[..., Any], name: str, grace: int | None = None) -> None:
        from kubernetes.client import ApiException

        try:
            delete(name, self.namespace, propagation_policy="Background", grace_period_seconds=grace)
        except ApiException as exc:
            if exc.status != 404:
                log.error("could not delete", extra={"name": name, "status": exc.status})

    def _note_admission(self, job: Job, current: dict[str, Any] | None, phase: Phase) -> None:
        """While Kueue holds the Job suspended, the job's progress says so (the check run shows it), once."""
        if current is None or not (current.get("spec") or {}).get("suspend") or not self.settings.queue_name \
                or (job.id, job.attempts, phase) in self._queued_noted:
            return
        self._queued_noted.add((job.id, job.attempts, phase))
        queue.record_progress(self.engine, job.id, job.attempts, {
            "stage": "queued", "detail": f"waiting for Kueue to admit the {phase} Job into queue "
                                         f"{self.settings.queue_name}"})

    def _watch_seconds(self) -> float:
        return max(5.0, 10 * self.settings.poll_seconds)

    # --- ends ------------------------------------------------------------------------------------------
    def _stopping(self, job: Job, attempt: Attempt) -> Outcome | None:
        """`lost`: a lost lease leaves the Jobs for the attempt that adopts them; a cancel or time-out deletes
        them, each pod given the model's grace period to checkpoint."""
        current = get_job(self.engine, job.id)
        if not (current is None or self._cancelled(job) or self._timed_out(job)):
            # a lost lease (another attempt adopts the Jobs), or the runner's report ended it: nothing to stop
            return self._abandon(job, attempt) if current.state not in queue.FINAL_STATES else None
        grace = int(self.config.model(job.model).train.preemption_grace_seconds + GRACE_MARGIN_SECONDS) \
            if job.model in self.config.models else None
        for phase in ("job", "fetch", "build", "judge"):
            self._delete(self.cluster.batch.delete_namespaced_job, attempt.name(phase), grace)   # type: ignore[arg-type]
        self._delete(self.cluster.core.delete_namespaced_persistent_volume_claim, exchange_claim_name(attempt))
        log.warning("kubernetes jobs deleted", extra={"job_id": job.id, "state": current.state if current else None})
        return None

    def _cancelled(self, job: Job) -> bool:
        current = get_job(self.engine, job.id)
        return current is not None and current.state == "cancelled"

    def _timed_out(self, job: Job) -> bool:
        from datetime import datetime, timezone

        started = queue.as_utc(get_job(self.engine, job.id).started_at)   # type: ignore[union-attr]
        return started is not None and (datetime.now(timezone.utc) - started).total_seconds() > \
            self.config.service.job_timeout_minutes * 60

    def _abandon(self, job: Job, attempt: Attempt) -> None:
        log.warning("job left running for the next attempt to adopt",
                    extra={"job_id": job.id, "k8s_job": attempt.name("job")})
        return None

    def _failed(self, job: Job, error: str) -> Outcome:
        return finish_job(self.engine, self.config.workdir, job.id, Outcome("failed", {"error": error[:2000]}), None)


def executor_from_env(config: MlgateConfig, config_path: str | None, engine: Engine) -> KubernetesExecutor:
    """The service's executor: MLGATE_RESULT_SECRET mints the runners' credentials (checked at start)."""
    from automation.errors import UsageError
    from triggers.jobs.runner_results import SECRET_ENV

    if not os.environ.get(SECRET_ENV):
        raise UsageError(f"service.executor is 'kubernetes' but {SECRET_ENV} is not set",
                         hint="the service mints each pod's result credential with it")
    if not config.service.kubernetes.service_url:
        raise UsageError("service.executor is 'kubernetes' but service.kubernetes.service_url is empty",
                         hint="the URL pods reach the service at, for their results")
    if not config.service.kubernetes.repository_url and not os.environ.get("GITHUB_REPOSITORY"):
        raise UsageError("service.executor is 'kubernetes' but neither service.kubernetes.repository_url nor "
                         "GITHUB_REPOSITORY says where pods fetch the commit from")
    return KubernetesExecutor(config, config_path, engine)
