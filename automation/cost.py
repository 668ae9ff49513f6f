"""What a job cost: wall and CPU time per stage; GPU-seconds, GPU energy and peak GPU memory where the job ran
on a GPU (NVML, from nvidia-ml-py), reported as absent where it did not; and, for a resumed job, the time its
earlier attempts lost to preemption and the training time the resume saved."""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from automation.device import RunnerDevice

log = logging.getLogger(__name__)


def _cpu_seconds() -> float:
    """User and system time of this process and of the children it has waited for (DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class GpuMeter:
    """Energy (the driver's counter, Volta and later) and time on the job's GPU. `absent` says why there is
    nothing to read: no CUDA device, no nvidia-ml-py, or a driver that does not count energy."""

    def __init__(self, runner: RunnerDevice) -> None:
        self.runner, self.handle, self.absent = runner, None, None
        if not runner.is_cuda:
            self.absent = "the job ran on the CPU"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(runner.ordinal)
            self.name = pynvml.nvmlDeviceGetName(self.handle)
        except Exception as exc:   # ImportError, NVMLError: the job goes on, unmetered
            self.absent = f"NVML unavailable ({type(exc).__name__}: {exc})"

    def energy_joules(self) -> float | None:
        if self.handle is None:
            return None
        try:
            import pynvml

            return pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0   # mJ
        except Exception:
            return None

    def peak_memory_mb(self) -> float | None:
        if not self.runner.is_cuda:
            return None
        import torch

        return torch.cuda.max_memory_allocated(self.runner.torch) / 2**20


@dataclass
class StageCost:
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    gpu_seconds: float = 0.0
    gpu_energy_joules: float | None = None


class StageTimer:
    """Times the job's stages (wall and CPU; GPU time and energy once `use_device` named a GPU) and tells
    `on_stage` (the progress file) which stage is running. A failure inside a stage is named after it."""

    def __init__(self, on_stage: Callable[[str], None] | None = None) -> None:
        self.seconds: dict[str, float] = {}      # wall seconds per stage, as the report's timings show them
        self.stages: dict[str, StageCost] = {}
        self.gpu: GpuMeter | None = None
        self.on_stage = on_stage

    def use_device(self, runner: RunnerDevice) -> None:
        self.runner, self.gpu = runner, GpuMeter(runner)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        from automation.errors import MlgateError, StageError, one_line

        log.info("stage started", extra={"stage": name})
        if self.on_stage is not None:
            self.on_stage(name)
        wall0, cpu0 = time.perf_counter(), _cpu_seconds()
        energy0 = self.gpu.energy_joules() if self.gpu else None
        try:
            yield
        except MlgateError:
            raise
        except Exception as exc:   # name the stage; keep the cause chained for --debug
            raise StageError(name, one_line(f"{type(exc).__name__}: {exc}", 400)) from exc
        finally:
            wall = time.perf_counter() - wall0
            self.seconds[name] = self.seconds.get(name, 0.0) + wall
            cost = self.stages.setdefault(name, StageCost())
            cost.wall_seconds += wall
            cost.cpu_seconds += _cpu_seconds() - cpu0
            if self.gpu is not None and self.gpu.absent is None:
                cost.gpu_seconds += wall   # the job holds its GPU for the whole stage, busy or not
                energy1 = self.gpu.energy_joules()
                if energy0 is not None and energy1 is not None:
                    cost.gpu_energy_joules = (cost.gpu_energy_joules or 0.0) + energy1 - energy0
        log.info("stage finished", extra={"stage": name, "seconds": round(self.seconds[name], 3)})

    def summary(self, training: dict[str, Any] | None = None, earlier_attempts: dict[str, Any] | None = None
                ) -> dict[str, Any]:
        """The job's cost section. `training` is the job summary's training block (train seconds over all
        attempts, and where this attempt resumed); `earlier_attempts` is what the service says the attempts
        before this one spent (wall seconds, how many were preempted)."""
        energies = [s.gpu_energy_joules for s in self.stages.values() if s.gpu_energy_joules is not None]
        gpu = self.gpu
        out: dict[str, Any] = {
            "stages": {name: {"wall_seconds": round(s.wall_seconds, 3), "cpu_seconds": round(s.cpu_seconds, 3),
                              "gpu_seconds": round(s.gpu_seconds, 3),
                              "gpu_energy_joules": None if s.gpu_energy_joules is None else
                              round(s.gpu_energy_joules, 1)} for name, s in self.stages.items()},
            "wall_seconds": round(sum(s.wall_seconds for s in self.stages.values()), 3),
            # everything but training: what the framework adds to a retrain (the report shows it too)
            "outside_training_seconds": round(sum(s.wall_seconds for name, s in self.stages.items()
                                                  if name != "train"), 3),
            "cpu_seconds": round(sum(s.cpu_seconds for s in self.stages.values()), 3),
            "gpu": None if gpu is None or gpu.absent else {
                "device": getattr(gpu, "name", str(gpu.runner.torch)),
                "seconds": round(sum(s.gpu_seconds for s in self.stages.values()), 3),
                # the driver's counter is the whole GPU's: another process on it is counted too
                "energy_joules": round(sum(energies), 1) if energies else None,
                "peak_memory_mb": None if (peak := gpu.peak_memory_mb()) is None else round(peak, 1)},
            "gpu_absent": "the job ran on the CPU" if gpu is None else gpu.absent,
        }
        resumed = (training or {}).get("resumed_from")
        saved = (training or {}).get("resumed_seconds", 0.0)
        earlier = earlier_attempts or {}
        out["resume"] = {
            "resumed_from": resumed,
            "saved_seconds": round(max(0.0, saved), 1),   # training already done that this attempt did not redo
            "earlier_attempts": earlier.get("count", 0),
            "preempted_attempts": earlier.get("preempted", 0),
            # what earlier attempts ran for, less what of it the checkpoint kept
            "lost_seconds": None if "seconds" not in earlier else round(max(0.0, earlier["seconds"] - saved), 1),
        }
        return out
