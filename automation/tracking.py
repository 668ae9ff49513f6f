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
        if not os.environ.get("MLFLOW_TRACKING_URI"):   # the embedded store: a new one starts as a migrated copy
            seed_store(workdir / "mlflow.db")
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


def template_store() -> Path:
    """An empty embedded store, migrated once per MLflow version and kept in the user's cache: MLflow's 68
    schema migrations took 0.8 s to 3 s on every new workdir (the first job, every test's store)."""
    import mlflow

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlgate" / "mlflow"
    return _migrated_empty(cache / f"empty-{mlflow.__version__}.db")


def _migrated_empty(path: Path) -> Path:
    """`path`, an empty MLflow SQLite store with every migration applied, built there once."""
    import threading

    if not path.exists():
        from mlflow import MlflowClient

        path.parent.mkdir(parents=True, exist_ok=True)
        building = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        uri = f"sqlite:///{building}"
        MlflowClient(uri, uri).search_experiments()   # creates and migrates it
        building.replace(path)   # atomic: a concurrent job sees the whole file or none
    return path


def seed_store(db: Path) -> None:
    """Start a new embedded store as a copy of `template_store()`, as MLflow would have made it here: its
    Default experiment's artifact location follows this working directory and its times are now. MLflow's
    schema check still runs when the store opens. Where the cache cannot be written, MLflow creates the store."""
    import contextlib
    import shutil
    import sqlite3
    import threading
    import time

    if db.exists():
        return
    try:
        from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
        from mlflow.utils.uri import append_to_uri_path, resolve_uri_if_local

        template = template_store()
    except (ImportError, OSError):
        return
    default_location = append_to_uri_path(resolve_uri_if_local(DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH), "0")
    partial = db.with_name(f"{db.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    shutil.copyfile(template, partial)
    now = int(time.time() * 1000)
    with contextlib.closing(sqlite3.connect(partial)) as connection, connection:
        connection.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
                           "WHERE experiment_id = 0", (default_location, now, now))
    try:
        os.link(partial, db)   # never over a store another job created meanwhile
    except OSError:   # that job's store stands; or no hard links here, and MLflow creates the store
        pass
    finally:
        partial.unlink()


def empty_store(workdir: Path) -> Path:
    """An empty MLflow store, its schema migrated once per service: a sandboxed or remote runner's private
    workdir starts with a copy instead of seconds of migrations (its run is thrown away with the workdir)."""
    return _migrated_empty(workdir / "cache" / "empty-mlflow.db")
