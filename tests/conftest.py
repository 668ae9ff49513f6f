from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from triggers.cli import main

POSTGRES_URL = os.environ.get("MLGATE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

# Small but real: actual training on digits, actual ONNX Runtime, actual MLflow on SQLite.
FAST_CONFIG: dict[str, Any] = {
    "version": 1,
    "workdir": "state",
    "defaults": {
        "train": {"epochs": 15, "batch_size": 32, "lr": 0.003, "patience": 5},
        "benchmark": {"batch_sizes": [1, 16], "warmup": 5, "iterations": 60, "rounds": 4},
        "gates": {"absolute": {"min_accuracy": 0.85, "max_p95_latency_ms": 50, "max_size_mb": 10},
                  "bootstrap_samples": 500},
    },
    "models": {
        "digits_mlp": {"module": "models.digits_mlp", "params": {"hidden": 64}},
        "digits_cnn": {"module": "models.digits_cnn", "params": {"channels": 8, "hidden": 32}},
    },
}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The job/audit store: a SQLite file, and the PostgreSQL server on this machine."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mlgate.db'}"
    from sqlalchemy import create_engine, text

    try:
        with create_engine(POSTGRES_URL).connect() as conn:
            conn.execute(text("select 1"))
    except Exception:
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_URL}; start it (see README, Development)")
    return POSTGRES_URL


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MLFLOW_TRACKING_URI", "MLGATE_DATABASE_URL", "GITHUB_TOKEN", "GITHUB_REPOSITORY"):
        monkeypatch.delenv(var, raising=False)


def write_config(directory: Path, config: dict[str, Any] | None = None) -> Path:
    path = directory / "mlgate.yaml"
    path.write_text(yaml.safe_dump(config or FAST_CONFIG), encoding="utf-8")
    return path


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(tmp_path)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv), standalone=False)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


def error_lines(stderr: str) -> list[str]:
    """stderr without the structured (JSON) log lines: what a person reads."""
    return [line for line in stderr.splitlines() if line and not line.startswith("{")]
