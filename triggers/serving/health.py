"""`GET /livez` (the process answers) and `GET /healthz` (readiness: 200 only while the version served, or rolled
out, is the one its alias or git names)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

router = APIRouter()


def serving_production(server: Any) -> bool:
    """Ready: the version served, or the one rolling out, is what the alias names; where git declares production,
    serving the declared version is ready even while the alias drifted. `/healthz` and `/v2/health/ready` alike."""
    served, candidate = server.current, server.candidate
    if served is None:
        return False
    rolling_out = server.rollout is not None and candidate is not None and \
        candidate.loaded.version == server.production
    declared = server.pinned and served.loaded.version == server.declared
    return served.loaded.version == server.production or rolling_out or declared


@router.get("/livez", summary="Liveness: the process answers")
def livez() -> Response:
    return JSONResponse({"status": "alive"})


@router.get("/healthz", summary="Readiness: 200 only while the version served (or rolled out) is production")
def healthz(request: Request) -> Response:
    server = request.app.state.plane.server
    served, rollout = server.current, server.rollout
    not_served = {version: failure.as_dict() for version, failure in server.failed.items()}
    if served is None:
        return JSONResponse({"status": "loading", "model": server.model, "production": server.production,
                             "not_served": not_served}, 503)
    is_production = serving_production(server)
    return JSONResponse({"status": "ok" if is_production else "not_production", "model": server.model,
                         "rollout": None if rollout is None else rollout.as_dict(),
                         "version": served.loaded.version, "production": server.production,
                         "variant": served.loaded.variant, "served_as": served.loaded.served_as,
                         "fallback_reason": served.loaded.fallback_reason, "device": str(server.device.torch),
                         "input_shape": list(served.loaded.input_shape), "input_kind": served.loaded.input_kind,
                         "serving_since": served.since, "not_served": not_served},
                        200 if is_production else 503)
