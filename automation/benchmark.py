"""Benchmark: accuracy on the held-out test set and latency with warm-up, rounds and percentiles.

Predictors are timed in interleaved rounds (A, B, C, then B, C, A, ...) so that drift in
machine load hits every contender alike; the production model is one of the contenders,
so candidate and production are compared on the same hardware in the same job.

Timing stops once it is precise enough: after `min_rounds`, a batch size ends as soon as every
contender's per-round p95s agree (their spread is within a tolerance), and at `rounds` otherwise.
All contenders stop together, so every cell at a batch size has the same number of rounds (the
gate pairs candidate and production round by round). Each cell records how many rounds ran,
whether it stopped early, and whether its rounds disagree beyond their own noise
(`rounds_disagree`: the per-round p95s' confidence intervals do not overlap), which means the
machine's load changed while the cell was timed; the report flags such cells.

A contender may have a time cap (`caps`, optimize.variant_seconds): its warm-up and timed calls over every
batch size count against it, and one that passes it stops being timed and is reported in `failures` with
the reason, like one that raised; the others go on.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from automation.errors import one_line
from automation.predictors import Predictor, evaluate, host_batch

log = logging.getLogger(__name__)
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
    rounds: int = 0                    # rounds timed (up to max_rounds)
    max_rounds: int = 0
    samples: int = 0                   # timed calls in all
    stopped_early: bool = False        # every contender's rounds agreed before max_rounds
    steady: bool | None = None         # this cell's rounds agreed (None: a single round, nothing to compare)
    spread_ms: float | None = None     # max - min of round_p95_ms
    allowed_spread_ms: float | None = None   # what `steady` allowed: max(steady_spread x median, floor)
    rounds_disagree: bool | None = None      # the rounds' p95 intervals do not all overlap (see p95_interval)
    round_p50_ms: list[float] = field(default_factory=list)   # one per round: a probe reads the least disturbed

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if k != "samples_ms"}


@dataclass
class AccuracyStats:
    accuracy: float
    macro_f1: float
    per_class_f1: dict[str, float]
    correct: np.ndarray          # per test example, for paired bootstrap comparisons
    predicted: np.ndarray | None = None   # per test example: the confusion matrix and misclassified examples

    def as_dict(self) -> dict[str, object]:
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "per_class_f1": self.per_class_f1}


def evaluate_accuracy(predictor: Predictor, x: np.ndarray, y: np.ndarray,
                      classes: tuple[str, ...]) -> AccuracyStats:
    predicted = evaluate(predictor, x).argmax(axis=1)
    per_class = f1_per_class(y, predicted, len(classes))
    return AccuracyStats(accuracy=float((predicted == y).mean()),
                         macro_f1=float(per_class.mean()),
                         per_class_f1={name: float(score) for name, score in zip(classes, per_class)},
                         correct=(predicted == y), predicted=predicted)


def f1_per_class(y: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """Each class's F1, 2·TP / (2·TP + FP + FN), 0 for a class neither in `y` nor predicted: scikit-learn's
    `f1_score(average=None, zero_division=0, labels=range(classes))`, without importing it (1.2 s)."""
    y, predicted = np.asarray(y, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    true_sum = np.bincount(y, minlength=classes)[:classes].astype(np.float64)
    pred_sum = np.bincount(predicted, minlength=classes)[:classes].astype(np.float64)
    tp = np.bincount(y[predicted == y], minlength=classes)[:classes].astype(np.float64)
    denominator = true_sum + pred_sum
    return np.where(denominator == 0, 0.0, 2.0 * tp / np.where(denominator == 0, 1.0, denominator))


@dataclass(frozen=True)
class Steadiness:
    """When a cell's rounds agree: the spread (max - min) of its per-round p95s is within `spread` of
    their median, or under `floor_ms` (timer and scheduler jitter, which no number of rounds removes)."""

    spread: float = 0.10
    floor_ms: float = 0.005

    def allowed_ms(self, round_p95_ms: list[float]) -> float:
        return max(self.spread * float(np.median(round_p95_ms)), self.floor_ms)

    def steady(self, round_p95_ms: list[float]) -> bool | None:
        if len(round_p95_ms) < 2:
            return None
        return max(round_p95_ms) - min(round_p95_ms) <= self.allowed_ms(round_p95_ms)


def _round_p95s(rounds: list[np.ndarray]) -> list[float]:
    return [float(np.percentile(r * 1e3, 95)) for r in rounds]


def p95_interval(timings: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """A distribution-free ~95 % interval for one round's p95: the order statistics at n·0.95 ± z·√(n·0.95·0.05)
    (binomial). Timings are heavy-tailed, so no normal approximation of the values themselves."""
    ordered = np.sort(timings)
    n = len(ordered)
    centre, half = n * 0.95, z * np.sqrt(n * 0.95 * 0.05)
    low = int(np.clip(np.floor(centre - half) - 1, 0, n - 1))
    high = int(np.clip(np.ceil(centre + half) - 1, 0, n - 1))
    return float(ordered[low]), float(ordered[high])


def rounds_disagree(rounds: list[np.ndarray]) -> bool | None:
    """Whether the rounds measured different things, beyond each round's own sampling noise: some round's
    p95 interval lies wholly above another's. None with fewer than two rounds."""
    if len(rounds) < 2:
        return None
    intervals = [p95_interval(r) for r in rounds]
    return max(low for low, _ in intervals) > min(high for _, high in intervals)


def _summarize(batch_size: int, rounds: list[np.ndarray], *, max_rounds: int | None = None,
               stopped_early: bool = False, steadiness: Steadiness = Steadiness()) -> LatencyStats:
    samples_ms = np.concatenate(rounds) * 1e3
    p50, p90, p95, p99 = np.percentile(samples_ms, [50, 90, 95, 99])
    mean = float(samples_ms.mean())
    round_p95 = _round_p95s(rounds)
    round_p50 = [float(np.percentile(r * 1e3, 50)) for r in rounds]
    return LatencyStats(batch_size=batch_size, p50_ms=float(p50), p90_ms=float(p90), p95_ms=float(p95),
                        p99_ms=float(p99), mean_ms=mean, throughput_per_s=batch_size * 1e3 / mean,
                        round_p95_ms=round_p95, samples_ms=samples_ms, rounds=len(rounds),
                        max_rounds=max_rounds or len(rounds), samples=len(samples_ms), stopped_early=stopped_early,
                        steady=steadiness.steady(round_p95),
                        spread_ms=max(round_p95) - min(round_p95) if round_p95 else None,
                        allowed_spread_ms=steadiness.allowed_ms(round_p95) if round_p95 else None,
                        rounds_disagree=rounds_disagree(rounds), round_p50_ms=round_p50)


@dataclass
class LatencyResults:
    stats: dict[str, dict[int, LatencyStats]]          # {name: {batch_size: stats}}
    failures: dict[str, str] = field(default_factory=dict)   # {name: why it stopped being timed}

    def __getitem__(self, name: str) -> dict[int, LatencyStats]:
        return self.stats[name]


def measure_latency(predictors: Mapping[str, Predictor], sample: np.ndarray, batch_sizes: list[int], *,
                    warmup: int, iterations: int, rounds: int, min_rounds: int | None = None,
                    steadiness: Steadiness = Steadiness(), max_round_seconds: float = math.inf,
                    min_iterations: int = 20, progress: ProgressFn | None = None,
                    caps: Mapping[str, float] | None = None) -> LatencyResults:
    """Latency of every predictor at every batch size. The timed region is `run` alone (see
    automation/predictors.py): inputs are prepared on the device beforehand and `run` synchronizes.
    A predictor that raises is dropped from the contest with its reason; the others go on.

    `rounds` is the most rounds a batch size gets. From `min_rounds` on (None: `rounds`, i.e. never
    early), a batch size stops after any round at which every live contender is steady (`Steadiness`).
    A contender's round ends after `iterations` calls or `max_round_seconds`, but not before `min_iterations`.
    `caps` ({name: seconds}): a contender named there stops being timed, with the reason in `failures`, once
    its warm-up and timed calls together pass its cap; one not named has none."""
    min_rounds = rounds if min_rounds is None else max(1, min(min_rounds, rounds))
    live = dict(predictors)
    results = LatencyResults({name: {} for name in predictors})
    budget = _Budget(dict(caps or {}))

    def drop(name: str, exc: Exception) -> None:
        results.failures[name] = one_line(f"failed while timed: {type(exc).__name__}: {exc}")
        live.pop(name, None)

    def over_cap(name: str, batch_size: int) -> None:
        results.failures[name] = budget.reason(name, batch_size)
        live.pop(name, None)

    for batch_size in batch_sizes:
        batch = host_batch(np.resize(sample, (batch_size, *sample.shape[1:])))
        prepared: dict[str, Any] = {}
        for name, p in list(live.items()):
            started = time.perf_counter()
            try:
                prepared[name] = p.prepare(batch)
                for _ in range(warmup):
                    p.run(prepared[name])
                    if time.perf_counter() - started > budget.left(name):   # a slow warm-up counts too
                        break
            except Exception as exc:   # one runtime's failure is its own
                drop(name, exc)
                continue
            if budget.charge(name, time.perf_counter() - started):
                over_cap(name, batch_size)
        samples: dict[str, list[np.ndarray]] = {name: [] for name in live}
        stopped_early = False
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
                calls, began = iterations, time.perf_counter()
                deadline, cap_at = began + max_round_seconds, began + budget.left(name)
                try:
                    for i in range(iterations):
                        start = time.perf_counter()
                        p.run(handle)
                        timings[i] = end = time.perf_counter() - start
                        if start + end > cap_at or (start + end >= deadline and i + 1 >= min_iterations):
                            calls = i + 1   # slow calls: enough samples, or the contender's time is up
                            break
                except Exception as exc:
                    drop(name, exc)
                    continue
                if budget.charge(name, time.perf_counter() - began):
                    over_cap(name, batch_size)
                    continue
                samples[name].append(timings[:calls])
                if progress is not None:
                    progress(iterations)
            done = r + 1
            if min_rounds <= done < rounds and live and \
                    all(steadiness.steady(_round_p95s(samples[name])) for name in live):
                stopped_early = True
                if progress is not None:   # the rounds not needed count as done
                    progress((rounds - done) * iterations * len(live))
                break
        for name in live:
            results.stats[name][batch_size] = _summarize(batch_size, samples[name], max_rounds=rounds,
                                                         stopped_early=stopped_early, steadiness=steadiness)
    for name in results.failures:
        results.stats[name] = {}
    give_back_scratch(live, sample)
    return results


def give_back_scratch(predictors: Mapping[str, Predictor], sample: Any) -> None:
    """One untimed call of one example per predictor that has them (`run_untimed`), once its timing is over:
    ONNX Runtime then returns the scratch its timed calls made its arena grow, which the variants would hold
    through the gate, registration and report (the news transformer's: ~310 MB at batch 32)."""
    for name, predictor in predictors.items():
        untimed = getattr(predictor, "run_untimed", None)
        if untimed is None:
            continue
        try:
            untimed(predictor.prepare(host_batch(sample[:1])))
        except Exception as exc:   # the figures stand: this call is no part of them
            log.warning("an untimed call after timing failed", extra={"predictor": name, "reason": one_line(
                f"{type(exc).__name__}: {exc}")})


@dataclass
class _Budget:
    """Each capped contender's time so far (warm-up and timed calls), against its cap."""

    caps: dict[str, float]
    spent: dict[str, float] = field(default_factory=dict)

    def left(self, name: str) -> float:
        return self.caps.get(name, math.inf) - self.spent.get(name, 0.0)

    def charge(self, name: str, seconds: float) -> bool:
        """Count `seconds` against `name`; whether it has now passed its cap."""
        self.spent[name] = self.spent.get(name, 0.0) + seconds
        return self.left(name) < 0

    def reason(self, name: str, batch_size: int) -> str:
        return (f"took more than {self.caps[name]:g} s to time (optimize.variant_seconds): stopped at batch "
                f"{batch_size}, so it is not a candidate")


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
