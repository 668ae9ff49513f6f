"""Liveness and readiness, and the Prometheus metrics."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from triggers.routes.state import ServiceState, read_access


def health_router(state: ServiceState) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz", summary="Liveness and readiness")
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

    @router.get("/metrics", summary="Prometheus metrics", dependencies=read_access(state))
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
