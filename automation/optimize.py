"""Optimize: build every deployable variant, each in isolation, and pick the winner.

A variant that fails to export, quantize, compile, load or run is skipped with a one-line
reason and the job goes on; only the fp32 torch reference (`torch_eager`) is required.
An fp32 variant must also pass parity with torch fp32 on its own device (automation/parity.py);
lossy ones (half, int8) are judged by test accuracy in `choose_variant`.

The winner is the fastest variant (p50 at the configured batch size) whose test accuracy
stays within `accuracy_tolerance` of the fp32 torch model.

What a build and its timing cost is decided, not paid blindly:
- the cheap variants (torch_half, the ONNX ones) are built first, then every built variant is timed
  briefly, interleaved, at `select_batch_size` (the probe, `probe_variants`). The winner is the fastest
  there among those within the accuracy tolerance, so a variant more than `probe_margin` slower than
  the fastest one *sure* to be within it (`sure_eligible`) cannot win: it is skipped with the figures,
  not timed at every batch size by the benchmark. torch_eager, the reference, is always timed;
- on a CPU runner, when that sure-eligible variant already leads torch_eager by
  `skip_compile_when_onnx_speedup`, the compiled torch variants (30-70 s each to build here) are
  skipped as unable to win, with the figures in the reason. On CUDA they are always built, and
  probed with the others once built;
- the benchmark gives each variant at most `variant_seconds` (`time_caps`); torch_eager and the
  probe's fastest are never capped, so the gates always have the reference and the likely winner;
- an AOTInductor package is cached under the workdir by a hash of what determines it (weights,
  graph, input shape, torch version, device), so a rerun of the same model does not rebuild it;
- builds run one after another, not in parallel: the expensive ones (inductor, AOTInductor's C++
  build) already use every core, a CPU runner here has two, and concurrent builds would also time
  each other's warm-up runs. The cheap ones take a second or two; there is nothing to gain.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
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
from automation.benchmark import AccuracyStats, LatencyStats, MemoryProbe, measure_latency, size_mb
from automation.config import ALL_VARIANTS, OptimizeConfig
from automation.device import CPU, RunnerDevice, device_copy, host_copy
from automation.errors import StageError, failure_reason, one_line
from automation.logs import captured_output
from automation.predictors import (AotiPredictor, OnnxPredictor, Predictor, TorchPredictor, evaluate, host_batch,
                                   onnx_provider_missing, onnx_providers)

log = logging.getLogger(__name__)
REFERENCE = "torch_eager"
LOSSY = {"torch_half", "onnx_int8", "tensorrt_fp16"}   # judged by accuracy, not parity
COMPILED = ("torch_compile", "torch_aoti")            # the expensive builds: built last, skipped if they cannot win
AOTI_CACHE_KEEP = 16                                   # newest cached packages kept (a few MB each for small models)


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
    cached: bool = False                   # the artifact came from the workdir's cache, not a build
    cache_key: str | None = None
    memory_mb: float | None = None
    memory_kind: str | None = None
    size_mb: float | None = None
    parity: parity.Parity | None = None
    accuracy: AccuracyStats | None = None
    latency: dict[int, LatencyStats] = field(default_factory=dict)
    always_timed: bool = False             # the reference, or the probe's fastest: the time cap spares it

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
                "cached": self.cached, "cache_key": self.cache_key,
                "test_examples": int(len(self.accuracy.correct)) if self.accuracy else None,
                "latency": {str(b): s.as_dict() for b, s in self.latency.items()}}


# --- artifacts -------------------------------------------------------------------------------------------

def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path, dtype: np.dtype | type = np.float32) -> Path:
    """ONNX from a CPU copy, with a dynamic batch axis and weights inline (one self-contained file). The
    input keeps its dtype: an image model takes uint8 pixels, a text model int64 token ids."""
    example = torch.zeros((2, *input_shape), dtype=torch.from_numpy(np.zeros(0, dtype=dtype)).dtype)
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


def aoti_cache_key(program: torch.export.ExportedProgram, model: nn.Module, input_shape: tuple[int, ...],
                   device: RunnerDevice) -> str:
    """What determines an AOTInductor package: the weights, the exported graph (two models with the same
    weights can compute different things), the input shape, torch's version, the device and the build
    recipe. A stale or corrupt entry would still be caught: a cached package goes through parity too."""
    digest = hashlib.sha256()
    for part in (torch.__version__, device.type, device.name, device.fp32_precision, str(tuple(input_shape)),
                 AOTI_BUILD, str(program.graph)):
        digest.update(part.encode())
        digest.update(b"\0")
    for name, tensor in sorted(host_copy(model).state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def _store_in_cache(package: Path, entry: Path) -> None:
    """Atomically (a concurrent job may store the same key), then keep the newest AOTI_CACHE_KEEP entries.
    A cache that cannot be written costs the next job a build, never this one its variant."""
    try:
        entry.mkdir(parents=True, exist_ok=True)
        partial = entry / f"model.aoti.pt2.{os.getpid()}.part"
        shutil.copyfile(package, partial)
        os.replace(partial, entry / package.name)
        entries = sorted((e for e in entry.parent.iterdir() if (e / package.name).is_file()),
                         key=lambda e: (e / package.name).stat().st_mtime, reverse=True)
        for stale in entries[AOTI_CACHE_KEEP:]:
            shutil.rmtree(stale, ignore_errors=True)
    except OSError as exc:
        log.warning("AOTInductor cache not written", extra={"entry": str(entry), "reason": str(exc)})


def compile_aoti(model: nn.Module, example: np.ndarray, device: RunnerDevice, out_dir: Path, *,
                 timeout: float, log_file: Path, cache_dir: Path | None = None) -> tuple[Path, str | None, bool]:
    """An AOTInductor package for `device`: (package, cache key, whether it came from the cache). The
    C++/Triton build runs in a child process, so the build budget is a hard limit: a build over it is
    killed, not waited for. With `cache_dir`, a package built before for the same key is reused and a
    new one is stored there (`<cache_dir>/aoti/<key>/model.aoti.pt2`).

    The example is real input: with an all-zero example, torch 2.13's CPU AOTInductor built a package
    for digits_cnn that was off by up to 17 in the logits (caught by parity)."""
    module = device_copy(model, device)
    example = torch.from_numpy(host_batch(example[:2])).to(device.torch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, (example,),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},))
    package = out_dir / "model.aoti.pt2"
    key = aoti_cache_key(program, model, tuple(example.shape[1:]), device) if cache_dir is not None else None
    entry = cache_dir / "aoti" / key if cache_dir is not None and key is not None else None
    if entry is not None and (entry / package.name).is_file():
        shutil.copyfile(entry / package.name, package)   # the job's own copy: the cache may be pruned later
        os.utime(entry / package.name)                   # recently used: kept by the pruning
        return package, key, True
    exported = out_dir / "model.export.pt2"
    torch.export.save(program, str(exported))
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
    if entry is not None:
        _store_in_cache(package, entry)
    return package, key, False


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
    cache_dir: Path | None = None     # compiled artifacts reused across jobs (None: always build)
    cache: tuple[str | None, bool] = (None, False)   # the current variant's cache key, and whether it hit
    _onnx: Path | None = None
    _onnx_error: str | None = None

    def onnx_fp32(self) -> Path:
        """Exported once, shared by every ONNX variant; an export failure skips all of them alike."""
        if self._onnx is None and self._onnx_error is None:
            try:
                with captured_output(self.out_dir / "onnx_export.build.log"):
                    self._onnx = export_onnx(self.model, self.input_shape, self.out_dir / "model.onnx",
                                             host_batch(self.sample[:1]).dtype)
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
    package, key, hit = compile_aoti(ctx.model, ctx.sample, ctx.device, ctx.out_dir,
                                     timeout=max(1.0, ctx.deadline - time.perf_counter()), log_file=ctx.log_file,
                                     cache_dir=ctx.cache_dir)
    ctx.cache = (key, hit)
    return AotiPredictor(package, ctx.device), package, ctx.device.fp32_precision


# the CPU variants' sessions share one arena: a job runs them one call at a time (builds, evaluation and timing
# are sequential), where each held its own scratch (the news transformer's fp32 and int8: ~310 MB each at batch 32)
def _build_onnx_fp32(ctx: BuildContext) -> Built:
    path = ctx.onnx_fp32()
    return OnnxPredictor(path, onnx_providers("onnx_fp32"), CPU, shared_arena=True), path, "fp32"


def _build_onnx_int8(ctx: BuildContext) -> Built:
    path = quantize_int8(ctx.onnx_fp32(), ctx.out_dir / "model.int8.onnx")
    return OnnxPredictor(path, onnx_providers("onnx_int8"), CPU, shared_arena=True), path, "int8"


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
        batch = host_batch(np.resize(x, (batch_size, *x.shape[1:])))
        prepared = predictor.prepare(batch)
        for _ in range(3):   # CUDA graphs record on the second or third call
            predictor.run(prepared)
    probe.finish(predictor.memory_kind)
    return evaluate(predictor, x)   # untimed: the variant waits for the probe holding its weights, not this pass


@contextmanager
def _timed(variant: Variant) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        variant.build_seconds = round(time.perf_counter() - started, 3)


# the short timing behind a "cannot win" decision: at most 5 + 3 x 50 calls, and a slow variant's round ends
# after half a second (with 10 calls), so a probe costs seconds, not the full matrix
PROBE = {"warmup": 5, "iterations": 50, "rounds": 3, "max_round_seconds": 0.5, "min_iterations": 10}


@dataclass
class Probe:
    """Every built variant timed briefly at one batch size, and the bar the others must beat."""
    batch_size: int
    p50_ms: dict[str, float]      # each variant's best round p50
    bar: str                      # the fastest variant sure to stay within accuracy_tolerance

    @property
    def fastest(self) -> str:
        return min(self.p50_ms, key=self.p50_ms.__getitem__)


def sure_eligible(variant: Variant, reference_device: str, cross_device: parity.Parity | None,
                  tolerance: float) -> bool:
    """Whether `variant`'s test accuracy cannot fall more than `tolerance` below torch_eager's, before either
    is evaluated: it can only lose the examples whose predicted class differs from the reference's (its
    parity's argmax disagreement on the test split), plus, for a variant judged against torch on another
    device, the examples where torch itself differs across devices."""
    if variant.name == REFERENCE:
        return True
    if variant.parity is None or (variant.name not in LOSSY and not variant.parity.passed):
        return False
    disagreement = 1.0 - variant.parity.argmax_agreement
    if variant.device.split(":")[0] != reference_device.split(":")[0]:
        if cross_device is None:
            return False
        disagreement += 1.0 - cross_device.argmax_agreement
    return disagreement <= tolerance - 1e-12   # accuracy is compared with >=; keep clear of a float tie


def probe_variants(variants: list[Variant], x: np.ndarray, cfg: OptimizeConfig,
                   cross_device: parity.Parity | None = None) -> Probe | None:
    """Time every built variant briefly, interleaved, at `select_batch_size` (the batch whose p50 picks the
    winner). None when there is nothing to compare (fewer than two built) or the reference failed; a variant
    that fails here is left to the benchmark, which says what failed. Each variant's figure is its best
    round's p50: on a shared machine one round can catch a burst of load (a torch eager p50 of 40 ms instead
    of 0.1 ms was seen here), and the least disturbed round is the closest to what the runtime can do."""
    live = {v.name: v for v in variants if v.predictor is not None}
    if REFERENCE not in live or len(live) < 2:
        return None
    batch = cfg.select_batch_size
    latency = measure_latency({name: v.predictor for name, v in live.items()}, x, [batch], **PROBE)
    if REFERENCE in latency.failures:
        return None
    p50 = {name: _best_round_p50(latency[name][batch]) for name in live if name not in latency.failures}
    device = live[REFERENCE].device
    sure = [name for name in p50 if sure_eligible(live[name], device, cross_device, cfg.accuracy_tolerance)]
    probe = Probe(batch, p50, bar=min(sure, key=p50.__getitem__))
    log.info("probe", extra={"batch_size": batch, "p50_ms": p50, "bar": probe.bar})
    return probe


def cannot_win(probe: Probe, name: str, margin: float | None) -> str | None:
    """Why a built variant cannot be chosen, or None: it is slower than the probe's bar by more than `margin`.
    torch_eager, the reference, is always timed."""
    if margin is None or name in (REFERENCE, probe.bar) or name not in probe.p50_ms:
        return None
    mine, best = probe.p50_ms[name], probe.p50_ms[probe.bar]
    if mine <= best * (1 + margin):
        return None
    return (f"not timed: {mine / best:.1f}× slower than {probe.bar} at batch {probe.batch_size} in the probe "
            f"before the benchmark (p50 {mine:.3f} ms vs {best:.3f} ms), beyond optimize.probe_margin "
            f"({margin:.0%}), so it cannot be chosen")


def compiled_cannot_win(probe: Probe | None, cfg: OptimizeConfig, device: RunnerDevice) -> str | None:
    """Why torch_compile and torch_aoti cannot win on this runner, or None when they are worth building.

    Only on a CPU runner, and only against a variant sure to stay within the accuracy tolerance (an exact
    ONNX variant, typically; a lossy one that might still fail on accuracy does not count): when it is
    already `skip_compile_when_onnx_speedup` times faster than torch_eager in the probe, compiling torch
    (which rarely gains that much over eager on a CPU) cannot catch it. The figures go in the reason."""
    ratio = cfg.skip_compile_when_onnx_speedup
    if ratio is None or device.is_cuda or probe is None:   # on a GPU, compiling is where the gains are
        return None
    eager, fastest = probe.p50_ms[REFERENCE], probe.p50_ms[probe.bar]
    speedup = eager / fastest
    log.info("compiled variants: cannot-win probe", extra={"batch_size": probe.batch_size, "bar": probe.bar,
                                                          "torch_eager_p50_ms": eager, "bar_p50_ms": fastest,
                                                          "speedup": speedup, "threshold": ratio})
    if speedup < ratio:
        return None
    return (f"cannot win: {probe.bar} is {speedup:.1f}× faster than torch_eager at batch {probe.batch_size} on "
            f"this CPU (p50 {fastest:.3f} ms vs {eager:.3f} ms, timed before building); compiling torch rarely "
            f"gains {ratio:g}× over eager on a CPU (optimize.skip_compile_when_onnx_speedup)")


def _best_round_p50(stats: LatencyStats) -> float:
    if stats.round_p50_ms:
        return min(stats.round_p50_ms)
    if stats.rounds < 2 or len(stats.samples_ms) % stats.rounds:
        return stats.p50_ms
    return float(np.median(stats.samples_ms.reshape(stats.rounds, -1), axis=1).min())


def _probe_and_skip(variants: list[Variant], x: np.ndarray, cfg: OptimizeConfig,
                    cross_device: parity.Parity | None) -> Probe | None:
    """The probe, then every built variant that cannot win skipped with its reason."""
    probe = probe_variants(variants, x, cfg, cross_device)
    if probe is not None:
        for variant in variants:
            reason = cannot_win(probe, variant.name, cfg.probe_margin) if variant.predictor is not None else None
            if reason:
                variant.skip(reason)
    return probe


def _mark_always_timed(variants: list[Variant], probe: Probe | None) -> None:
    """The reference, and the probe's fastest and bar (the likely choice, and the one sure to be eligible)."""
    spared = {REFERENCE} | ({probe.fastest, probe.bar} if probe is not None else set())
    for variant in variants:
        variant.always_timed = variant.name in spared


def time_caps(variants: list[Variant], cfg: OptimizeConfig) -> dict[str, float]:
    """{name: seconds} for the benchmark (measure_latency's `caps`): every built variant but those always
    timed. A judged candidate (no reference among them) is the only contender: it is never capped."""
    if not any(v.name == REFERENCE for v in variants):
        return {}
    return {v.name: cfg.variant_seconds for v in variants if v.predictor is not None and not v.always_timed}


def build_variants(model: nn.Module, input_shape: tuple[int, ...], x_test: np.ndarray, cfg: OptimizeConfig,
                   out_dir: Path, device: RunnerDevice = CPU, batch_sizes: list[int] | None = None,
                   cache_dir: Path | None = None) -> tuple[list[Variant], parity.Parity | None]:
    """Every configured variant, built or skipped with its reason, plus the cross-device difference
    (torch fp32 on the runner's GPU against torch fp32 on the CPU; None on a CPU runner).

    The cheap variants are built first and probed (`probe_variants`): those that cannot win are skipped,
    and so are the compiled ones when they cannot (`compiled_cannot_win`); compiled ones that are built
    are probed with the rest. The list comes back in the registry's order (config.ALL_VARIANTS).
    `cache_dir` keeps AOTInductor packages across jobs (None: always build)."""
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
        logits["cpu"] = evaluate(TorchPredictor(model, CPU), x_test)
        cross_device = parity.compare(logits["cpu"], logits[device.type], against="torch fp32 on cpu",
                                      precision=device.fp32_precision)
        log.info("cross-device difference", extra=cross_device.as_dict())

    ctx = BuildContext(model, input_shape, x_test[:2], device, cfg, out_dir, cache_dir=cache_dir)
    wanted = [n for n in ALL_VARIANTS if n in cfg.variants and n != REFERENCE]
    cheap, compiled = [n for n in wanted if n not in COMPILED], [n for n in wanted if n in COMPILED]
    for name in cheap:
        variants.append(_build_one(name, ctx, logits, batch_sizes, x_test, torch_path))
    probe = _probe_and_skip(variants, x_test, cfg, cross_device) if _worth_probing(cfg, device, compiled) else None
    not_built = compiled_cannot_win(probe, cfg, device) if compiled else None
    for name in compiled:
        if not_built:
            variant = Variant(name, device=str(device.torch), precision=device.fp32_precision)
            variant.skip(not_built)
            variants.append(variant)
        else:
            variants.append(_build_one(name, ctx, logits, batch_sizes, x_test, torch_path))
    if cfg.probe_margin is not None and any(v.name in COMPILED and v.predictor is not None for v in variants):
        probe = _probe_and_skip(variants, x_test, cfg, cross_device)   # the compiled ones against the rest
    _mark_always_timed(variants, probe)
    variants.sort(key=lambda v: ALL_VARIANTS.index(v.name))   # type: ignore[arg-type]
    return variants, cross_device


def _worth_probing(cfg: OptimizeConfig, device: RunnerDevice, compiled: list[str]) -> bool:
    """A probe decides something: which built variants to time, or whether to build the compiled ones."""
    return cfg.probe_margin is not None or bool(compiled and cfg.skip_compile_when_onnx_speedup is not None
                                                and not device.is_cuda)


def _build_one(name: str, ctx: BuildContext, logits: dict[str, np.ndarray], batch_sizes: list[int],
               x_test: np.ndarray, torch_path: Path) -> Variant:
    """One optional variant, built, warmed and checked; any failure skips it with its reason."""
    cfg, device = ctx.cfg, ctx.device
    variant = Variant(name, build_log=ctx.out_dir / f"{name}.build.log")
    ctx.log_file, ctx.deadline = variant.build_log, time.perf_counter() + cfg.build_budget_seconds
    ctx.cache = (None, False)
    with _timed(variant):
        try:
            probe = MemoryProbe(device)
            with captured_output(variant.build_log):
                predictor, artifact, variant.precision = BUILDERS[name](ctx)
                variant.device = str(predictor.device.torch)
                candidate = _warm(predictor, x_test, batch_sizes, probe)
        except Skip as exc:
            variant.skip(str(exc))
            return variant
        except Exception as exc:   # any failure of an optional variant is its own, never the job's
            variant.skip(failure_reason(f"{name} build", exc) + (" (cached package; the cache entry was removed)"
                                                                 if _drop_cache_entry(ctx) else ""))
            return variant
    variant.cache_key, variant.cached = ctx.cache
    variant.memory_mb, variant.memory_kind = probe.megabytes, probe.kind
    variant.size_mb = size_mb(artifact) if artifact is not None else (
        size_mb(torch_path) * (0.5 if name == "torch_half" else 1.0))
    lossy = name in LOSSY
    variant.parity = parity.compare(
        logits[predictor.device.type], candidate, against=f"torch fp32 on {predictor.device.torch}",
        precision=variant.precision if variant.precision in parity.EPSILON else "fp32",
        atol=None if lossy else cfg.parity_atol)
    if not lossy and not variant.parity.passed:
        variant.skip(variant.parity.reason() + (" (cached package; the cache entry was removed)"
                                                if _drop_cache_entry(ctx) else ""))
        return variant
    if variant.build_seconds > cfg.build_budget_seconds:
        variant.skip(f"build took {variant.build_seconds:.0f} s, over the {cfg.build_budget_seconds:g} s "
                     "budget (optimize.build_budget_seconds)")
        return variant
    variant.predictor, variant.artifact = predictor, artifact
    return variant


def _drop_cache_entry(ctx: BuildContext) -> bool:
    """A cached package that failed to load or to match is removed, so the next job builds it afresh."""
    key, hit = ctx.cache
    if not hit or key is None or ctx.cache_dir is None:
        return False
    shutil.rmtree(ctx.cache_dir / "aoti" / key, ignore_errors=True)
    return True


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
