"""Each model's production state and history, and the dashboard page that shows it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from triggers.dashboard import DASHBOARD_HTML
from triggers.routes.state import ServiceState, error, read_access


def models_router(state: ServiceState) -> APIRouter:
    router = APIRouter()
    read = read_access(state)

    @router.get("/models", summary="Each model: production and previous version, who promoted it, its last jobs "
                "with their gate verdicts, and accuracy and p95 latency across versions with the gate thresholds",
                dependencies=read)
    def models() -> Any:
        from automation import promote
        from triggers.model_overview import model_overview

        result = []
        for name in state.config.models:
            try:
                aliases = promote.alias_state(state.mlflow_client(), name)
            except Exception as exc:   # unreachable: an outage, never shown as "no production"
                return error(503, f"the model registry did not answer ({type(exc).__name__}); try again")
            history = [r.as_dict() for r in promote.audit_trail(state.engine, name)]
            result.append({"model": name, "production": aliases.production, "previous": aliases.previous,
                           "history": history, "gitops": gitops_card(state, name)}
                          | model_overview(state.engine, state.config, name, history))
        return result

    @router.get("/gitops", summary="Production declared in git: the last reconcile (what each deploy file declares, "
                "drift between git and the registry, refused files) and the recent deploy-file changes",
                dependencies=read)
    def gitops() -> Any:
        from automation import proposals

        if state.gitops is None:
            return {"models": [], "last": None, "proposals": []}
        return state.gitops.view() | {"proposals": [p.as_dict() for p in proposals.recent_proposals(state.engine)]}

    @router.get("/", response_class=HTMLResponse, include_in_schema=False, dependencies=read)
    def dashboard() -> str:
        return DASHBOARD_HTML

    return router


def gitops_card(state: ServiceState, model: str) -> dict[str, Any] | None:
    """What git declares for the model at the last reconcile, drift included; None where the registry rules."""
    if state.gitops is None or state.config.model(model).promotion.mode == "registry":
        return None
    last = state.gitops.last
    return {"mode": state.config.model(model).promotion.mode, "head": last.head if last else None,
            "stages": [s.as_dict() for s in (last.states if last else []) if s.model == model],
            "refused": [line for line in (last.refused if last else []) if f"/{model}.yaml" in line]}
