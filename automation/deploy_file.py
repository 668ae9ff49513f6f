"""A deploy file: what serves one model in one stage, declared in the repository (GitOps promotion).

    deploy/<stage>/<model>.yaml        e.g. deploy/production/digits_mlp.yaml

    apiVersion: mlgate/v1
    kind: ModelDeployment
    model: digits_mlp                  # the registered model, and the file's name
    stage: production                  # staging | production, and the file's folder
    version: "7"                       # the registered version that serves
    digest: sha256:9f2c…               # of the files serve-model loads (artifact_digest); a mismatch is refused
    variant: onnx_int8
    evidence:                          # why: the job that gated it (and, after staging, its rollout)
      job_id: 3f6…
      commit: 9ab1…
      trigger: push
      gates: [{name: accuracy, status: passed, line: "✅ accuracy: …"}]
      report: /reports/3f6…

One file is one model in one stage: a second YAML document, a file elsewhere, a link, a name that is not the
model's, a version that does not exist or a digest that does not match are refused with one line each.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from automation.errors import one_line

API_VERSION = "mlgate/v1"
KIND = "ModelDeployment"
STAGES = ("staging", "production")
Stage = Literal["staging", "production"]
MAX_DEPLOY_FILE_BYTES = 64 * 1024
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class DeployRefused(ValueError):
    """A deploy file that declares nothing: the message is the one line the log, dashboard and check show."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GateLine(_Strict):
    name: str = Field(max_length=200)
    status: Literal["passed", "failed", "skipped"]
    line: str = Field("", max_length=2000)


class Evidence(_Strict):
    job_id: str | None = Field(None, max_length=64)
    commit: str | None = Field(None, max_length=64)
    trigger: str | None = Field(None, max_length=32)
    gates: list[GateLine] = Field(default_factory=list, max_length=64)
    report: str | None = Field(None, max_length=2000)
    # a production file after staging: the staging rollout's verdict and figures
    rollout: dict[str, Any] | None = None
    # a rollback that serving did on its own (live evidence): why
    rolled_back: str | None = Field(None, max_length=2000)


class DeployFile(_Strict):
    apiVersion: Literal["mlgate/v1"] = API_VERSION
    kind: Literal["ModelDeployment"] = KIND
    model: str = Field(min_length=1, max_length=200)
    stage: Stage
    version: str = Field(pattern=r"^[1-9][0-9]{0,9}$")
    digest: str = Field(pattern=DIGEST.pattern)
    variant: str | None = Field(None, max_length=64)
    evidence: Evidence = Evidence()

    def render(self) -> str:
        """The file's text: the schema's key order, a header saying what to do with it."""
        header = (f"# mlgate deploy file: version {self.version} of {self.model} serves in {self.stage}.\n"
                  "# Merge a change here to promote; `git revert` the change to roll back (README: GitOps).\n")
        body = self.model_dump(mode="json", exclude_none=True)
        return header + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=120)


def deploy_path(folder: str, stage: str, model: str) -> str:
    """The file's path in the repository: `<folder>/<stage>/<model>.yaml`."""
    return f"{folder.strip('/')}/{stage}/{model}.yaml"


def parse_deploy_file(path: str, text: bytes, folder: str, models: set[str]) -> DeployFile:
    """The declaration in `text`, read from `path` in the repository; DeployRefused (one line) otherwise."""
    where = _place(path, folder)
    if len(text) > MAX_DEPLOY_FILE_BYTES:
        raise DeployRefused(f"{path}: {len(text)} bytes, more than a deploy file's {MAX_DEPLOY_FILE_BYTES}")
    try:
        documents = [d for d in yaml.safe_load_all(text.decode("utf-8")) if d is not None]
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DeployRefused(f"{path}: not YAML ({one_line(str(exc), 160)})") from None
    if len(documents) != 1:
        raise DeployRefused(f"{path}: {len(documents)} YAML documents; a deploy file declares one model in one "
                            "stage" if documents else f"{path}: empty")
    try:
        declared = DeployFile.model_validate(documents[0])
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise DeployRefused(f"{path}: {key}: {first['msg']}") from None
    if (declared.stage, declared.model) != where:
        raise DeployRefused(f"{path}: declares {declared.model} in {declared.stage}; this file may only declare "
                            f"{where[1]} in {where[0]} ({deploy_path(folder, declared.stage, declared.model)})")
    if declared.model not in models:
        raise DeployRefused(f"{path}: {declared.model} is not a model in mlgate.yaml")
    return declared


def _place(path: str, folder: str) -> tuple[str, str]:
    """(stage, model) a path may declare: exactly `<folder>/<stage>/<model>.yaml`."""
    parts = PurePosixPath(path).parts
    root = PurePosixPath(folder.strip("/")).parts
    if parts[:len(root)] != root or len(parts) != len(root) + 2 or not parts[-1].endswith(".yaml") \
            or parts[len(root)] not in STAGES:
        raise DeployRefused(f"{path}: outside {folder.strip('/')}/<stage>/<model>.yaml (stages: "
                            f"{', '.join(STAGES)}); nothing there is read")
    return parts[len(root)], parts[-1][:-len(".yaml")]


def artifact_digest(directory: Path) -> str:
    """sha256 over every regular file under a version's downloaded MLflow model directory (what serve-model
    loads): relative path, size and content hash of each, in path order. A link is refused, not followed."""
    listing = hashlib.sha256()
    for path in sorted(directory.rglob("*"), key=lambda p: p.relative_to(directory).as_posix()):
        if path.is_symlink():
            raise DeployRefused(f"{path.relative_to(directory)} is a link; a served artifact holds files only")
        if not path.is_file():
            continue
        content = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                content.update(block)
        listing.update(f"{path.relative_to(directory).as_posix()}\0{path.stat().st_size}\0"
                       f"{content.hexdigest()}\n".encode())
    return f"sha256:{listing.hexdigest()}"


def version_digest(model: str, version: str, scratch: Path) -> str:
    """The digest of a registered version's files, downloaded from the registry into `scratch`."""
    import mlflow

    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model}/{version}", dst_path=str(scratch))
    return artifact_digest(Path(local))
