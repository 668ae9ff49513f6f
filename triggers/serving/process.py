"""How `mlgate serve-model` runs: one process, or `--workers N` uvicorn worker processes on one port.

Each worker builds its own server (alias watcher, model, batcher) from the same settings, passed in the
environment because uvicorn starts workers by import string.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SETTINGS_ENV = "MLGATE_SERVE_MODEL_SETTINGS"


@dataclass
class ServeSettings:
    config_path: str | None
    model: str
    poll_seconds: float = 2.0
    log_dir: str | None = None
    inference_log: bool = True
    max_batch: int = 1024
    batch_delay_ms: float | None = None
    stage: str = "production"    # the alias followed: production, or staging (promotion.stages)


def build_app(settings: ServeSettings) -> Any:
    """The serving app with its watcher started; both stop when the app shuts down."""
    from contextlib import asynccontextmanager

    from automation.config import load_config
    from triggers.serving.inference_log import InferenceLog
    from triggers.serving.server import ModelServer, create_serving_app

    config = load_config(settings.config_path)
    config.model(settings.model)
    server = ModelServer(config, settings.model, poll_seconds=settings.poll_seconds, stage=settings.stage)
    server.sync()   # serve at once when a production version exists; the watcher handles the rest
    server.start()
    log = None if not settings.inference_log else InferenceLog(
        Path(settings.log_dir) if settings.log_dir else config.workdir / "inference" / server.rollout_key)
    app = create_serving_app(server, log, max_batch=settings.max_batch, batch_delay_ms=settings.batch_delay_ms)

    @asynccontextmanager
    async def lifespan(_: Any) -> Any:
        yield
        server.stop()
        if log is not None:
            log.close()

    app.router.lifespan_context = lifespan
    return app


def app_from_env() -> Any:
    """uvicorn's factory in each worker process."""
    return build_app(ServeSettings(**json.loads(os.environ[SETTINGS_ENV])))


def serve(settings: ServeSettings, host: str, port: int, workers: int = 1) -> None:
    import uvicorn

    if workers == 1:
        uvicorn.run(build_app(settings), host=host, port=port, log_level="warning", access_log=False,
                    proxy_headers=False)   # nothing here reads the client's address
        return
    os.environ[SETTINGS_ENV] = json.dumps(asdict(settings))
    uvicorn.run("triggers.serving.process:app_from_env", factory=True, workers=workers, host=host, port=port,
                log_level="warning", access_log=False, proxy_headers=False)
