"""The rollout's live comparison, check by check (latency quantiles, predicted classes, delayed labels),
and the labels' path through the job database: matched once whichever replica gets them, refused when
they do not fit, and gone with the rollout."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from automation import store
from automation.config import RolloutConfig, RolloutStage
from tests.conftest import clean_tables
from triggers.serving import rollout
from triggers.serving import rollout_analysis as analysis
from triggers.serving.feedback import parse_feedback
from automation.wire.json_inputs import BadInput

CONFIG = RolloutConfig()
rng = np.random.default_rng(7)


def latency_counts(base: np.ndarray, cand: np.ndarray, kind: str = "lat") -> dict[str, float]:
    """Histogram counts of both versions' seconds (`lat`: per request; `cost`: per example of a model call)."""
    counts: Counter[str] = Counter()
    counts.update(f"{kind}_base_{analysis.latency_bucket(s)}" for s in base)
    counts.update(f"{kind}_cand_{analysis.latency_bucket(s)}" for s in cand)
    return dict(counts)


def test_the_quantile_interval_holds_the_true_quantile() -> None:
    misses = 0
    for _ in range(200):
        sample = rng.lognormal(np.log(5e-4), 0.4, 1000)
        true_p95 = float(np.exp(np.log(5e-4) + 0.4 * 1.6448536))
        hist = Counter(analysis.latency_bucket(s) for s in sample)
        estimate, low, high = analysis.quantile_interval(hist, 0.95, 0.95)
        assert low <= estimate <= high
        misses += not low <= true_p95 <= high
    assert misses <= 10      # 95 % intervals, widened to bucket edges: seldom miss in 200 draws


def test_a_slower_candidate_fails_on_p95_and_an_equal_one_does_not() -> None:
    base = rng.lognormal(np.log(5e-4), 0.3, 2000)
    slow = latency_counts(base, rng.lognormal(np.log(1.5e-3), 0.3, 2000))
    reason = analysis.latency_failure(slow, CONFIG)
    assert reason and reason.startswith("p95 latency ") and "more than 1.5×" in reason, reason
    assert analysis.latency_failure(latency_counts(base, rng.lognormal(np.log(5e-4), 0.3, 2000)), CONFIG) is None
    # a few requests cannot make the whole interval slower, however slow they look
    assert analysis.latency_failure(latency_counts(base[:5], rng.lognormal(np.log(1e-3), 0.3, 5)), CONFIG) is None
    # nor can a gap under the noise floor: 1 µs against 3 µs is 3× and jitter
    tiny = latency_counts(np.full(2000, 1e-6), np.full(2000, 3e-6))
    assert analysis.latency_failure(tiny, CONFIG) is None
    assert analysis.latency_failure(tiny, CONFIG.model_copy(update={"latency_noise_floor_ms": 0})) is not None


def test_a_candidate_that_predicts_one_class_more_fails_the_class_check() -> None:
    base = {f"class_base_{k}": 200 for k in range(10)}
    shifted = base | {f"class_cand_{k}": 200 for k in range(10)} | {"class_cand_0": 500, "class_cand_1": 50}
    reason = analysis.class_failure(shifted, CONFIG)
    assert reason and reason.startswith("class 0 is 23.3% of its predictions against 10.0% ") and \
        "beyond ±0.05" in reason, reason
    even = base | {f"class_cand_{k}": 200 for k in range(10)} | {"class_cand_0": 215}
    assert analysis.class_failure(even, CONFIG) is None


def test_labels_fail_a_candidate_only_when_it_is_significantly_less_accurate() -> None:
    def counts(n: int, base_only: int, cand_only: int) -> dict[str, float]:
        return {"labelled": n, "base_only": base_only, "cand_only": cand_only,
                "base_correct": n * 0.9, "cand_correct": n * 0.9 - base_only + cand_only}

    reason = analysis.accuracy_failure(counts(500, 60, 5), CONFIG)
    assert reason and reason.startswith("accuracy ") and "on 500 labelled examples" in reason, reason
    assert analysis.accuracy_failure(counts(500, 12, 10), CONFIG) is None
    assert analysis.accuracy_failure(counts(20, 3, 0), CONFIG) is None      # too few labels to be sure
    assert analysis.accuracy_failure({}, CONFIG) is None


def test_feedback_bodies_are_checked_before_anything_is_scored() -> None:
    assert parse_feedback(b'{"labels": [{"id": "a", "label": 3}, {"id": "b", "labels": [1, 2]}]}', 64) == [
        ("a", [3]), ("b", [1, 2])]
    bad = {b"not json": "not valid JSON", b"[]": '"labels"', b'{"labels": [{"label": 3}]}': 'labels[0] needs "id"',
           b'{"labels": [{"id": "a", "label": -1}]}': 'labels[0] needs "label"',
           b'{"labels": [{"id": "a", "label": true}]}': 'labels[0] needs "label"',
           b'{"labels": [{"id": "a", "label": 1}, {"id": "a", "label": 2}]}': "appears twice",
           b'{"labels": [{"id": "' + b"x" * 65 + b'", "label": 1}]}': "at most 64 characters"}
    for body, message in bad.items():
        with pytest.raises(BadInput, match=message.replace("[", r"\[").replace("(", r"\(")):
            parse_feedback(body, 64)


def observation(request_id: str, baseline: list[int], candidate: list[int] | None) -> rollout.Observation:
    return rollout.Observation(request_id, np.array(baseline), None if candidate is None else np.array(candidate),
                               4e-4, 5e-4)


def test_labels_are_scored_once_per_request_and_leave_with_the_rollout(db_url: str) -> None:
    clean_tables(db_url)
    engine = store.open_store(db_url)
    config = RolloutConfig(stages=[RolloutStage(traffic=0, min_seconds=0, min_requests=4, min_labels=6)],
                           min_agreement=0.2, max_accuracy_drop=0.0)
    view = rollout.begin(engine, "m", "1", "2", config)
    replicas = [rollout.Tally(), rollout.Tally()]
    truth: dict[str, list[int]] = {}
    for i in range(40):   # the candidate is right on 1 of 3 examples the baseline gets right
        truth[f"r{i}"] = [1, 2, 3]
        replicas[i % 2].add(view, observation(f"r{i}", [1, 2, 3], [1, 0, 0]))
    replicas[0].add(view, observation("failed", [1], None))   # the candidate errored: nothing to score
    for tally in replicas:
        tally.flush(engine)
    # stage long and busy enough, but it waits for its labels
    waiting, failure = rollout.advance(engine, view.id, config)
    assert failure is None and waiting.state == "running" and waiting.comparison["labelled"] == 0
    assert waiting.comparison["requests"] == 41 and waiting.comparison["candidate_error_rate"] == pytest.approx(
        1 / 41, abs=1e-4)

    first = rollout.record_feedback(engine, "m", [("r0", truth["r0"]), ("r1", [1]), ("nope", [1]),
                                                  ("failed", [1])])
    assert first.matched == ["r0"] and first.refused == {"r1": "1 labels for a request of 3 examples"}
    assert sorted(first.unmatched) == ["failed", "nope"] and first.examples == 3
    again = rollout.record_feedback(engine, "m", [("r0", truth["r0"])])      # sent twice: counted once
    assert again.matched == [] and again.already == ["r0"] and again.unmatched == []
    assert rollout.record_feedback(engine, "other", [("r2", truth["r2"])]).matched == []   # another model's
    rest = rollout.record_feedback(engine, "m", [(rid, labels) for rid, labels in truth.items() if rid != "r0"])
    assert len(rest.matched) == 39

    ended, failure = rollout.advance(engine, view.id, config)
    assert ended.state == "rolled_back" and failure == ended.reason
    assert "failed its shadow stage: accuracy 0.333 on 120 labelled examples against 1.000" in failure, failure
    assert ended.comparison["accuracy"] == {"baseline": 1.0, "candidate": 0.3333}
    with Session(engine) as session:
        left = session.scalar(select(func.count()).select_from(rollout.RolloutPrediction).where(
            rollout.RolloutPrediction.rollout_id == view.id))
    assert left == 0
    # labels for an ended rollout find nothing to score
    assert rollout.record_feedback(engine, "m", [("r5", truth["r5"])]).unmatched == ["r5"]


def test_a_newer_rollout_drops_the_superseded_ones_predictions(db_url: str) -> None:
    clean_tables(db_url)
    engine = store.open_store(db_url)
    first = rollout.begin(engine, "m", "1", "2", CONFIG)
    tally: Any = rollout.Tally()
    tally.add(first, observation("a", [1], [1]))
    tally.flush(engine)
    assert kept_predictions(engine, first.id) == 1
    second = rollout.begin(engine, "m", "1", "3", CONFIG)
    with Session(engine) as session:
        assert session.get(rollout.Rollout, first.id).state == "superseded" and second.id != first.id
    assert kept_predictions(engine, first.id) == 0
    assert rollout.record_feedback(engine, "m", [("a", [1])]).unmatched == ["a"]


def kept_predictions(engine: Any, rollout_id: int) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(rollout.RolloutPrediction).where(
            rollout.RolloutPrediction.rollout_id == rollout_id))


def test_replicas_creating_the_same_counters_at_once_lose_none(db_url: str) -> None:
    """Every replica's first flush of a stage creates the same counters: an upsert, or some would fail."""
    import threading

    clean_tables(db_url)
    engine = store.open_store(db_url)
    view = rollout.begin(engine, "m", "1", "2", CONFIG)
    replicas = [rollout.Tally(keep_predictions=False) for _ in range(6)]
    for i, tally in enumerate(replicas):
        for j in range(5):
            tally.add(view, observation(f"r{i}-{j}", [j % 3], [j % 3]))
    start, failures = threading.Barrier(len(replicas)), []

    def flush(tally: rollout.Tally) -> None:
        start.wait()
        try:
            tally.flush(engine)
        except Exception as exc:
            failures.append(exc)

    threads = [threading.Thread(target=flush, args=(tally,)) for tally in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert failures == []
    with Session(engine) as session:
        counts = rollout.stage_counts(session, view.id, 0)
    assert counts["requests"] == 30 and counts["agree"] == 30 and counts["class_base_0"] == 12
    assert kept_predictions(engine, view.id) == 0    # no labels can come back: nothing kept for them


def test_a_stage_that_waits_for_labels_needs_feedback_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from automation.errors import UsageError
    from triggers.serving.server import check_rollout_labels

    waiting = RolloutConfig(stages=[RolloutStage(traffic=0, min_labels=100)])
    monkeypatch.delenv("MLGATE_FEEDBACK_TOKEN", raising=False)
    with pytest.raises(UsageError, match="min_labels.*set MLGATE_FEEDBACK_TOKEN"):
        check_rollout_labels("m", waiting)
    check_rollout_labels("m", CONFIG)          # no stage waits for labels
    monkeypatch.setenv("MLGATE_FEEDBACK_TOKEN", "t")
    check_rollout_labels("m", waiting)


def cost_counts(base: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    return latency_counts(base, cand, "cost")


def test_a_candidate_costing_several_times_the_compute_per_example_fails_and_an_equal_one_does_not() -> None:
    base = rng.lognormal(np.log(29e-6), 0.3, 300)          # seconds per example, one per model call
    costly = analysis.compute_failure(cost_counts(base, rng.lognormal(np.log(206e-6), 0.3, 300)), CONFIG)
    assert costly is not None and "per example" in costly and "7." in costly
    assert analysis.compute_failure(cost_counts(base, rng.lognormal(np.log(29e-6), 0.3, 300)), CONFIG) is None
    # a handful of calls cannot make the whole interval costlier
    assert analysis.compute_failure(cost_counts(base, rng.lognormal(np.log(206e-6), 0.3, 3)), CONFIG) is None
    shown = analysis.comparison(cost_counts(base, base * 7), 0.95)["latency"]
    assert 6 < shown["cand_compute_us_per_example"] / shown["base_compute_us_per_example"] < 8
