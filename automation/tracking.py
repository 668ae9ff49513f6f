"""MLflow connection: embedded SQLite store by default, any server via MLFLOW_TRACKING_URI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from automation.errors import MlgateError
from automation.redaction import redact, redact_url

if TYPE_CHECKING:
    from mlflow import MlflowClient


def tracking_uri(workdir: Path) -> str:
    # four slashes for an absolute path: sqlite:////abs/path
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def artifact_location(workdir: Path) -> str | None:
    """Where a new experiment keeps its artifacts: beside the embedded store (MLflow's default, ./mlruns, would
    follow the working directory); a tracking server decides for itself."""
    return (workdir / "mlartifacts").resolve().as_uri() if tracking_uri(workdir).startswith("sqlite") else None


def connect(workdir: Path, experiment: str) -> tuple["MlflowClient", str]:
    """Point MLflow at the store, check it answers, and return (client, experiment id)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import logging

    import mlflow
    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.ERROR)   # its INFO lines are not about the job

    uri = tracking_uri(workdir)
    if uri.startswith("sqlite"):
        workdir.mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in saved.items():   # MLflow also exports these; a user's setting must stay the only source
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    client = MlflowClient(uri, uri)
    try:
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            return client, found.experiment_id
        return client, client.create_experiment(experiment, artifact_location=artifact_location(workdir))
    except Exception as exc:  # MLflow wraps network errors in many types; the user needs the URI
        reason = redact(str(exc).splitlines()[0])[:200] if str(exc) else type(exc).__name__
        raise MlgateError(f"MLflow tracking store at {redact_url(uri)} is unreachable: {reason}",
                          hint="check MLFLOW_TRACKING_URI, or unset it to use the embedded store") from None


def empty_store(workdir: Path) -> Path:
    """An empty MLflow store, its schema migrated once per service: a sandboxed or remote runner's private
    workdir starts with a copy instead of seconds of migrations (its run is thrown away with the workdir)."""
    import threading

    path = workdir / "cache" / "empty-mlflow.db"
    if not path.exists():
        from mlflow import MlflowClient

        path.parent.mkdir(parents=True, exist_ok=True)
        building = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        uri = f"sqlite:///{building}"
        MlflowClient(uri, uri).search_experiments()   # creates and migrates it
        building.replace(path)   # atomic: a concurrent worker sees the whole file or none
    return path
