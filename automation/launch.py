"""Data-parallel training through torchrun: the one launcher `train_model` uses when more than one process trains.

The job's process writes what to train (a `RankSpec`: the build function, its params, the splits, the
TrainConfig, the job's device, the checkpoint folder and lineage) to a private temporary folder, and runs
`python -m torch.distributed.run` on it. torchrun starts one process per rank on this node, each running this
module (`python -m automation.launch FOLDER`): it reads the spec, joins the process group through torchrun's
rendezvous (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from torchrun's environment) and trains with the
same loop as a single process. The process with LOCAL_RANK 0 writes the result beside the spec; the job's
process reads it back, so the trained model crosses to the CPU there, once.

Elastic: a lost worker (killed, out of memory, a peer that died) makes torchrun stop the whole group and start
it again, at most `MLGATE_MAX_RESTARTS` times; the new group resumes from the newest checkpoint, which only
global rank 0 writes, at each epoch end. Without a checkpoint folder from the caller, one in the private folder
serves the restarts.

Why a rank leaves as it does (`_leave_group`, `_exit`): under load a gloo rank aborted at exit (SIGABRT,
"terminate called without an active exception"; 1 in 25-200 two-process runs beside busy processes, with
either rendezvous). A core dump showed why: gloo's worker thread still held the last collective's work (the
barrier's, which keeps DDP's last all-reduce) when the main thread had already returned from the barrier and
begun finalizing the interpreter. Dropping that work drops a Python object, so the thread asked for the GIL;
CPython ends a thread that asks during finalization with pthread_exit, which unwinds through gloo's noexcept
destructor, and C++ calls std::terminate. Destroying the group does not stop those threads (DDP's reducer
keeps the gloo backend alive from C++), so a rank that is done writes its result, passes a barrier with its
peers, destroys the group, flushes its output and leaves with os._exit: nothing runs after that to race them.

The store: torchrun's agent hosts it on one node, so it outlives every rank; but it keeps one store across
restarts of the group, so each attempt's keys go under a prefix of their own (`_join_group`), or a restarted
rank reads its dead predecessors' gloo addresses and dials them. Across nodes the restart count is not the
same everywhere (a node whose workers were healthy restarts without counting), so there each rendezvous
round gets a fresh store instead (TORCH_DISABLE_SHARE_RDZV_TCP_STORE), hosted by global rank 0.

The environment, as the executor that started this node sets it (a Kubernetes Indexed Job's pod, a Ray
worker); all unset means one node (`torchrun --standalone`):

    MLGATE_NNODES          how many nodes train together (train.nodes); more than 1 needs the next three
    MLGATE_NODE_RANK       this node's index, 0 to NNODES-1 (Kubernetes: the job completion index); node 0
                           hosts the rendezvous store
    MLGATE_RDZV_ENDPOINT   host:port of node 0's rendezvous store (torchrun --rdzv-endpoint, c10d backend)
    MLGATE_RDZV_ID         the run's id, the same on every node and new for every run (torchrun --rdzv-id)
    MLGATE_MAX_RESTARTS    how often torchrun may restart a group that lost a worker (default 2)
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import traceback
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from automation.errors import MlgateError, UsageError

if TYPE_CHECKING:
    from automation.checkpoint import CheckpointDir, Lineage
    from automation.config import TrainConfig
    from automation.data import Splits
    from automation.device import RunnerDevice
    from automation.train import BuildFn, TrainResult

log = logging.getLogger(__name__)

NNODES_ENV = "MLGATE_NNODES"
NODE_RANK_ENV = "MLGATE_NODE_RANK"
RDZV_ENDPOINT_ENV = "MLGATE_RDZV_ENDPOINT"
RDZV_ID_ENV = "MLGATE_RDZV_ID"
MAX_RESTARTS_ENV = "MLGATE_MAX_RESTARTS"

DEFAULT_MAX_RESTARTS = 2
# nodes of an Indexed Job start minutes apart (image pulls, scheduling): the rendezvous waits that long
RENDEZVOUS_JOIN_SECONDS = 900
# one store read on a loaded machine; torchrun's 60 s default is tight beside a busy test suite
RENDEZVOUS_READ_SECONDS = 300
# the longest a rank waits in a collective for a peer: rank 0 writing (and uploading) a checkpoint keeps the
# others waiting in the next epoch's first all-reduce; a lost peer is torchrun's to notice, not this timeout's
COLLECTIVE_TIMEOUT = timedelta(minutes=30)

SPEC_FILE = "spec.pkl"
RESULT_FILE = "result.pt"
PR_SET_PDEATHSIG = 1   # linux/prctl.h
OUTPUT_TAIL_LINES = 200   # kept of torchrun's output: its root-cause summary is at the end


class DistributedTrainingFailed(MlgateError):
    """torchrun gave up: a rank failed more often than the group may restart."""


@dataclass(frozen=True)
class Rendezvous:
    """How this node meets the others: alone (`--standalone`, a store on a free port in torchrun's agent), or
    one of `nnodes` meeting at node 0's c10d store."""
    nnodes: int = 1
    node_rank: int = 0
    endpoint: str | None = None     # host:port of node 0's store
    run_id: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Rendezvous":
        """The node's rendezvous from the MLGATE_* variables; a missing or malformed one fails before any
        process starts, naming the variable."""
        nnodes = _positive_int(environ, NNODES_ENV, 1)
        if nnodes == 1:
            return cls()
        if not environ.get(NODE_RANK_ENV, "").strip():   # every node would claim to host the store
            raise UsageError(f"{NNODES_ENV} is {nnodes}, so {NODE_RANK_ENV} must say which node this is (0 to "
                             f"{nnodes - 1})")
        node_rank = _positive_int(environ, NODE_RANK_ENV, 0, minimum=0)
        if node_rank >= nnodes:
            raise UsageError(f"{NODE_RANK_ENV} is {node_rank}, but {NNODES_ENV} is {nnodes}",
                             hint=f"node ranks run from 0 to {nnodes - 1}")
        endpoint = environ.get(RDZV_ENDPOINT_ENV, "").strip()
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"{NNODES_ENV} is {nnodes}, so {RDZV_ENDPOINT_ENV} must be host:port of node 0's "
                             f"rendezvous store (got {endpoint or 'nothing'})",
                             hint="the executor that starts the nodes sets it (Kubernetes: <job>-0.<job>:29400)")
        run_id = environ.get(RDZV_ID_ENV, "").strip()
        if not run_id:
            raise UsageError(f"{NNODES_ENV} is {nnodes}, so {RDZV_ID_ENV} must name the run (the same on every node)")
        return cls(nnodes, node_rank, endpoint, run_id)

    def torchrun_args(self) -> list[str]:
        conf = f"join_timeout={RENDEZVOUS_JOIN_SECONDS},read_timeout={RENDEZVOUS_READ_SECONDS}"
        if self.nnodes == 1:
            return ["--standalone", "--nnodes", "1", "--rdzv-conf", conf]
        # is_host said outright: guessing it from the hostname fails while node 0's DNS name is not yet published
        conf += f",is_host={'true' if self.node_rank == 0 else 'false'}"
        return ["--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", str(self.endpoint), "--rdzv-id", str(self.run_id), "--rdzv-conf", conf]


def _positive_int(environ: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    text = environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < minimum:
        raise UsageError(f"{name} must be a whole number of at least {minimum} (got {text!r})")
    return int(text)


def max_restarts(environ: Mapping[str, str] = os.environ) -> int:
    return _positive_int(environ, MAX_RESTARTS_ENV, DEFAULT_MAX_RESTARTS, minimum=0)


@dataclass
class RankSpec:
    """What each rank trains: everything `train_model` was given, and how many threads a rank takes."""
    build: BuildFn
    params: dict[str, Any]
    splits: Splits
    cfg: TrainConfig
    device: RunnerDevice           # the job's, from automation/device.py; a rank takes its own ordinal of it
    backend: str                   # "nccl" on GPUs, "gloo" on CPUs
    threads: int                   # intra-op threads per rank (train.training_threads, shared by the node's ranks)
    checkpoints: CheckpointDir | None
    hopeless_below: float | None
    lineage: Lineage | None


# --- the job's side ------------------------------------------------------------------------------

def launch_training(spec: RankSpec, nproc_per_node: int, rendezvous: Rendezvous | None = None,
                    restarts: int | None = None) -> TrainResult:
    """Train `spec` on `nproc_per_node` processes here (and the other nodes' through `rendezvous`) with
    torchrun; returns the result rank 0 of this node wrote, the model on the CPU."""
    from automation.checkpoint import CheckpointDir

    rendezvous = rendezvous or Rendezvous.from_env()
    restarts = max_restarts() if restarts is None else restarts
    with tempfile.TemporaryDirectory(prefix="mlgate-ddp-") as tmp:   # 0700: the spec is unpickled from here
        folder = Path(tmp)
        if spec.checkpoints is None and restarts > 0:   # a restarted group resumes rather than starts over
            spec = dataclasses.replace(spec, checkpoints=CheckpointDir(folder / "checkpoints"))
        write_spec(folder, spec)
        command = torchrun_command(folder, nproc_per_node, rendezvous, restarts)
        log.info("training on %d processes per node, %d node(s), through torchrun", nproc_per_node,
                 rendezvous.nnodes, extra={"command": " ".join(command), "max_restarts": restarts})
        code, output = _run_torchrun(command, _torchrun_env(spec.threads, rendezvous))
        if code != 0:
            raise DistributedTrainingFailed(_failure(folder, code, output, restarts),
                                            hint="the ranks' own output (in the job's log) says more")
        return read_result(folder, spec)


def torchrun_command(folder: Path, nproc_per_node: int, rendezvous: Rendezvous, restarts: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous.torchrun_args(),
            "--nproc-per-node", str(nproc_per_node), "--max-restarts", str(restarts),
            "--log-dir", str(folder / "logs"),   # each rank's error.json: the failure's root cause
            "-m", __name__, str(folder)]


def write_spec(folder: Path, spec: RankSpec) -> None:
    """Pickled (both sides are the job's own code) with the import path the job has, so a rank imports the
    model's module as the job did. The build function goes by reference (module and name), so it must be
    importable: a function defined inside another cannot be sent."""
    try:
        payload = pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise UsageError(f"cannot send the training to its ranks: {exc}",
                         hint="build() must be a module-level function (or a functools.partial of one) and its "
                              "params plain values") from exc
    with open(folder / SPEC_FILE, "wb") as out:
        pickle.dump({"sys_path": list(sys.path), "spec": payload}, out, protocol=pickle.HIGHEST_PROTOCOL)


def read_result(folder: Path, spec: RankSpec) -> TrainResult:
    import torch

    from automation.train import TrainResult

    path = folder / RESULT_FILE
    if not path.is_file():
        raise DistributedTrainingFailed("torchrun finished, but no rank wrote the training's result")
    saved = torch.load(path, weights_only=False)   # written by our own rank, in our private folder
    model = spec.build(**spec.params)
    model.load_state_dict(saved.pop("state_dict"))
    return TrainResult(model=model.eval(), **saved)


def _torchrun_env(threads: int, rendezvous: Rendezvous) -> dict[str, str]:
    import automation

    env = dict(os.environ)
    if rendezvous.nnodes > 1:   # a fresh store each rendezvous round (see the module's docstring)
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    # torchrun sets OMP_NUM_THREADS=1 for its workers (and says so) unless it is set; the ranks' count is ours
    env["OMP_NUM_THREADS"] = str(threads)
    root = str(Path(automation.__file__).resolve().parents[1])   # where `-m automation.launch` is found
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _run_torchrun(command: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """torchrun's exit code and the last lines it and the ranks printed. Their output goes on to this
    process's stderr as it comes (stdout is the job's own: its last line is the JSON summary). torchrun dies
    with this process: a preempted job exits at once, and its group must not train on unread."""
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace", preexec_fn=_die_with_parent_preexec())
    try:
        for line in process.stdout:   # type: ignore[union-attr]
            sys.stderr.write(line)
            tail.append(line.rstrip("\n"))
        return process.wait(), list(tail)
    except BaseException:   # interrupted here (KeyboardInterrupt): stop the group before going
        process.terminate()
        process.wait()
        raise


def _die_with_parent_preexec() -> Any:
    """A preexec function that makes the child get SIGTERM when this process dies (Linux), resolved before
    the fork so that the child only makes one system call. torchrun forwards SIGTERM to its ranks."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    return preexec


def _failure(folder: Path, code: int, output: list[str], restarts: int) -> str:
    """One line: how each failed rank ended, torchrun's root cause (the first failure it saw) first, and the
    newest Python error a rank recorded."""
    failed = _failed_ranks(output)
    how = ", ".join(f"rank {rank} ended with {_exit_status(exit_code)}" for rank, exit_code in failed) \
        or f"torchrun ended with {_exit_status(code)}"
    error = _rank_error(folder)
    return (f"distributed training failed after {restarts} restart(s) of the group: {how}"
            + (f"; {error}" if error else ""))


def _exit_status(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _failed_ranks(output: list[str]) -> list[tuple[str, int]]:
    """(rank, exit code) of each failure in torchrun's closing summary ("... FAILED", then a block per rank
    with `rank :` and `exitcode :` lines; the "Root Cause" block last), the root cause first."""
    start = max((i for i, line in enumerate(output) if line.rstrip().endswith(" FAILED")), default=None)
    if start is None:
        return []
    others: list[tuple[str, int]] = []
    root: list[tuple[str, int]] = []
    found, rank = others, "?"
    for line in output[start:]:
        key, _, value = line.strip().partition(":")
        if line.startswith("Root Cause"):
            found = root
        elif key.strip() == "rank":
            rank = value.split("(")[0].strip()
        elif key.strip() == "exitcode":
            word = value.split("(")[0].strip()
            if word.lstrip("-").isdigit():
                found.append((rank, int(word)))
    return root + others


def _rank_error(folder: Path) -> str | None:
    """The first line of the Python error a rank recorded (torchrun's error files), the newest attempt's."""
    import json

    for error_file in sorted((folder / "logs").glob("**/error.json"), key=lambda p: p.stat().st_mtime,
                             reverse=True):
        try:
            message = json.loads(error_file.read_text())["message"]
        except (OSError, ValueError, KeyError):
            continue
        text = (message.get("message", "") if isinstance(message, dict) else str(message)).strip()
        if text:
            return text.splitlines()[0][:300]
    return None


# --- a rank's side -------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankEnv:
    """What torchrun tells a rank about itself."""
    rank: int
    world_size: int
    local_rank: int
    restart: int   # how often the group was restarted before this attempt

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "RankEnv":
        missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k not in environ]
        if missing:
            raise UsageError(f"{__name__} runs as a torchrun rank; {', '.join(missing)} not set",
                             hint="train_model() starts it through torchrun")
        return cls(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ["LOCAL_RANK"]),
                   int(environ.get("TORCHELASTIC_RESTART_COUNT", "0")))


def read_spec(folder: Path) -> RankSpec:
    with open(folder / SPEC_FILE, "rb") as source:
        outer = pickle.load(source)
    for entry in reversed(outer["sys_path"]):   # the job's import path, so the model's module imports here too
        if entry not in sys.path:
            sys.path.insert(0, entry)
    spec = pickle.loads(outer["spec"])
    if not isinstance(spec, RankSpec):
        raise TypeError(f"{folder / SPEC_FILE} holds a {type(spec).__name__}, not a RankSpec")
    return spec


def rank_device(job_device: RunnerDevice, local_rank: int) -> RunnerDevice:
    """This rank's device, decided where every device is (automation/device.py), which also sets the float32
    precision in this fresh process: cuda:LOCAL_RANK on a GPU node, the CPU otherwise."""
    import torch

    from automation.config import DeviceConfig
    from automation.device import select_device

    if job_device.is_cuda:
        torch.cuda.set_device(local_rank)   # select_device takes the current device
    return select_device(DeviceConfig(type="cuda" if job_device.is_cuda else "cpu", tf32=job_device.tf32))


def run_rank(folder: Path) -> None:
    """One rank: join the group, train, write the result (LOCAL_RANK 0), leave the group with the others."""
    from automation.train import rank_training

    me = RankEnv.from_env()
    spec = read_spec(folder)
    device = rank_device(spec.device, me.local_rank)
    _join_group(me, spec.backend, device)
    result = rank_training(spec, rank=me.rank, world_size=me.world_size, device=device)
    if me.local_rank == 0:   # every rank holds the same weights; each node's job reads its own copy
        write_result(folder / RESULT_FILE, result, restarts=me.restart)
    _leave_group()


def _join_group(me: RankEnv, backend: str, device: RunnerDevice) -> None:
    """The process group, through torchrun's store. The agent's store (one node) serves every restart of
    the group: this attempt's keys go under a prefix of its own. Otherwise (several nodes) the store is this
    round's own and env:// finds it."""
    import torch.distributed as dist

    # NCCL binds its communicator to the rank's GPU at once; gloo (CPU, or CUDA tensors) takes no device
    options: dict[str, Any] = {"backend": backend, "timeout": COLLECTIVE_TIMEOUT,
                               "device_id": device.torch if backend == "nccl" else None}
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(init_method="env://", **options)
        return
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=RENDEZVOUS_JOIN_SECONDS))
    store = dist.PrefixStore(f"mlgate/attempt-{me.restart}", agent)
    dist.init_process_group(store=store, rank=me.rank, world_size=me.world_size, **options)


def write_result(path: Path, result: TrainResult, restarts: int) -> None:
    import torch

    fields = {k: v for k, v in vars(result).items() if k not in ("model", "seconds")}
    fields["restarts"] = restarts
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": result.model.state_dict(), **fields}, tmp)
    tmp.replace(path)   # whole or absent: a rank killed mid-write leaves no half a result


def _leave_group() -> None:
    """Every rank waits for the others (none closes its connections while a peer still sends), then the
    group goes. Its gloo threads may outlive this (see the module's docstring): the rank leaves by `_exit`."""
    import torch.distributed as dist

    gc.collect()   # DDP and its reducer, unreachable now, go while the group they use still exists
    dist.barrier()
    dist.destroy_process_group()


def _exit(code: int) -> None:
    """Leave without finalizing the interpreter, so no gloo thread can ask for the GIL while it goes (the
    SIGABRT under load). Everything durable is written by now: the result (renamed into place), the error
    file, the checkpoints; output is flushed here."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _die_with_parent() -> None:
    """A rank runs in a session of its own (torchrun's choice): if the agent is killed outright, nothing
    else would stop it training on. Linux only."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() == 1:   # the agent was already gone before the line above
        os._exit(1)


def _log_as_rank() -> None:
    """The job's JSON log lines on stderr, each with the rank that wrote it."""
    from automation.logs import configure_logging

    configure_logging()
    rank = os.environ.get("RANK", "?")

    def add_rank(record: logging.LogRecord) -> bool:
        record.rank = rank
        return True
    for handler in logging.getLogger().handlers:
        handler.addFilter(add_rank)


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit(f"usage: python -m {__name__} FOLDER   (a torchrun rank; train_model() starts it)")
    _die_with_parent()
    _log_as_rank()
    try:
        record(run_rank)(Path(args[0]))   # an exception lands in torchrun's error file: the failure's root cause
    except Exception:
        traceback.print_exc()
        _exit(1)
    _exit(0)


if __name__ == "__main__":
    # through the module by its name: the spec's RankSpec must be automation.launch's, not __main__'s
    from automation.launch import main as rank_main

    rank_main()
