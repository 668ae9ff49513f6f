"""Variants: built or skipped in isolation, parity per device, timing, choice. Assertions follow the
device actually present, so the same tests hold on a CPU machine and on a GPU runner."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from automation import optimize, parity
from automation.benchmark import AccuracyStats, LatencyStats, evaluate_accuracy, measure_latency
from automation.config import OptimizeConfig, TrainConfig
from automation.device import select_device
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
    variants, cross = build_variants(model, splits.input_shape, splits.x_test, OptimizeConfig(variants=QUICK),
                                     tmp_path, DEVICE, [1, 8])
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
    variants, _ = build_variants(model, splits.input_shape, splits.x_test, OptimizeConfig(variants=QUICK[:4]),
                                 tmp_path, DEVICE)
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

    def export_a_different_model(model_, input_shape, path):
        other = digits_cnn.build(channels=8, hidden=32)   # same graph, other weights: a wrong artifact
        return real_export(other, input_shape, path)

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
    splits, model = trained
    cfg = OptimizeConfig(variants=["torch_eager", "torch_compile", "torch_aoti"])
    variants, _ = build_variants(model, splits.input_shape, splits.x_test, cfg, tmp_path, DEVICE, [1, 16])
    by_name = _by_name(variants)
    for name in ("torch_compile", "torch_aoti"):
        v = by_name[name]
        assert v.skipped is None and v.predictor is not None, v.skipped
        assert v.parity.passed and v.parity.reference == f"torch fp32 on {DEVICE.torch}"
        assert v.build_seconds > 0 and v.build_log is not None
    assert by_name["torch_aoti"].artifact.name == "model.aoti.pt2" and by_name["torch_aoti"].artifact.stat().st_size
    out, err = capfd.readouterr()
    assert "AUTOTUNE" not in err and "g++" not in err and "warning" not in err.lower(), err[-2000:]


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
