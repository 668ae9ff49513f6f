"""The FastAPI app: webhook and drift intake, the job API, reports, metrics and the dashboard.

Request handlers only verify, record and enqueue; work happens in workers. Database calls run
in the thread pool so the event loop stays free. Each concern is a router in `triggers/routes/`.
"""

from __future__ import annotations

from fastapi import FastAPI

from triggers.routes.health import health_router
from triggers.routes.intake import intake_router
from triggers.routes.jobs import jobs_router
from triggers.routes.models import models_router
from triggers.routes.reports import reports_router
from triggers.routes.state import ServiceState

__all__ = ["ServiceState", "create_app"]


def create_app(state: ServiceState) -> FastAPI:
    app = FastAPI(title="mlgate", description="Event-driven GitOps automation for deep-learning models.")
    app.state.mlgate = state
    for router in (intake_router, jobs_router, models_router, reports_router, health_router):
        app.include_router(router(state))
    return app
