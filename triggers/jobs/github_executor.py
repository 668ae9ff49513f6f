"""The `github` executor: dispatch the GPU-runner workflow with PyGithub and track the run until the runner
reports back (`POST /jobs/{id}/result`).

The dispatch carries no credential (its inputs are in the event payload every job of the run can read, the
outsider's `build` job included). Before dispatching, the executor records what may report for the attempt
(the repository, ref and workflow file: judge.yml for an outsider's PR); once it sees the run GitHub started,
it records the run's id. The runner then proves with a GitHub Actions OIDC token that it is that job of that
run (triggers/jobs/oidc.py)."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from sqlalchemy import Engine

from automation.config import MlgateConfig
from triggers.jobs.executors import Outcome
from triggers.jobs.queue import Job, get_job

log = logging.getLogger(__name__)


class GitHubExecutor:
    """Dispatch `.github/workflows/<workflow>` and wait: the runner posts the result to
    `POST /jobs/{id}/result`; if the run ends without doing so, the job fails with the run's conclusion.

    A job recovered after a lost lease first cancels the run an earlier attempt may have left going (its
    token names that attempt's run, so its result would be refused anyway), then dispatches anew. A job
    cancelled in mlgate cancels its run. A GitHub error while polling is retried until the time-out: the
    runner goes on regardless, so a flaky API must not fail the job."""

    def __init__(self, config: MlgateConfig, engine: Engine, github: Any, repository: str,
                 poll_seconds: float = 15.0) -> None:
        # no result secret: the runner's credential is a GitHub OIDC token, nothing is minted for a dispatch
        self.config, self.engine, self.github, self.repository = config, engine, github, repository
        self.poll_seconds = poll_seconds

    def _run(self, job: Job, this_attempt: bool = True) -> Any:
        """The newest run of this attempt (its run-name ends `job <id> (attempt <n>)`), or of any attempt."""
        from triggers.github.api import GitHubRateLimited, GitHubUnavailable

        title = f"job {job.id} (attempt {job.attempts})" if this_attempt else job.id
        try:
            return self.github.workflow_run(self.repository, self.config.service.github.workflow, title)
        except (GitHubUnavailable, GitHubRateLimited) as exc:
            log.warning("workflow run not readable; polling on", extra={"job_id": job.id, "error": str(exc)})
            return None

    def _cancel_earlier_run(self, job: Job) -> None:
        earlier = self._run(job, this_attempt=False)
        if earlier is None or earlier.completed:
            return
        log.warning("cancelling the run of an earlier attempt", extra={"job_id": job.id, "run": earlier.id})
        self.github.cancel_workflow_run(self.repository, earlier.id)
        deadline = time.monotonic() + 10 * self.poll_seconds
        while time.monotonic() < deadline:
            run = self._run(job, this_attempt=False)
            if run is None or run.completed:
                return
            time.sleep(self.poll_seconds)

    def run(self, job: Job, lost: threading.Event) -> Outcome | None:
        from triggers.jobs.oidc import record_dispatch, record_run, workflow_ref

        settings = self.config.service.github
        if job.attempts > 1:
            self._cancel_earlier_run(job)
        data_ref = json.loads(job.payload or "{}").get("data_ref") or ""
        # an outsider's PR is built by its code and judged by the default branch's (retrain.yml: build, judge)
        outsider = job.trigger == "pr" and json.loads(job.payload or "{}").get("author_writes") is not True
        # who may report: for an outsider's PR only the reusable judge workflow (no job of retrain.yml, build
        # included, can carry its job_workflow_ref); otherwise the job of retrain.yml that runs the attempt
        reporter = settings.judge_workflow if outsider else settings.workflow
        record_dispatch(self.engine, job.id, job.attempts, self.repository, settings.ref,
                        workflow_ref(self.repository, reporter, settings.ref))
        # no credential among the inputs: every job of the run reads them from its event payload
        inputs = {"model": job.model, "job_id": job.id, "attempt": str(job.attempts), "trigger": job.trigger,
                  "sha": job.sha or "", "pr": str(job.pr or ""), "data_ref": data_ref,
                  "author_writes": "true" if job.trigger == "pr" and not outsider else "false"}
        self.github.dispatch_workflow(self.repository, settings.workflow, settings.ref, inputs)
        log.info("workflow dispatched", extra={"job_id": job.id, "workflow": settings.workflow})
        deadline = time.monotonic() + settings.timeout_minutes * 60
        concluded_at: float | None = None
        run_seen = False
        while time.monotonic() < deadline:
            if lost.wait(self.poll_seconds):
                self._cancel_if_cancelled(job)
                return None
            current = get_job(self.engine, job.id)
            if current is None or current.state != "running":
                self._cancel_if_cancelled(job)
                return None                   # the runner reported back (or the job was cancelled)
            run = self._run(job)
            if run is not None and not run_seen:   # the one run whose OIDC token may report for this attempt
                run_seen = True
                if record_run(self.engine, job.id, job.attempts, run.id):
                    log.info("workflow run seen", extra={"job_id": job.id, "run": run.id})
            if run is not None and run.completed:
                concluded_at = concluded_at or time.monotonic()
                if time.monotonic() - concluded_at > 2 * self.poll_seconds:   # grace for the result call
                    return Outcome("failed", {"error": f"workflow run ended '{run.conclusion}' without reporting "
                                                       "a result"})
        self._cancel_if_cancelled(job, timed_out=True)
        return Outcome("failed", {"error": f"no result within {settings.timeout_minutes:g} min"})

    def _cancel_if_cancelled(self, job: Job, timed_out: bool = False) -> None:
        """Stop the runner of a job that was cancelled here (or ran out of time): it would only burn a GPU."""
        from triggers.github.api import GitHubRateLimited, GitHubUnavailable

        current = get_job(self.engine, job.id)
        if not timed_out and (current is None or current.state != "cancelled"):
            return
        run = self._run(job)
        if run is not None and not run.completed:
            try:
                self.github.cancel_workflow_run(self.repository, run.id)
                log.info("workflow run cancelled", extra={"job_id": job.id, "run": run.id})
            except (GitHubUnavailable, GitHubRateLimited) as exc:
                log.error("could not cancel the workflow run", extra={"job_id": job.id, "error": str(exc)})
