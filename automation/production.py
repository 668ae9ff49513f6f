"""Production, handed to a job that may not read the registry.

A PR job runs code from the pull request, so it holds no registry credential and never touches the
registry. Trusted code (the service, or its local executor) exports the production version into a
snapshot directory, and the PR job loads production from there:

    <dir>/production.json   {"model", "version", "tags", "path"}; version null when there is no production
    <dir>/model/…           the version's MLflow model directory, at `path`
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from automation.errors import MlgateError

SNAPSHOT_FILE = "production.json"


@dataclass
class ProductionSnapshot:
    model: str
    version: str | None
    tags: dict[str, str] = field(default_factory=dict)
    path: Path | None = None   # the MLflow model directory

    def load(self, device: Any) -> Any:
        from automation.predictors import load_downloaded

        assert self.version is not None and self.path is not None
        return load_downloaded(self.path, self.model, self.version, self.tags, device)


def export_production(client: Any, model: str, dest: Path) -> ProductionSnapshot:
    """Write `model`'s production version (or the fact that there is none) under `dest`."""
    import mlflow

    from automation.promote import PRODUCTION, alias_version

    dest.mkdir(parents=True, exist_ok=True)
    version = alias_version(client, model, PRODUCTION)
    tags: dict[str, str] = {}
    path = None
    if version is not None:
        tags = {k: v for k, v in client.get_model_version(model, version).tags.items() if k.startswith("mlgate.")}
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model}/{version}",
                                                        dst_path=str(dest / "model")))
    where = None if path is None else path.resolve().relative_to(dest.resolve()).as_posix()
    (dest / SNAPSHOT_FILE).write_text(json.dumps({"model": model, "version": version, "tags": tags, "path": where}),
                                      "utf-8")
    return ProductionSnapshot(model, version, tags, path)


def read_production(directory: Path, model: str) -> ProductionSnapshot:
    try:
        data = json.loads((directory / SNAPSHOT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MlgateError(f"{directory} is not a production snapshot ({type(exc).__name__})") from None
    if data.get("model") != model:
        raise MlgateError(f"{directory} holds production of {data.get('model')!r}, not {model!r}")
    version, where = data.get("version"), data.get("path")
    if version is not None and (not isinstance(where, str) or ".." in Path(where).parts or Path(where).is_absolute()):
        raise MlgateError(f"{directory / SNAPSHOT_FILE} names no model directory inside the snapshot")
    return ProductionSnapshot(model, None if version is None else str(version), dict(data.get("tags") or {}),
                              directory / where if version is not None else None)


def pack(directory: Path) -> bytes:
    """A snapshot as one gzip'd tar (what the service sends a runner)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(directory, arcname=".")
    return buffer.getvalue()


def unpack(data: bytes, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        archive.extractall(directory, filter="data")   # no absolute paths, links out or devices
