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
from typing import Any

import numpy as np

from automation.errors import one_line
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


@dataclass
class LatencyResults:
    stats: dict[str, dict[int, LatencyStats]]          # {name: {batch_size: stats}}
    failures: dict[str, str] = field(default_factory=dict)   # {name: why it stopped being timed}

    def __getitem__(self, name: str) -> dict[int, LatencyStats]:
        return self.stats[name]


def measure_latency(predictors: Mapping[str, Predictor], sample: np.ndarray, batch_sizes: list[int], *,
                    warmup: int, iterations: int, rounds: int,
                    progress: ProgressFn | None = None) -> LatencyResults:
    """Latency of every predictor at every batch size. The timed region is `run` alone (see
    automation/predictors.py): inputs are prepared on the device beforehand and `run` synchronizes.
    A predictor that raises is dropped from the contest with its reason; the others go on."""
    live = dict(predictors)
    results = LatencyResults({name: {} for name in predictors})

    def drop(name: str, exc: Exception) -> None:
        results.failures[name] = one_line(f"failed while timed: {type(exc).__name__}: {exc}")
        live.pop(name, None)

    for batch_size in batch_sizes:
        batch = np.resize(sample, (batch_size, *sample.shape[1:])).astype(np.float32)
        prepared: dict[str, Any] = {}
        for name, p in list(live.items()):
            try:
                prepared[name] = p.prepare(batch)
                for _ in range(warmup):
                    p.run(prepared[name])
            except Exception as exc:   # one runtime's failure is its own
                drop(name, exc)
        samples: dict[str, list[np.ndarray]] = {name: [] for name in live}
        for r in range(rounds):
            names = list(live)
            if not names:
                break
            # rotate the order every round: whoever runs right after a contender whose threads
            # are still spinning (torch's OpenMP pool, say) would otherwise always pay for it
            for name in names[r % len(names):] + names[:r % len(names)]:
                p = live[name]
                timings = np.empty(iterations)
                handle = prepared[name]
                try:
                    for i in range(iterations):
                        start = time.perf_counter()
                        p.run(handle)
                        timings[i] = time.perf_counter() - start
                except Exception as exc:
                    drop(name, exc)
                    continue
                samples[name].append(timings)
                if progress is not None:
                    progress(iterations)
        for name in live:
            results.stats[name][batch_size] = _summarize(batch_size, samples[name])
    for name in results.failures:
        results.stats[name] = {}
    return results


class MemoryProbe:
    """Memory a variant takes, measured around its build and a run at the largest batch.

    - `cuda_peak_allocated`: torch's peak allocation on the GPU after a reset, minus what was
      allocated before (torch eager, half, compiled, AOTInductor);
    - `cuda_device_used`: device memory that disappeared from the free pool (ONNX Runtime's own
      CUDA allocator, which torch cannot see);
    - `host_rss`: growth of the process's resident memory (CPU runtimes).
    """

    def __init__(self, device: Any) -> None:
        self.cuda = device.is_cuda
        self.megabytes: float | None = None
        self.kind: str | None = None
        self._rss = resident_memory_mb()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._allocated = torch.cuda.memory_allocated()
            self._free = torch.cuda.mem_get_info()[0]

    def finish(self, kind: str) -> None:
        self.kind = kind
        if kind == "cuda_peak_allocated" and self.cuda:
            import torch

            self.megabytes = (torch.cuda.max_memory_allocated() - self._allocated) / 2**20
        elif kind == "cuda_device_used" and self.cuda:
            import torch

            self.megabytes = max(0.0, (self._free - torch.cuda.mem_get_info()[0]) / 2**20)
        else:
            self.kind = "host_rss"
            self.megabytes = max(0.0, resident_memory_mb() - self._rss)


def resident_memory_mb() -> float:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def size_mb(path: str | os.PathLike[str]) -> float:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**20
    return os.path.getsize(path) / 2**20
