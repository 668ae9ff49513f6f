"""Gate: declarative thresholds, evaluated fail-closed and noise-aware.

Semantics (documented in the README):
- A check whose metric is missing fails (fail-closed).
- Relative checks are skipped, with the reason, only when nothing is in production yet or production is not
  comparable: its input contract or classes differ from the candidate's, or it could not be loaded.
- With `contract_change: approve`, a changed contract fails the check "contract change": a person promotes it.
- Accuracy vs production: paired bootstrap over the shared test set gives a confidence
  interval for Δ = candidate − production. The check fails only when Δ is below −δ
  *and* the interval lies entirely below 0, i.e. the drop is larger than allowed and
  not explainable by which examples happened to be in the test set.
- Latency vs production: candidate and production are timed in interleaved rounds; the
  per-round p95 ratio is bootstrapped over rounds. The check fails only when the median
  ratio exceeds 1 + r *and* the interval lies entirely above 1. A p95 gap smaller than
  `latency_noise_floor_ms` (default 20 µs) counts as equal: timer and scheduler jitter.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from automation.config import GateConfig

Status = Literal["passed", "failed", "skipped"]
APPROVAL_REASON = ("needs a maintainer's approval: the input contract changed; promote it by hand with "
                   "`mlgate promote MODEL VERSION --reason …`")


@dataclass
class Check:
    name: str
    metric: str
    observed: float | None
    threshold: str
    status: Status
    reason: str
    ci: tuple[float, float] | None = None    # confidence interval of `observed`, where one was computed

    @property
    def passed(self) -> bool:
        return self.status != "failed"

    def line(self) -> str:
        mark = {"passed": "✅", "failed": "❌", "skipped": "⏭️"}[self.status]
        observed = "missing" if self.observed is None else f"{self.observed:.4g}"
        return f"{mark} {self.name}: {self.metric} = {observed} (threshold {self.threshold}) — {self.reason}"


@dataclass
class Verdict:
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def as_dict(self) -> dict[str, object]:
        return {"passed": self.passed, "checks": [asdict(c) | {"line": c.line()} for c in self.checks]}


@dataclass
class CandidateMetrics:
    accuracy: float | None
    macro_f1: float | None
    p95_ms_batch1: float | None
    size_mb: float | None
    correct: np.ndarray | None            # per-example correctness on the shared test set
    round_p95_ms: list[float] | None      # chosen variant, batch 1, one per round


def bootstrap_ci(values: np.ndarray, statistic, samples: int, confidence: float,
                 seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(samples, len(values)))
    stats = statistic(values[idx])
    tail = (1 - confidence) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return float(low), float(high)


def _absolute(name: str, metric: str, observed: float | None, limit: float | None, *,
              at_least: bool) -> Check | None:
    if limit is None:
        return None
    op = "≥" if at_least else "≤"
    if observed is None or (isinstance(observed, float) and math.isnan(observed)):
        return Check(name, metric, None, f"{op} {limit:g}", "failed", "metric missing: fail-closed")
    ok = observed >= limit if at_least else observed <= limit
    return Check(name, metric, observed, f"{op} {limit:g}", "passed" if ok else "failed",
                 "within limit" if ok else f"{'below' if at_least else 'above'} the limit")


def _accuracy_vs_production(candidate: CandidateMetrics, production: CandidateMetrics, delta: float,
                            cfg: GateConfig) -> Check:
    name, metric, threshold = "accuracy vs production", "Δ accuracy", f"≥ −{delta:g} (paired bootstrap)"
    if candidate.correct is None or production.correct is None or len(candidate.correct) != len(production.correct):
        return Check(name, metric, None, threshold, "failed", "per-example results missing: fail-closed")
    diff = candidate.correct.astype(float) - production.correct.astype(float)
    observed = float(diff.mean())
    low, high = bootstrap_ci(diff, lambda d: d.mean(axis=1), cfg.bootstrap_samples, cfg.confidence)
    ci = f"{cfg.confidence:.0%} CI [{low:+.4f}, {high:+.4f}]"
    if observed < -delta and high < 0:
        return Check(name, metric, observed, threshold, "failed", f"significant drop beyond δ; {ci}", (low, high))
    if observed < -delta:
        return Check(name, metric, observed, threshold, "passed", f"drop beyond δ but not significant; {ci}",
                     (low, high))
    return Check(name, metric, observed, threshold, "passed", f"within δ; {ci}", (low, high))


def _latency_vs_production(candidate: CandidateMetrics, production: CandidateMetrics, increase: float,
                           cfg: GateConfig) -> Check:
    name, metric, threshold = "latency vs production", "p95 ratio (batch 1)", f"≤ {1 + increase:.3g}×"
    if not candidate.round_p95_ms or not production.round_p95_ms or \
            len(candidate.round_p95_ms) != len(production.round_p95_ms):
        return Check(name, metric, None, threshold, "failed", "repeated measurements missing: fail-closed")
    cand, prod = np.asarray(candidate.round_p95_ms), np.asarray(production.round_p95_ms)
    ratios = cand / prod
    observed = float(np.median(ratios))
    gap_ms = float(np.median(cand) - np.median(prod))
    if gap_ms < cfg.latency_noise_floor_ms:
        return Check(name, metric, observed, threshold, "passed",
                     f"p95 gap {gap_ms * 1e3:+.1f} µs is below the {cfg.latency_noise_floor_ms * 1e3:g} µs noise floor")
    low, high = bootstrap_ci(ratios, lambda r: np.median(r, axis=1), cfg.bootstrap_samples, cfg.confidence)
    ci = f"{cfg.confidence:.0%} CI [{low:.3f}, {high:.3f}] over {len(ratios)} interleaved rounds"
    if observed > 1 + increase and low > 1:
        return Check(name, metric, observed, threshold, "failed", f"significantly slower; {ci}", (low, high))
    if observed > 1 + increase:
        return Check(name, metric, observed, threshold, "passed", f"slower but within noise; {ci}", (low, high))
    return Check(name, metric, observed, threshold, "passed", f"within limit; {ci}", (low, high))


def _signature_text(described: dict[str, Any]) -> str:
    """A contract's input in a few words: `uint8 [32, 32, 3]`, with a tensor model's feature names and what a text
    model's network takes after its tokenizer (shown, never compared: each version brings its own tokenizer)."""
    text = f"{described.get('input_dtype')} {list(described.get('input_shape') or [])}"
    features, network = described.get("features"), described.get("network_input")
    if features:
        text += f" (features {', '.join(map(str, features))})"
    if isinstance(network, dict):
        text += f" (network: {network.get('dtype')} {list(network.get('shape') or [])})"
    return text


def _classes_text(described: dict[str, Any]) -> str:
    classes = [str(c) for c in described.get("classes") or []]
    return ", ".join(classes[:8]) + (f", … ({len(classes)} in all)" if len(classes) > 8 else "")


def contract_text(described: dict[str, Any]) -> str:
    """A contract in one line, for the summary, the report and `mlgate versions`:
    `image uint8 [32, 32, 3]; 2 classes: cat, dog`."""
    count = len(described.get("classes") or [])
    return f"{described.get('input_kind')} {_signature_text(described)}; {count} classes: {_classes_text(described)}"


def contract_sides(production: dict[str, Any], candidate: dict[str, Any]) -> dict[str, str]:
    """Both contracts in words, and the one line the summary and the report show when they differ."""
    before, after = contract_text(production), contract_text(candidate)
    what = "Input contract changed" if _inputs_differ(production, candidate) else "Classes changed"
    return {"production": before, "candidate": after, "line": f"{what}: production {before} → candidate {after}"}


def _inputs_differ(production: dict[str, Any], candidate: dict[str, Any]) -> bool:
    from automation.serving_check import Signature

    try:
        return Signature.of(production) != Signature.of(candidate)
    except (KeyError, TypeError, ValueError):   # a version logged without mlgate's metadata
        return True


def contract_change(production: dict[str, Any], candidate: dict[str, Any]) -> str | None:
    """Why production cannot be judged on the candidate's test data, or None when their contracts agree.

    Both are `describe()` dicts (automation/contract.py): the input's kind, shape, dtype and feature names,
    and the classes by index; production's comes from its MLmodel `mlgate` metadata."""
    from automation.serving_check import Signature

    try:
        before, after = Signature.of(production), Signature.of(candidate)
    except (KeyError, TypeError, ValueError) as exc:   # a version logged without mlgate's metadata
        return f"the input contract changed (production records no usable contract: {type(exc).__name__} {exc})"
    if before != after:
        return (f"the input contract changed (production takes {_signature_text(production)}, "
                f"the candidate takes {_signature_text(candidate)})")
    if [str(c) for c in production.get("classes") or []] != [str(c) for c in candidate.get("classes") or []]:
        return (f"the classes changed (production: {_classes_text(production)}; "
                f"the candidate: {_classes_text(candidate)})")
    return None


def evaluate_gates(cfg: GateConfig, candidate: CandidateMetrics, production: CandidateMetrics | None,
                   not_comparable: str | None = None, contract_changed: bool = False) -> Verdict:
    """The absolute checks, then the relative ones: skipped with `not_comparable` (why production could not be
    judged beside the candidate) or when nothing is in production. `contract_changed` with
    `contract_change: approve` adds a failed "contract change" check."""
    a = cfg.absolute
    checks = [c for c in (
        _absolute("min accuracy", "accuracy", candidate.accuracy, a.min_accuracy, at_least=True),
        _absolute("min macro-F1", "macro_f1", candidate.macro_f1, a.min_macro_f1, at_least=True),
        _absolute("max p95 latency", "p95 ms (batch 1)", candidate.p95_ms_batch1, a.max_p95_latency_ms,
                  at_least=False),
        _absolute("max size", "size MB", candidate.size_mb, a.max_size_mb, at_least=False),
    ) if c is not None]
    r = cfg.relative
    relative = [(r.max_accuracy_drop, "accuracy vs production", "Δ accuracy", _accuracy_vs_production),
                (r.max_latency_increase, "latency vs production", "p95 ratio (batch 1)", _latency_vs_production)]
    for limit, name, metric, compare in relative:
        if limit is None:
            continue
        if not_comparable is not None:
            checks.append(Check(name, metric, None, "n/a", "skipped", not_comparable))
        elif production is None:
            checks.append(Check(name, metric, None, "n/a", "skipped", "nothing in production yet"))
        else:
            checks.append(compare(candidate, production, limit, cfg))
    if contract_changed and cfg.contract_change == "approve":
        checks.append(Check("contract change", "input contract", None, "unchanged, or approved", "failed",
                            APPROVAL_REASON))
    return Verdict(checks)
