"""Event intake: GitHub webhooks and drift events over HTTP. Handlers verify, record and enqueue only."""

from __future__ import annotations

import json
import logging
import time

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from triggers.drift import events as drift
from triggers.intake import deliveries
from triggers.intake.webhooks import BadPayload
from triggers.request_guard import (EVENT_LIMIT, SIGNATURE_HEADER, WEBHOOK_LIMIT, BodyRefused, BodyTooLarge,
                                    SignatureRefused, bearer_ok, digest_ok, hmac_sha256, read_body, signature_ok)
from triggers.routes.state import ServiceState, error

log = logging.getLogger(__name__)
# metric labels come from this fixed set: a header value an outsider picks never becomes a new series
KNOWN_EVENTS = frozenset({"push", "pull_request", "ping", "issue_comment", "installation", "check_run",
                          "check_suite", "workflow_run", "workflow_job", "status", "create", "delete"})


def intake_router(state: ServiceState) -> APIRouter:
    router = APIRouter()
    events = state.metrics.events
    recorder = deliveries.GroupCommitRecorder(state.engine, state.config)
    state.components["delivery-writer"] = recorder

    @router.post("/webhooks/github", summary="GitHub webhook receiver (push, pull_request, ping)")
    async def github_webhook(request: Request) -> Response:
        started = time.perf_counter()
        event = request.headers.get("X-GitHub-Event", "")
        label = event if event in KNOWN_EVENTS else "other"
        digest = hmac_sha256(state.webhook_secret)   # computed as the body streams in
        try:
            # unsigned or with a header that cannot be a signature: refused unread, so it holds no budget
            body = await read_body(request, WEBHOOK_LIMIT, digest=digest, signed_by="X-Hub-Signature-256")
        except BodyTooLarge as exc:
            events.labels("github", label, "too_large").inc()
            return error(413, str(exc))
        except SignatureRefused as exc:
            events.labels("github", label, "bad_signature").inc()
            return exc.answer()
        except BodyRefused as exc:
            events.labels("github", label, "refused").inc()
            return exc.answer()
        if not digest_ok(state.webhook_secret, digest, request.headers.get("X-Hub-Signature-256")):
            events.labels("github", label, "bad_signature").inc()
            return error(401, "missing or invalid X-Hub-Signature-256")
        delivery_id = request.headers.get("X-GitHub-Delivery", "")
        if not event or not delivery_id or len(delivery_id) > 100:
            events.labels("github", label, "bad_request").inc()
            return error(400, "missing X-GitHub-Event or X-GitHub-Delivery header")
        try:
            item = deliveries.Incoming.parse(state.config, delivery_id, event, json.loads(body), body)
        except (ValueError, BadPayload, RecursionError) as exc:   # json.JSONDecodeError is a ValueError
            events.labels("github", label, "bad_payload").inc()
            return error(400, f"malformed {event} payload: {exc}")
        try:
            recorded = await recorder.record(item)
        except Exception as exc:   # nothing was committed: GitHub shows the failure and can redeliver
            events.labels("github", label, "not_recorded").inc()
            return error(503, f"delivery not recorded ({type(exc).__name__}); redeliver it")
        delivery = recorded.delivery
        outcome = "duplicate" if recorded.duplicate else delivery["status"]
        events.labels("github", label, outcome).inc()
        if delivery["status"] == "pending":
            state.planner_wake.set()
        if state.gitops is not None and event == "push" and delivery["status"] != "ignored":
            state.gitops.wake.set()   # the tracked branch may have moved: reconcile now (git is fetched, not read here)
        state.metrics.webhook_seconds.observe(time.perf_counter() - started)
        return JSONResponse(delivery | {"duplicate": recorded.duplicate},
                            status_code=200 if recorded.duplicate or delivery["status"] != "jobs" else 202)

    @router.post("/events/drift", summary="A drift CloudEvent over HTTP (same body as on Kafka); signed with "
                 "MLGATE_DRIFT_SECRET (X-Mlgate-Signature-256) or sent with the bearer MLGATE_DRIFT_TOKEN")
    async def drift_event(request: Request) -> Response:
        if not (state.drift_secret or state.drift_token):
            events.labels("http", "drift", "disabled").inc()
            return error(403, "drift intake over HTTP is off: set MLGATE_DRIFT_SECRET or MLGATE_DRIFT_TOKEN")
        bearer = bearer_ok(state.drift_token, request.headers.get("Authorization"))   # known before the body
        try:
            body = await read_body(request, EVENT_LIMIT, signed_by=None if bearer else SIGNATURE_HEADER)
        except BodyTooLarge as exc:
            events.labels("http", "drift", "too_large").inc()
            return error(413, str(exc))
        except SignatureRefused:   # neither credential: refused before the body is read
            events.labels("http", "drift", "unauthenticated").inc()
            return BodyRefused(f"missing or invalid credential ({SIGNATURE_HEADER} or Authorization: Bearer)",
                               401).answer()
        except BodyRefused as exc:
            events.labels("http", "drift", "refused").inc()
            return exc.answer()
        if not (bearer or signature_ok(state.drift_secret, body, request.headers.get(SIGNATURE_HEADER))):
            events.labels("http", "drift", "unauthenticated").inc()
            return error(401, f"missing or invalid credential ({SIGNATURE_HEADER} or Authorization: Bearer)")
        try:
            event = drift.parse_event(body, state.config)
        except drift.BadEvent as exc:
            events.labels("http", "drift", "bad_event").inc()
            return error(422 if isinstance(exc, drift.UnknownModel) else 400, str(exc))
        try:
            [decision] = await run_in_threadpool(drift.decide_batch, state.engine, state.config, [event], "http")
        except Exception as exc:   # nothing was recorded: the sender can safely send it again (same id)
            log.error("drift event not recorded", extra={"event_id": event.id, "error": type(exc).__name__})
            events.labels("http", "drift", "not_recorded").inc()
            return error(503, f"drift event not recorded ({type(exc).__name__}); send it again")
        events.labels("http", "drift", "duplicate" if decision.duplicate else decision.outcome).inc()
        return JSONResponse(vars(decision), status_code=202 if decision.outcome == "job" and not decision.duplicate
                            else 200)

    return router
