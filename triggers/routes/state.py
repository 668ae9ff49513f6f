"""What every router shares: the service's state, the read-token dependency and the error answer."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import Engine

from automation.config import MlgateConfig
from triggers.metrics import ServiceMetrics
from triggers.request_guard import reader_ok

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
    gitops: Any = None            # triggers.gitops.loop.GitOpsLoop, when some model's production is declared in git
    started: float = field(default_factory=time.time)
    _mlflow: Any = field(default=None, repr=False, init=False)

    def mlflow_client(self) -> Any:
        """Connected on first use: MLflow's import is slow, and once is enough."""
        if self._mlflow is None:
            from automation import tracking

            self._mlflow = tracking.connect(self.config.workdir, self.config.experiment)[0]
        return self._mlflow


def report_file(state: ServiceState, job_id: str) -> Path:
    """Where a job's HTML report lives: derived from the id of a job that exists, nothing else."""
    from triggers.jobs.job_end import report_path

    return report_path(state.config.workdir, job_id)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def read_access(state: ServiceState) -> list[Any]:
    """Read routes: open without MLGATE_READ_TOKEN (local use), else the token is required."""
    def reader(request: Request) -> None:
        if state.read_token and not reader_ok(state.read_token, request.headers.get("Authorization")):
            raise HTTPException(401, "this mlgate needs its read token (MLGATE_READ_TOKEN)",
                                headers={"WWW-Authenticate": 'Basic realm="mlgate"'})

    return [Depends(reader)]
