"""The reconciler: the registry's aliases made to match the deploy files at the tracked branch's head.

Git is the source of truth. For each model whose promotion goes through git, the file
`<folder>/<stage>/<model>.yaml` at the head of `service.branch` names a version and its digest; the alias
(`production`, `staging`) is moved there through the audited compare-and-set (automation/promote.py).

An alias that differs from what git declared *and already applied* moved outside git: that is drift, counted,
logged and shown on the dashboard, and by the model's `promotion.on_drift` put back or left alone. A file that
declares nothing valid (a version that does not exist, a digest that does not match, two documents, a path or
link outside `<folder>/<stage>/<model>.yaml`) is refused with one line, and that model's alias stays where it
is. The same head twice moves nothing.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Engine, String
from sqlalchemy.orm import Mapped, Session, mapped_column

from automation.config import MlgateConfig
from automation.deploy_file import MAX_DEPLOY_FILE_BYTES, DeployFile, DeployRefused, parse_deploy_file
from automation.errors import one_line
from automation.store import Base, utc_now
from triggers.gitops import git_tree

log = logging.getLogger(__name__)


class AppliedDeclaration(Base):
    """What git declared for a model's stage when it was last applied: an alias that differs from it while
    the file has not changed moved outside git."""
    __tablename__ = "gitops_applied"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    stage: Mapped[str] = mapped_column(String(16), primary_key=True)
    version: Mapped[str] = mapped_column(String(32))
    head: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


@dataclass
class StageState:
    model: str
    stage: str
    declared: str | None        # the version git declares
    registry: str | None        # where the alias pointed before this pass
    outcome: str                # in_sync | moved | drift_restored | drift_reported | held | refused
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Reconciled:
    head: str
    at: float
    states: list[StageState] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)     # one line per file that declares nothing

    @property
    def drift(self) -> list[StageState]:
        return [s for s in self.states if s.outcome.startswith("drift")]

    def as_dict(self) -> dict[str, Any]:
        return {"head": self.head, "at": self.at, "states": [s.as_dict() for s in self.states],
                "refused": self.refused}


def git_models(config: MlgateConfig) -> set[str]:
    """The models whose production git declares."""
    return {name for name, spec in config.models.items() if spec.promotion.mode != "registry"}


def read_declarations(config: MlgateConfig, repo: Path, head: str) -> tuple[dict[tuple[str, str], DeployFile],
                                                                            list[str]]:
    """Every valid declaration under the deploy folder at `head`, by (stage, model), and a line per refusal."""
    folder = config.service.gitops.folder
    models = git_models(config)
    declared: dict[tuple[str, str], DeployFile] = {}
    refused: list[str] = []
    for entry in git_tree.entries_under(repo, head, folder):
        try:
            if not entry.is_file:
                raise DeployRefused(f"{entry.path}: a link or submodule; a deploy file is a regular file")
            text = git_tree.read_blob(repo, entry.blob, MAX_DEPLOY_FILE_BYTES)
            if text is None:
                raise DeployRefused(f"{entry.path}: larger than a deploy file's {MAX_DEPLOY_FILE_BYTES} bytes")
            found = parse_deploy_file(entry.path, text, folder, set(config.models))
            spec = config.model(found.model)
            if found.model not in models:
                raise DeployRefused(f"{entry.path}: {found.model} promotes through the registry "
                                    "(promotion.mode: registry); git declares nothing for it")
            if found.stage not in spec.promotion.stages:
                raise DeployRefused(f"{entry.path}: {found.model} has no {found.stage} stage (promotion.stages)")
            declared[(found.stage, found.model)] = found
        except DeployRefused as exc:
            refused.append(str(exc))
    return declared, refused


class Reconciler:
    """One pass per call; digests of registered versions are remembered (a version's files never change)."""

    def __init__(self, config: MlgateConfig, repo: Path, engine: Engine, client: Callable[[], Any],
                 held: Callable[[str, str], str | None] | None = None) -> None:
        self.config, self.repo, self.engine, self._client = config, repo, engine, client
        # (model, stage) -> version an open rollback proposal names: serving rolled back, git will follow
        self.held = held or (lambda model, stage: None)
        self._digests: dict[tuple[str, str, str], str] = {}
        self.last: Reconciled | None = None

    @property
    def client(self) -> Any:
        return self._client()

    def run(self) -> Reconciled:
        head = git_tree.branch_head(self.repo, self.config.service.branch)
        declared, refused = read_declarations(self.config, self.repo, head)
        result = Reconciled(head=head, at=time.time(), refused=list(refused))
        for (stage, model), found in sorted(declared.items()):
            try:
                result.states.append(self._apply(head, found))
            except DeployRefused as exc:
                result.refused.append(str(exc))
                result.states.append(StageState(model, stage, found.version, None, "refused", str(exc)))
        for line in result.refused:
            log.error("deploy file refused", extra={"head": head, "refusal": line})
        self.last = result
        return result

    def _apply(self, head: str, found: DeployFile) -> StageState:
        from automation import promote

        path = f"{self.config.service.gitops.folder}/{found.stage}/{found.model}.yaml"
        self._check_version(path, found)
        alias = promote.PRODUCTION if found.stage == "production" else promote.STAGING
        promote.reconcile(self.client, self.engine, found.model)   # a move whose mover died settles first
        current = promote.alias_version(self.client, found.model, alias)
        state = StageState(found.model, found.stage, found.version, current, "in_sync")
        if current != found.version:
            applied = self._applied(found.model, found.stage)
            git_changed = applied is None or applied != found.version
            reason = f"git {head[:12]}: {path}"
            if git_changed:
                state.outcome = "moved" if self._move(found, reason, current) else "in_sync"
                state.detail = f"{current} → {found.version} ({reason})"
            elif self.held(found.model, found.stage) == current:
                state.outcome = "held"
                state.detail = f"serving rolled back to {current}; its deploy-file change is not merged yet"
            else:
                state.detail = f"the alias names {current}, git declares {found.version}: moved outside git"
                if self.config.model(found.model).promotion.on_drift == "restore":
                    self._move(found, f"drift restored: {state.detail}", current)
                    state.outcome = "drift_restored"
                else:
                    state.outcome = "drift_reported"
                log.warning("registry drifted from git", extra={"model": found.model, "stage": found.stage,
                                                                "registry": current, "git": found.version,
                                                                "outcome": state.outcome})
        self._remember(found, head)
        return state

    def _move(self, found: DeployFile, reason: str, current: str | None) -> bool:
        """The alias moved to the declared version, over `current` only; False when another replica's reconciler
        moved it first (one audited move per change, however many replicas reconcile)."""
        from automation import promote
        from automation.errors import GateStale

        if found.stage == "production":
            try:
                promote.declare(self.client, self.engine, found.model, found.version, reason=reason,
                                expected_production=current)
            except GateStale:
                return False
        else:
            promote.set_staging(self.client, self.engine, found.model, found.version, reason=reason)
        log.info("alias moved to what git declares", extra={"model": found.model, "stage": found.stage,
                                                            "version": found.version, "reason": reason})
        return True

    def _check_version(self, path: str, found: DeployFile) -> None:
        """The version exists and its files are the ones the file names (DeployRefused otherwise)."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version(found.model, found.version)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise DeployRefused(f"{path}: version {found.version} of {found.model} is not registered") from None
            raise
        key = (found.model, found.version, str(mv.run_id))
        if key not in self._digests:
            from automation.deploy_file import version_digest

            with tempfile.TemporaryDirectory(prefix="mlgate-reconcile-") as scratch:
                try:
                    self._digests[key] = version_digest(found.model, found.version, Path(scratch))
                except DeployRefused as exc:
                    raise DeployRefused(f"{path}: version {found.version}: {exc}") from None
        if self._digests[key] != found.digest:
            raise DeployRefused(f"{path}: digest {found.digest[:19]}… does not match version {found.version}'s "
                                f"files ({self._digests[key][:19]}…)")

    def _applied(self, model: str, stage: str) -> str | None:
        with Session(self.engine) as session:
            row = session.get(AppliedDeclaration, (model, stage))
            return None if row is None else row.version

    def _remember(self, found: DeployFile, head: str) -> None:
        with Session(self.engine) as session, session.begin():
            row = session.get(AppliedDeclaration, (found.model, found.stage))
            if row is None:
                session.add(AppliedDeclaration(model=found.model, stage=found.stage, version=found.version,
                                               head=head, updated_at=utc_now()))
            else:
                row.version, row.head, row.updated_at = found.version, head, utc_now()


def summary_text(result: Reconciled) -> tuple[str, str]:
    """(title, markdown) for the commit's `mlgate/deploy` check run."""
    if result.refused:
        title = f"{len(result.refused)} deploy file(s) refused; their models stay where they were"
    else:
        title = f"{len(result.states)} declaration(s) applied"
    lines = [f"- ❌ {one_line(r, 300)}" for r in result.refused]
    lines += [f"- {s.model} {s.stage}: v{s.declared} ({s.outcome.replace('_', ' ')})" for s in result.states
              if s.outcome != "refused"]
    return title, "\n".join(lines) or "no deploy files"
