"""Staged rollout after a promotion: the new version (candidate) against the one it replaces (baseline),
on the same live requests, stage by stage (the model's `rollout:` block): shadow (it answers nothing,
every request is compared), then canaries answering a growing share.

The state lives in the job database, so every `serve-model` replica agrees on the stage: each replica
adds its counts to `rollout_stats` at every look at the alias (`--poll-seconds`), and whichever replica
next holds the rollout's lock judges the stage once it is long, busy and labelled enough
(rollout_analysis.py says how). A failed stage rolls production back to the baseline (audited).

Where labels can come back (`POST /feedback` is on), each request of a rollout leaves both versions'
predictions in `rollout_predictions` under its request id, written with the counts, so a label that
comes later, to any replica, is scored once against both; the rows go when the rollout ends.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from sqlalchemy import Boolean, DateTime, Engine, Float, Integer, String, Text, delete, insert, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from automation.config import RolloutConfig
from automation.store import Base, as_utc, locked, utc_now
from triggers.serving import rollout_analysis as analysis

WHOLE_ROLLOUT = -1   # the stage under which labels count: they compare the same two versions in every stage


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


class RolloutPrediction(Base):
    """What both versions predicted for one request of a running rollout, until its labels come back."""

    __tablename__ = "rollout_predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[int] = mapped_column(Integer, index=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    baseline: Mapped[str] = mapped_column(Text)      # JSON list of classes, one per example
    candidate: Mapped[str] = mapped_column(Text)
    labelled: Mapped[bool] = mapped_column(Boolean, default=False)


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
    comparison: dict[str, object] = field(default_factory=dict)   # the stage's live comparison, when read

    def as_dict(self) -> dict[str, object]:
        return {"id": self.id, "baseline": self.baseline, "candidate": self.candidate, "stage": self.stage,
                "state": self.state, "traffic": self.traffic, "reason": self.reason, "comparison": self.comparison}


def _view(row: Rollout, config: RolloutConfig, counts: dict[str, float] | None = None) -> RolloutView:
    traffic = config.stages[min(row.stage, len(config.stages) - 1)].traffic if row.state == "running" else (
        1.0 if row.state == "done" else 0.0)
    return RolloutView(row.id, row.model, row.baseline, row.candidate, row.stage, row.state, row.reason, traffic,
                       {} if counts is None else analysis.comparison(counts, config.confidence))


def stage_counts(session: Session, rollout_id: int, stage: int) -> dict[str, float]:
    """The stage's counts from every replica, with the labels that came back over the whole rollout."""
    return {s.name: s.value for s in session.scalars(select(RolloutStat).where(
        RolloutStat.rollout_id == rollout_id, RolloutStat.stage.in_((stage, WHOLE_ROLLOUT))))}


def begin(engine: Engine, model: str, baseline: str, candidate: str, config: RolloutConfig) -> RolloutView:
    """The running rollout of `candidate` over `baseline` another replica began, or a new one (a version
    promoted again after a rollback is rolled out again). It ends any other running rollout of the model."""
    with locked(engine, f"rollout:{model}") as session:
        row = session.scalars(select(Rollout).where(Rollout.model == model, Rollout.candidate == candidate,
                                                    Rollout.baseline == baseline, Rollout.state == "running")
                              .order_by(Rollout.id.desc()).limit(1)).first()
        if row is None:   # also whatever a replica flushed for an ended rollout as it ended
            session.execute(delete(RolloutPrediction).where(RolloutPrediction.rollout_id.in_(
                select(Rollout.id).where(Rollout.model == model))))
            session.execute(update(Rollout).where(Rollout.model == model, Rollout.state == "running").values(
                state="superseded", reason=f"production moved to version {candidate}"))
            row = Rollout(model=model, baseline=baseline, candidate=candidate, stage=0, stage_started_at=utc_now(),
                          state="running", reason="")
            session.add(row)
            session.flush()
        return _view(row, config)


@dataclass
class Observation:
    """One request of a rollout, as both versions answered it."""

    request_id: str
    baseline: np.ndarray              # predicted classes
    candidate: np.ndarray | None      # None: the candidate failed
    baseline_seconds: float
    candidate_seconds: float


class Tally:
    """This replica's counts and predictions since the last flush, per rollout stage."""

    def __init__(self, keep_predictions: bool = True) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[int, int, str]] = Counter()
        self._predictions: list[dict[str, object]] = []
        self.keep_predictions = keep_predictions   # only where labels can come back (POST /feedback is on)

    def add(self, rollout: RolloutView, seen: Observation) -> None:
        counts: Counter[str] = Counter(requests=1, examples=len(seen.baseline))
        counts[f"lat_base_{analysis.latency_bucket(seen.baseline_seconds)}"] += 1
        if seen.candidate is None:
            counts["candidate_errors"] += 1
        else:   # classes of both on the same requests, so the candidate's failures shift neither share
            counts.update(f"class_base_{k}" for k in seen.baseline.tolist())
            counts["compared"] += len(seen.candidate)
            counts["agree"] += int((seen.candidate == seen.baseline).sum())
            counts[f"lat_cand_{analysis.latency_bucket(seen.candidate_seconds)}"] += 1
            counts.update(f"class_cand_{k}" for k in seen.candidate.tolist())
        with self._lock:
            for name, amount in counts.items():
                self._counts[(rollout.id, rollout.stage, name)] += amount
            if seen.candidate is not None and self.keep_predictions:
                self._predictions.append({"rollout_id": rollout.id, "request_id": seen.request_id,
                                          "baseline": json.dumps(seen.baseline.tolist()),
                                          "candidate": json.dumps(seen.candidate.tolist()), "labelled": False})

    def add_cost(self, rollout: RolloutView, candidate: bool, seconds: float, examples: int) -> None:
        """One model call's time over its examples, for the version that made it (its compute cost)."""
        if examples <= 0:
            return
        name = f"cost_{'cand' if candidate else 'base'}_{analysis.latency_bucket(seconds / examples)}"
        with self._lock:
            self._counts[(rollout.id, rollout.stage, name)] += 1

    def flush(self, engine: Engine) -> None:
        with self._lock:
            counts, self._counts = self._counts, Counter()
            predictions, self._predictions = self._predictions, []
        if not counts and not predictions:
            return
        try:
            with Session(engine) as session, session.begin():
                add_counts(session, counts)
                if predictions:   # a rollout that ended meanwhile takes no more labels
                    running = set(session.scalars(select(Rollout.id).where(
                        Rollout.id.in_({p["rollout_id"] for p in predictions}), Rollout.state == "running")))
                    kept = [p for p in predictions if p["rollout_id"] in running]
                    if kept:
                        session.execute(insert(RolloutPrediction), kept)
        except Exception:   # the database is away: keep them for the next flush
            with self._lock:
                self._counts.update(counts)
                self._predictions[:0] = predictions
            raise


def add_counts(session: Session, counts: Counter[tuple[int, int, str]]) -> None:
    """Add to the shared counters in one upsert per counter (replicas may create the same one at once),
    in key order so two replicas never wait on each other's rows crosswise."""
    if not counts:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as upsert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as upsert
    else:
        raise RuntimeError(f"rollout counters need PostgreSQL or SQLite, not {dialect}")
    statement = upsert(RolloutStat)
    statement = statement.on_conflict_do_update(
        index_elements=[RolloutStat.rollout_id, RolloutStat.stage, RolloutStat.name],
        set_={"value": RolloutStat.value + statement.excluded.value})
    session.execute(statement, [{"rollout_id": rollout_id, "stage": stage, "name": name, "value": float(amount)}
                                for (rollout_id, stage, name), amount in sorted(counts.items())])


@dataclass
class FeedbackResult:
    matched: list[str]
    already: list[str]        # its labels came before (from this sender or another replica)
    unmatched: list[str]      # no prediction kept for it: served outside a rollout, or not flushed yet
    refused: dict[str, str]   # request id -> why its labels do not fit its request
    examples: int

    def as_dict(self) -> dict[str, object]:
        return {"matched": len(self.matched), "labelled_examples": self.examples, "already_labelled": self.already,
                "unmatched": self.unmatched, "refused": self.refused}


def record_feedback(engine: Engine, model: str, labels: Sequence[tuple[str, list[int]]]) -> FeedbackResult:
    """Score delayed labels against what both versions predicted for those requests. A request's labels
    count once, whichever replica gets them and however often they are sent."""
    result = FeedbackResult([], [], [], {}, 0)
    wanted = dict(labels)
    found: set[str] = set()
    with Session(engine) as session, session.begin():
        running = select(Rollout.id).where(Rollout.model == model, Rollout.state == "running")
        rows = session.scalars(select(RolloutPrediction).where(
            RolloutPrediction.rollout_id.in_(running), RolloutPrediction.request_id.in_(list(wanted)))).all()
        counts: Counter[tuple[int, int, str]] = Counter()
        for row in rows:
            truth = wanted[row.request_id]
            found.add(row.request_id)
            baseline, candidate = json.loads(row.baseline), json.loads(row.candidate)
            if len(truth) != len(baseline):
                result.refused[row.request_id] = f"{len(truth)} labels for a request of {len(baseline)} examples"
                continue
            claimed = not row.labelled and session.execute(update(RolloutPrediction).where(
                RolloutPrediction.id == row.id, RolloutPrediction.labelled.is_(False)).values(labelled=True)).rowcount
            if not claimed:   # labelled before, or by another replica just now
                result.already.append(row.request_id)
                continue
            result.matched.append(row.request_id)
            result.examples += len(truth)
            key = (row.rollout_id, WHOLE_ROLLOUT)
            for label, base, cand in zip(truth, baseline, candidate):
                counts[(*key, "labelled")] += 1
                counts[(*key, "base_correct")] += base == label
                counts[(*key, "cand_correct")] += cand == label
                counts[(*key, "base_only")] += base == label and cand != label
                counts[(*key, "cand_only")] += cand == label and base != label
        add_counts(session, counts)
    result.unmatched = [rid for rid in wanted if rid not in found]
    return result


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
        counts = stage_counts(session, rollout_id, row.stage)
        started = as_utc(row.stage_started_at)
        if counts.get("requests", 0) < stage.min_requests or counts.get("labelled", 0) < stage.min_labels or \
                (utc_now() - started).total_seconds() < stage.min_seconds:
            return _view(row, config, counts), None
        failure = analysis.judge(counts, config)
        kind = "shadow" if stage.traffic == 0 else f"canary {stage.traffic:.0%}"
        if failure:
            row.state, row.reason = "rolled_back", f"version {row.candidate} failed its {kind} stage: {failure}"
        elif row.stage + 1 < len(config.stages):
            row.stage, row.stage_started_at = row.stage + 1, utc_now()
        else:
            row.state, row.reason = "done", f"version {row.candidate} passed every stage"
        if row.state != "running":   # its predictions waited for labels that can no longer count
            session.execute(delete(RolloutPrediction).where(RolloutPrediction.rollout_id == rollout_id))
        return _view(row, config, counts), failure and row.reason
