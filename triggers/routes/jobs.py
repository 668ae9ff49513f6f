"""Jobs and what fed them (deliveries, drift events), and the runner's side: results and production snapshots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from triggers.drift import events as drift
from triggers.intake import deliveries
from triggers.jobs import queue
from triggers.request_guard import RESULT_LIMIT, BodyRefused, BodyTooLarge, read_body
from triggers.routes.state import Limit, ServiceState, error, read_access, report_file


def jobs_router(state: ServiceState) -> APIRouter:
    router = APIRouter()
    read = read_access(state)

    @router.post("/jobs/{job_id}/result", summary="The runner reports a job's outcome and report, with the job's "
                 "own credential (Authorization: Bearer: a GitHub Actions OIDC token)")
    async def job_result(job_id: str, request: Request) -> Response:
        from automation.summary import JobSummary
        from triggers.jobs.job_end import finish_job, outcome_from_summary
        from triggers.jobs.runner_results import RunnerAuthError, RunnerResult, runner_attempt

        try:   # the credential (OIDC, or minted) is checked before a byte of the body is read
            attempt = await run_in_threadpool(runner_attempt, state.config, state.engine, state.result_secret,
                                              request.headers.get("Authorization", ""), job_id)
        except RunnerAuthError as exc:
            return error(exc.status, str(exc))
        try:
            body = await read_body(request, RESULT_LIMIT)
        except BodyTooLarge as exc:
            return error(413, str(exc))
        except BodyRefused as exc:
            return exc.answer()
        try:
            result = RunnerResult.parse(body)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            return error(400, f"a result is {{job_id, attempt, exit_code, summary, error, report_html}}: {exc}")
        if result.job_id != job_id or queue.attempt_for_runner(state.engine, job_id, result.attempt) != attempt:
            return error(401, "the result names another job or attempt than its token")
        # the runner is trusted code (a retrain, or the judge of an outsider's PR): its summary is typed here
        summary = JobSummary.parse(result.summary)
        outcome = outcome_from_summary(result.exit_code, summary, result.error)
        if result.report_html is not None:
            outcome.fields["report_path"] = str(report_file(state, job_id))
        if outcome.state == "preempted":   # the runner checkpointed and went away: requeued to resume
            requeued = await run_in_threadpool(queue.preempt, state.engine, job_id, attempt,
                                               outcome.fields.get("error", "preempted"),
                                               state.config.service.max_preemptions)
            if requeued is None:
                return error(409, f"job {job_id} attempt {attempt} is not running (finished, retried or unknown)")
            return JSONResponse({"job": job_id, "attempt": attempt, "state": "preempted", "job_state": requeued})
        if not await run_in_threadpool(queue.record_result, state.engine, job_id, outcome.state, attempt=attempt,
                                       **outcome.fields):
            return error(409, f"job {job_id} attempt {attempt} is not running (finished, retried or unknown)")
        if result.report_html is not None:   # kept under the service's own workdir, at a path it chose
            report = report_file(state, job_id)
            report.parent.mkdir(parents=True, exist_ok=True)
            await run_in_threadpool(report.write_text, result.report_html, "utf-8")
        await run_in_threadpool(finish_job, state.engine, state.config.workdir, job_id, outcome, summary)
        return JSONResponse({"job": job_id, "attempt": attempt, "state": outcome.state})

    @router.get("/jobs/{job_id}/production", summary="A running PR job's production snapshot (gzip'd tar), for "
                "the job's own credential: the runner never holds a registry credential")
    def job_production(job_id: str, request: Request) -> Response:
        import tempfile

        from automation.production import export_production, pack
        from triggers.jobs.runner_results import RunnerAuthError, runner_attempt

        try:
            attempt = runner_attempt(state.config, state.engine, state.result_secret,
                                     request.headers.get("Authorization", ""), job_id)
        except RunnerAuthError as exc:
            return error(exc.status, str(exc))
        job = queue.get_job(state.engine, job_id)
        if job is None or job.state != "running" or job.attempts != attempt:
            return error(409, f"job {job_id} attempt {attempt} is not running")
        if job.trigger != "pr":   # a retrain reads the registry itself; a leaked retrain token reads nothing here
            return error(403, f"job {job_id} is not a pull-request job: production snapshots are for PR jobs only")
        scratch = state.config.workdir / "production-snapshots"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch) as directory:
            export_production(state.mlflow_client(), job.model, Path(directory))
            return Response(pack(Path(directory)), media_type="application/gzip")

    @router.get("/jobs", summary="Recent jobs, newest first", dependencies=read)
    def list_jobs(state_filter: str | None = Query(None, alias="state"), limit: int = Limit) -> list[dict[str, Any]]:
        jobs = queue.list_jobs(state.engine, limit=limit, state=state_filter)
        progress = queue.running_progress(state.engine, [j.id for j in jobs if j.state == "running"])
        return [job.as_dict() | {"progress": progress.get(job.id)} for job in jobs]

    @router.get("/jobs/{job_id}", summary="One job", dependencies=read)
    def get_job(job_id: str) -> dict[str, Any]:
        job = queue.get_job(state.engine, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        attempts = [a.as_dict() for a in queue.attempts(state.engine, job_id)]
        running = attempts[-1] if attempts and attempts[-1]["state"] == "running" else None
        return job.as_dict() | {"attempt_history": attempts, "progress": running and running["progress"]}

    @router.get("/deliveries", summary="Recent webhook deliveries and what they decided", dependencies=read)
    def list_deliveries(limit: int = Limit) -> list[dict[str, Any]]:
        return [d.as_dict() for d in deliveries.list_deliveries(state.engine, limit)]

    @router.get("/drift-events", summary="Recent drift events and what they decided", dependencies=read)
    def list_drift_events(limit: int = Limit) -> list[dict[str, Any]]:
        return [e.as_dict() for e in drift.list_drift_events(state.engine, limit)]

    return router
