from __future__ import annotations

import numpy as np

from automation.config import AbsoluteGates, GateConfig, RelativeGates
from automation.gate import CandidateMetrics, evaluate_gates

N = 400


def _metrics(accuracy: float, p95: float = 0.05, seed: int = 0, rounds: list[float] | None = None,
             correct: np.ndarray | None = None) -> CandidateMetrics:
    rng = np.random.default_rng(seed)
    if correct is None:
        correct = np.zeros(N, dtype=bool)
        correct[rng.choice(N, int(round(accuracy * N)), replace=False)] = True
    return CandidateMetrics(accuracy=float(correct.mean()), macro_f1=float(correct.mean()), p95_ms_batch1=p95,
                            size_mb=1.0, correct=correct, round_p95_ms=rounds or [p95] * 5)


CFG = GateConfig(absolute=AbsoluteGates(min_accuracy=0.9, max_p95_latency_ms=1.0, max_size_mb=5),
                 relative=RelativeGates(max_accuracy_drop=0.01, max_latency_increase=0.2), bootstrap_samples=1000)


def _by_name(verdict):
    return {c.name: c for c in verdict.checks}


def test_first_model_skips_relative_checks_with_reason() -> None:
    verdict = evaluate_gates(CFG, _metrics(0.95), None)
    checks = _by_name(verdict)
    assert verdict.passed
    assert checks["accuracy vs production"].status == "skipped"
    assert "nothing in production" in checks["latency vs production"].reason


def test_missing_metric_fails_closed() -> None:
    candidate = _metrics(0.95)
    candidate.p95_ms_batch1 = None
    verdict = evaluate_gates(CFG, candidate, None)
    assert not verdict.passed
    assert "fail-closed" in _by_name(verdict)["max p95 latency"].line()


def test_absolute_threshold_failure_names_metric_and_threshold() -> None:
    verdict = evaluate_gates(CFG, _metrics(0.80), None)
    check = _by_name(verdict)["min accuracy"]
    assert check.status == "failed"
    assert check.line().startswith("❌ min accuracy: accuracy = 0.8 (threshold ≥ 0.9)")


def test_a_real_accuracy_drop_fails() -> None:
    production = _metrics(0.97)
    correct = production.correct.copy()
    correct[np.flatnonzero(correct)[:20]] = False          # 20 of 400 examples now wrong: −5 points
    verdict = evaluate_gates(CFG, _metrics(0, correct=correct), production)
    check = _by_name(verdict)["accuracy vs production"]
    assert check.status == "failed" and "significant" in check.reason


def test_noise_alone_does_not_flip_the_accuracy_verdict() -> None:
    production = _metrics(0.95)
    correct = production.correct.copy()
    wrong, right = np.flatnonzero(correct)[:8], np.flatnonzero(~correct)[:2]
    correct[wrong], correct[right] = False, True           # −6 +2 examples: −1.5 points, within noise
    check = _by_name(evaluate_gates(CFG, _metrics(0, correct=correct), production))["accuracy vs production"]
    assert check.observed < -0.01
    assert check.status == "passed" and "not significant" in check.reason


def test_latency_regression_needs_to_be_consistent_across_rounds() -> None:
    production = _metrics(0.95, rounds=[0.50, 0.52, 0.49, 0.51, 0.50])
    slower = _metrics(0.95, rounds=[0.80, 0.82, 0.79, 0.81, 0.83])
    check = _by_name(evaluate_gates(CFG, slower, production))["latency vs production"]
    assert check.status == "failed" and check.observed > 1.5
    # one noisy round pushes the median ratio up, but most rounds are as fast as production
    noisy = _metrics(0.95, rounds=[0.50, 0.90, 0.49, 0.95, 0.62])
    check = _by_name(evaluate_gates(CFG, noisy, production))["latency vs production"]
    assert check.status == "passed" and "within noise" in check.reason


def test_microsecond_latency_gaps_are_below_the_noise_floor() -> None:
    production = _metrics(0.95, rounds=[0.006, 0.006, 0.007, 0.006, 0.006])
    twice_as_slow = _metrics(0.95, rounds=[0.013, 0.012, 0.014, 0.013, 0.012])   # +7 µs
    check = _by_name(evaluate_gates(CFG, twice_as_slow, production))["latency vs production"]
    assert check.status == "passed" and "noise floor" in check.reason
    strict = CFG.model_copy(update={"latency_noise_floor_ms": 0.0})
    assert _by_name(evaluate_gates(strict, twice_as_slow, production))["latency vs production"].status == "failed"


def test_relative_checks_fail_closed_without_measurements() -> None:
    production = _metrics(0.95)
    production.round_p95_ms = None
    assert _by_name(evaluate_gates(CFG, _metrics(0.95), production))["latency vs production"].status == "failed"


IMAGE = {"input_kind": "image", "input_shape": [32, 32, 3], "input_dtype": "uint8", "classes": ["cat", "dog"],
         "features": None}


def test_contract_change_names_both_inputs_or_both_class_lists() -> None:
    from automation.gate import contract_change, contract_sides

    assert contract_change(IMAGE, dict(IMAGE)) is None
    assert contract_change(IMAGE, IMAGE | {"input_shape": [3, 32, 32]}) == (
        "the input contract changed (production takes uint8 [32, 32, 3], the candidate takes uint8 [3, 32, 32])")
    assert contract_change(IMAGE, IMAGE | {"classes": ["cat", "fox"]}) == (
        "the classes changed (production: cat, dog; the candidate: cat, fox)")
    assert contract_change({}, IMAGE).startswith("the input contract changed (production records no usable")
    line = contract_sides(IMAGE, IMAGE | {"input_dtype": "float32"})["line"]
    assert line.startswith("Input contract changed: production image uint8 [32, 32, 3]")
    assert "→ candidate image float32 [32, 32, 3]" in line


def test_not_comparable_production_skips_relative_checks_with_the_reason() -> None:
    why = "not comparable: the input contract changed (production takes uint8 [4], the candidate takes uint8 [5])"
    checks = _by_name(evaluate_gates(CFG, _metrics(0.95), None, why, contract_changed=True))
    for name in ("accuracy vs production", "latency vs production"):
        assert checks[name].status == "skipped" and checks[name].reason == why
    assert "contract change" not in checks   # "allow", the default: the absolute gates decide
    assert all(c.passed for c in checks.values())


def test_approve_fails_a_changed_contract_until_a_maintainer_promotes_it() -> None:
    approve = CFG.model_copy(update={"contract_change": "approve"})
    verdict = evaluate_gates(approve, _metrics(0.95), None, "not comparable: the classes changed (…)",
                             contract_changed=True)
    check = _by_name(verdict)["contract change"]
    assert not verdict.passed and check.status == "failed"
    assert check.reason.startswith("needs a maintainer's approval: the input contract changed")
    assert "mlgate promote MODEL VERSION --reason" in check.reason
    # a production that only failed to load is no contract change: nothing to approve
    unloadable = evaluate_gates(approve, _metrics(0.95), None, "not comparable: production could not be loaded (x)")
    assert unloadable.passed and "contract change" not in _by_name(unloadable)


def test_a_text_models_network_input_is_shown_not_compared() -> None:
    """Production runs on the same raw strings through its own tokenizer: a longer token sequence is no change."""
    from automation.gate import contract_change, contract_sides, contract_text

    text = {"input_kind": "text", "input_shape": [], "input_dtype": "string", "classes": ["neg", "pos"],
            "network_input": {"shape": [64], "dtype": "int64"}}
    longer = text | {"network_input": {"shape": [128], "dtype": "int64"}}
    assert contract_change(text, longer) is None
    assert contract_text(longer) == "text string [] (network: int64 [128]); 2 classes: neg, pos"
    renamed = longer | {"classes": ["bad", "good"]}
    assert contract_change(text, renamed) == "the classes changed (production: neg, pos; the candidate: bad, good)"
    assert contract_sides(text, renamed)["line"] == (
        "Classes changed: production text string [] (network: int64 [64]); 2 classes: neg, pos → "
        "candidate text string [] (network: int64 [128]); 2 classes: bad, good")
