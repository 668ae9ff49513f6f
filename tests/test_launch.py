"""Data-parallel training through torchrun (automation/launch.py): the rendezvous a node is given, a rank
killed mid-training and the group that restarts and resumes, checkpoints written by rank 0 only, and a
checkpoint resumed on another world size (in both directions, at an epoch end and inside an epoch)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from automation.checkpoint import CheckpointDir, PreemptionNotice, Preempted, Saved
from automation.config import TrainConfig
from automation.device import select_device
from automation.errors import UsageError
from automation.launch import (MAX_RESTARTS_ENV, NNODES_ENV, NODE_RANK_ENV, RDZV_ENDPOINT_ENV, RDZV_ID_ENV,
                               DistributedTrainingFailed, Rendezvous, RankSpec, launch_training, max_restarts,
                               torchrun_command)
from automation.train import TrainResult, train_model
from models import digits_mlp
from models.datasets import digits

# onecycle: a resume on another world size must stretch the schedule, or it steps past its end and raises
CFG = TrainConfig(epochs=5, batch_size=64, lr=0.01, lr_schedule="onecycle", patience=10)
KILL_AFTER_EPOCH = 2


class RecordingCheckpoints(CheckpointDir):
    """A checkpoint folder that notes which rank wrote each checkpoint (in `writers.log` beside it)."""

    def save(self, state: dict[str, Any], epoch: int, step: int) -> Saved:
        with open(self.folder.parent / "writers.log", "a") as log:
            log.write(f"{os.environ.get('RANK', '-')} {epoch} {step}\n")
        return super().save(state, epoch, step)


def build_killed_once(hidden: int, checkpoints: str) -> nn.Module:
    """digits_mlp's network; in the first attempt of a torchrun group, rank 1 SIGKILLs itself at its first
    forward pass after rank 0 has checkpointed epoch 2: a worker lost mid-training, at a point the test knows.
    Rank 1 cannot get further than two steps into epoch 3 before that: each step waits for rank 0."""
    model = digits_mlp.build(hidden=hidden, dropout=0.1)
    if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
        def kill_after_the_checkpoint(_module: nn.Module, _inputs: Any) -> None:
            if any(Path(checkpoints).glob(f"ckpt-{KILL_AFTER_EPOCH:05d}-*.pt.json")):
                (Path(checkpoints).parent / "killed").write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
        model.register_forward_pre_hook(kill_after_the_checkpoint)
    return model


def _accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def _writers(folder: Path) -> list[tuple[str, int]]:
    lines = (folder / "writers.log").read_text().split()
    return [(lines[i], int(lines[i + 1])) for i in range(0, len(lines), 3)]


def _train_killed_once(tmp_path: Path, **kwargs: Any) -> TrainResult:
    folder = tmp_path / "checkpoints"
    return train_model(build_killed_once, {"hidden": 32, "checkpoints": str(folder)}, digits(seed=0), CFG,
                       checkpoints=RecordingCheckpoints(folder), **kwargs)


# --- rendezvous --------------------------------------------------------------------------------

def test_one_node_is_torchrun_standalone_with_timeouts_set() -> None:
    alone = Rendezvous.from_env({})
    assert alone == Rendezvous()
    args = alone.torchrun_args()
    assert args[:3] == ["--standalone", "--nnodes", "1"]
    assert "join_timeout=" in args[-1] and "read_timeout=" in args[-1]


def test_several_nodes_meet_at_node_0s_c10d_store() -> None:
    env = {NNODES_ENV: "3", NODE_RANK_ENV: "2", RDZV_ENDPOINT_ENV: "job-0.job:29400", RDZV_ID_ENV: "job"}
    node = Rendezvous.from_env(env)
    assert node == Rendezvous(3, 2, "job-0.job:29400", "job")
    command = torchrun_command(Path("/tmp/x"), 4, node, restarts=2)
    flat = " ".join(command)
    assert ("--nnodes 3 --node-rank 2 --rdzv-backend c10d --rdzv-endpoint job-0.job:29400 --rdzv-id job"
            in flat)
    assert "is_host=false" in flat and "--standalone" not in flat
    assert "--nproc-per-node 4 --max-restarts 2" in flat and command[-3:] == ["-m", "automation.launch", "/tmp/x"]
    assert "is_host=true" in " ".join(Rendezvous.from_env({**env, NODE_RANK_ENV: "0"}).torchrun_args())


@pytest.mark.parametrize("env, named", [
    ({NNODES_ENV: "two"}, NNODES_ENV),
    ({NNODES_ENV: "2", NODE_RANK_ENV: "0", RDZV_ID_ENV: "job"}, RDZV_ENDPOINT_ENV),
    ({NNODES_ENV: "2", NODE_RANK_ENV: "0", RDZV_ENDPOINT_ENV: "job-0:29400"}, RDZV_ID_ENV),
    ({NNODES_ENV: "2", RDZV_ENDPOINT_ENV: "h:1", RDZV_ID_ENV: "j"}, NODE_RANK_ENV),
    ({NNODES_ENV: "2", NODE_RANK_ENV: "2", RDZV_ENDPOINT_ENV: "h:1", RDZV_ID_ENV: "j"}, NODE_RANK_ENV),
    ({NNODES_ENV: "2", NODE_RANK_ENV: "1", RDZV_ENDPOINT_ENV: "no-port", RDZV_ID_ENV: "j"}, RDZV_ENDPOINT_ENV),
])
def test_a_bad_rendezvous_fails_before_anything_starts_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(UsageError, match=named):
        Rendezvous.from_env(env)


def test_max_restarts_from_the_environment() -> None:
    assert max_restarts({}) == 2
    assert max_restarts({MAX_RESTARTS_ENV: "0"}) == 0
    with pytest.raises(UsageError, match=MAX_RESTARTS_ENV):
        max_restarts({MAX_RESTARTS_ENV: "-1"})


SUMMARY = """[W torch] something else
======================================================
automation.launch FAILED
------------------------------------------------------
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 7697)  (SIGTERM)
------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 7701)  (SIGKILL)
======================================================""".splitlines()


def test_a_failure_names_each_rank_root_cause_first_and_the_python_error(tmp_path: Path) -> None:
    from automation.launch import _failure

    error = tmp_path / "logs" / "run" / "attempt_0" / "0" / "error.json"
    error.parent.mkdir(parents=True)
    error.write_text('{"message": {"message": "RuntimeError: Connection reset by peer\\nmore", "extraInfo": {}}}')
    assert _failure(tmp_path, 1, SUMMARY, restarts=2) == (
        "distributed training failed after 2 restart(s) of the group: rank 1 ended with signal SIGKILL, rank 0 "
        "ended with signal SIGTERM; RuntimeError: Connection reset by peer")
    assert _failure(tmp_path / "none", 1, ["no summary"], restarts=0) == (
        "distributed training failed after 0 restart(s) of the group: torchrun ended with exit code 1")


# --- elastic restarts and checkpoints ------------------------------------------------------------

@pytest.mark.slow
def test_a_killed_rank_restarts_the_group_which_resumes_from_rank_0s_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MAX_RESTARTS_ENV, "1")
    seen: list[int] = []
    result = _train_killed_once(tmp_path, world_size=2, backend="gloo", on_epoch=lambda e, _m: seen.append(e))
    assert (tmp_path / "killed").is_file()                       # rank 1 really died (SIGKILL)
    assert result.restarts == 1 and result.world_size == 2
    assert result.resumed_from == (KILL_AFTER_EPOCH, 0)          # the restarted group went on from there
    assert len(result.history) == CFG.epochs and seen == list(range(1, CFG.epochs + 1))
    # only rank 0 wrote: epochs 1-2 before the kill, 3-5 after the restart
    assert _writers(tmp_path) == [("0", epoch) for epoch in range(1, CFG.epochs + 1)]
    splits = digits(seed=0)
    assert _accuracy(result.model, splits.x_test, splits.y_test) > 0.8


@pytest.mark.slow
def test_a_checkpoint_written_by_two_ranks_resumes_on_one_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MAX_RESTARTS_ENV, "0")
    with pytest.raises(DistributedTrainingFailed, match="after 0 restart.*rank 1 ended with signal SIGKILL"):
        _train_killed_once(tmp_path, world_size=2, backend="gloo")
    latest = CheckpointDir(tmp_path / "checkpoints").latest()
    assert latest is not None and latest["world_size"] == 2 and latest["progress"]["epoch"] == KILL_AFTER_EPOCH
    resumed = _train_killed_once(tmp_path)                       # world size 1, in this process
    assert resumed.world_size == 1 and resumed.resumed_from == (KILL_AFTER_EPOCH, 0)
    assert len(resumed.history) == CFG.epochs and resumed.epochs_this_attempt == CFG.epochs - KILL_AFTER_EPOCH
    assert [w for w, _ in _writers(tmp_path)] == ["0", "0", "-", "-", "-"]
    splits = digits(seed=0)
    assert _accuracy(resumed.model, splits.x_test, splits.y_test) > 0.8


@pytest.mark.slow
def test_a_checkpoint_from_inside_a_single_process_epoch_resumes_on_two_ranks(tmp_path: Path) -> None:
    """A single process checkpoints mid-epoch (a preemption at step 5); two ranks share the rest of that epoch
    and go on with the schedule stretched to their number of steps."""
    notice = PreemptionNotice(grace_seconds=30)
    steps = {"n": 0}

    def notice_at_step_5(module: Any, _inputs: Any) -> None:
        if isinstance(module, nn.Sequential):   # the hook sees every submodule; count the model
            steps["n"] += 1
            if steps["n"] == 5:
                notice.requested.set()

    handle = nn.modules.module.register_module_forward_pre_hook(notice_at_step_5)
    try:
        with pytest.raises(Preempted, match="preempted at epoch 1, step 5"):
            train_model(digits_mlp.build, {"hidden": 32}, digits(seed=0), CFG, notice=notice,
                        checkpoints=CheckpointDir(tmp_path))
    finally:
        handle.remove()
    assert CheckpointDir(tmp_path).latest()["world_size"] == 1
    resumed = train_model(digits_mlp.build, {"hidden": 32}, digits(seed=0), CFG, world_size=2, backend="gloo",
                          checkpoints=CheckpointDir(tmp_path))
    assert resumed.world_size == 2 and resumed.resumed_from == (0, 5) and len(resumed.history) == CFG.epochs
    splits = digits(seed=0)
    assert _accuracy(resumed.model, splits.x_test, splits.y_test) > 0.8


# --- several nodes ---------------------------------------------------------------------------------

# one node's job: argv = result file, device type (cpu | cuda), backend
NODE = """
import sys, torch
from automation.config import DeviceConfig, TrainConfig
from automation.device import select_device
from automation.train import TrainResult, train_model
from models import digits_mlp
from models.datasets import digits

result = train_model(digits_mlp.build, {"hidden": 16}, digits(seed=0), TrainConfig(epochs=2, lr=3e-3, nodes=2),
                     device=select_device(DeviceConfig(type=sys.argv[2])), world_size=1, backend=sys.argv[3])
torch.save({"world_size": result.world_size, "device": result.device, "precision": result.precision,
            "state": result.model.state_dict()}, sys.argv[1])
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_nodes(tmp_path: Path, device: str, backend: str) -> list[dict[str, Any]]:
    """Two job processes, as two pods of an Indexed Job would run them (here on one machine, one rank each),
    meeting at node 0's store from the MLGATE_* variables alone; what each one's train_model returned."""
    common = {**os.environ, NNODES_ENV: "2", RDZV_ENDPOINT_ENV: f"127.0.0.1:{_free_port()}",
              RDZV_ID_ENV: f"test-{uuid.uuid4().hex[:8]}"}
    nodes = [subprocess.Popen([sys.executable, "-c", NODE, str(tmp_path / f"node{i}.pt"), device, backend],
                              env={**common, NODE_RANK_ENV: str(i)}, cwd=Path(__file__).parents[1])
             for i in range(2)]
    try:
        codes = [node.wait(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert codes == [0, 0]
    return [torch.load(tmp_path / f"node{i}.pt", weights_only=True) for i in range(2)]


def _same_weights(first: dict[str, Any], second: dict[str, Any]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
def test_two_nodes_train_as_one_group_through_the_rendezvous_environment(tmp_path: Path) -> None:
    first, second = _two_nodes(tmp_path, "cpu", "gloo")
    assert first["world_size"] == second["world_size"] == 2
    assert _same_weights(first["state"], second["state"])


# --- on a GPU (`make gpu-check`; skipped with the reason elsewhere) --------------------------------------

@pytest.mark.gpu
def test_a_rank_on_a_gpu_joins_through_nccl_and_hands_back_host_weights() -> None:
    cuda = select_device()
    spec = RankSpec(build=digits_mlp.build, params={"hidden": 32}, splits=digits(seed=0),
                    cfg=TrainConfig(epochs=4, lr=3e-3), device=cuda, backend="nccl", threads=1, checkpoints=None,
                    hopeless_below=None, lineage=None)
    result = launch_training(spec, 1, Rendezvous(), restarts=0)
    assert result.device == "cuda:0" and result.precision.endswith("autocast") and result.world_size == 1
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in result.model.parameters())
    splits = digits(seed=0)
    assert _accuracy(result.model, splits.x_test, splits.y_test) > 0.8


@pytest.mark.gpu
def test_two_ranks_on_a_gpu_train_ddp_with_autocast(tmp_path: Path) -> None:
    """Two nodes' ranks on this machine's one GPU: gloo (NCCL refuses two ranks on one device) carries DDP's
    CUDA gradients; each rank decides its device through automation/device.py."""
    first, second = _two_nodes(tmp_path, "cuda", "gloo")
    assert first["device"] == second["device"] == "cuda:0" and first["precision"].endswith("autocast")
    assert first["world_size"] == 2 and _same_weights(first["state"], second["state"])
