"""Runtimes a model can be served by: torch (eager, half, compiled, AOTInductor) and ONNX Runtime.

Each predictor splits a call into `prepare` (put the inputs where the runtime computes, in
its dtype) and `run` (execute and wait for the result, which stays where it was computed).
Host↔device copies are therefore outside the timed region for every runtime alike, and a
CUDA timing includes the kernels because `run` synchronizes before it returns.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from automation.device import CPU, RunnerDevice, device_copy
from automation.errors import one_line
from automation.threads import ort_session_options

log = logging.getLogger(__name__)

TIMED_REGION = ("one forward pass on inputs already on the runtime's device, synchronized before the clock "
                "stops; host↔device copies are outside the timed region for every runtime")


class Predictor(Protocol):
    device: RunnerDevice          # where it computes
    memory_kind: str              # what its memory figure measures (see automation/optimize.py)

    def prepare(self, x: np.ndarray) -> Any: ...

    def run(self, prepared: Any) -> Any: ...

    def to_numpy(self, output: Any) -> np.ndarray: ...


def host_batch(x: Any) -> np.ndarray:
    """A batch as the network takes it: integer inputs (uint8 pixels, int64 token ids) as they are, numbers
    as float32; strings (a text model's served path) as they are, for its tokenizer."""
    array = np.ascontiguousarray(x)
    return array if array.dtype.kind in "iubO" else array.astype(np.float32, copy=False)


# A whole split is evaluated (`evaluate`) in chunks this size. A text model's attention over 512 tokens holds
# batch × heads × 512² floats per layer: chunks of 256 took the news_transformer job to an 18 GB peak (resident).
# 32, the largest batch the benchmark times by default: a pass needs no more scratch than timing the variant does
# (at 64, an ONNX session of the news transformer grew ~230 MB past what its warm-up at 32 had taken)
EVALUATION_BATCH = 32


def predict(predictor: Predictor, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """fp32 logits on the host for all of `x`, in batches."""
    chunks = [predictor.to_numpy(predictor.run(predictor.prepare(x[i:i + batch_size])))
              for i in range(0, len(x), batch_size)]
    # one chunk (every served request up to batch_size) is a fresh array of its own: not copied again
    return np.ascontiguousarray(chunks[0]) if len(chunks) == 1 else np.concatenate(chunks)


def evaluate(predictor: Predictor, x: np.ndarray, batch_size: int = EVALUATION_BATCH) -> np.ndarray:
    """`predict` for a pass over a whole split that nobody times (parity logits, test accuracy), through the
    runtime's untimed calls where it has them (`run_untimed`). ONNX Runtime keeps the largest scratch any call
    needed in its arena, for the next call: right for serving and timing, but after an evaluation pass every
    built variant held its own until the job ended (the news transformer's fp32 and int8 sessions, ~2 GB each,
    took its job to a 5.2 GB peak). An untimed call gives back what it made the arena grow."""
    run = getattr(predictor, "run_untimed", predictor.run)   # the others keep nothing between calls
    chunks = [predictor.to_numpy(run(predictor.prepare(x[i:i + batch_size]))) for i in range(0, len(x), batch_size)]
    return np.concatenate(chunks)


class EncodingPredictor:
    """A text model's served path: raw strings through its tokenizer, then the network's runtime. The
    tokenizer runs inside `run`, so a timing of this predictor includes it (and the ids' copy to the
    device), as a client of `/predict` would see."""

    def __init__(self, inner: Predictor, encoder: Any) -> None:
        self.inner, self.encoder = inner, encoder
        self.device, self.memory_kind = inner.device, inner.memory_kind

    def prepare(self, x: Any) -> Any:
        return list(x)

    def run(self, prepared: Any) -> Any:
        return self.inner.run(self.inner.prepare(self.encoder.encode(prepared)))

    def run_untimed(self, prepared: Any) -> Any:
        run = getattr(self.inner, "run_untimed", self.inner.run)
        return run(self.inner.prepare(self.encoder.encode(prepared)))

    def to_numpy(self, output: Any) -> np.ndarray:
        return self.inner.to_numpy(output)


class _TorchRuntime:
    """Inputs become tensors on the device (in `dtype`); outputs stay there until `to_numpy`."""

    def __init__(self, device: RunnerDevice, dtype: Any = None) -> None:
        import torch

        self._torch = torch
        self.device = device
        self.dtype = dtype or torch.float32
        self.memory_kind = "cuda_peak_allocated" if device.is_cuda else "host_rss"
        self.module: Any = None       # set by the subclass: anything callable on a prepared tensor

    def prepare(self, x: np.ndarray) -> Any:
        tensor = self._torch.from_numpy(host_batch(x))
        # integer inputs keep their dtype: the model's first step (pixels, an embedding) reads them as such
        return tensor.to(device=self.device.torch, dtype=self.dtype if tensor.is_floating_point() else None)

    def run(self, prepared: Any) -> Any:
        with self._torch.inference_mode():
            out = self.module(prepared)
        self.device.synchronize()   # kernels are asynchronous: without this the clock sees only the launch
        return out

    def to_numpy(self, output: Any) -> np.ndarray:
        return output.float().cpu().numpy()


class TorchPredictor(_TorchRuntime):
    def __init__(self, model: Any, device: RunnerDevice = CPU, *, dtype: Any = None,
                 compile_mode: str | None = None) -> None:
        super().__init__(device, dtype)
        module = device_copy(model, device, dtype)   # the caller's model never moves
        self._cudagraphs = bool(compile_mode) and device.is_cuda and compile_mode in ("reduce-overhead",
                                                                                      "max-autotune")
        # one graph per batch size: a dynamic graph would give up the shape specialization we time
        self.module = self._torch.compile(module, mode=compile_mode, dynamic=False) if compile_mode else module

    def run(self, prepared: Any) -> Any:
        if self._cudagraphs:   # each call is a new step: the previous call's output may be overwritten
            self._torch.compiler.cudagraph_mark_step_begin()
        return super().run(prepared)


class AotiPredictor(_TorchRuntime):
    """An AOTInductor package: compiled kernels plus weights, loaded with no model code."""

    def __init__(self, package: str | Path, device: RunnerDevice = CPU) -> None:
        super().__init__(device)
        import torch._inductor

        self.module = torch._inductor.aoti_load_package(
            str(package), device_index=-1 if device.index is None else device.index)


class OnnxPredictor:
    """ONNX Runtime. On a CUDA provider, inputs and outputs are bound on the GPU (I/O binding), so the
    timed `run` holds no host↔device copy, as for torch; on the CPU provider they are host arrays.

    `shared_arena`: the session allocates host memory from one CPU arena shared by every session made so in
    this process (`shared_cpu_arena`), for sessions that never run at the same time: a job's variants, built,
    evaluated and timed one call after another, then hold the largest call's scratch once, not once each."""

    def __init__(self, path: str | Path, providers: list[Any] | None = None, device: RunnerDevice = CPU,
                 cpu_threads: int | None = None, call_timeout: float | None = None,
                 total_seconds: float | None = None, shared_arena: bool = False) -> None:
        import onnxruntime as ort

        self._ort = ort
        # an untrusted candidate's calls are stopped past `call_timeout` each, or once they have taken
        # `total_seconds` together (a watchdog sets ORT's terminate flag)
        self._watchdog = CallWatchdog(ort.RunOptions(), call_timeout, total_seconds) \
            if call_timeout is not None else None
        # an untimed call (`evaluate`) shrinks the CPU arena at its end: its free regions go back to the system
        self._untimed = ort.RunOptions()
        self._untimed.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3   # warnings about node placement are not the job's
        # no memory pattern: planned per input shape, its one block is allocated beside the tensors the first call
        # at that shape left in the arena, so a session held twice a call's scratch at every batch size it saw
        # (news transformer, batch 32: 649 MB, against 349 MB without). Latency was the same without it (digits,
        # Fashion-MNIST ResNet, news; batch 1 to 256) but for the digits MLP at 32: 15 µs against 12
        options.enable_mem_pattern = False
        if shared_arena and shared_cpu_arena():
            options.add_session_config_entry("session.use_env_allocators", "1")
        ort_session_options(options, cpu_threads)   # None: the thread policy's benchmark count
        self.session = ort.InferenceSession(str(path), sess_options=options,
                                            providers=providers or ["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        on_gpu = device.is_cuda and self.session.get_providers()[0] != "CPUExecutionProvider"
        self.device = device if on_gpu else CPU
        self.memory_kind = "cuda_device_used" if on_gpu else "host_rss"

    def prepare(self, x: np.ndarray) -> Any:
        x = host_batch(x)
        if not self.device.is_cuda:
            return {self.input_name: x}
        binding = self.session.io_binding()
        index = self.device.ordinal
        binding.bind_ortvalue_input(self.input_name, self._ort.OrtValue.ortvalue_from_numpy(x, "cuda", index))
        binding.bind_output(self.output_name, "cuda", index)
        binding.synchronize_inputs()
        return binding

    def run(self, prepared: Any) -> Any:
        if self._watchdog is not None:
            with self._watchdog.call() as options:
                return self._run_with(prepared, options)
        return self._run_with(prepared, None)

    def run_untimed(self, prepared: Any) -> Any:
        """`run` for a call nobody times (an evaluation pass). At its end the arena gives back every region no
        call is using (all but its first), so a variant waiting for its timing holds its weights, not scratch."""
        if self._watchdog is not None:
            with self._watchdog.call(self._untimed) as options:
                return self._run_with(prepared, options)
        return self._run_with(prepared, self._untimed)

    def _run_with(self, prepared: Any, options: Any) -> Any:
        if not self.device.is_cuda:
            return self.session.run(None, prepared, options)[0]   # host arrays: already synchronous
        self.session.run_with_iobinding(prepared, options)   # synchronizes the provider's stream before returning
        return prepared

    def to_numpy(self, output: Any) -> np.ndarray:
        if isinstance(output, np.ndarray):
            return output
        return np.asarray(output.copy_outputs_to_cpu()[0], dtype=np.float32)


@functools.cache
def shared_cpu_arena() -> bool:
    """Register, once per process, the CPU arena that `OnnxPredictor(shared_arena=True)` sessions allocate from
    (ONNX Runtime's own defaults, as a session's private arena has them); False, and private arenas, when this
    ONNX Runtime refuses it."""
    import onnxruntime as ort

    try:
        ort.create_and_register_allocator(
            ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT),
            ort.OrtArenaCfg(0, -1, -1, -1))   # no limit; default extension, first chunk and dead bytes
    except Exception as exc:   # e.g. one registered already by other code in this process: sessions keep theirs
        log.warning("ONNX Runtime's shared CPU arena is unavailable; each session keeps its own",
                    extra={"reason": one_line(f"{type(exc).__name__}: {exc}")})
        return False
    return True


class CallTimedOut(RuntimeError):
    """ONNX Runtime stopped a call that ran past its time-out."""


class CallWatchdog:
    """Stops an ONNX Runtime call that runs past `seconds`, or past what is left of `total` (every call's time
    together: calls that each stay just under `seconds` would otherwise hold the judge for hours, since
    evaluation and timing make hundreds). One thread per predictor sets the call's RunOptions.terminate at
    its deadline (nothing is started inside the timed call itself)."""

    def __init__(self, options: Any, seconds: float, total: float | None = None) -> None:
        import threading

        options.log_severity_level = 4   # the stopped call's own error is ours to word, in one line
        self.options, self.seconds = options, seconds
        self._current = options           # the RunOptions of the call being watched
        self.total = math.inf if total is None else total
        self._spent = 0.0                 # seconds every call so far took, together
        self._deadline: float | None = None
        self._fired = False
        self._by_total = False            # this call's deadline is the total's, not its own
        self._lock = threading.Lock()
        self._armed = threading.Event()   # set while a call runs: the thread sleeps between calls
        threading.Thread(target=self._watch, name="onnx-call-watchdog", daemon=True).start()

    def _watch(self) -> None:
        import time

        while True:
            self._armed.wait()
            time.sleep(min(0.05, self.seconds / 4))
            with self._lock:
                if self._deadline is not None and time.monotonic() >= self._deadline and not self._fired:
                    self._current.terminate, self._fired = True, True

    def _spent_all(self) -> CallTimedOut:
        return CallTimedOut(f"the candidate's calls took its {self.total:g} s in all (judge.total_seconds) and "
                            "were stopped")

    @contextlib.contextmanager
    def call(self, options: Any = None) -> Iterator[Any]:
        """Watch one call, made with `options` (RunOptions; None: the watchdog's own), which it yields."""
        import time

        options = self.options if options is None else options
        options.log_severity_level = 4
        with self._lock:
            left = self.total - self._spent
            if left <= 0:
                raise self._spent_all()
            self._current = options
            options.terminate, self._fired, self._by_total = False, False, left < self.seconds
            start = time.monotonic()
            self._deadline = start + min(self.seconds, left)
        self._armed.set()
        try:
            yield options
        except Exception as exc:
            if self._fired:
                raise (self._spent_all() if self._by_total else CallTimedOut(
                    f"one call ran past its {self.seconds:g} s (judge.call_timeout_seconds) and was stopped")) \
                    from None
            raise exc
        finally:
            with self._lock:
                self._deadline = None
                self._spent += time.monotonic() - start
            self._armed.clear()


def onnx_providers(variant: str, device: RunnerDevice = CPU) -> list[Any]:
    """Execution providers, most preferred first. The CUDA provider gets the job's device and TF32
    setting explicitly: its own default allows TF32, which would make fp32 parity a coin toss."""
    cuda = ("CUDAExecutionProvider", {"device_id": device.ordinal, "use_tf32": int(device.tf32)})
    if variant == "onnx_cuda":
        return [cuda, "CPUExecutionProvider"]
    if variant == "tensorrt_fp16":
        return [("TensorrtExecutionProvider", {"device_id": device.ordinal, "trt_fp16_enable": True}), cuda,
                "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnx_provider_missing(variant: str, device: RunnerDevice) -> str | None:
    """Why a GPU variant of ONNX Runtime cannot run here, or None when it can."""
    import onnxruntime as ort

    provider = {"onnx_cuda": "CUDAExecutionProvider", "tensorrt_fp16": "TensorrtExecutionProvider"}.get(variant)
    if provider is None:
        return None
    if not device.is_cuda:
        return "no CUDA device on this runner"
    if provider not in ort.get_available_providers():
        return f"this onnxruntime build has no {provider} (install the 'gpu' extra: onnxruntime-gpu)"
    if provider == "TensorrtExecutionProvider" and importlib.util.find_spec("tensorrt") is None:
        return "the 'tensorrt' package is not importable (install the 'gpu' extra)"
    return None


@dataclass
class RegisteredModel:
    """A registry version, downloaded and loaded for inference on this machine."""

    version: str
    variant: str                     # what the job chose
    served_as: str                   # what runs here: the variant, or its portable fallback
    fallback_reason: str | None
    predictor: Predictor
    artifact: Path
    input_shape: tuple[int, ...]     # one input, without the batch axis (from the logged signature)
    dtype: str
    # from the version's contract (MLmodel metadata, automation/contract.py): class names by index, and the
    # feature names of a tabular model; () and None for versions logged before mlgate recorded them
    classes: tuple[str, ...] = ()
    features: tuple[str, ...] | None = None
    # what clients send: "tensor" (numbers shaped input_shape), "image" (uint8 pixels shaped input_shape, or
    # PNG files) or "text" (strings, which `encoder` turns into the network's token ids)
    input_kind: str = "tensor"
    encoder: Any = None               # automation.preprocess.TextEncoder for a text model

    def probe_input(self, count: int) -> Any:
        """`count` harmless raw examples, to check the version answers at all."""
        if self.input_kind == "text":
            return ["probe"] * count
        return np.zeros((count, *self.input_shape), dtype=self.dtype)

    def network_input(self, raw: Any) -> np.ndarray:
        """Raw inputs as the network takes them: a text model's strings through its tokenizer."""
        return self.encoder.encode(raw) if self.encoder is not None else raw


def _load_variant(variant: str, local: Path, device: RunnerDevice, built_on: str | None,
                  cpu_threads: int | None = None, shared_arena: bool = False) -> tuple[Predictor, Path]:
    if variant.startswith("torch_"):
        if variant == "torch_aoti":
            package = next(local.rglob("*.pt2"), None)
            if package is None:
                raise FileNotFoundError("the version has no AOTInductor package (*.pt2)")
            if built_on is not None and built_on.split(":")[0] != device.type:
                raise RuntimeError(f"its AOTInductor package was compiled for {built_on}, this machine runs on "
                                   f"{device.torch}")
            return AotiPredictor(package, device), package
        import mlflow.pytorch

        model = mlflow.pytorch.load_model(str(local), map_location="cpu")   # whatever device it was saved from
        half = variant == "torch_half"
        return TorchPredictor(model, device, dtype=device.half_dtype if half else None,
                              compile_mode="reduce-overhead" if variant == "torch_compile" else None), local
    onnx_file = next(local.rglob("*.onnx"))
    missing = onnx_provider_missing(variant, device)
    if missing:
        raise RuntimeError(missing)
    return OnnxPredictor(onnx_file, onnx_providers(variant, device), device, cpu_threads,
                         shared_arena=shared_arena and not device.is_cuda), onnx_file


def load_registered(client: Any, model: str, version: str, dest: Path, device: RunnerDevice = CPU,
                    cpu_threads: int | None = None, shared_arena: bool = True) -> RegisteredModel:
    """Download `models:/model/version` and load it on `device` (see `load_downloaded`). What loads a version
    this way (a job's production and its serve check, a benchmark's reference) runs it one call at a time
    beside the job's own sessions: by default it shares their CPU arena (`OnnxPredictor`), where production,
    timed beside the news transformer's variants, held its own ~270 MB."""
    import mlflow

    tags = client.get_model_version(model, version).tags
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model}/{version}", dst_path=str(dest)))
    return load_downloaded(local, model, version, tags, device, cpu_threads, shared_arena)


def load_downloaded(local: Path, model: str, version: str, tags: dict[str, str],
                    device: RunnerDevice = CPU, cpu_threads: int | None = None,
                    shared_arena: bool = False) -> RegisteredModel:
    """Load a downloaded version (an MLflow model directory and its registry tags) on `device`; an ONNX
    Runtime session on the CPU uses `cpu_threads` intra-op threads (None: one per core), and the process's
    shared CPU arena with `shared_arena` (serve-model runs its sessions side by side: each keeps its own).

    A variant that cannot run here (an AOTInductor package built for another device, a CUDA
    provider on a CPU machine) is served by its portable form instead, and the reason is kept:
    the torch model for torch variants, the fp32 ONNX model for ONNX ones.
    """
    from mlflow.models import Model

    variant = tags.get("mlgate.variant", "onnx_fp32")
    fallback_reason = None
    try:
        predictor, artifact = _load_variant(variant, local, device, tags.get("mlgate.device"), cpu_threads,
                                            shared_arena)
        served_as = variant
    except Exception as exc:   # a device-specific artifact: serve the portable form rather than nothing
        served_as = "torch_eager" if variant.startswith("torch_") else "onnx_fp32"
        if served_as == variant:
            raise
        fallback_reason = f"{variant} cannot run here ({one_line(f'{type(exc).__name__}: {exc}', 200)})"
        log.warning("serving the portable form", extra={"model": model, "version": version, "variant": variant,
                                                        "served_as": served_as, "reason": fallback_reason})
        predictor, artifact = _load_variant(served_as, local, device, None, cpu_threads, shared_arena)
    logged = Model.load(str(local))
    spec = logged.signature.inputs.to_dict()[0]["tensor-spec"]
    contract = (logged.metadata or {}).get("mlgate") or {}
    features = contract.get("features")
    kind = str(contract.get("input_kind") or "tensor")
    encoder = None
    shape = tuple(int(d) for d in spec["shape"][1:])
    if kind == "text":   # the tokenizer the version was trained with, saved beside it
        from automation.preprocess import TOKENIZER_FILE, TextEncoder

        found = next(local.rglob(TOKENIZER_FILE), None)
        if found is None:
            raise FileNotFoundError(f"version {version} is a text model but holds no {TOKENIZER_FILE}")
        encoder, shape = TextEncoder.load(found), ()
    return RegisteredModel(version=version, variant=variant, served_as=served_as, fallback_reason=fallback_reason,
                           predictor=predictor, artifact=artifact, input_shape=shape,
                           dtype="string" if kind == "text" else str(spec["dtype"]),
                           classes=tuple(str(c) for c in contract.get("classes") or ()),
                           features=None if features is None else tuple(str(f) for f in features),
                           input_kind=kind, encoder=encoder)
