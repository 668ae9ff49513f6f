"""Training: seeded, device-aware, AMP on CUDA, early stopping, DDP across GPUs.

The loop reads top to bottom in phases: set-up, per-epoch train, validate, early-stop.
With several GPUs (or when asked, e.g. in tests) it runs data-parallel through
torch.distributed, one process per rank, with the env:// rendezvous torchrun uses.
"""

from __future__ import annotations

import copy
import os
import random
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from automation.config import TrainConfig
from automation.device import CPU, RunnerDevice
from models.datasets import Splits, is_on_disk

EpochCallback = Callable[[int, dict[str, float]], None]
BuildFn = Callable[..., nn.Module]


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    world_size: int = 1
    device: str = "cpu"
    precision: str = "fp32"          # "fp32", or the autocast dtype used on CUDA ("bf16 autocast")
    seconds: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_world_size(cfg: TrainConfig, device: RunnerDevice) -> int:
    if cfg.distributed == "auto" and device.is_cuda:
        return max(1, torch.cuda.device_count())
    return 1


def train_model(build: BuildFn, params: dict[str, Any], splits: Splits, cfg: TrainConfig, *,
                device: RunnerDevice = CPU, world_size: int | None = None, backend: str | None = None,
                on_epoch: EpochCallback | None = None) -> TrainResult:
    """Train `build(**params)` on `splits` on `device`; returns the best-validation-loss weights on the
    CPU, in fp32: the trained model crosses the device boundary here, once."""
    world_size = world_size or resolve_world_size(cfg, device)
    started = time.perf_counter()
    if world_size == 1:
        result = _train_single(build, params, splits, cfg, rank=0, world_size=1, runner=device, on_epoch=on_epoch)
    else:
        result = _train_distributed(build, params, splits, cfg, world_size, device,
                                    backend or ("nccl" if device.is_cuda else "gloo"))
        if on_epoch is not None:   # ranks run in other processes; replay their history here
            for epoch, metrics in enumerate(result.history, start=1):
                on_epoch(epoch, metrics)
    result.seconds = time.perf_counter() - started
    return result


def _train_single(build: BuildFn, params: dict[str, Any], splits: Splits, cfg: TrainConfig, *,
                  rank: int, world_size: int, runner: RunnerDevice, on_epoch: EpochCallback | None) -> TrainResult:
    return TrainingLoop(build, params, splits, cfg, rank=rank, world_size=world_size, runner=runner).run(on_epoch)


@dataclass
class Progress:
    """Where training stands between two steps: everything besides the model and optimizer that a resumed
    run needs to go on exactly as an uninterrupted one would."""
    epoch: int = 0                       # epochs completed
    best_loss: float = float("inf")
    best_epoch: int = 0
    best_state: dict[str, Any] | None = None
    stale: int = 0                       # epochs since the validation loss last improved
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False


class TrainingLoop:
    """One rank's training, in phases: set-up (here), per-epoch train, validate, early-stop."""

    def __init__(self, build: BuildFn, params: dict[str, Any], splits: Splits, cfg: TrainConfig, *,
                 rank: int, world_size: int, runner: RunnerDevice) -> None:
        seed_everything(cfg.seed)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        # one GPU per rank under DDP; otherwise the job's device
        self.device = device = torch.device("cuda", rank % torch.cuda.device_count()) \
            if world_size > 1 and runner.is_cuda else runner.torch
        self.model = model = build(**params).to(device)
        self.train_module: nn.Module = model
        if world_size > 1:
            self.train_module = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.use_amp = cfg.amp and device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.loss_fn = nn.CrossEntropyLoss()

        self.batches = TrainingBatches(splits.x_train, splits.y_train, device, cfg.loader_workers)
        self.x_val = torch.from_numpy(np.asarray(splits.x_val)).to(device)
        self.y_val = torch.from_numpy(splits.y_val).to(device)
        # every rank draws the same permutation and takes its own stride, as DistributedSampler does
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.per_rank = len(self.batches) // world_size
        self.progress = Progress(best_state=copy.deepcopy(model.state_dict()))

    def run(self, on_epoch: EpochCallback | None = None) -> TrainResult:
        cfg, progress = self.cfg, self.progress
        while progress.epoch < cfg.epochs and not progress.stopped_early:
            epoch_start = time.perf_counter()
            train_loss = self.train_epoch()
            val_loss, val_accuracy = self.validate()
            metrics = {"train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_accuracy,
                       "epoch_seconds": time.perf_counter() - epoch_start}
            progress.epoch += 1
            progress.history.append(metrics)
            if on_epoch is not None:
                on_epoch(progress.epoch, metrics)
            self.early_stop(val_loss)
        return self.result()

    def train_epoch(self) -> float:
        self.train_module.train()
        order = torch.randperm(len(self.batches), generator=self.generator)[self.rank::self.world_size]
        order = order[:self.per_rank]
        total_loss = torch.zeros((), device=self.device)
        for x_batch, y_batch in self.batches.epoch(order, self.cfg.batch_size):
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                loss = self.loss_fn(self.train_module(x_batch), y_batch)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total_loss += loss.detach() * len(y_batch)   # stays on device: no sync per step
        return (total_loss / self.per_rank).item()    # one sync per epoch

    def validate(self) -> tuple[float, float]:
        """Loss and accuracy on the full validation split (every rank, so all reach the same stop decision)."""
        self.model.eval()
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            logits = self.model(self.x_val).float()
        return self.loss_fn(logits, self.y_val).item(), (logits.argmax(1) == self.y_val).float().mean().item()

    def early_stop(self, val_loss: float) -> None:
        progress = self.progress
        if val_loss < progress.best_loss - 1e-6:
            progress.best_loss, progress.best_epoch, progress.stale = val_loss, progress.epoch, 0
            progress.best_state = copy.deepcopy(self.model.state_dict())
        else:
            progress.stale += 1
            progress.stopped_early = progress.stale >= self.cfg.patience

    def result(self) -> TrainResult:
        progress = self.progress
        self.model.load_state_dict(progress.best_state)
        precision = f"{'bf16' if self.amp_dtype == torch.bfloat16 else 'fp16'} autocast" if self.use_amp else "fp32"
        return TrainResult(model=self.model.to(device="cpu", dtype=torch.float32).eval(), history=progress.history,
                           best_epoch=progress.best_epoch, stopped_early=progress.stopped_early,
                           world_size=self.world_size, device=str(self.device), precision=precision)


class _Rows(torch.utils.data.Dataset):
    """Rows of a split on disk; a batch is read in one call (`__getitems__`), not one row at a time."""

    def __init__(self, x: Any, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.int64]:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.asarray(indices)
        return torch.from_numpy(np.asarray(self.x[rows])), torch.from_numpy(self.y[rows])


class TrainingBatches:
    """The training split's batches in a given order. In memory, the whole split sits on the device and a
    batch is an index; on disk (models.datasets.DiskArray), a DataLoader reads each batch's rows, so memory
    holds a few batches whatever the split's size. Both take the same rows in the same order."""

    def __init__(self, x: Any, y: np.ndarray, device: torch.device, workers: int = 0) -> None:
        self.device, self.workers = device, workers
        self.streamed = is_on_disk(x)
        self.rows = _Rows(x, y) if self.streamed else None
        self.x = None if self.streamed else torch.from_numpy(np.asarray(x)).to(device)
        self.y = None if self.streamed else torch.from_numpy(y).to(device)
        self.count = len(y)

    def __len__(self) -> int:
        return self.count

    def epoch(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.streamed:
            order = order.to(self.device)
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                yield self.x[idx], self.y[idx]
            return
        chunks = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
        loader = torch.utils.data.DataLoader(self.rows, batch_sampler=chunks, collate_fn=_as_batch,
                                             num_workers=self.workers, pin_memory=self.device.type == "cuda")
        for x_batch, y_batch in loader:
            yield x_batch.to(self.device, non_blocking=True), y_batch.to(self.device, non_blocking=True)


def _as_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch   # __getitems__ already stacked it


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, backend: str, port: int, out: str,
                build: BuildFn, params: dict[str, Any], splits: Splits, cfg: TrainConfig, device: RunnerDevice) -> None:
    # the same variables torchrun sets, so init_process_group uses the env:// rendezvous
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.distributed.init_process_group(backend=backend)
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        result = _train_single(build, params, splits, cfg, rank=rank, world_size=world_size, runner=device,
                               on_epoch=None)
        if rank == 0:
            torch.save({"state_dict": result.model.state_dict(), "history": result.history,
                        "best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
                        "device": result.device, "precision": result.precision}, out)
        # ranks tear the group down together: one leaving while its peer still works aborted gloo
        # ("terminate called without an active exception", SIGABRT) now and then
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _train_distributed(build: BuildFn, params: dict[str, Any], splits: Splits, cfg: TrainConfig,
                       world_size: int, device: RunnerDevice, backend: str) -> TrainResult:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="mlgate-ddp-") as tmp:
        out = str(Path(tmp) / "rank0.pt")
        mp.spawn(_ddp_worker, nprocs=world_size, join=True,
                 args=(world_size, backend, _free_port(), out, build, params, splits, cfg, device))
        saved = torch.load(out, weights_only=False)
    model = build(**params)
    model.load_state_dict(saved["state_dict"])
    return TrainResult(model=model.eval(), history=saved["history"], best_epoch=saved["best_epoch"],
                       stopped_early=saved["stopped_early"], world_size=world_size, device=saved["device"],
                       precision=saved["precision"])
