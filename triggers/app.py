"""The FastAPI app: webhook and drift intake, the job API, reports, metrics and the dashboard.

Request handlers only verify, record and enqueue; work happens in workers. Database calls run
in the thread pool so the event loop stays free.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from sqlalchemy import Engine, text

from automation.config import MlgateConfig
from triggers.jobs import queue
from triggers.dashboard import DASHBOARD_HTML
from triggers.github.job_status import keep_summary
from triggers.intake import deliveries, drift
from triggers.intake.webhooks import BadPayload
from triggers.metrics import ServiceMetrics
from triggers.request_guard import (EVENT_LIMIT, RESULT_LIMIT, SIGNATURE_HEADER, WEBHOOK_LIMIT, BodyTooLarge, bearer_ok,
                                    read_body, reader_ok, signature_ok)

log = logging.getLogger(__name__)
# metric labels come from this fixed set: a header value an outsider picks never becomes a new series
KNOWN_EVENTS = frozenset({"push", "pull_request", "ping", "issue_comment", "installation", "check_run",
                          "check_suite", "workflow_run", "workflow_job", "status", "create", "delete"})
Limit = Query(50, ge=1, le=500, description="how many, newest first (1-500)")


@dataclass
class ServiceState:
    config: MlgateConfig
    engine: Engine
    webhook_secret: str
    metrics: ServiceMetrics
    drift_secret: str = ""        # MLGATE_DRIFT_SECRET: HMAC of a drift event's body (X-Mlgate-Signature-256)
    drift_token: str = ""         # MLGATE_DRIFT_TOKEN: or a bearer token
    result_secret: str = ""       # MLGATE_RESULT_SECRET: mints and checks each dispatched job's result credential
    read_token: str = ""          # MLGATE_READ_TOKEN: when set, the API and dashboard need it (off for local use)
    planner_wake: threading.Event = field(default_factory=threading.Event)
    components: dict[str, Any] = field(default_factory=dict)   # name -> object with .alive() (health)
    started: float = field(default_factory=time.time)


def _report_file(state: ServiceState, job_id: str) -> Path:
    """Where a job's HTML report lives: derived from the id of a job that exists, nothing else."""
    return state.config.workdir / "reports" / job_id / "report.html"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(state: ServiceState) -> FastAPI:
    app = FastAPI(title="mlgate", description="Event-driven GitOps automation for deep-learning models.")

    def reader(request: Request) -> None:
        """Read routes: open without MLGATE_READ_TOKEN (local use), else the token is required."""
        if state.read_token and not reader_ok(state.read_token, request.headers.get("Authorization")):
            raise HTTPException(401, "this mlgate needs its read token (MLGATE_READ_TOKEN)",
                                headers={"WWW-Authenticate": 'Basic realm="mlgate"'})

    read = [Depends(reader)]
    app.state.mlgate = state
    events = state.metrics.events
    recorder = deliveries.GroupCommitRecorder(state.engine, state.config)
    state.components["delivery-writer"] = recorder

    @app.post("/webhooks/github", summary="GitHub webhook receiver (push, pull_request, ping)")
    async def github_webhook(request: Request) -> Response:
        started = time.perf_counter()
        event = request.headers.get("X-GitHub-Event", "")
        label = event if event in KNOWN_EVENTS else "other"
        try:
            body = await read_body(request, WEBHOOK_LIMIT)
        except BodyTooLarge as exc:
            events.labels("github", label, "too_large").inc()
            return _error(413, str(exc))
        if not signature_ok(state.webhook_secret, body, request.headers.get("X-Hub-Signature-256")):
            events.labels("github", label, "bad_signature").inc()
            return _error(401, "missing or invalid X-Hub-Signature-256")
        delivery_id = request.headers.get("X-GitHub-Delivery", "")
        if not event or not delivery_id or len(delivery_id) > 100:
            events.labels("github", label, "bad_request").inc()
            return _error(400, "missing X-GitHub-Event or X-GitHub-Delivery header")
        try:
            item = deliveries.Incoming.parse(state.config, delivery_id, event, json.loads(body), body)
        except (ValueError, BadPayload, RecursionError) as exc:   # json.JSONDecodeError is a ValueError
            events.labels("github", label, "bad_payload").inc()
            return _error(400, f"malformed {event} payload: {exc}")
        try:
            recorded = await recorder.record(item)
        except Exception as exc:   # nothing was committed: GitHub shows the failure and can redeliver
            events.labels("github", label, "not_recorded").inc()
            return _error(503, f"delivery not recorded ({type(exc).__name__}); redeliver it")
        delivery = recorded.delivery
        outcome = "duplicate" if recorded.duplicate else delivery["status"]
        events.labels("github", label, outcome).inc()
        if delivery["status"] == "pending":
            state.planner_wake.set()
        state.metrics.webhook_seconds.observe(time.perf_counter() - started)
        return JSONResponse(delivery | {"duplicate": recorded.duplicate},
                            status_code=200 if recorded.duplicate or delivery["status"] != "jobs" else 202)

    @app.post("/events/drift", summary="A drift CloudEvent over HTTP (same body as on Kafka); signed with "
              "MLGATE_DRIFT_SECRET (X-Mlgate-Signature-256) or sent with the bearer MLGATE_DRIFT_TOKEN")
    async def drift_event(request: Request) -> Response:
        if not (state.drift_secret or state.drift_token):
            events.labels("http", "drift", "disabled").inc()
            return _error(403, "drift intake over HTTP is off: set MLGATE_DRIFT_SECRET or MLGATE_DRIFT_TOKEN")
        try:
            body = await read_body(request, EVENT_LIMIT)
        except BodyTooLarge as exc:
            events.labels("http", "drift", "too_large").inc()
            return _error(413, str(exc))
        if not (signature_ok(state.drift_secret, body, request.headers.get(SIGNATURE_HEADER))
                or bearer_ok(state.drift_token, request.headers.get("Authorization"))):
            events.labels("http", "drift", "unauthenticated").inc()
            return _error(401, f"missing or invalid credential ({SIGNATURE_HEADER} or Authorization: Bearer)")
        try:
            event = drift.parse_event(body, state.config)
        except drift.BadEvent as exc:
            events.labels("http", "drift", "bad_event").inc()
            return _error(422 if isinstance(exc, drift.UnknownModel) else 400, str(exc))
        try:
            [decision] = await run_in_threadpool(drift.decide_batch, state.engine, state.config, [event], "http")
        except Exception as exc:   # nothing was recorded: the sender can safely send it again (same id)
            log.error("drift event not recorded", extra={"event_id": event.id, "error": type(exc).__name__})
            events.labels("http", "drift", "not_recorded").inc()
            return _error(503, f"drift event not recorded ({type(exc).__name__}); send it again")
        events.labels("http", "drift", "duplicate" if decision.duplicate else decision.outcome).inc()
        return JSONResponse(vars(decision), status_code=202 if decision.outcome == "job" and not decision.duplicate
                            else 200)

    @app.post("/jobs/{job_id}/result", summary="The runner reports a job's outcome and report, with the job's "
              "own credential (Authorization: Bearer, minted at dispatch)")
    async def job_result(job_id: str, request: Request) -> Response:
        from triggers.jobs.executors import outcome_from_summary
        from triggers.jobs.runner_results import BadResultToken, RunnerResult, check_token

        if not state.result_secret:
            return _error(403, "runner results are off: set MLGATE_RESULT_SECRET")
        header = request.headers.get("Authorization", "")
        try:   # the credential is checked before a byte of the body is read
            attempt = check_token(state.result_secret, header.removeprefix("Bearer "), job_id)
        except BadResultToken as exc:
            return _error(401, str(exc))
        try:
            body = await read_body(request, RESULT_LIMIT)
        except BodyTooLarge as exc:
            return _error(413, str(exc))
        try:
            result = RunnerResult.parse(body)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            return _error(400, f"a result is {{job_id, attempt, exit_code, summary, error, report_html}}: {exc}")
        if (result.job_id, result.attempt) != (job_id, attempt):
            return _error(401, "the result names another job or attempt than its token")
        outcome = outcome_from_summary(result.exit_code, result.summary, result.error)
        if result.report_html is not None:
            outcome.fields["report_path"] = str(_report_file(state, job_id))
        if not await run_in_threadpool(queue.record_result, state.engine, job_id, outcome.state, attempt=attempt,
                                       **outcome.fields):
            return _error(409, f"job {job_id} attempt {attempt} is not running (finished, retried or unknown)")
        await run_in_threadpool(keep_summary, state.config.workdir, job_id, result.summary)   # for GitHub reports
        if result.report_html is not None:   # kept under the service's own workdir, at a path it chose
            report = _report_file(state, job_id)
            report.parent.mkdir(parents=True, exist_ok=True)
            await run_in_threadpool(report.write_text, result.report_html, "utf-8")
        return JSONResponse({"job": job_id, "attempt": attempt, "state": outcome.state})

    @app.get("/jobs/{job_id}/production", summary="A running PR job's production snapshot (gzip'd tar), for the "
             "job's own credential: the runner never holds a registry credential")
    def job_production(job_id: str, request: Request) -> Response:
        import tempfile

        from automation.production import export_production, pack
        from triggers.jobs.runner_results import BadResultToken, check_token

        if not state.result_secret:
            return _error(403, "runner credentials are off: set MLGATE_RESULT_SECRET")
        try:
            attempt = check_token(state.result_secret, request.headers.get("Authorization", "").removeprefix(
                "Bearer "), job_id)
        except BadResultToken as exc:
            return _error(401, str(exc))
        job = queue.get_job(state.engine, job_id)
        if job is None or job.state != "running" or job.attempts != attempt:
            return _error(409, f"job {job_id} attempt {attempt} is not running")
        scratch = state.config.workdir / "production-snapshots"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch) as directory:
            export_production(mlflow_client(), job.model, Path(directory))
            return Response(pack(Path(directory)), media_type="application/gzip")

    @app.get("/jobs", summary="Recent jobs, newest first", dependencies=read)
    def list_jobs(state_filter: str | None = Query(None, alias="state"), limit: int = Limit) -> list[dict[str, Any]]:
        return [job.as_dict() for job in queue.list_jobs(state.engine, limit=limit, state=state_filter)]

    @app.get("/jobs/{job_id}", summary="One job", dependencies=read)
    def get_job(job_id: str) -> dict[str, Any]:
        job = queue.get_job(state.engine, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job.as_dict()

    @app.get("/deliveries", summary="Recent webhook deliveries and what they decided", dependencies=read)
    def list_deliveries(limit: int = Limit) -> list[dict[str, Any]]:
        return [d.as_dict() for d in deliveries.list_deliveries(state.engine, limit)]

    @app.get("/drift-events", summary="Recent drift events and what they decided", dependencies=read)
    def list_drift_events(limit: int = Limit) -> list[dict[str, Any]]:
        return [e.as_dict() for e in drift.list_drift_events(state.engine, limit)]

    @functools.cache
    def mlflow_client() -> Any:   # connected on first use: MLflow's import is slow, and once is enough
        from automation import tracking

        return tracking.connect(state.config.workdir, state.config.experiment)[0]

    @app.get("/models", summary="Each model: production and previous version, who promoted it, its last jobs "
             "with their gate verdicts, and accuracy and p95 latency across versions with the gate thresholds",
             dependencies=read)
    def models() -> list[dict[str, Any]]:
        from automation import promote
        from triggers.model_overview import model_overview

        client = mlflow_client()
        result = []
        for name in state.config.models:
            aliases = promote.alias_state(client, name)
            history = [r.as_dict() for r in promote.audit_trail(state.engine, name)]
            result.append({"model": name, "production": aliases.production, "previous": aliases.previous,
                           "history": history} | model_overview(state.engine, state.config, name, history))
        return result

    @app.get("/reports/{job_id}", summary="A job's HTML report", response_class=HTMLResponse, dependencies=read)
    def report(job_id: str) -> Response:
        job = queue.get_job(state.engine, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        path = _report_file(state, job.id)   # never a path from the job's record or a runner
        if not path.is_file():
            raise HTTPException(404, f"job {job_id} has no report yet (state: {job.state})")
        return FileResponse(path, media_type="text/html")

    @app.get("/healthz", summary="Liveness and readiness")
    def healthz() -> Response:
        checks: dict[str, Any] = {}
        try:
            with state.engine.connect() as conn:
                conn.execute(text("select 1"))
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unreachable: {type(exc).__name__}"
        for name, component in state.components.items():
            checks[name] = "ok" if component.alive() else "stopped"
        healthy = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if healthy else "degraded", "checks": checks,
                             "uptime_seconds": round(time.time() - state.started, 1)},
                            status_code=200 if healthy else 503)

    @app.get("/metrics", summary="Prometheus metrics", dependencies=read)
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False, dependencies=read)
    def dashboard() -> str:
        return DASHBOARD_HTML

    return app
