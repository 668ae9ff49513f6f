"""Optimize: export to ONNX, quantize, build every deployable variant and pick the winner.

The winner is the fastest variant (p50 at the configured batch size) whose test accuracy
stays within `accuracy_tolerance` of the fp32 torch model. GPU-only variants are built only
where their runtime exists; otherwise they are listed as skipped with the reason.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from automation.benchmark import AccuracyStats, LatencyStats, resident_memory_mb, size_mb
from automation.config import OptimizeConfig
from automation.predictors import (OnnxPredictor, Predictor, TorchPredictor, cuda_available, onnx_provider_missing,
                                   onnx_providers, predict)
from automation.errors import StageError

log = logging.getLogger(__name__)


@dataclass
class Parity:
    max_abs_diff: float
    argmax_agreement: float
    passed: bool


@dataclass
class Variant:
    name: str
    predictor: Predictor | None = None
    artifact: Path | None = None           # what would be shipped: an ONNX file, or None for torch
    skipped: str | None = None
    memory_mb: float | None = None         # resident memory added by loading it and running one batch
    size_mb: float | None = None
    accuracy: AccuracyStats | None = None
    latency: dict[int, LatencyStats] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        return {"name": self.name, "skipped": self.skipped, "size_mb": self.size_mb, "memory_mb": self.memory_mb,
                "accuracy": self.accuracy.accuracy if self.accuracy else None,
                "latency": {str(b): s.as_dict() for b, s in self.latency.items()}}


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """ONNX with a dynamic batch axis, weights inline (one self-contained file)."""
    example = torch.zeros((2, *input_shape), dtype=torch.float32)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)   # torchvision ops
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # exporter internals, not the user's model
            torch.onnx.export(model.eval(), (example,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},),
                              input_names=["x"], output_names=["logits"], verbose=False)
    except Exception as exc:  # the exporter raises many types; the stage name is what the user needs
        raise StageError("optimize", f"ONNX export failed: {exc}",
                         hint="the model must be traceable by torch.export") from exc
    return path


def quantize_int8(fp32_path: Path, int8_path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
    return int8_path


def check_parity(reference: np.ndarray, candidate: np.ndarray, atol: float) -> Parity:
    diff = float(np.abs(reference - candidate).max())
    agreement = float((reference.argmax(1) == candidate.argmax(1)).mean())
    return Parity(max_abs_diff=diff, argmax_agreement=agreement, passed=diff <= atol)


def _measure_load(build: Callable[[], Predictor], sample: np.ndarray) -> tuple[Predictor, float]:
    before = resident_memory_mb()
    if cuda_available():
        torch.cuda.reset_peak_memory_stats()
    predictor = build()
    predictor.run(predictor.prepare(sample))
    if cuda_available():
        return predictor, torch.cuda.max_memory_allocated() / 2**20
    return predictor, max(0.0, resident_memory_mb() - before)


def build_variants(model: nn.Module, input_shape: tuple[int, ...], x_test: np.ndarray, cfg: OptimizeConfig,
                   out_dir: Path) -> tuple[list[Variant], Parity | None]:
    """Every configured variant, built or skipped, plus the fp32 ONNX parity check."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if cuda_available() else "cpu"
    sample = x_test[:32]
    variants: list[Variant] = []
    wanted = set(cfg.variants)

    torch_path = out_dir / "model_state.pt"
    torch.save(model.state_dict(), torch_path)
    eager, mem = _measure_load(lambda: TorchPredictor(model, device=device), sample)
    variants.append(Variant("torch_eager", eager, None, memory_mb=mem, size_mb=size_mb(torch_path)))

    onnx_names = [n for n in ("onnx_fp32", "onnx_int8", "onnx_cuda", "tensorrt_fp16") if n in wanted]
    parity = None
    if onnx_names:
        fp32_path = export_onnx(model, input_shape, out_dir / "model.onnx")
        fp32 = OnnxPredictor(fp32_path)
        parity = check_parity(predict(eager, x_test), predict(fp32, x_test), cfg.parity_atol)
        blocked = None if parity.passed else (
            f"ONNX parity failed: max |Δlogit| {parity.max_abs_diff:.2e} > {cfg.parity_atol:.0e}")
        for name in onnx_names:
            path = quantize_int8(fp32_path, out_dir / "model.int8.onnx") if name == "onnx_int8" else fp32_path
            provider = {"onnx_cuda": "CUDAExecutionProvider",
                        "tensorrt_fp16": "TensorrtExecutionProvider"}.get(name)
            reason = blocked or (onnx_provider_missing(provider) if provider else None)
            if reason:
                variants.append(Variant(name, skipped=reason))
                continue
            predictor, mem = _measure_load(lambda p=path, n=name: OnnxPredictor(p, onnx_providers(n)), sample)
            variants.append(Variant(name, predictor, path, memory_mb=mem, size_mb=size_mb(path)))

    if "torch_compile" in wanted:
        if not cuda_available():
            variants.append(Variant("torch_compile", skipped="no CUDA device on this runner "
                                    "(compiled kernels are only built for the GPU runner)"))
        else:
            compiled, mem = _measure_load(lambda: TorchPredictor(model, device=device, compile_model=True), sample)
            variants.append(Variant("torch_compile", compiled, None, memory_mb=mem, size_mb=size_mb(torch_path)))
    for variant in variants:
        if variant.skipped:
            log.info("variant skipped", extra={"variant": variant.name, "reason": variant.skipped})
    return variants, parity


def choose_variant(variants: list[Variant], tolerance: float, batch_size: int) -> tuple[Variant, str]:
    """The fastest built variant whose accuracy is within `tolerance` of torch eager (fp32)."""
    reference = next(v for v in variants if v.name == "torch_eager")
    if reference.accuracy is None:
        raise StageError("optimize", "torch_eager was not evaluated")
    floor = reference.accuracy.accuracy - tolerance
    eligible = [v for v in variants if v.predictor is not None and v.accuracy is not None
                and v.accuracy.accuracy >= floor and batch_size in v.latency]
    best = min(eligible, key=lambda v: v.latency[batch_size].p50_ms)
    rejected = [v.name for v in variants if v.accuracy is not None and v.accuracy.accuracy < floor]
    why = (f"fastest p50 at batch {batch_size} among variants within {tolerance:.1%} of fp32 accuracy "
           f"({reference.accuracy.accuracy:.2%})")
    if rejected:
        why += f"; rejected for accuracy: {', '.join(rejected)}"
    return best, why
