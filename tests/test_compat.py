"""The declared dependency ranges hold: export and int8 quantization with whichever torch and
onnxruntime are installed. `make test-compat` runs these on the oldest and newest declared
onnxruntime (and CI's compat job on the oldest torch); `make test` runs them on what it installed."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import onnxruntime
import pytest
import torch

from automation import parity
from automation.config import TrainConfig
from automation.optimize import export_onnx, quantize_int8
from automation.predictors import OnnxPredictor, TorchPredictor, predict
from automation.train import train_model
from models import digits_cnn, digits_mlp
from models.datasets import digits

pytestmark = pytest.mark.compat
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def test_installed_versions_are_in_the_declared_range() -> None:
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    floors = {m.group(1): m.group(2) for d in declared if (m := re.match(r"(torch|onnxruntime)>=([\d.]+)", d))}
    assert set(floors) == {"torch", "onnxruntime"}
    assert _release(torch.__version__) >= _release(floors["torch"])
    assert _release(onnxruntime.__version__) >= _release(floors["onnxruntime"])


@pytest.mark.parametrize("module,params", [(digits_mlp, {"hidden": 64}), (digits_cnn, {"channels": 8, "hidden": 32})],
                         ids=["digits_mlp", "digits_cnn"])
def test_export_and_int8_work_with_the_installed_onnxruntime(module, params, tmp_path: Path) -> None:
    splits = digits(seed=0)
    model = train_model(module.build, params, splits, TrainConfig(epochs=8, lr=3e-3)).model
    fp32 = export_onnx(model, splits.input_shape, tmp_path / "model.onnx")
    int8 = quantize_int8(fp32, tmp_path / "model.int8.onnx")   # raised ShapeInferenceError on 1.18-1.31
    reference = predict(TorchPredictor(model), splits.x_test)
    exported = predict(OnnxPredictor(fp32), splits.x_test)
    assert parity.compare(reference, exported, against="torch fp32 on cpu", precision="fp32").passed
    quantized = predict(OnnxPredictor(int8), splits.x_test)
    assert int8.stat().st_size < fp32.stat().st_size
    assert (quantized.argmax(1) == reference.argmax(1)).mean() >= 0.97, onnxruntime.__version__
    accuracy = lambda logits: float((logits.argmax(1) == splits.y_test).mean())   # noqa: E731
    assert accuracy(quantized) >= accuracy(reference) - 0.02
