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
from triggers.serving.server import BadInput

CONFIG = RolloutConfig()
rng = np.random.default_rng(7)


def latency_counts(base: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    counts: Counter[str] = Counter()
    counts.update(f"lat_base_{analysis.latency_bucket(s)}" for s in base)
    counts.update(f"lat_cand_{analysis.latency_bucket(s)}" for s in cand)
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
    base = Counter({f"class_base_{k}": 200 for k in range(10)})
    shifted = base | Counter({f"class_cand_{k}": 200 for k in range(10)}) | Counter(
        {"class_cand_0": 500, "class_cand_1": 50})
    reason = analysis.class_failure(dict(shifted), CONFIG)
    assert reason and reason.startswith("class 0 is ") and "beyond ±0.05" in reason, reason
    even = base | Counter({f"class_cand_{k}": 200 for k in range(10)}) | Counter({"class_cand_0": 215})
    assert analysis.class_failure(dict(even), CONFIG) is None


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
    assert again.matched == [] and again.unmatched == ["r0"]
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
    second = rollout.begin(engine, "m", "1", "3", CONFIG)
    assert rollout.current(engine, first.id, CONFIG).state == "superseded" and second.id != first.id
    assert rollout.record_feedback(engine, "m", [("a", [1])]).unmatched == ["a"]
