from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from automation.benchmark import AccuracyStats, LatencyStats, evaluate_accuracy, measure_latency
from automation.config import OptimizeConfig, TrainConfig
from automation.errors import StageError
from automation.optimize import Variant, build_variants, check_parity, choose_variant
from automation.predictors import OnnxPredictor, TorchPredictor, predict
from automation.train import train_model
from models import digits_cnn
from models.datasets import digits


@pytest.fixture(scope="module")
def trained():
    splits = digits(seed=0)
    return splits, train_model(digits_cnn.build, {"channels": 8, "hidden": 32}, splits,
                               TrainConfig(epochs=6, lr=3e-3)).model


def test_variants_built_parity_checked_and_gpu_ones_skipped_with_reason(trained, tmp_path: Path) -> None:
    splits, model = trained
    variants, parity = build_variants(model, splits.input_shape, splits.x_test, OptimizeConfig(), tmp_path)
    by_name = {v.name: v for v in variants}
    assert parity is not None and parity.passed and parity.argmax_agreement == 1.0
    assert parity.max_abs_diff < 1e-3
    for name in ("torch_eager", "onnx_fp32", "onnx_int8"):
        assert by_name[name].predictor is not None and by_name[name].size_mb > 0
    assert by_name["onnx_int8"].size_mb < by_name["onnx_fp32"].size_mb
    for name in ("torch_compile", "onnx_cuda", "tensorrt_fp16"):
        assert by_name[name].predictor is None and "CUDA" in by_name[name].skipped
    # the dynamic batch axis: any batch size runs
    onnx = OnnxPredictor(tmp_path / "model.onnx")
    for batch in (1, 7, 64):
        assert predict(onnx, splits.x_test[:batch]).shape == (batch, 10)


def test_parity_check_fails_on_real_divergence() -> None:
    reference = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert not check_parity(reference, reference + np.array([[0.0, 2.0], [0.0, 0.0]]), 1e-3).passed
    assert check_parity(reference, reference + 1e-5, 1e-3).passed


def test_accuracy_and_latency_measurement(trained) -> None:
    splits, model = trained
    eager = TorchPredictor(model)
    stats = evaluate_accuracy(eager, splits.x_test, splits.y_test, splits.classes)
    manual = (predict(eager, splits.x_test).argmax(1) == splits.y_test).mean()
    assert stats.accuracy == pytest.approx(manual)
    assert stats.correct.shape == (len(splits.y_test),) and set(stats.per_class_f1) == set(splits.classes)
    latency = measure_latency({"eager": eager}, splits.x_test, [1, 8], warmup=2, iterations=30, rounds=3)
    for batch, s in latency["eager"].items():
        assert s.batch_size == batch and len(s.round_p95_ms) == 3 and len(s.samples_ms) == 90
        assert 0 < s.p50_ms <= s.p90_ms <= s.p95_ms <= s.p99_ms
        assert s.throughput_per_s == pytest.approx(batch * 1e3 / s.mean_ms)


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
