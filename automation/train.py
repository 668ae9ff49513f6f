"""Training: seeded, device-aware, AMP on CUDA, early stopping, DDP across GPUs.

Repeatable on the CPU: the same commit, data and config give the same weights bit for bit. Everything random
draws from seeded generators (the model's init is seeded before build()), torch's deterministic algorithms
are on while training, and the intra-op thread count is fixed (`train.threads`), since it decides how float
sums are split. On CUDA, cuDNN is pinned to deterministic kernels; see README for the tolerance there.

The loop reads top to bottom in phases: set-up, per-epoch train, validate, early-stop.
With several GPUs (or when asked, e.g. in tests), or several nodes, it runs data-parallel through
torch.distributed, one process per rank, started by torchrun (automation/launch.py). A checkpoint records
the world size that wrote it; resumed on another, the rest of its epoch is shared among the new ranks and the
learning-rate schedule is stretched to the new number of steps.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from automation.checkpoint import CheckpointDir, Lineage, PreemptionNotice, Preempted, Saved
from automation.config import TrainConfig
from automation.device import CPU, RunnerDevice
from automation.data import Splits, is_on_disk

if TYPE_CHECKING:
    from automation.launch import RankSpec, Rendezvous

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]
VALIDATION_BATCH = 64   # as predictors.EVALUATION_BATCH: attention over long texts grows with the square of length
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
    train_seconds: float = 0.0       # training time over every attempt (this one and those it resumed)
    resumed_from: tuple[int, int] | None = None   # (epoch, step) of the checkpoint this attempt started from
    budget_reached: bool = False
    hopeless: str | None = None
    checkpoint_seconds: float = 0.0  # spent writing checkpoints in this attempt
    epochs_this_attempt: int = 0     # trained (or finished, when resumed mid-epoch) by this attempt
    resumed_seconds: float = 0.0     # the training time the checkpoint held: what resuming saved
    threads: int = 0                 # intra-op CPU threads per process while training (train.threads)
    fresh_start: str | None = None   # why a checkpoint found was not resumed (written by another config, ...)
    restarts: int = 0                # times torchrun restarted the group after losing a worker


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)   # every device's generator too


def training_threads(cfg: TrainConfig, world_size: int = 1) -> int:
    """Intra-op threads per training process (automation/threads.py decides), shared among the ranks running
    here. Never the machine's load: that would make the sums differ."""
    from automation.threads import policy

    return max(1, policy(cfg.threads).train // world_size)


@contextmanager
def reproducible(threads: int) -> Iterator[None]:
    """Deterministic algorithms and a fixed thread count while training; the caller's settings come back
    after (the benchmark chooses its own threads). warn_only: an op with no deterministic kernel warns
    rather than failing a job."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False   # no timing-picked kernels
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[3], saved[4]


def default_lineage(build: BuildFn, params: dict[str, Any], splits: Splits, cfg: TrainConfig) -> Lineage:
    """What a checkpoint records when the caller (the job) gave none: the data and code fingerprinted here."""
    from automation.fingerprint import code_fingerprint, data_fingerprint

    return Lineage.of(params, cfg, data_fingerprint(splits)[0], code_fingerprint(build))


def resolve_world_size(cfg: TrainConfig, device: RunnerDevice) -> int:
    if cfg.distributed == "auto" and device.is_cuda:
        return max(1, torch.cuda.device_count())
    return 1


def train_model(build: BuildFn, params: dict[str, Any], splits: Splits, cfg: TrainConfig, *,
                device: RunnerDevice = CPU, world_size: int | None = None, backend: str | None = None,
                on_epoch: EpochCallback | None = None, checkpoints: CheckpointDir | None = None,
                notice: PreemptionNotice | None = None, hopeless_below: float | None = None,
                lineage: Lineage | None = None) -> TrainResult:
    """Train `build(**params)` on `splits` on `device`; returns the best-validation-loss weights on the
    CPU, in fp32: the trained model crosses the device boundary here, once. With `checkpoints`, resumes from
    the newest complete one there that `lineage` (what this training is: config, data, code; derived when not
    given) wrote, and writes new ones (automation/checkpoint.py)."""
    from automation.launch import Rendezvous

    world_size = world_size or resolve_world_size(cfg, device)   # processes on this node
    rendezvous = Rendezvous.from_env()
    if cfg.nodes != rendezvous.nnodes:
        log.warning("train.nodes is %d, but this runner was started as %d node(s): training on %d", cfg.nodes,
                    rendezvous.nnodes, rendezvous.nnodes, extra={"nodes": cfg.nodes, "started": rendezvous.nnodes})
    if checkpoints is not None and lineage is None:
        lineage = default_lineage(build, params, splits, cfg)
    started = time.perf_counter()
    if world_size == 1 and rendezvous.nnodes == 1:
        with reproducible(training_threads(cfg)):
            result = _train_single(build, params, splits, cfg, rank=0, world_size=1, runner=device,
                                   on_epoch=on_epoch, checkpoints=checkpoints, notice=notice,
                                   hopeless_below=hopeless_below, lineage=lineage)
    else:   # a preemption notice reaches this process only: the ranks resume from the last epoch's checkpoint
        result = _train_distributed(build, params, splits, cfg, world_size, device,
                                    backend or ("nccl" if device.is_cuda else "gloo"), checkpoints, hopeless_below,
                                    lineage, rendezvous)
        if on_epoch is not None:   # ranks run in other processes; replay their history here
            for epoch, metrics in enumerate(result.history, start=1):
                on_epoch(epoch, metrics)
    result.seconds = time.perf_counter() - started
    return result


def _train_distributed(build: BuildFn, params: dict[str, Any], splits: Splits, cfg: TrainConfig, nproc: int,
                       device: RunnerDevice, backend: str, checkpoints: CheckpointDir | None,
                       hopeless_below: float | None, lineage: Lineage | None, rendezvous: Rendezvous) -> TrainResult:
    from automation.launch import RankSpec, launch_training

    spec = RankSpec(build=build, params=params, splits=splits, cfg=cfg, device=device, backend=backend,
                    threads=training_threads(cfg, nproc),   # the node's ranks share its threads
                    checkpoints=checkpoints, hopeless_below=hopeless_below, lineage=lineage)
    return launch_training(spec, nproc, rendezvous)


def rank_training(spec: RankSpec, *, rank: int, world_size: int, device: RunnerDevice) -> TrainResult:
    """One torchrun rank's training (automation/launch.py), in the group the caller joined. The loop (and
    DDP's reducer in it, which holds the group) is gone when this returns: the caller leaves the group next."""
    with reproducible(spec.threads):
        loop = TrainingLoop(spec.build, spec.params, spec.splits, spec.cfg, rank=rank, world_size=world_size,
                            runner=device, checkpoints=spec.checkpoints, hopeless_below=spec.hopeless_below,
                            lineage=spec.lineage)
        result = loop.run(None)
    del loop
    return result


def _train_single(build: BuildFn, params: dict[str, Any], splits: Splits, cfg: TrainConfig, *,
                  rank: int, world_size: int, runner: RunnerDevice, on_epoch: EpochCallback | None,
                  checkpoints: CheckpointDir | None = None, notice: PreemptionNotice | None = None,
                  hopeless_below: float | None = None, lineage: Lineage | None = None) -> TrainResult:
    loop = TrainingLoop(build, params, splits, cfg, rank=rank, world_size=world_size, runner=runner,
                        checkpoints=checkpoints, notice=notice, hopeless_below=hopeless_below, lineage=lineage)
    return loop.run(on_epoch)


@dataclass
class Progress:
    """Where training stands between two steps: everything besides the model, optimizer and random state that
    a resumed run needs to go on exactly as an uninterrupted one would. A checkpoint holds it."""
    epoch: int = 0                       # epochs completed
    best_loss: float = float("inf")
    best_epoch: int = 0
    best_state: dict[str, Any] | None = None
    stale: int = 0                       # epochs since the validation loss last improved
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    train_seconds: float = 0.0           # over every attempt, up to the last checkpoint or now
    budget_reached: bool = False         # train.max_minutes ran out
    hopeless: str | None = None          # why train.abort_when_hopeless stopped it

    @property
    def finished(self) -> bool:
        return self.stopped_early or self.budget_reached or self.hopeless is not None


@dataclass
class EpochPosition:
    """Inside an epoch: its batch order and the steps already taken (a checkpoint between two steps)."""
    order: torch.Tensor
    step: int = 0
    total_loss: float = 0.0


class TrainingLoop:
    """One rank's training, in phases: set-up (here), per-epoch train, validate, early-stop, checkpoint.

    With `checkpoints`, it resumes from the newest complete one (when `lineage` wrote it; otherwise it
    deletes them and starts fresh, saying why), checkpoints at each epoch end and every
    `checkpoint_every_minutes` inside an epoch, and on a preemption notice checkpoints at the next step and
    raises Preempted. Rank 0 writes; under DDP only at epoch ends."""

    def __init__(self, build: BuildFn, params: dict[str, Any], splits: Splits, cfg: TrainConfig, *,
                 rank: int, world_size: int, runner: RunnerDevice, checkpoints: CheckpointDir | None = None,
                 notice: PreemptionNotice | None = None, hopeless_below: float | None = None,
                 lineage: Lineage | None = None) -> None:
        seed_everything(cfg.seed)   # before build(): the initial weights are the seed's
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = device = runner.torch   # under DDP, the rank's own (automation/launch.py: rank_device)
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
        steps_per_epoch = -(-self.per_rank // cfg.batch_size)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch) \
            if cfg.lr_schedule == "onecycle" else None
        self.progress = Progress(best_state=copy.deepcopy(model.state_dict()))
        self.position: EpochPosition | None = None
        self.checkpoints = checkpoints if rank == 0 or world_size == 1 else None
        self.notice, self.hopeless_below = notice, hopeless_below
        self.resumed_from: tuple[int, int] | None = None
        self.resumed_seconds = 0.0
        self.checkpoint_seconds = 0.0
        self.epochs_run = 0   # by this attempt
        self.lineage, self.fresh_start = lineage, None
        if checkpoints is not None:   # every rank decides alike, from the checkpoint rank 0 read
            self.resume(checkpoints)
        self._clock = self._last_saved = time.monotonic()

    def resume(self, checkpoints: CheckpointDir) -> None:
        """Go on from the newest checkpoint if this training's lineage wrote it; otherwise start fresh and say
        why in one line (rank 0 deletes the stale ones, which would outrank the fresh run's by epoch)."""
        latest = self._shared_latest(checkpoints)
        if latest is None:
            return
        epoch, step = _position(latest)
        differs = self.lineage.differences(latest.get("lineage")) if self.lineage is not None else []
        misfit = None if differs else self.misfit(latest)   # code the model file's hash does not cover
        if misfit is not None:
            differs = [misfit]
        where = f"epoch {epoch}, step {step}"
        if differs:
            self.fresh_start = f"checkpoint from {where} was written by {' / '.join(differs)}; starting fresh"
            if self.rank == 0:
                log.warning(self.fresh_start, extra={"epoch": epoch, "step": step, "differs": differs})
                checkpoints.clear("written by " + " / ".join(differs))
            return
        self.load_state(latest)
        if self.rank == 0:
            log.info(f"resuming from the checkpoint at {where}",
                     extra={"epoch": epoch, "step": step, "epochs": self.cfg.epochs,
                            "trained_seconds": round(self.resumed_seconds, 2)})

    def _shared_latest(self, checkpoints: CheckpointDir) -> dict[str, Any] | None:
        """The newest checkpoint as rank 0 reads it, on every rank. Under DDP the others get rank 0's copy: a
        node of its own may have an empty folder, and a rank reading after rank 0 cleared a stale one would
        start fresh beside a rank 0 that resumed (other weights, another epoch count: a hang)."""
        if self.world_size == 1:
            return checkpoints.latest()
        shared = [checkpoints.latest() if self.rank == 0 else None]
        torch.distributed.broadcast_object_list(shared, src=0)
        return shared[0]

    # --- the loop ------------------------------------------------------------------------------
    def run(self, on_epoch: EpochCallback | None = None) -> TrainResult:
        if self.notice is not None:
            self.notice.training = self.checkpoints is not None and self.world_size == 1
        try:
            return self._run(on_epoch)
        finally:
            if self.notice is not None:
                self.notice.training = False

    def _run(self, on_epoch: EpochCallback | None) -> TrainResult:
        cfg, progress = self.cfg, self.progress
        while progress.epoch < cfg.epochs and not progress.finished:
            epoch_start = time.perf_counter()
            train_loss = self.train_epoch()
            val_loss, val_accuracy = self.validate()
            metrics = {"train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_accuracy,
                       "epoch_seconds": time.perf_counter() - epoch_start}
            if progress.budget_reached:   # cut short by train.max_minutes: judged as it stands
                metrics["partial"] = 1.0
            progress.epoch += 1
            self.epochs_run += 1
            progress.history.append(metrics)
            if on_epoch is not None:
                on_epoch(progress.epoch, metrics)
            self.early_stop(val_loss)
            self.give_up_if_hopeless()
            self.save_checkpoint()
        return self.result()

    def train_epoch(self) -> float:
        if self.position is None:
            order = torch.randperm(len(self.batches), generator=self.generator)[self.rank::self.world_size]
            self.position = EpochPosition(order[:self.per_rank])
        position = self.position
        self.train_module.train()
        total_loss = torch.full((), position.total_loss, device=self.device)
        for x_batch, y_batch in self.batches.epoch(position.order, self.cfg.batch_size, position.step):
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                loss = self.loss_fn(self.train_module(x_batch), y_batch)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.scheduler is not None:
                self.scheduler.step()
            total_loss += loss.detach() * len(y_batch)   # stays on device: no sync per step
            position.step += 1
            if self._between_steps(total_loss):
                break
        self.position = None
        return (total_loss / self.per_rank).item()    # one sync per epoch

    def _between_steps(self, total_loss: torch.Tensor) -> bool:
        """After a step: checkpoint when due or preempted (raising Preempted then); True ends the epoch here
        because train.max_minutes ran out."""
        if self.checkpoints is not None and self.world_size == 1:
            preempted = self.notice is not None and self.notice.requested.is_set()
            if preempted or time.monotonic() - self._last_saved >= self.cfg.checkpoint_every_minutes * 60:
                self.position.total_loss = float(total_loss)   # type: ignore[union-attr]
                saved = self.save_checkpoint()
                if preempted:
                    raise Preempted(f"preempted at epoch {saved.epoch + 1}, step {saved.step}: checkpointed in "
                                    f"{saved.seconds:.2f} s; the next attempt resumes there")
        if self.cfg.max_minutes is not None and self._budget_spent():
            self.progress.budget_reached = True
            return True
        return False

    def _budget_spent(self) -> bool:
        """train.max_minutes, reached. Under DDP the ranks' clocks differ: they agree (any rank's spent budget
        stops all) or one would wait for the others in its next all-reduce forever. A sync point every step,
        paid only with max_minutes set."""
        spent = self._train_seconds() >= self.cfg.max_minutes * 60   # type: ignore[operator]
        if self.world_size == 1:
            return spent
        flag = torch.tensor([float(spent)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def validate(self) -> tuple[float, float]:
        """Loss and accuracy on the full validation split (every rank, so all reach the same stop decision)."""
        self.model.eval()
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            logits = torch.cat([self.model(self.x_val[i:i + VALIDATION_BATCH]).float()   # bounded memory
                                for i in range(0, len(self.x_val), VALIDATION_BATCH)])
        return self.loss_fn(logits, self.y_val).item(), (logits.argmax(1) == self.y_val).float().mean().item()

    def early_stop(self, val_loss: float) -> None:
        progress = self.progress
        if val_loss < progress.best_loss - 1e-6:
            progress.best_loss, progress.best_epoch, progress.stale = val_loss, progress.epoch, 0
            progress.best_state = copy.deepcopy(self.model.state_dict())
        else:
            progress.stale += 1
            progress.stopped_early = progress.stale >= self.cfg.patience

    def give_up_if_hopeless(self) -> None:
        """train.abort_when_hopeless: the bound assumes no remaining epoch adds more validation accuracy than
        the largest one-epoch gain so far. It says nothing about a schedule that saves its gains for late."""
        accuracies = [h["val_accuracy"] for h in self.progress.history]
        if not self.cfg.abort_when_hopeless or self.hopeless_below is None or len(accuracies) < 3:
            return
        best_so_far = np.maximum.accumulate(accuracies)
        largest_gain = float(max(np.diff(best_so_far).max(), 0.0))
        remaining = self.cfg.epochs - self.progress.epoch
        reachable = float(best_so_far[-1]) + remaining * largest_gain
        if reachable < self.hopeless_below:
            self.progress.hopeless = (
                f"after {self.progress.epoch} epochs, validation accuracy {best_so_far[-1]:.2%} plus at most "
                f"{largest_gain:.2%} per remaining epoch ({remaining}) reaches {reachable:.2%}, under the "
                f"{self.hopeless_below:.2%} gate")

    def result(self) -> TrainResult:
        progress = self.progress
        self.model.load_state_dict(progress.best_state)
        precision = f"{'bf16' if self.amp_dtype == torch.bfloat16 else 'fp16'} autocast" if self.use_amp else "fp32"
        return TrainResult(model=self.model.to(device="cpu", dtype=torch.float32).eval(), history=progress.history,
                           best_epoch=progress.best_epoch, stopped_early=progress.stopped_early,
                           world_size=self.world_size, device=str(self.device), precision=precision,
                           train_seconds=self._train_seconds(), resumed_from=self.resumed_from,
                           budget_reached=progress.budget_reached, hopeless=progress.hopeless,
                           checkpoint_seconds=self.checkpoint_seconds, epochs_this_attempt=self.epochs_run,
                           resumed_seconds=self.resumed_seconds, threads=torch.get_num_threads(),
                           fresh_start=self.fresh_start)

    # --- checkpoints ---------------------------------------------------------------------------
    def _train_seconds(self) -> float:
        now = time.monotonic()
        self.progress.train_seconds += now - self._clock
        self._clock = now
        return self.progress.train_seconds

    def state_dict(self) -> dict[str, Any]:
        progress = {k: v for k, v in vars(self.progress).items() if k != "best_state"}
        progress["train_seconds"] = self._train_seconds()
        position = None if self.position is None else {
            "order": self.position.order, "step": self.position.step, "total_loss": self.position.total_loss}
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict(), "best_state": self.progress.best_state, "progress": progress,
                "position": position, "rng": _random_state(self.generator, self.device),
                "lineage": self.lineage.record() if self.lineage is not None else None,
                "world_size": self.world_size}   # how the position's rows and the schedule's steps were counted

    def load_state(self, state: dict[str, Any]) -> None:
        """Go on from `state`, written at this world size or another (a checkpoint from before the world size
        was recorded counts as this one's)."""
        written_at = int(state.get("world_size", self.world_size))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(best_state=state["best_state"], **state["progress"])
        position = state["position"]
        self.position = None if position is None else EpochPosition(position["order"], int(position["step"]),
                                                                     float(position["total_loss"]))
        self.resumed_from = (self.progress.epoch, self.position.step if self.position else 0)
        if written_at != self.world_size and self.position is not None:
            self.position = self._reshard(self.position, written_at)
        if self.scheduler is not None and state["scheduler"] is not None:
            if written_at == self.world_size:
                self.scheduler.load_state_dict(state["scheduler"])
            else:   # its step count and phases were those of another number of steps per epoch
                self._continue_schedule()
        _restore_random_state(state["rng"], self.generator, self.device)
        self.resumed_seconds = self.progress.train_seconds   # training this attempt does not redo

    def _reshard(self, position: EpochPosition, written_at: int) -> EpochPosition:
        """The rest of an epoch a single process began, shared among this world's ranks as a fresh epoch's
        rows are (each its stride of the same order). Only a single process checkpoints inside an epoch
        (DDP ranks at epoch ends), so the saved order is the whole epoch's."""
        if written_at != 1:
            raise ValueError(f"a checkpoint inside an epoch written by {written_at} ranks holds rank 0's rows "
                             "only; it cannot be resumed on another number of ranks")
        remaining = position.order[position.step * self.cfg.batch_size:]
        share = len(remaining) // self.world_size
        # the loss summed so far, as this rank's share of it: the epoch's mean divides by this rank's rows
        return EpochPosition(remaining[self.rank::self.world_size][:share], 0,
                             position.total_loss * written_at / self.world_size)

    def _continue_schedule(self) -> None:
        """The learning-rate schedule at the point this world size has reached: the steps still to take at
        this size, counted back from the end of a schedule built for it (so it never steps past its end)."""
        if self.scheduler is None:
            return
        per_epoch = -(-self.per_rank // self.cfg.batch_size)
        this_epoch = -(-len(self.position.order) // self.cfg.batch_size) - self.position.step \
            if self.position is not None else per_epoch
        remaining = this_epoch + (self.cfg.epochs - self.progress.epoch - 1) * per_epoch
        total = self.cfg.epochs * per_epoch
        self.scheduler.last_epoch = max(0, total - remaining)
        # the next step() sets the rate from last_epoch; until then the optimizer keeps the checkpoint's rate

    def misfit(self, state: dict[str, Any]) -> str | None:
        """Why the checkpoint's weights cannot go into this network (checked before anything is loaded:
        load_state_dict copies what fits before it raises); None when they fit."""
        mine, theirs = self.model.state_dict(), state.get("model") or {}
        if mine.keys() != theirs.keys():
            return "a network with other layers"
        for name, tensor in mine.items():
            if tuple(theirs[name].shape) != tuple(tensor.shape):
                return f"a network of another shape ({name}: {list(theirs[name].shape)} -> {list(tensor.shape)})"
        return None

    def save_checkpoint(self) -> Saved:
        if self.checkpoints is None:
            return Saved(Path(), self.progress.epoch, 0, 0.0)
        saved = self.checkpoints.save(self.state_dict(), self.progress.epoch,
                                      self.position.step if self.position else 0)
        self.checkpoint_seconds += saved.seconds
        self._last_saved = time.monotonic()
        return saved


def _random_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "generator": generator.get_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": random.getstate()}


def _restore_random_state(state: dict[str, Any], generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _position(state: dict[str, Any]) -> tuple[int, int]:
    """(epochs completed, steps into the next) of a checkpoint."""
    position = state.get("position")
    return int(state["progress"]["epoch"]), int(position["step"]) if position else 0


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
    batch is an index; on disk (automation.data.DiskArray), a DataLoader reads each batch's rows, so memory
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

    def epoch(self, order: torch.Tensor, batch_size: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of one epoch in `order`, after the first `skip` (a resumed epoch)."""
        if not self.streamed:
            order = order.to(self.device)
            for start in range(skip * batch_size, len(order), batch_size):
                idx = order[start:start + batch_size]
                yield self.x[idx], self.y[idx]
            return
        chunks = [order[i:i + batch_size].tolist() for i in range(skip * batch_size, len(order), batch_size)]
        # its own generator: a loader drawing its worker seed from the global one would shift every random
        # number after it, and a resumed epoch (a loader started mid-way) would not match an uninterrupted one
        loader = torch.utils.data.DataLoader(self.rows, batch_sampler=chunks, collate_fn=_as_batch,
                                             num_workers=self.workers, pin_memory=self.device.type == "cuda",
                                             generator=torch.Generator().manual_seed(len(chunks)),
                                             worker_init_fn=_seed_worker)
        for x_batch, y_batch in loader:
            yield x_batch.to(self.device, non_blocking=True), y_batch.to(self.device, non_blocking=True)


def _seed_worker(worker_id: int) -> None:
    """A loader worker's numpy and random from its torch seed (the loader's generator plus its id): a dataset
    that draws (augmentation) draws the same in every run, whichever worker reads which batch."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _as_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch   # __getitems__ already stacked it
