"""What only a CUDA machine can show: AMP training, synchronized timing, the GPU variants, and a
CUDA-trained version crossing to a CPU machine (and back). Skipped with the reason elsewhere;
`make gpu-check` runs them (see ../shared/gpu/README.md for a lent GPU machine)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from automation import tracking
from automation.config import OptimizeConfig, TrainConfig, load_config
from automation.device import CPU, select_device
from automation.optimize import build_variants
from automation.predictors import TorchPredictor, load_registered, predict
from automation.train import train_model
from models import digits_cnn
from models.datasets import digits
from tests.conftest import fast_config, last_json, write_config
from triggers.cli import main
from triggers.serving.server import ModelServer, create_serving_app

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda():
    return select_device()


def test_amp_training_is_deterministic_and_returns_host_fp32_weights(cuda) -> None:
    splits = digits(seed=0)
    cfg = TrainConfig(epochs=5, lr=3e-3)
    first = train_model(digits_cnn.build, {"channels": 8, "hidden": 32}, splits, cfg, device=cuda)
    second = train_model(digits_cnn.build, {"channels": 8, "hidden": 32}, splits, cfg, device=cuda)
    assert first.device.startswith("cuda") and first.precision in {"bf16 autocast", "fp16 autocast"}
    for p, q in zip(first.model.parameters(), second.model.parameters()):
        assert p.device.type == "cpu" and p.dtype == torch.float32
        assert torch.equal(p, q)


def test_a_timed_run_has_finished_its_kernels(cuda) -> None:
    model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(8)])
    predictor = TorchPredictor(model, cuda)
    prepared = predictor.prepare(np.random.default_rng(0).standard_normal((512, 4096)).astype(np.float32))
    predictor.run(prepared)
    assert torch.cuda.current_stream().query()   # nothing left in flight when the clock stops
    assert next(model.parameters()).device.type == "cpu"


def test_every_gpu_variant_builds_matches_on_its_device_and_stays_quiet(cuda, tmp_path: Path, capfd) -> None:
    splits = digits(seed=0)
    model = train_model(digits_cnn.build, {"channels": 8, "hidden": 32}, splits, TrainConfig(epochs=5, lr=3e-3),
                        device=cuda).model
    variants, cross = build_variants(model, splits.input_shape, splits.x_test, OptimizeConfig(probe_margin=None), tmp_path,
                                     cuda, [1, 32, 256])
    by_name = {v.name: v for v in variants}
    assert cross is not None and cross.reference == "torch fp32 on cpu" and cross.argmax_agreement > 0.99
    for name in ("torch_eager", "torch_half", "torch_compile", "torch_aoti"):
        v = by_name[name]
        assert v.skipped is None and v.device.startswith("cuda"), (name, v.skipped)
        assert v.memory_kind == "cuda_peak_allocated" and v.memory_mb is not None and v.memory_mb > 0
    assert by_name["torch_half"].precision == "fp16"
    for name in ("torch_compile", "torch_aoti"):
        assert by_name[name].parity.passed and by_name[name].parity.reference == f"torch fp32 on {cuda.torch}"
    assert by_name["onnx_fp32"].parity.reference == "torch fp32 on cpu" and by_name["onnx_fp32"].parity.passed
    for name in ("onnx_cuda", "tensorrt_fp16"):   # built where onnxruntime-gpu/TensorRT exist, else a reason
        v = by_name[name]
        assert (v.skipped is None and v.device.startswith("cuda")) or \
            ("onnxruntime" in v.skipped or "tensorrt" in v.skipped), v.skipped
    _, err = capfd.readouterr()
    assert "AUTOTUNE" not in err and "triton" not in err.lower(), err[-2000:]


def _job(directory: Path, device: str) -> Path:
    config = fast_config(epochs=6)
    if device == "cuda":   # the compiled variants too: the chosen one may be CUDA-only (AOTInductor's CUDA
        # build takes ~100 s on an H100, so test_every_gpu_variant_builds... and gpu_check cover it)
        config["defaults"]["optimize"]["variants"] += ["torch_compile"]
    config["defaults"]["device"] = {"type": device}
    path = write_config(directory, config)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["run", "--config", str(path), "--model", "digits_mlp", "--json"], standalone=False)
    summary = last_json(out.getvalue())
    assert code == 0 and summary["promoted"] and summary["training"]["device"].startswith(device)
    return path


@pytest.fixture(scope="module")
def registries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """digits_mlp v1 trained on CUDA (every variant) and another v1 trained on the CPU."""
    return {device: _job(tmp_path_factory.mktemp(f"trained-on-{device}"), device) for device in ("cuda", "cpu")}


def _load_both_ways(path: Path, tmp_path: Path, cuda) -> tuple[np.ndarray, np.ndarray]:
    config = load_config(path)
    client, _ = tracking.connect(config.workdir, config.experiment)
    x = digits(seed=0).x_test
    on_gpu = load_registered(client, "digits_mlp", "1", tmp_path / "gpu", cuda)
    on_cpu = load_registered(client, "digits_mlp", "1", tmp_path / "cpu", CPU)
    assert on_cpu.predictor.device.type == "cpu" and on_cpu.served_as in {on_cpu.variant, "torch_eager", "onnx_fp32"}
    if on_cpu.served_as != on_cpu.variant:   # a CUDA-only artifact: served by its portable form, and it says why
        assert on_cpu.fallback_reason and on_cpu.variant in on_cpu.fallback_reason
    return predict(on_gpu.predictor, x), predict(on_cpu.predictor, x)


@pytest.mark.parametrize("trained_on", ["cuda", "cpu"])
def test_a_version_crosses_between_cuda_and_cpu_machines(trained_on: str, cuda, registries, tmp_path: Path) -> None:
    gpu_logits, cpu_logits = _load_both_ways(registries[trained_on], tmp_path, cuda)
    assert (gpu_logits.argmax(1) == cpu_logits.argmax(1)).mean() > 0.99
    assert np.abs(gpu_logits - cpu_logits).max() < 0.1   # half precision is a legitimate choice here


def test_serve_model_answers_on_cuda(cuda, registries) -> None:
    server = ModelServer(load_config(registries["cuda"]), "digits_mlp")
    assert server.sync() and server.device.is_cuda
    with TestClient(create_serving_app(server)) as client:
        health = client.get("/healthz").json()
        assert health["device"].startswith("cuda") and health["version"] == "1"
        x = digits(seed=0).x_test[:8]
        answer = client.post("/predict", json={"inputs": x.tolist()})
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 8
