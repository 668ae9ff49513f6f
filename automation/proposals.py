"""Proposed deploy-file changes, durable until the service has put them in git (triggers/gitops/publish.py).

A job whose gate passed (promotion mode `pull_request` or `commit`), or serve-model after a rollback or a
staging rollout that passed, writes one row here: the deploy file's whole text and the version it replaces.
Nothing here moves production; git does, once the change is merged (or committed) and reconciled. A row is
written once and settled once, so a restart anywhere between leaves at most one commit or pull request.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import DateTime, Engine, Integer, String, Text, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from automation.deploy_file import DeployFile
from automation.store import Base, locked, utc_now

OPEN_STATES = ("pending", "pushed", "opened")   # not yet in the tracked branch


class Proposal(Base):
    __tablename__ = "gitops_proposals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200), index=True)
    stage: Mapped[str] = mapped_column(String(16))
    version: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(16))                 # promote | rollback
    content: Mapped[str] = mapped_column(Text)                    # the deploy file's text
    # the version the deploy file declared when the gate compared against it (None: nothing declared): the
    # change is stale, and dropped, once git declares something else
    replaces: Mapped[str | None] = mapped_column(String(32), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # pending → pushed (branch pushed, no GitHub) | opened (pull request) | done (in the branch) ;
    # superseded (a newer proposal, or git moved on) ; failed
    state: Mapped[str] = mapped_column(String(16), index=True)
    pr_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    branch: Mapped[str | None] = mapped_column(String(300), nullable=True)
    commit_sha: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


@dataclass(frozen=True)
class ProposalView:
    id: int
    model: str
    stage: str
    version: str
    kind: str
    content: str
    replaces: str | None
    job_id: str | None
    state: str
    pr_number: int | None
    branch: str | None
    commit_sha: str | None
    detail: str

    @classmethod
    def of(cls, row: Proposal) -> "ProposalView":
        return cls(row.id, row.model, row.stage, row.version, row.kind, row.content, row.replaces, row.job_id,
                   row.state, row.pr_number, row.branch, row.commit_sha, row.detail)

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "content"}


def propose(engine: Engine, declared: DeployFile, *, replaces: str | None, kind: str = "promote",
            job_id: str | None = None) -> ProposalView:
    """Record a change of `declared.model`'s deploy file in `declared.stage`; older open ones are superseded
    (the newer change goes on the same branch and pull request)."""
    with locked(engine, f"gitops:{declared.model}") as session:
        session.execute(update(Proposal).where(Proposal.model == declared.model, Proposal.stage == declared.stage,
                                               Proposal.state.in_(OPEN_STATES))
                        .values(state="superseded", detail="a newer change was proposed", updated_at=utc_now()))
        row = Proposal(model=declared.model, stage=declared.stage, version=declared.version, kind=kind,
                       content=declared.render(), replaces=replaces, job_id=job_id, state="pending")
        session.add(row)
        session.flush()
        return ProposalView.of(row)


def open_proposals(engine: Engine, model: str | None = None) -> list[ProposalView]:
    with Session(engine) as session:
        query = select(Proposal).where(Proposal.state.in_(OPEN_STATES)).order_by(Proposal.id)
        if model is not None:
            query = query.where(Proposal.model == model)
        return [ProposalView.of(row) for row in session.scalars(query)]


def settle(engine: Engine, proposal_id: int, expected: str, state: str, detail: str = "", **values: object) -> bool:
    """Move a proposal from `expected` to `state`; False when another worker already did."""
    with Session(engine) as session, session.begin():
        return session.execute(update(Proposal).where(Proposal.id == proposal_id, Proposal.state == expected)
                               .values(state=state, detail=detail[:2000], updated_at=utc_now(), **values)
                               ).rowcount == 1


def recent_proposals(engine: Engine, limit: int = 50) -> list[ProposalView]:
    with Session(engine) as session:
        return [ProposalView.of(row) for row in
                session.scalars(select(Proposal).order_by(Proposal.id.desc()).limit(limit))]
