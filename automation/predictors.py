"""Runtimes a model can be served by: torch (eager or compiled) and ONNX Runtime (CPU, CUDA, TensorRT).

Each predictor splits a call into `prepare` (move inputs to the device, outside the timed
region) and `run` (execute and wait for the result), so latency is measured honestly on
asynchronous devices too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class Predictor(Protocol):
    def prepare(self, x: np.ndarray) -> Any: ...

    def run(self, prepared: Any) -> Any: ...

    def to_numpy(self, output: Any) -> np.ndarray: ...


def predict(predictor: Predictor, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits for all of `x`, in batches."""
    chunks = [predictor.to_numpy(predictor.run(predictor.prepare(x[i:i + batch_size])))
              for i in range(0, len(x), batch_size)]
    return np.concatenate(chunks)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def onnx_provider_missing(provider: str) -> str | None:
    """Why an ONNX Runtime execution provider cannot be used here, or None when it can."""
    import onnxruntime as ort

    if not cuda_available():
        return "no CUDA device on this runner"
    if provider not in ort.get_available_providers():
        return f"onnxruntime build has no {provider} (install onnxruntime-gpu)"
    if provider == "TensorrtExecutionProvider" and importlib.util.find_spec("tensorrt") is None:
        return "the 'tensorrt' package is not importable"
    return None


class TorchPredictor:
    def __init__(self, model: Any, *, device: str = "cpu", compile_model: bool = False) -> None:
        import torch

        self._torch = torch
        self.device = torch.device(device)
        model = model.to(self.device).eval()
        self.module = torch.compile(model, mode="max-autotune") if compile_model else model
        self._sync = self.device.type == "cuda"

    def prepare(self, x: np.ndarray) -> Any:
        return self._torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)

    def run(self, prepared: Any) -> Any:
        with self._torch.inference_mode():
            out = self.module(prepared)
        if self._sync:   # kernels are asynchronous: wait, or the timer measures only the launch
            self._torch.cuda.synchronize(self.device)
        return out

    def to_numpy(self, output: Any) -> np.ndarray:
        return output.float().cpu().numpy()


class OnnxPredictor:
    def __init__(self, path: str | Path, providers: list[Any] | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), sess_options=options,
                                            providers=providers or ["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def prepare(self, x: np.ndarray) -> Any:
        return {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}

    def run(self, prepared: Any) -> Any:
        return self.session.run(None, prepared)[0]   # returns host memory: already synchronous

    def to_numpy(self, output: Any) -> np.ndarray:
        return output


def onnx_providers(variant: str) -> list[Any]:
    if variant == "onnx_cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if variant == "tensorrt_fp16":
        return [("TensorrtExecutionProvider", {"trt_fp16_enable": True}), "CUDAExecutionProvider",
                "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load_predictor(variant: str, artifact: str | Path) -> Predictor:
    """Rebuild a predictor for a variant from its shipped artifact (ONNX file or torch model dir)."""
    if variant.startswith("torch_"):
        import mlflow.pytorch

        device = "cuda" if cuda_available() else "cpu"
        return TorchPredictor(mlflow.pytorch.load_model(str(artifact), map_location="cpu"), device=device,
                              compile_model=variant == "torch_compile")
    return OnnxPredictor(artifact, onnx_providers(variant))


@dataclass
class RegisteredModel:
    """A registry version, downloaded and loaded for inference."""

    version: str
    variant: str
    predictor: Predictor
    artifact: Path
    input_shape: tuple[int, ...]     # one input, without the batch axis (from the logged signature)
    dtype: str


def load_registered(client: Any, model: str, version: str, dest: Path) -> RegisteredModel:
    """Download `models:/model/version` and load the variant it was registered as."""
    import mlflow
    from mlflow.models import Model

    variant = client.get_model_version(model, version).tags.get("mlgate.variant", "onnx_fp32")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model}/{version}", dst_path=str(dest)))
    artifact = local if variant.startswith("torch") else next(local.rglob("*.onnx"))
    spec = Model.load(str(local)).signature.inputs.to_dict()[0]["tensor-spec"]
    return RegisteredModel(version=version, variant=variant, predictor=load_predictor(variant, artifact),
                           artifact=artifact, input_shape=tuple(int(d) for d in spec["shape"][1:]),
                           dtype=str(spec["dtype"]))
