"""The device boundary: one place decides where a job computes, and how models cross to the host.

Everything else receives a `RunnerDevice`. Nothing below this module asks `torch.cuda` which
device to use, and nothing hands a device-resident model to a file, the registry or another
runtime: it hands over `host_copy(model)`, an fp32 copy on the CPU.
"""

from __future__ import annotations

import copy
import os
import platform
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from automation.errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from automation.config import DeviceConfig


@dataclass(frozen=True)
class RunnerDevice:
    type: str                  # "cuda" or "cpu"
    index: int | None          # CUDA ordinal
    name: str                  # "NVIDIA H100 80GB HBM3", or the CPU's
    tf32: bool                 # TF32 matmuls and cuDNN convolutions allowed (CUDA only)

    @property
    def is_cuda(self) -> bool:
        return self.type == "cuda"

    @property
    def ordinal(self) -> int:
        """The CUDA device number other runtimes (ONNX Runtime) are given."""
        return self.index or 0

    @property
    def torch(self) -> "torch.device":
        import torch

        return torch.device(self.type, self.index) if self.index is not None else torch.device(self.type)

    @property
    def fp32_precision(self) -> str:
        """The precision an 'fp32' computation really has here: TF32 keeps 10 mantissa bits, not 23."""
        return "tf32" if self.is_cuda and self.tf32 else "fp32"

    @property
    def half_dtype(self) -> "torch.dtype":
        """fp16 on a GPU (tensor cores); bf16 on a CPU, where fp16 kernels are missing or slow."""
        import torch

        return torch.float16 if self.is_cuda else torch.bfloat16

    def synchronize(self) -> None:
        if self.is_cuda:
            import torch

            torch.cuda.synchronize(self.torch)

    def describe(self) -> dict[str, str]:
        import torch

        return {"device": str(self.torch), "device_name": self.name, "fp32_precision": self.fp32_precision,
                "matmul_precision": torch.get_float32_matmul_precision(),
                "cudnn_tf32": str(bool(torch.backends.cudnn.allow_tf32)) if self.is_cuda else "n/a"}


CPU = RunnerDevice("cpu", None, platform.processor() or platform.machine() or "cpu", tf32=False)


def select_device(cfg: "DeviceConfig | None" = None) -> RunnerDevice:
    """Decide the job's device and set the float32 precision on it explicitly (it is process-wide)."""
    # cuBLAS reads this when its first handle is made: without it, deterministic algorithms (training) cannot
    # pin cuBLAS's split-K reductions. Set here, before anything touches CUDA; a value the user set stands
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    wanted = cfg.type if cfg is not None else "auto"
    tf32 = cfg.tf32 if cfg is not None else False
    if wanted == "cuda" and not torch.cuda.is_available():
        raise UsageError("device.type is 'cuda' but no CUDA device is visible",
                         hint="use device.type: auto to fall back to the CPU")
    # set either way: torch's defaults differ between matmul (off) and cuDNN (on) and across versions
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    if wanted == "cpu" or not torch.cuda.is_available():
        return CPU
    index = torch.cuda.current_device()
    return RunnerDevice("cuda", index, torch.cuda.get_device_name(index), tf32=tf32)


def device_copy(model: "nn.Module", device: RunnerDevice, dtype: Any = None) -> "nn.Module":
    """An eval-mode copy on `device` (and in `dtype`), so that moving it never moves the caller's model."""
    return copy.deepcopy(model).to(device=device.torch, dtype=dtype).eval()


def host_copy(model: "nn.Module") -> "nn.Module":
    """An fp32 copy on the CPU: what crosses to ONNX, MLflow and files. The original stays put."""
    import torch

    return device_copy(model, CPU, torch.float32)
