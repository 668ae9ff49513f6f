"""The live comparison behind a rollout's verdict: the candidate against the version it replaces, on the
same requests. Everything is kept as counts, so replicas add theirs up in the job database:

- agreement: of the examples the candidate answered (`compared`), those both versions predict alike;
- inference errors of the candidate;
- the predicted classes of each version (`class_base_K`, `class_cand_K`);
- latency histograms of each version, 8 buckets per doubling from 1 µs (`lat_base_I`, `lat_cand_I`),
  from which p95 and p99 get distribution-free intervals (the order statistics a binomial allows);
- delayed labels (`POST /feedback`), over the whole rollout: labelled examples, and how many of them only
  the previous version (`base_only`) or only the candidate (`cand_only`) got right.

As in the offline gate, a check fails only when its whole interval lies beyond the limit: the candidate is
then worse with the configured confidence, not by the luck of which requests came.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist

from automation.config import RolloutConfig

BUCKETS_PER_DOUBLING = 8
SMALLEST_SECONDS = 1e-6
QUANTILES = (0.95, 0.99)
LABEL_COUNTS = ("labelled", "base_correct", "cand_correct", "base_only", "cand_only")


def latency_bucket(seconds: float) -> int:
    return max(0, int(BUCKETS_PER_DOUBLING * math.log2(max(seconds, SMALLEST_SECONDS) / SMALLEST_SECONDS)))


def bucket_edges(bucket: int) -> tuple[float, float]:
    return (SMALLEST_SECONDS * 2 ** (bucket / BUCKETS_PER_DOUBLING),
            SMALLEST_SECONDS * 2 ** ((bucket + 1) / BUCKETS_PER_DOUBLING))


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(successes: float, n: float, confidence: float) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(max(0.0, p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    # exact at the ends (rounding would put 0 of n a hair above 0, and n of n a hair below 1)
    return (0.0 if successes <= 0 else max(0.0, centre - half)), (1.0 if successes >= n else min(1.0, centre + half))


def share_difference(a: float, n_a: float, b: float, n_b: float, confidence: float) -> tuple[float, float, float]:
    """a/n_a − b/n_b with Newcombe's interval (from the two Wilson intervals). It assumes independent
    samples; the two versions see the same requests, which only makes the true interval narrower."""
    p_a, p_b = a / n_a, b / n_b
    low_a, high_a = wilson(a, n_a, confidence)
    low_b, high_b = wilson(b, n_b, confidence)
    d = p_a - p_b
    return d, d - math.hypot(p_a - low_a, high_b - p_b), d + math.hypot(high_a - p_a, p_b - low_b)


def paired_difference(only_a: float, only_b: float, n: float, confidence: float) -> tuple[float, float, float]:
    """Accuracy of A minus accuracy of B on the same labelled examples, from the discordant pairs
    (Agresti–Min adjusted Wald interval, which keeps its coverage at small counts)."""
    d = (only_a - only_b) / n
    a, b, m = only_a + 0.5, only_b + 0.5, n + 2
    half = _z(confidence) * math.sqrt(max(0.0, (a + b) - (a - b) ** 2 / m)) / m
    centre = (a - b) / m
    return d, centre - half, centre + half


def histogram(counts: Mapping[str, float], prefix: str) -> dict[int, float]:
    return {int(name[len(prefix):]): value for name, value in counts.items() if name.startswith(prefix) and value}


def quantile_interval(hist: Mapping[int, float], q: float, confidence: float) -> tuple[float, float, float] | None:
    """(estimate, low, high) seconds for the q-quantile of a latency histogram, or None without data. The
    interval runs between the order statistics of ranks n·q ∓ z·√(n·q·(1−q)), widened to bucket edges; a
    rank beyond the sample leaves that side unbounded (five requests cannot bound a p95 from above)."""
    n = sum(hist.values())
    if n == 0:
        return None
    spread = _z(confidence) * math.sqrt(n * q * (1 - q))
    low_rank, high_rank = math.floor(n * q - spread), math.ceil(n * q + spread) + 1
    ranks = (max(1.0, low_rank), max(1.0, math.ceil(n * q)), min(n, high_rank))
    found: list[int] = []
    seen = 0.0
    for bucket in sorted(hist):
        seen += hist[bucket]
        while len(found) < 3 and seen >= ranks[len(found)]:
            found.append(bucket)
    low_bucket, estimate_bucket, high_bucket = found
    low, high = bucket_edges(estimate_bucket)
    return (math.sqrt(low * high), bucket_edges(low_bucket)[0] if low_rank >= 1 else 0.0,
            bucket_edges(high_bucket)[1] if high_rank <= n else math.inf)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms"


def latency_failure(counts: Mapping[str, float], config: RolloutConfig) -> str | None:
    base, cand = histogram(counts, "lat_base_"), histogram(counts, "lat_cand_")
    for q in QUANTILES:
        b, c = quantile_interval(base, q, config.confidence), quantile_interval(cand, q, config.confidence)
        if b is None or c is None:
            return None
        if c[1] > config.max_latency_ratio * b[2] and c[1] - b[2] > config.latency_noise_floor_ms / 1000:
            return (f"p{q * 100:g} latency {_ms(c[0])} ({config.confidence:.0%} CI [{_ms(c[1])}, {_ms(c[2])}]) "
                    f"against {_ms(b[0])} ([{_ms(b[1])}, {_ms(b[2])}]) for the previous version, "
                    f"more than {config.max_latency_ratio:g}×")
    return None


def class_failure(counts: Mapping[str, float], config: RolloutConfig) -> str | None:
    base, cand = histogram(counts, "class_base_"), histogram(counts, "class_cand_")
    n_base, n_cand = sum(base.values()), sum(cand.values())
    classes = sorted(set(base) | set(cand))
    if not n_base or not n_cand:
        return None
    confidence = 1 - (1 - config.confidence) / len(classes)    # Bonferroni: one look per class
    for k in classes:
        d, low, high = share_difference(cand.get(k, 0.0), n_cand, base.get(k, 0.0), n_base, confidence)
        if low > config.max_class_shift or high < -config.max_class_shift:
            return (f"class {k} is {cand.get(k, 0.0) / n_cand:.1%} of its predictions against "
                    f"{base.get(k, 0.0) / n_base:.1%} of the previous version's, difference {d:+.3f} "
                    f"({config.confidence:.0%} CI [{low:+.3f}, {high:+.3f}]), beyond ±{config.max_class_shift:g}")
    return None


def accuracy_failure(counts: Mapping[str, float], config: RolloutConfig) -> str | None:
    n = counts.get("labelled", 0.0)
    if not n:
        return None
    d, low, high = paired_difference(counts.get("cand_only", 0.0), counts.get("base_only", 0.0), n, config.confidence)
    if high < -config.max_accuracy_drop:
        return (f"accuracy {counts.get('cand_correct', 0.0) / n:.3f} on {n:.0f} labelled examples against "
                f"{counts.get('base_correct', 0.0) / n:.3f} for the previous version, difference {d:+.3f} "
                f"({config.confidence:.0%} CI [{low:+.3f}, {high:+.3f}]), a drop over {config.max_accuracy_drop:g}")
    return None


def compute_failure(counts: Mapping[str, float], config: RolloutConfig) -> str | None:
    """The candidate's inference time per example (each model call's time over its batch's examples: what a
    version costs on its own, whatever the batching wait and queue add) against the previous version's, at
    the median, when the whole interval lies beyond `max_compute_ratio`. End-to-end latency hides this below
    saturation: a 7× costlier model answers in the same 2 ms while the server idles."""
    base, cand = histogram(counts, "cost_base_"), histogram(counts, "cost_cand_")
    b, c = quantile_interval(base, 0.5, config.confidence), quantile_interval(cand, 0.5, config.confidence)
    if b is None or c is None:
        return None
    if c[1] > config.max_compute_ratio * b[2] and c[1] - b[2] > config.compute_noise_floor_us / 1e6:
        return (f"inference costs {c[0] * 1e6:.3g} µs per example at the median ({config.confidence:.0%} CI "
                f"[{c[1] * 1e6:.3g}, {c[2] * 1e6:.3g}]) against {b[0] * 1e6:.3g} µs ([{b[1] * 1e6:.3g}, "
                f"{b[2] * 1e6:.3g}]) for the previous version, {c[0] / b[0]:.1f}×, more than "
                f"{config.max_compute_ratio:g}×")
    return None


def judge(counts: Mapping[str, float], config: RolloutConfig) -> str | None:
    """Why the candidate failed this stage, or None. `counts` holds the stage's counts and the rollout's
    labels. Fails only on what the interval makes certain."""
    n, compared = counts.get("requests", 0.0), counts.get("compared", 0.0)
    agree = counts.get("agree", 0.0)
    agree_low, agree_high = wilson(agree, compared, config.confidence)
    if compared and agree_high < config.min_agreement:
        return (f"agreement {agree / compared:.3f} with the previous version on {compared:.0f} "
                f"predictions, {config.confidence:.0%} CI [{agree_low:.3f}, {agree_high:.3f}], "
                f"below {config.min_agreement:g}")
    errors = counts.get("candidate_errors", 0.0)
    error_low, error_high = wilson(errors, n, config.confidence)
    if n and error_low > config.max_error_rate:
        return (f"inference error rate {errors / n:.3f}, {config.confidence:.0%} CI "
                f"[{error_low:.3f}, {error_high:.3f}], above {config.max_error_rate:g}")
    return accuracy_failure(counts, config) or class_failure(counts, config) or compute_failure(counts, config) or \
        latency_failure(counts, config)


def comparison(counts: Mapping[str, float], confidence: float) -> dict[str, object]:
    """The live comparison as /healthz, /metrics and the dashboard show it."""
    examples, n, compared = counts.get("examples", 0.0), counts.get("requests", 0.0), counts.get("compared", 0.0)
    latency: dict[str, object] = {}
    for who in ("base", "cand"):
        hist = histogram(counts, f"lat_{who}_")
        for q in QUANTILES:
            found = quantile_interval(hist, q, confidence)
            latency[f"{who}_p{q * 100:g}_ms"] = None if found is None else round(found[0] * 1000, 4)
        cost = quantile_interval(histogram(counts, f"cost_{who}_"), 0.5, confidence)
        latency[f"{who}_compute_us_per_example"] = None if cost is None else round(cost[0] * 1e6, 3)
    labelled = counts.get("labelled", 0.0)
    return {"requests": int(n), "examples": int(examples),
            "agreement": round(counts.get("agree", 0.0) / compared, 4) if compared else None,
            "candidate_error_rate": round(counts.get("candidate_errors", 0.0) / n, 4) if n else None,
            "latency": latency, "labelled": int(labelled),
            "accuracy": {"baseline": round(counts.get("base_correct", 0.0) / labelled, 4),
                         "candidate": round(counts.get("cand_correct", 0.0) / labelled, 4)} if labelled else None}
