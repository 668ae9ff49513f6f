"""Variants: built or skipped in isolation, parity per device, timing, choice. Assertions follow the
device actually present, so the same tests hold on a CPU machine and on a GPU runner."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from automation import optimize, parity
from automation import benchmark, gate
from automation.benchmark import AccuracyStats, LatencyResults, LatencyStats, Steadiness, evaluate_accuracy, \
    measure_latency
from automation.config import GateConfig, OptimizeConfig, TrainConfig
from automation.device import CPU, RunnerDevice, select_device
from automation.errors import StageError
from automation.optimize import Variant, build_variants, choose_variant, drop_failed
from automation.predictors import OnnxPredictor, TorchPredictor, predict
from automation.train import train_model
from models import digits_cnn
from models.datasets import digits

DEVICE = select_device()
# the variants that build in a second or two; the compiled ones have their own (slow) test
QUICK = ["torch_eager", "torch_half", "onnx_fp32", "onnx_int8", "onnx_cuda", "tensorrt_fp16"]


@pytest.fixture(scope="module")
def trained():
    splits = digits(seed=0)
    return splits, train_model(digits_cnn.build, {"channels": 8, "hidden": 32}, splits,
                               TrainConfig(epochs=6, lr=3e-3), device=DEVICE).model


def _by_name(variants: list[Variant]) -> dict[str, Variant]:
    return {v.name: v for v in variants}


def test_variants_built_and_parity_checked_on_their_own_device(trained, tmp_path: Path) -> None:
    splits, model = trained
    variants, cross = build_variants(model, splits.input_shape, splits.x_test,
                                     OptimizeConfig(variants=QUICK, probe_margin=None), tmp_path, DEVICE, [1, 8])
    by_name = _by_name(variants)
    assert next(model.parameters()).device.type == "cpu"      # building never moves the trained model
    onnx = by_name["onnx_fp32"]
    assert onnx.predictor is not None and onnx.device == "cpu" and onnx.parity.passed
    assert onnx.parity.reference == "torch fp32 on cpu"          # ORT on the CPU is judged against torch on the CPU
    assert onnx.parity.tolerance == pytest.approx(parity.tolerance("fp32", predict(TorchPredictor(model), splits.x_test)))
    assert onnx.parity.argmax_agreement == 1.0
    int8 = by_name["onnx_int8"]
    assert int8.predictor is not None and int8.precision == "int8" and int8.size_mb < onnx.size_mb
    half = by_name["torch_half"]
    assert half.predictor is not None and half.precision == ("fp16" if DEVICE.is_cuda else "bf16")
    for v in variants:
        assert v.build_seconds is not None and v.build_seconds >= 0
        if v.predictor is not None:
            assert v.memory_kind == ("host_rss" if v.device == "cpu" else "cuda_peak_allocated") or \
                v.memory_kind == "cuda_device_used"
    if DEVICE.is_cuda:
        assert cross is not None and cross.reference == "torch fp32 on cpu"
    else:
        assert cross is None
        for name in ("onnx_cuda", "tensorrt_fp16"):
            assert by_name[name].predictor is None and by_name[name].skipped == "no CUDA device on this runner"
    # the dynamic batch axis: any batch size runs
    for batch in (1, 7, 64):
        assert predict(OnnxPredictor(tmp_path / "model.onnx"), splits.x_test[:batch]).shape == (batch, 10)


def test_an_exporter_that_raises_skips_the_onnx_variants_only(trained, tmp_path: Path, monkeypatch) -> None:
    splits, model = trained

    def broken_export(*_args, **_kwargs):
        raise RuntimeError("Unhandled FakeTensor Device Propagation for aten.mm.default\nsecond line")

    monkeypatch.setattr(optimize, "export_onnx", broken_export)
    variants, _ = build_variants(model, splits.input_shape, splits.x_test,
                                 OptimizeConfig(variants=QUICK[:4], probe_margin=None), tmp_path, DEVICE)
    by_name = _by_name(variants)
    for name in ("onnx_fp32", "onnx_int8"):
        assert by_name[name].predictor is None
        assert by_name[name].skipped.startswith("ONNX export failed: RuntimeError: Unhandled FakeTensor")
        assert "\n" not in by_name[name].skipped and "second line" not in by_name[name].skipped
    assert by_name["torch_eager"].predictor is not None and by_name["torch_half"].predictor is not None


def test_a_quantizer_that_raises_skips_int8_only(trained, tmp_path: Path, monkeypatch) -> None:
    splits, model = trained

    def broken_quantizer(*_args, **_kwargs):
        raise ValueError("[ShapeInferenceError] Inferred shape and existing shape differ in dimension 0: (64) vs (10)")

    monkeypatch.setattr(optimize, "quantize_int8", broken_quantizer)
    variants, _ = build_variants(model, splits.input_shape, splits.x_test,
                                 OptimizeConfig(variants=["torch_eager", "onnx_fp32", "onnx_int8"]), tmp_path, DEVICE)
    by_name = _by_name(variants)
    assert by_name["onnx_int8"].skipped == ("onnx_int8 build failed: ValueError: [ShapeInferenceError] Inferred "
                                            "shape and existing shape differ in dimension 0: (64) vs (10)")
    assert by_name["onnx_fp32"].predictor is not None


def test_an_artifact_that_computes_something_else_fails_parity(trained, tmp_path: Path, monkeypatch) -> None:
    splits, model = trained
    real_export = optimize.export_onnx

    def export_a_different_model(model_, input_shape, path, dtype=np.float32):
        other = digits_cnn.build(channels=8, hidden=32)   # same graph, other weights: a wrong artifact
        return real_export(other, input_shape, path, dtype)

    monkeypatch.setattr(optimize, "export_onnx", export_a_different_model)
    variants, _ = build_variants(model, splits.input_shape, splits.x_test,
                                 OptimizeConfig(variants=["torch_eager", "onnx_fp32"]), tmp_path, DEVICE)
    onnx = _by_name(variants)["onnx_fp32"]
    assert onnx.predictor is None and onnx.skipped.startswith("parity with torch fp32 on cpu failed: max |Δlogit|")
    assert onnx.parity is not None and not onnx.parity.passed


def test_the_fp32_reference_failing_fails_the_job(tmp_path: Path) -> None:
    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(StageError, match="the fp32 torch reference failed: RuntimeError: CUDA error"):
        build_variants(Broken(), (1, 8, 8), np.zeros((4, 1, 8, 8), np.float32), OptimizeConfig(), tmp_path, DEVICE)


def test_a_build_over_its_budget_is_skipped(trained, tmp_path: Path) -> None:
    splits, model = trained
    cfg = OptimizeConfig(variants=["torch_eager", "onnx_fp32", "torch_aoti"], build_budget_seconds=0.2)
    variants, _ = build_variants(model, splits.input_shape, splits.x_test, cfg, tmp_path, DEVICE)
    by_name = _by_name(variants)
    assert "over the 0.2 s budget" in by_name["onnx_fp32"].skipped
    # the AOTInductor build runs in a child process that is killed at the budget, not waited for
    assert by_name["torch_aoti"].skipped.startswith("AOTInductor build exceeded")
    assert by_name["torch_aoti"].build_seconds < 30
    assert by_name["torch_eager"].predictor is not None     # the reference has no budget


@pytest.mark.slow
def test_compiled_variants_build_match_and_keep_their_chatter_off_stderr(trained, tmp_path: Path, capfd) -> None:
    """Also the AOTInductor cache: the one package built here is reused by a second build of the same weights
    (the only AOTInductor build in this file: one takes 30-40 s on 2 cores)."""
    splits, model = trained
    cfg = OptimizeConfig(variants=["torch_eager", "torch_compile", "torch_aoti"], probe_margin=None)
    cache = tmp_path / "cache"
    variants, _ = build_variants(model, splits.input_shape, splits.x_test, cfg, tmp_path / "first", DEVICE, [1, 16],
                                 cache_dir=cache)
    by_name = _by_name(variants)
    for name in ("torch_compile", "torch_aoti"):
        v = by_name[name]
        assert v.skipped is None and v.predictor is not None, v.skipped
        assert v.parity.passed and v.parity.reference == f"torch fp32 on {DEVICE.torch}"
        assert v.build_seconds > 0 and v.build_log is not None
    built = by_name["torch_aoti"]
    assert built.artifact.name == "model.aoti.pt2" and built.artifact.stat().st_size
    assert not built.cached and built.cache_key and (cache / "aoti" / built.cache_key / "model.aoti.pt2").is_file()
    out, err = capfd.readouterr()
    assert "AUTOTUNE" not in err and "g++" not in err and "warning" not in err.lower(), err[-2000:]

    # a rerun of the same model (CPU training is deterministic) takes the package from the cache
    again, _ = build_variants(model, splits.input_shape, splits.x_test,
                              OptimizeConfig(variants=["torch_eager", "torch_aoti"], probe_margin=None),
                              tmp_path / "second", DEVICE,
                              [1, 16], cache_dir=cache)
    hit = _by_name(again)["torch_aoti"]
    assert hit.skipped is None and hit.cached and hit.cache_key == built.cache_key and hit.parity.passed
    assert hit.artifact == tmp_path / "second" / "model.aoti.pt2"          # the job's own copy
    assert hit.artifact.read_bytes() == built.artifact.read_bytes()
    assert hit.summary()["cached"] is True and not (tmp_path / "second" / "model.export.pt2").exists()

    # other weights, another input shape or another device are another key
    program = torch.export.export(optimize.device_copy(model, CPU), (torch.from_numpy(splits.x_test[:2]),))
    key = optimize.aoti_cache_key(program, model, splits.input_shape, CPU)
    assert key != optimize.aoti_cache_key(program, digits_cnn.build(channels=8, hidden=32), splits.input_shape, CPU)
    assert key != optimize.aoti_cache_key(program, model, (1, 8, 9), CPU)
    assert key != optimize.aoti_cache_key(program, model, splits.input_shape, RunnerDevice("cuda", 0, "H100", False))


def _probe_result(batch: int = 1, **p50: float) -> LatencyResults:
    """What measure_latency would return for a probe: each variant's p50 at `batch`, the same in every round."""
    def stats(ms: float) -> LatencyStats:
        return LatencyStats(batch, ms, ms, ms, ms, ms, batch * 1e3 / ms, [ms] * 3, round_p50_ms=[ms] * 3)
    return LatencyResults({name: {batch: stats(ms)} for name, ms in p50.items()})


def _injected_probe(monkeypatch, **p50: float) -> list[tuple[list[str], list[int]]]:
    """The probe's timings are given (a timing here would make the test depend on the machine); returns the
    calls it got: which variants, at which batch sizes."""
    probed: list[tuple[list[str], list[int]]] = []

    def probe(predictors, x, batch_sizes, **kwargs):
        probed.append((sorted(predictors), batch_sizes))
        return _probe_result(batch_sizes[0], **{name: p50[name] for name in predictors})

    monkeypatch.setattr(optimize, "measure_latency", probe)
    return probed


def test_compiled_variants_that_cannot_win_are_not_built_on_a_cpu(trained, tmp_path: Path, monkeypatch) -> None:
    """ONNX Runtime 4x faster than eager: compiling torch would cost 30-70 s for a variant that cannot win."""
    splits, model = trained
    probed = _injected_probe(monkeypatch, torch_eager=0.40, onnx_fp32=0.10)
    monkeypatch.setattr(optimize, "compile_aoti", lambda *a, **k: pytest.fail("torch_aoti was built"))
    cfg = OptimizeConfig(variants=["torch_eager", "torch_compile", "torch_aoti", "onnx_fp32"], select_batch_size=8)
    variants, _ = build_variants(model, splits.input_shape, splits.x_test, cfg, tmp_path, CPU, [1, 8])
    by_name = _by_name(variants)
    assert [v.name for v in variants] == ["torch_eager", "torch_compile", "torch_aoti", "onnx_fp32"]   # registry order
    assert probed == [(["onnx_fp32", "torch_eager"], [8])]          # timed once, at the batch that picks the winner
    for name in ("torch_compile", "torch_aoti"):
        v = by_name[name]
        assert v.predictor is None and v.build_seconds is None and v.device == "cpu"
        assert v.skipped == ("cannot win: onnx_fp32 is 4.0× faster than torch_eager at batch 8 on this CPU (p50 "
                             "0.100 ms vs 0.400 ms, timed before building); compiling torch rarely gains 2× over eager "
                             "on a CPU (optimize.skip_compile_when_onnx_speedup)")
    # eager is 4x slower than the bar, beyond the probe's margin, and still timed: it is the reference
    assert by_name["onnx_fp32"].predictor is not None and by_name["torch_eager"].predictor is not None
    assert by_name["torch_eager"].skipped is None and by_name["torch_eager"].always_timed


def _probed(*variants: Variant, cfg: OptimizeConfig = OptimizeConfig(), cross=None) -> optimize.Probe:
    probe = optimize.probe_variants(list(variants), np.zeros((4, 3), np.float32), cfg, cross)
    assert probe is not None
    return probe


def _built(name: str, agreement: float = 1.0, device: str = "cpu", passed: bool = True) -> Variant:
    """A built variant whose parity with the reference is given."""
    variant = Variant(name, device=device, predictor=object())  # type: ignore[arg-type]
    variant.parity = parity.Parity("torch fp32 on cpu", "fp32", 0.0 if passed else 1.0, 1e-3, agreement)
    return variant


def test_compiled_variants_are_built_when_they_might_win(monkeypatch) -> None:
    eager, onnx = Variant("torch_eager", predictor=object()), _built("onnx_fp32")  # type: ignore[arg-type]
    _injected_probe(monkeypatch, torch_eager=0.15, onnx_fp32=0.10)
    assert optimize.compiled_cannot_win(_probed(eager, onnx), OptimizeConfig(), CPU) is None      # 1.5x < 2x
    _injected_probe(monkeypatch, torch_eager=0.40, onnx_fp32=0.10)
    probe = _probed(eager, onnx)
    assert optimize.compiled_cannot_win(probe, OptimizeConfig(), CPU).startswith("cannot win")
    # configurable, and off with null; never on CUDA, where compiling is where the gains are
    assert optimize.compiled_cannot_win(probe, OptimizeConfig(skip_compile_when_onnx_speedup=5), CPU) is None
    assert optimize.compiled_cannot_win(probe, OptimizeConfig(skip_compile_when_onnx_speedup=None), CPU) is None
    gpu = RunnerDevice("cuda", 0, "NVIDIA H100 80GB HBM3", tf32=False)
    assert optimize.compiled_cannot_win(probe, OptimizeConfig(), gpu) is None
    assert optimize.compiled_cannot_win(None, OptimizeConfig(), CPU) is None                     # nothing probed
    # a lossy variant that might yet fail on accuracy is no bar: int8 agrees with eager on 98 % of the test split
    _injected_probe(monkeypatch, torch_eager=0.40, onnx_int8=0.10)
    unsure = _probed(eager, _built("onnx_int8", agreement=0.98))
    assert unsure.bar == "torch_eager" and optimize.compiled_cannot_win(unsure, OptimizeConfig(), CPU) is None
    # each side is judged by its least disturbed round: one round caught in a burst of load does not decide
    bursty = np.concatenate([np.full(50, 0.1), np.full(50, 40.0), np.full(50, 0.12)])
    stats = LatencyStats(1, 40.0, 40.0, 40.0, 40.0, 13.4, 75.0, [0.1, 40.0, 0.12], bursty, rounds=3)
    assert optimize._best_round_p50(stats) == pytest.approx(0.1)
    stats.round_p50_ms = [0.1, 40.0, 0.12]     # rounds of unequal length (a slow round ends early) record theirs
    assert optimize._best_round_p50(stats) == pytest.approx(0.1)


def test_sure_eligible_bounds_the_accuracy_a_variant_can_lose() -> None:
    """A variant can only lose the test examples whose class it predicts differently from torch_eager."""
    assert optimize.sure_eligible(Variant("torch_eager"), "cpu", None, 0.005)
    assert optimize.sure_eligible(_built("onnx_fp32", agreement=1.0), "cpu", None, 0.005)
    assert optimize.sure_eligible(_built("onnx_int8", agreement=0.997), "cpu", None, 0.005)
    assert not optimize.sure_eligible(_built("onnx_int8", agreement=0.99), "cpu", None, 0.005)
    assert not optimize.sure_eligible(_built("onnx_fp32", passed=False), "cpu", None, 0.005)
    assert not optimize.sure_eligible(Variant("torch_half", predictor=object()), "cpu", None, 0.005)  # type: ignore[arg-type]
    # on a GPU runner an ONNX variant on the CPU is judged against torch on the CPU: torch's own cross-device
    # disagreement adds to its bound, and without that figure nothing can be said
    cross = parity.Parity("torch fp32 on cpu", "fp32", 1e-4, 1e-3, 0.998)
    assert optimize.sure_eligible(_built("onnx_fp32", agreement=0.999), "cuda:0", cross, 0.005)
    assert not optimize.sure_eligible(_built("onnx_fp32", agreement=0.996), "cuda:0", cross, 0.005)
    assert not optimize.sure_eligible(_built("onnx_fp32"), "cuda:0", None, 0.005)


def test_a_variant_slower_than_the_bar_in_the_probe_is_skipped_and_not_timed(trained, tmp_path: Path,
                                                                               monkeypatch) -> None:
    """torch_half 10x slower than onnx_fp32 at the selection batch: it cannot be chosen, so the benchmark does not
    time it at every batch size. Eager, 5x slower, is timed all the same: it is the reference."""
    from types import SimpleNamespace

    from automation import job
    from automation.config import ModelConfig
    from automation.progress import JobProgress

    splits, model = trained
    probed = _injected_probe(monkeypatch, torch_eager=0.5, torch_half=1.0, onnx_fp32=0.1, onnx_int8=0.12)
    cfg = OptimizeConfig(variants=["torch_eager", "torch_half", "onnx_fp32", "onnx_int8"])
    variants, _ = build_variants(model, splits.input_shape, splits.x_test, cfg, tmp_path, CPU, [1, 8])
    by_name = _by_name(variants)
    assert probed == [(["onnx_fp32", "onnx_int8", "torch_eager", "torch_half"], [1])]
    half = by_name["torch_half"]
    assert half.predictor is None and half.skipped == (
        "not timed: 10.0× slower than onnx_fp32 at batch 1 in the probe before the benchmark (p50 1.000 ms vs "
        "0.100 ms), beyond optimize.probe_margin (25%), so it cannot be chosen")
    assert half.parity is not None and half.build_seconds is not None    # it was built and checked, then set aside
    assert by_name["onnx_int8"].predictor is not None                    # 1.2x: within the margin, still a contender
    assert by_name["torch_eager"].predictor is not None and by_name["onnx_fp32"].predictor is not None
    assert optimize.time_caps(variants, cfg) == {"onnx_int8": cfg.variant_seconds}   # eager and the bar: never capped

    # the benchmark stage's matrix (real timing, tiny): every contender but torch_half, at every batch size
    timed: list[str] = []
    real_measure = benchmark.measure_latency

    def recording(predictors, *args, **kwargs):
        timed.extend(predictors)
        return real_measure(predictors, *args, **kwargs)

    monkeypatch.setattr(benchmark, "measure_latency", recording)
    spec = ModelConfig(module="models.digits_cnn", benchmark={"batch_sizes": [1, 8], "warmup": 1, "iterations": 5,
                                                              "rounds": 1, "min_rounds": 1})
    validated = SimpleNamespace(splits=splits, raw=splits, batch_sizes=[1, 8], encoder=None)
    connected = SimpleNamespace(production_version=None)
    done = job.benchmark_stage("digits_cnn", spec, validated, connected, variants, tmp_path, JobProgress(enabled=False))
    assert sorted(timed) == ["onnx_fp32", "onnx_int8", "torch_eager"]
    assert half.latency == {} and half.accuracy is None                  # neither timed nor evaluated
    assert {v.name for v in done.built} == {"torch_eager", "onnx_fp32", "onnx_int8"}
    assert all(set(v.latency) == {1, 8} and v.accuracy is not None for v in done.built)
    assert done.chosen.name != "torch_half"


def test_no_probe_margin_times_every_built_variant(trained, tmp_path: Path, monkeypatch) -> None:
    splits, model = trained
    probed = _injected_probe(monkeypatch, torch_eager=0.5, torch_half=5.0, onnx_fp32=0.1)
    cfg = OptimizeConfig(variants=["torch_eager", "torch_half", "onnx_fp32"], probe_margin=None)
    variants, _ = build_variants(model, splits.input_shape, splits.x_test, cfg, tmp_path, CPU, [1])
    assert probed == [] and all(v.predictor is not None for v in variants)   # no compiled variant to decide on
    assert optimize.time_caps(variants, cfg) == {"torch_half": 30, "onnx_fp32": 30}   # no probe: only eager is spared


def test_a_variant_over_its_time_cap_stops_being_timed_and_is_skipped(monkeypatch) -> None:
    """30 ms a call against a 1 s cap: it stops within the batch where the cap runs out, never the job's end; the
    reference, as slow and uncapped, is timed at every batch size."""
    clock, iterations = _FakeClock(), 50
    monkeypatch.setattr(benchmark, "time", clock)
    slow = _Scripted(clock, lambda r, i: 30.0, 10**9)
    contenders = {"torch_eager": _Scripted(clock, lambda r, i: 30.0, 10**9), "torch_half": slow,
                  "onnx_fp32": _Scripted(clock, lambda r, i: 0.1, 10**9)}
    latency = measure_latency(contenders, np.zeros((4, 3), np.float32), [1, 32, 256], warmup=5,
                              iterations=iterations, rounds=3, caps={"torch_half": 1.0, "onnx_fp32": 1.0})
    assert latency.failures == {"torch_half": "took more than 1 s to time (optimize.variant_seconds): stopped at "
                                              "batch 1, so it is not a candidate"}
    assert slow.calls == 5 + 29                  # 5 warm-up calls (0.15 s), then timed ones until past 1 s
    assert latency["torch_half"] == {}
    assert set(latency["torch_eager"]) == {1, 32, 256} and set(latency["onnx_fp32"]) == {1, 32, 256}
    assert latency["torch_eager"][256].samples == 3 * iterations
    variants = [Variant(name, predictor=object()) for name in contenders]  # type: ignore[arg-type]
    drop_failed(variants, latency.failures)
    assert variants[1].predictor is None and variants[1].skipped.startswith("took more than 1 s to time")
    # a warm-up alone can spend the cap: the rounds never start
    slow_start = _Scripted(clock, lambda r, i: 400.0, 10**9)
    capped = measure_latency({"torch_half": slow_start}, np.zeros((4, 3), np.float32), [1], warmup=20,
                             iterations=iterations, rounds=3, caps={"torch_half": 1.0})
    assert "torch_half" in capped.failures and slow_start.calls == 3


def test_a_judged_candidate_is_never_capped() -> None:
    """The one artifact a pull request's build handed over: there is nothing else to choose."""
    candidate = Variant("onnx_fp32", predictor=object())  # type: ignore[arg-type]
    assert optimize.time_caps([candidate], OptimizeConfig(variant_seconds=1)) == {}


class _FakeClock:
    """Stands in for time.perf_counter inside the benchmark: fake predictors advance it by what a call
    'takes', so these tests are about the stopping rule, not about this machine's speed."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class _Scripted:
    """A predictor whose call takes `ms(round, call)` milliseconds of fake time."""

    def __init__(self, clock: _FakeClock, ms, iterations: int) -> None:
        self.clock, self.ms, self.iterations, self.calls = clock, ms, iterations, 0
        self.device, self.memory_kind = CPU, "host_rss"

    def prepare(self, x):
        return x

    def run(self, prepared):
        self.clock.now += self.ms(self.calls // self.iterations, self.calls % self.iterations) / 1e3
        self.calls += 1

    def to_numpy(self, output):
        return output


def _jitter(call: int) -> float:
    return 0.02 * ((call * 7919) % 13) / 13      # up to 2 %, the same in every round


def test_timing_stops_early_once_every_contenders_rounds_agree(monkeypatch) -> None:
    clock, iterations = _FakeClock(), 40
    monkeypatch.setattr(benchmark, "time", clock)
    steady = {name: _Scripted(clock, lambda r, i, base=base: base * (1 + _jitter(i)), iterations)
              for name, base in (("onnx_fp32", 0.1), ("production", 0.12))}
    counted = []
    latency = measure_latency(steady, np.zeros((4, 3), np.float32), [1], warmup=0, iterations=iterations, rounds=6,
                              min_rounds=3, progress=counted.append)
    for name in steady:
        cell = latency[name][1]
        assert (cell.rounds, cell.max_rounds, cell.samples, cell.stopped_early) == (3, 6, 3 * iterations, True)
        assert cell.steady and not cell.rounds_disagree and len(cell.round_p95_ms) == 3
        assert cell.as_dict()["stopped_early"] is True and cell.as_dict()["rounds"] == 3
    assert sum(counted) == 6 * iterations * 2          # the progress bar completes: skipped rounds count as done
    # the gate pairs candidate and production round by round: equal counts, a real comparison
    candidate = gate.CandidateMetrics(0.9, 0.9, latency["onnx_fp32"][1].p95_ms, 1.0, None,
                                      latency["onnx_fp32"][1].round_p95_ms)
    production = gate.CandidateMetrics(0.9, 0.9, latency["production"][1].p95_ms, 1.0, None,
                                       latency["production"][1].round_p95_ms)
    check = gate._latency_vs_production(candidate, production, 0.25, GateConfig())
    assert check.status == "passed" and "missing" not in check.reason


def test_timing_runs_every_round_while_one_contender_is_noisy(monkeypatch) -> None:
    clock, iterations = _FakeClock(), 40
    monkeypatch.setattr(benchmark, "time", clock)
    contenders = {
        "onnx_fp32": _Scripted(clock, lambda r, i: 0.1 * (1 + _jitter(i)), iterations),
        # the machine's load changes between rounds: 1x, 1.6x, 1x, 1.6x, ...
        "torch_eager": _Scripted(clock, lambda r, i: 0.5 * (1.6 if r % 2 else 1.0) * (1 + _jitter(i)), iterations),
    }
    latency = measure_latency(contenders, np.zeros((4, 3), np.float32), [1, 8], warmup=0, iterations=iterations,
                              rounds=5, min_rounds=2, steadiness=Steadiness(spread=0.10, floor_ms=0.005))
    for batch in (1, 8):
        noisy, quiet = latency["torch_eager"][batch], latency["onnx_fp32"][batch]
        assert (noisy.rounds, noisy.stopped_early, noisy.steady, noisy.rounds_disagree) == (5, False, False, True)
        # the steady one is timed for as long as the noisy one: all contenders stop together
        assert (quiet.rounds, quiet.stopped_early, quiet.steady, quiet.rounds_disagree) == (5, False, True, False)
        assert noisy.spread_ms > noisy.allowed_spread_ms == pytest.approx(0.1 * np.median(noisy.round_p95_ms))
    # min_rounds above rounds, or not given: every round runs, as before
    assert measure_latency(contenders, np.zeros((4, 3), np.float32), [1], warmup=0, iterations=iterations,
                           rounds=3)["onnx_fp32"][1].rounds == 3


def test_a_round_of_slow_calls_ends_at_its_time_budget_but_not_before_min_iterations(monkeypatch) -> None:
    clock, iterations = _FakeClock(), 200
    monkeypatch.setattr(benchmark, "time", clock)
    contenders = {"slow": _Scripted(clock, lambda r, i: 40.0, iterations),          # 40 ms a call
                  "fast": _Scripted(clock, lambda r, i: 0.05, iterations)}
    latency = measure_latency(contenders, np.zeros((4, 3), np.float32), [1], warmup=0, iterations=iterations,
                              rounds=3, max_round_seconds=0.5, min_iterations=20)
    assert latency["slow"][1].samples == 3 * 20          # 20 calls pass 0.5 s: the floor, not 200
    assert latency["fast"][1].samples == 3 * iterations  # 200 calls take 10 ms: all of them
    tight = measure_latency(contenders, np.zeros((4, 3), np.float32), [1], warmup=0, iterations=iterations,
                            rounds=1, max_round_seconds=0.0001, min_iterations=20)
    assert tight["fast"][1].samples == 20                # never fewer than min_iterations


def test_parity_tolerance_follows_the_precision() -> None:
    reference = np.array([[8.0, -2.0], [0.5, 1.0]])
    assert parity.tolerance("fp32", reference) == pytest.approx(math.sqrt(2.0 ** -23) * 8.0)
    assert parity.tolerance("tf32", reference) == pytest.approx(math.sqrt(2.0 ** -10) * 8.0)
    assert parity.tolerance("fp32", reference / 100) == pytest.approx(math.sqrt(2.0 ** -23))   # scale floors at 1
    # TF32-sized noise (2.4e-3, seen on an H100) on unit-scale logits fails fp32 and passes tf32
    reference = reference / 8
    noisy = reference + 2.4e-3
    assert not parity.compare(reference, noisy, against="t", precision="fp32").passed
    assert parity.compare(reference, noisy, against="t", precision="tf32").passed
    assert parity.compare(reference, reference + 1e-6, against="t", precision="fp32").passed
    # a real divergence fails at any precision; non-finite logits always fail
    wrong = reference + np.array([[0.0, 2.0], [0.0, 0.0]])
    assert not parity.compare(reference, wrong, against="t", precision="bf16").passed
    assert not parity.compare(reference, reference * np.nan, against="t", precision="bf16").passed
    assert parity.compare(reference, noisy, against="t", precision="fp32", atol=1e-2).passed   # explicit override
    with pytest.raises(ValueError):
        parity.tolerance("fp8", reference)


def test_accuracy_and_latency_measurement(trained) -> None:
    splits, model = trained
    eager = TorchPredictor(model, DEVICE)
    stats = evaluate_accuracy(eager, splits.x_test, splits.y_test, splits.classes)
    manual = (predict(eager, splits.x_test).argmax(1) == splits.y_test).mean()
    assert stats.accuracy == pytest.approx(manual)
    assert stats.correct.shape == (len(splits.y_test),) and set(stats.per_class_f1) == set(splits.classes)
    latency = measure_latency({"eager": eager}, splits.x_test, [1, 8], warmup=2, iterations=30, rounds=3)
    assert not latency.failures
    for batch, s in latency["eager"].items():
        assert s.batch_size == batch and len(s.round_p95_ms) == 3 and len(s.samples_ms) == 90
        assert 0 < s.p50_ms <= s.p90_ms <= s.p95_ms <= s.p99_ms
        assert s.throughput_per_s == pytest.approx(batch * 1e3 / s.mean_ms)


class _FailsOnThirdCall:
    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0
        self.device, self.memory_kind = inner.device, inner.memory_kind

    def prepare(self, x):
        return self.inner.prepare(x)

    def run(self, prepared):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("cudaErrorLaunchFailure: unspecified launch failure")
        return self.inner.run(prepared)

    def to_numpy(self, output):
        return self.inner.to_numpy(output)


def test_a_runtime_failing_while_timed_is_dropped_and_the_rest_go_on(trained) -> None:
    splits, model = trained
    eager = TorchPredictor(model, DEVICE)
    latency = measure_latency({"torch_eager": eager, "torch_half": _FailsOnThirdCall(eager)}, splits.x_test, [1, 4],
                              warmup=5, iterations=10, rounds=2)
    assert latency.failures == {"torch_half": "failed while timed: RuntimeError: cudaErrorLaunchFailure: "
                                              "unspecified launch failure"}
    assert set(latency["torch_eager"]) == {1, 4} and latency["torch_half"] == {}
    variants = [Variant("torch_eager", predictor=eager), Variant("torch_half", predictor=eager)]
    drop_failed(variants, latency.failures)
    assert variants[1].predictor is None and variants[1].skipped.startswith("failed while timed")
    with pytest.raises(StageError, match="the fp32 torch reference failed"):
        drop_failed(variants, {"torch_eager": "failed while timed: boom"})


def _variant(name: str, accuracy: float, p50: float) -> Variant:
    v = Variant(name, predictor=object())  # type: ignore[arg-type]
    v.accuracy = AccuracyStats(accuracy, accuracy, {}, np.array([]))
    v.latency = {1: LatencyStats(1, p50, p50, p50, p50, p50, 1e3 / p50)}
    return v


def test_choose_fastest_within_tolerance() -> None:
    variants = [_variant("torch_eager", 0.97, 0.10), _variant("onnx_fp32", 0.97, 0.03),
                _variant("onnx_int8", 0.95, 0.01)]
    chosen, why = choose_variant(variants, tolerance=0.005, batch_size=1)
    assert chosen.name == "onnx_fp32"          # int8 is faster but loses 2 points
    assert "onnx_int8" in why
    chosen, _ = choose_variant(variants, tolerance=0.03, batch_size=1)
    assert chosen.name == "onnx_int8"


def test_choose_requires_the_fp32_reference() -> None:
    v = Variant("torch_eager", predictor=object())  # type: ignore[arg-type]
    with pytest.raises(StageError):
        choose_variant([v], tolerance=0.01, batch_size=1)
