"""Benchmark: accuracy on the held-out test set and latency with warm-up, rounds and percentiles.

Predictors are timed in interleaved rounds (A, B, C, then B, C, A, ...) so that drift in
machine load hits every contender alike; the production model is one of the contenders,
so candidate and production are compared on the same hardware in the same job.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from automation.predictors import Predictor, predict

ProgressFn = Callable[[int], None]


@dataclass
class LatencyStats:
    batch_size: int
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    throughput_per_s: float
    round_p95_ms: list[float] = field(default_factory=list)   # one per round, for noise-aware comparison
    samples_ms: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)   # for plots only

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if k != "samples_ms"}


@dataclass
class AccuracyStats:
    accuracy: float
    macro_f1: float
    per_class_f1: dict[str, float]
    correct: np.ndarray          # per test example, for paired bootstrap comparisons

    def as_dict(self) -> dict[str, object]:
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "per_class_f1": self.per_class_f1}


def evaluate_accuracy(predictor: Predictor, x: np.ndarray, y: np.ndarray,
                      classes: tuple[str, ...]) -> AccuracyStats:
    from sklearn.metrics import f1_score

    predicted = predict(predictor, x).argmax(axis=1)
    per_class = f1_score(y, predicted, labels=range(len(classes)), average=None, zero_division=0)
    return AccuracyStats(accuracy=float((predicted == y).mean()),
                         macro_f1=float(per_class.mean()),
                         per_class_f1={name: float(score) for name, score in zip(classes, per_class)},
                         correct=(predicted == y))


def _summarize(batch_size: int, rounds: list[np.ndarray]) -> LatencyStats:
    samples_ms = np.concatenate(rounds) * 1e3
    p50, p90, p95, p99 = np.percentile(samples_ms, [50, 90, 95, 99])
    mean = float(samples_ms.mean())
    return LatencyStats(batch_size=batch_size, p50_ms=float(p50), p90_ms=float(p90), p95_ms=float(p95),
                        p99_ms=float(p99), mean_ms=mean, throughput_per_s=batch_size * 1e3 / mean,
                        round_p95_ms=[float(np.percentile(r * 1e3, 95)) for r in rounds], samples_ms=samples_ms)


def measure_latency(predictors: Mapping[str, Predictor], sample: np.ndarray, batch_sizes: list[int], *,
                    warmup: int, iterations: int, rounds: int,
                    progress: ProgressFn | None = None) -> dict[str, dict[int, LatencyStats]]:
    """Latency of every predictor at every batch size: {name: {batch_size: stats}}."""
    results: dict[str, dict[int, LatencyStats]] = {name: {} for name in predictors}
    for batch_size in batch_sizes:
        batch = np.resize(sample, (batch_size, *sample.shape[1:])).astype(np.float32)
        prepared = {name: p.prepare(batch) for name, p in predictors.items()}
        for name, p in predictors.items():
            for _ in range(warmup):
                p.run(prepared[name])
        samples: dict[str, list[np.ndarray]] = {name: [] for name in predictors}
        names = list(predictors)
        for r in range(rounds):
            # rotate the order every round: whoever runs right after a contender whose threads
            # are still spinning (torch's OpenMP pool, say) would otherwise always pay for it
            for name in names[r % len(names):] + names[:r % len(names)]:
                p = predictors[name]
                timings = np.empty(iterations)
                handle = prepared[name]
                for i in range(iterations):
                    start = time.perf_counter()
                    p.run(handle)
                    timings[i] = time.perf_counter() - start
                samples[name].append(timings)
                if progress is not None:
                    progress(iterations)
        for name in predictors:
            results[name][batch_size] = _summarize(batch_size, samples[name])
    return results


def resident_memory_mb() -> float:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def size_mb(path: str | os.PathLike[str]) -> float:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**20
    return os.path.getsize(path) / 2**20
