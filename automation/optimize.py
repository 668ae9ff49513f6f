"""Optimize: build every deployable variant, each in isolation, and pick the winner.

A variant that fails to export, quantize, compile, load or run is skipped with a one-line
reason and the job goes on; only the fp32 torch reference (`torch_eager`) is required.
An fp32 variant must also pass parity with torch fp32 on its own device (automation/parity.py);
lossy ones (half, int8) are judged by test accuracy in `choose_variant`.

The winner is the fastest variant (p50 at the configured batch size) whose test accuracy
stays within `accuracy_tolerance` of the fp32 torch model.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from automation import parity
from automation.benchmark import AccuracyStats, LatencyStats, MemoryProbe, size_mb
from automation.config import ALL_VARIANTS, OptimizeConfig
from automation.device import CPU, RunnerDevice, device_copy, host_copy
from automation.errors import StageError, failure_reason, one_line
from automation.logs import captured_output
from automation.predictors import (AotiPredictor, OnnxPredictor, Predictor, TorchPredictor, onnx_provider_missing,
                                   onnx_providers, predict)

log = logging.getLogger(__name__)
REFERENCE = "torch_eager"
LOSSY = {"torch_half", "onnx_int8", "tensorrt_fp16"}   # judged by accuracy, not parity


class Skip(Exception):
    """A variant cannot be built here; the message is the reason shown in the report."""


@dataclass
class Variant:
    name: str
    device: str = "cpu"                    # where it computes
    precision: str = "fp32"
    predictor: Predictor | None = None
    artifact: Path | None = None           # what would be shipped: an ONNX file, an AOTInductor package, or None
    skipped: str | None = None
    build_seconds: float | None = None
    build_log: Path | None = None          # compiler and exporter output, kept off the job's stderr
    memory_mb: float | None = None
    memory_kind: str | None = None
    size_mb: float | None = None
    parity: parity.Parity | None = None
    accuracy: AccuracyStats | None = None
    latency: dict[int, LatencyStats] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.predictor = None
        self.skipped = one_line(reason)
        log.info("variant skipped", extra={"variant": self.name, "reason": self.skipped})

    def summary(self) -> dict[str, object]:
        return {"name": self.name, "skipped": self.skipped, "device": self.device, "precision": self.precision,
                "build_seconds": self.build_seconds, "size_mb": self.size_mb, "memory_mb": self.memory_mb,
                "memory_kind": self.memory_kind, "parity": self.parity.as_dict() if self.parity else None,
                "accuracy": self.accuracy.accuracy if self.accuracy else None,
                "build_log": str(self.build_log) if self.build_log else None,
                "latency": {str(b): s.as_dict() for b, s in self.latency.items()}}


# --- artifacts -------------------------------------------------------------------------------------------

def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """ONNX from a CPU copy, with a dynamic batch axis and weights inline (one self-contained file)."""
    example = torch.zeros((2, *input_shape), dtype=torch.float32)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)   # torchvision ops
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # exporter internals, not the user's model
        torch.onnx.export(host_copy(model), (example,), str(path), dynamo=True, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},),
                          input_names=["x"], output_names=["logits"], verbose=False)
    return path


def quantize_int8(fp32_path: Path, int8_path: Path) -> Path:
    """Dynamic int8 weights, working across the declared onnxruntime range (tests/test_compat.py).

    Before 1.32, `quantize_dynamic` transposes each Gemm(transB=1) weight in place under the same
    name but leaves the exporter's `value_info` for it, so its own shape inference then fails
    ("Inferred shape and existing shape differ", onnxruntime#25890). An initializer carries its own
    shape, so those entries are dropped. Before 1.24 the CPU provider has no uint8×int8 ConvInteger
    kernel, so convolutions stay fp32 there."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph_model = onnx.load(str(fp32_path))
    initializers = {t.name for t in graph_model.graph.initializer}
    kept = [info for info in graph_model.graph.value_info if info.name not in initializers]
    del graph_model.graph.value_info[:]
    graph_model.graph.value_info.extend(kept)
    release = tuple(int(part) for part in onnxruntime.__version__.split(".")[:2])
    op_types = ["MatMul", "Gemm"] if release < (1, 24) else None
    quantize_dynamic(graph_model, str(int8_path), weight_type=QuantType.QInt8, op_types_to_quantize=op_types)
    return int8_path


AOTI_BUILD = ("import sys, torch, torch._inductor; "
              "torch._inductor.aoti_compile_and_package(torch.export.load(sys.argv[1]), package_path=sys.argv[2])")


def compile_aoti(model: nn.Module, example: np.ndarray, device: RunnerDevice, out_dir: Path, *,
                 timeout: float, log_file: Path) -> Path:
    """An AOTInductor package for `device`. The C++/Triton build runs in a child process, so the build
    budget is a hard limit: a build over it is killed, not waited for.

    The example is real input: with an all-zero example, torch 2.13's CPU AOTInductor built a package
    for digits_cnn that was off by up to 17 in the logits (caught by parity)."""
    module = device_copy(model, device)
    example = torch.from_numpy(np.ascontiguousarray(example[:2], dtype=np.float32)).to(device.torch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, (example,),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},))
    exported = out_dir / "model.export.pt2"
    torch.export.save(program, str(exported))
    package = out_dir / "model.aoti.pt2"
    with log_file.open("ab") as sink:
        try:
            subprocess.run([sys.executable, "-c", AOTI_BUILD, str(exported), str(package)], stdout=sink,
                           stderr=subprocess.STDOUT, timeout=timeout, check=True)
        except subprocess.TimeoutExpired:
            raise Skip(f"AOTInductor build exceeded the {timeout:.0f} s left of its budget "
                       "(optimize.build_budget_seconds)") from None
        except subprocess.CalledProcessError as exc:
            tail = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()][-1:]
            raise Skip(f"AOTInductor build failed (exit {exc.returncode}): {tail[0] if tail else 'no output'}") \
                from None
    exported.unlink(missing_ok=True)
    return package


# --- building --------------------------------------------------------------------------------------------

@dataclass
class BuildContext:
    model: nn.Module                  # trained fp32 weights, on the host
    input_shape: tuple[int, ...]
    sample: np.ndarray                # real inputs, for tracing
    device: RunnerDevice
    cfg: OptimizeConfig
    out_dir: Path
    log_file: Path = Path()
    deadline: float = 0.0             # perf_counter() by which this variant's build must end
    _onnx: Path | None = None
    _onnx_error: str | None = None

    def onnx_fp32(self) -> Path:
        """Exported once, shared by every ONNX variant; an export failure skips all of them alike."""
        if self._onnx is None and self._onnx_error is None:
            try:
                with captured_output(self.out_dir / "onnx_export.build.log"):
                    self._onnx = export_onnx(self.model, self.input_shape, self.out_dir / "model.onnx")
            except Exception as exc:   # the exporter raises many types; the reason is what the user needs
                self._onnx_error = failure_reason("ONNX export", exc) + " (the model must be traceable by torch.export)"
        if self._onnx_error:
            raise Skip(self._onnx_error)
        return self._onnx   # type: ignore[return-value]


Built = tuple[Predictor, Path | None, str]   # predictor, shipped artifact, precision


def _build_torch_half(ctx: BuildContext) -> Built:
    dtype = ctx.device.half_dtype
    return TorchPredictor(ctx.model, ctx.device, dtype=dtype), None, "fp16" if dtype == torch.float16 else "bf16"


def _build_torch_compile(ctx: BuildContext) -> Built:
    return (TorchPredictor(ctx.model, ctx.device, compile_mode=ctx.cfg.compile_mode), None,
            ctx.device.fp32_precision)


def _build_torch_aoti(ctx: BuildContext) -> Built:
    package = compile_aoti(ctx.model, ctx.sample, ctx.device, ctx.out_dir,
                           timeout=max(1.0, ctx.deadline - time.perf_counter()), log_file=ctx.log_file)
    return AotiPredictor(package, ctx.device), package, ctx.device.fp32_precision


def _build_onnx_fp32(ctx: BuildContext) -> Built:
    path = ctx.onnx_fp32()
    return OnnxPredictor(path, onnx_providers("onnx_fp32"), CPU), path, "fp32"


def _build_onnx_int8(ctx: BuildContext) -> Built:
    path = quantize_int8(ctx.onnx_fp32(), ctx.out_dir / "model.int8.onnx")
    return OnnxPredictor(path, onnx_providers("onnx_int8"), CPU), path, "int8"


def _build_onnx_gpu(name: str) -> Callable[[BuildContext], Built]:
    def build(ctx: BuildContext) -> Built:
        missing = onnx_provider_missing(name, ctx.device)
        if missing:
            raise Skip(missing)
        path = ctx.onnx_fp32()
        predictor = OnnxPredictor(path, onnx_providers(name, ctx.device), ctx.device)
        if not predictor.device.is_cuda:
            raise Skip(f"onnxruntime placed {name} on the CPU (its GPU provider did not load)")
        return predictor, path, "fp16" if name == "tensorrt_fp16" else ctx.device.fp32_precision
    return build


BUILDERS: dict[str, Callable[[BuildContext], Built]] = {
    "torch_half": _build_torch_half,
    "torch_compile": _build_torch_compile,
    "torch_aoti": _build_torch_aoti,
    "onnx_fp32": _build_onnx_fp32,
    "onnx_int8": _build_onnx_int8,
    "onnx_cuda": _build_onnx_gpu("onnx_cuda"),
    "tensorrt_fp16": _build_onnx_gpu("tensorrt_fp16"),
}


def _warm(predictor: Predictor, x: np.ndarray, batch_sizes: list[int], probe: MemoryProbe) -> np.ndarray:
    """Run every shape the job will time (compiled runtimes build per shape), measure memory at the
    largest batch, and return the logits on `x` (the test set)."""
    for batch_size in sorted(batch_sizes):
        batch = np.resize(x, (batch_size, *x.shape[1:])).astype(np.float32)
        prepared = predictor.prepare(batch)
        for _ in range(3):   # CUDA graphs record on the second or third call
            predictor.run(prepared)
    probe.finish(predictor.memory_kind)
    return predict(predictor, x)


@contextmanager
def _timed(variant: Variant) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        variant.build_seconds = round(time.perf_counter() - started, 3)


def build_variants(model: nn.Module, input_shape: tuple[int, ...], x_test: np.ndarray, cfg: OptimizeConfig,
                   out_dir: Path, device: RunnerDevice = CPU,
                   batch_sizes: list[int] | None = None) -> tuple[list[Variant], parity.Parity | None]:
    """Every configured variant, built or skipped with its reason, plus the cross-device difference
    (torch fp32 on the runner's GPU against torch fp32 on the CPU; None on a CPU runner)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    batch_sizes = batch_sizes or [1]

    # --- the fp32 reference: its failure is the job's -----------------------------------------------
    reference = Variant(REFERENCE, device=str(device.torch), precision=device.fp32_precision)
    with _timed(reference):
        try:
            probe = MemoryProbe(device)
            reference.predictor = TorchPredictor(model, device)
            logits = {device.type: _warm(reference.predictor, x_test, batch_sizes, probe)}
        except Exception as exc:
            raise StageError("optimize", failure_reason("the fp32 torch reference", exc),
                             hint="torch_eager must run for any variant to be judged") from exc
    reference.memory_mb, reference.memory_kind = probe.megabytes, probe.kind
    torch_path = out_dir / "model_state.pt"
    torch.save(host_copy(model).state_dict(), torch_path)
    reference.size_mb = size_mb(torch_path)
    variants = [reference]

    cross_device = None
    if device.is_cuda:   # ONNX Runtime on the CPU is judged against torch on the CPU, not on the GPU
        logits["cpu"] = predict(TorchPredictor(model, CPU), x_test)
        cross_device = parity.compare(logits["cpu"], logits[device.type], against="torch fp32 on cpu",
                                      precision=device.fp32_precision)
        log.info("cross-device difference", extra=cross_device.as_dict())

    ctx = BuildContext(model, input_shape, x_test[:2], device, cfg, out_dir)
    for name in [n for n in ALL_VARIANTS if n in cfg.variants and n != REFERENCE]:
        variant = Variant(name, build_log=out_dir / f"{name}.build.log")
        ctx.log_file, ctx.deadline = variant.build_log, time.perf_counter() + cfg.build_budget_seconds
        variants.append(variant)
        with _timed(variant):
            try:
                probe = MemoryProbe(device)
                with captured_output(variant.build_log):
                    predictor, artifact, variant.precision = BUILDERS[name](ctx)
                    variant.device = str(predictor.device.torch)
                    candidate = _warm(predictor, x_test, batch_sizes, probe)
            except Skip as exc:
                variant.skip(str(exc))
                continue
            except Exception as exc:   # any failure of an optional variant is its own, never the job's
                variant.skip(failure_reason(f"{name} build", exc))
                continue
        variant.memory_mb, variant.memory_kind = probe.megabytes, probe.kind
        variant.size_mb = size_mb(artifact) if artifact is not None else (
            size_mb(torch_path) * (0.5 if name == "torch_half" else 1.0))
        lossy = name in LOSSY
        variant.parity = parity.compare(
            logits[predictor.device.type], candidate, against=f"torch fp32 on {predictor.device.torch}",
            precision=variant.precision if variant.precision in parity.EPSILON else "fp32",
            atol=None if lossy else cfg.parity_atol)
        if not lossy and not variant.parity.passed:
            variant.skip(variant.parity.reason())
            continue
        if variant.build_seconds > cfg.build_budget_seconds:
            variant.skip(f"build took {variant.build_seconds:.0f} s, over the {cfg.build_budget_seconds:g} s "
                         "budget (optimize.build_budget_seconds)")
            continue
        variant.predictor, variant.artifact = predictor, artifact
    return variants, cross_device


def drop_failed(variants: list[Variant], failures: dict[str, str]) -> None:
    """Variants that failed while being evaluated or timed are skipped with the reason; the reference's
    failure is the job's."""
    for variant in variants:
        if variant.name in failures:
            if variant.name == REFERENCE:
                raise StageError("benchmark", f"the fp32 torch reference failed: {failures[variant.name]}")
            variant.skip(failures[variant.name])
            variant.accuracy, variant.latency = None, {}


def choose_variant(variants: list[Variant], tolerance: float, batch_size: int) -> tuple[Variant, str]:
    """The fastest built variant whose accuracy is within `tolerance` of torch eager (fp32)."""
    reference = next(v for v in variants if v.name == REFERENCE)
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
