"""Staged rollout after a promotion: the new version (candidate) against the one it replaces (baseline),
on the same live requests, stage by stage (the model's `rollout:` block): shadow (it answers nothing,
every request is compared), then canaries answering a growing share.

The state lives in the job database, so every `serve-model` replica agrees on the stage: each replica
adds its counts to `rollout_stats` every second, and whichever replica next holds the rollout's lock
judges the stage once it is long and busy enough. The verdict uses intervals, as the offline gate does:
a stage fails only when the candidate is *significantly* worse (the whole Wilson interval beyond the
limit) on agreement, inference errors, or the share of requests it answers more than
`max_latency_ratio` slower. A failed stage rolls production back to the baseline (audited).
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from statistics import NormalDist

from sqlalchemy import DateTime, Engine, Float, Integer, String, Text, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from automation.config import RolloutConfig
from automation.store import Base, locked

COUNTS = ("requests", "examples", "agree", "candidate_errors", "slower")


class Rollout(Base):
    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200), index=True)
    baseline: Mapped[str] = mapped_column(String(32))
    candidate: Mapped[str] = mapped_column(String(32))
    stage: Mapped[int] = mapped_column(Integer, default=0)
    stage_started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    state: Mapped[str] = mapped_column(String(16), index=True)      # running | done | rolled_back | superseded
    reason: Mapped[str] = mapped_column(Text, default="")


class RolloutStat(Base):
    __tablename__ = "rollout_stats"

    rollout_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    stage: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[float] = mapped_column(Float, default=0.0)


@dataclass
class RolloutView:
    id: int
    model: str
    baseline: str
    candidate: str
    stage: int
    state: str
    reason: str
    traffic: float

    def as_dict(self) -> dict[str, object]:
        return {"id": self.id, "baseline": self.baseline, "candidate": self.candidate, "stage": self.stage,
                "state": self.state, "traffic": self.traffic, "reason": self.reason}


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _view(row: Rollout, config: RolloutConfig) -> RolloutView:
    traffic = config.stages[min(row.stage, len(config.stages) - 1)].traffic if row.state == "running" else (
        1.0 if row.state == "done" else 0.0)
    return RolloutView(row.id, row.model, row.baseline, row.candidate, row.stage, row.state, row.reason, traffic)


def begin(engine: Engine, model: str, baseline: str, candidate: str, config: RolloutConfig) -> RolloutView:
    """The running rollout of `candidate` over `baseline` another replica began, or a new one (a version
    promoted again after a rollback is rolled out again). It ends any other running rollout of the model."""
    with locked(engine, f"rollout:{model}") as session:
        row = session.scalars(select(Rollout).where(Rollout.model == model, Rollout.candidate == candidate,
                                                    Rollout.baseline == baseline, Rollout.state == "running")
                              .order_by(Rollout.id.desc()).limit(1)).first()
        if row is None:
            session.execute(update(Rollout).where(Rollout.model == model, Rollout.state == "running").values(
                state="superseded", reason=f"production moved to version {candidate}"))
            row = Rollout(model=model, baseline=baseline, candidate=candidate, stage=0, stage_started_at=_now(),
                          state="running", reason="")
            session.add(row)
            session.flush()
        return _view(row, config)


def current(engine: Engine, rollout_id: int, config: RolloutConfig) -> RolloutView:
    with Session(engine) as session:
        row = session.get(Rollout, rollout_id)
        assert row is not None
        return _view(row, config)


class Tally:
    """This replica's counts since the last flush, per rollout stage."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[int, int, str]] = Counter()

    def add(self, rollout: RolloutView, *, examples: int, agree: int, candidate_error: bool, slower: bool) -> None:
        """One request: how many examples, on how many of them both versions predicted the same class."""
        with self._lock:
            key = (rollout.id, rollout.stage)
            self._counts[(*key, "requests")] += 1
            self._counts[(*key, "examples")] += examples
            self._counts[(*key, "agree")] += agree
            self._counts[(*key, "candidate_errors")] += candidate_error
            self._counts[(*key, "slower")] += slower

    def flush(self, engine: Engine) -> None:
        with self._lock:
            counts, self._counts = self._counts, Counter()
        if not counts:
            return
        with Session(engine) as session, session.begin():
            for (rollout_id, stage, name), amount in counts.items():
                done = session.execute(update(RolloutStat).where(
                    RolloutStat.rollout_id == rollout_id, RolloutStat.stage == stage, RolloutStat.name == name)
                    .values(value=RolloutStat.value + amount)).rowcount
                if not done:
                    session.add(RolloutStat(rollout_id=rollout_id, stage=stage, name=name, value=float(amount)))


def wilson(successes: float, n: float, confidence: float) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def judge(counts: dict[str, float], config: RolloutConfig) -> str | None:
    """Why the candidate failed this stage, or None. Fails only on what the interval makes certain."""
    n, examples = counts.get("requests", 0.0), counts.get("examples", 0.0)
    agree_low, agree_high = wilson(counts.get("agree", 0.0), examples, config.confidence)
    if agree_high < config.min_agreement:
        return (f"agreement {counts.get('agree', 0) / examples:.3f} with the previous version on {examples:.0f} "
                f"predictions, {config.confidence:.0%} CI "
                f"[{agree_low:.3f}, {agree_high:.3f}], below {config.min_agreement:g}")
    error_low, error_high = wilson(counts.get("candidate_errors", 0.0), n, config.confidence)
    if error_low > config.max_error_rate:
        return (f"inference error rate {counts.get('candidate_errors', 0) / n:.3f}, {config.confidence:.0%} CI "
                f"[{error_low:.3f}, {error_high:.3f}], above {config.max_error_rate:g}")
    slow_low, slow_high = wilson(counts.get("slower", 0.0), n, config.confidence)
    if slow_low > 0.5:
        return (f"{counts.get('slower', 0) / n:.0%} of requests more than {config.max_latency_ratio:g}× slower than "
                f"the previous version, {config.confidence:.0%} CI [{slow_low:.3f}, {slow_high:.3f}]")
    return None


def advance(engine: Engine, rollout_id: int, config: RolloutConfig) -> tuple[RolloutView, str | None]:
    """Judge the current stage if it is long and busy enough: next stage, done, or rolled_back (with the
    reason, returned so the caller rolls production back). One replica at a time decides."""
    with Session(engine) as session:
        model = session.scalar(select(Rollout.model).where(Rollout.id == rollout_id))
    with locked(engine, f"rollout:{model}") as session:
        row = session.get(Rollout, rollout_id)
        assert row is not None
        if row.state != "running":
            return _view(row, config), None
        stage = config.stages[row.stage]
        counts = {s.name: s.value for s in session.scalars(select(RolloutStat).where(
            RolloutStat.rollout_id == rollout_id, RolloutStat.stage == row.stage))}
        started = row.stage_started_at if row.stage_started_at.tzinfo else row.stage_started_at.replace(
            tzinfo=timezone.utc)
        if counts.get("requests", 0) < stage.min_requests or (_now() - started).total_seconds() < stage.min_seconds:
            return _view(row, config), None
        failure = judge(counts, config)
        kind = "shadow" if stage.traffic == 0 else f"canary {stage.traffic:.0%}"
        if failure:
            row.state, row.reason = "rolled_back", f"version {row.candidate} failed its {kind} stage: {failure}"
            return _view(row, config), row.reason
        if row.stage + 1 < len(config.stages):
            row.stage, row.stage_started_at = row.stage + 1, _now()
        else:
            row.state, row.reason = "done", f"version {row.candidate} passed every stage"
        return _view(row, config), None
