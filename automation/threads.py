"""The thread policy, for jobs and for serving, decided here and nowhere else.

- **CPUs this process may use**: the smaller of its CPU affinity and its cgroup CPU quota (v2 `cpu.max`, v1
  `cpu.cfs_quota_us / cpu.cfs_period_us`), never the host's core count: a pod limited to 2 CPUs on a 64-core
  node that started 64 threads per session would spend its quota on waking them.
- **Training**: intra-op threads = `train.threads`; else `OMP_NUM_THREADS` where the runner set it (a shared
  machine's deliberate share); else the usable CPUs, at most MAX_DERIVED_THREADS. Shared by the node's ranks.
  The count decides how float sums are split, so it is recorded: same count, same weights.
- **Benchmarking**: the training default (a variant is timed as a job's runner would run it alone).
- **Serving**: one intra-op thread per session; concurrent requests run side by side on the inference
  threads, one per usable CPU (a tiny batch loses more to waking intra-op threads than it gains).
- **Everywhere**: inter-op threads 1 (the zoo's graphs are chains); OpenMP's idle threads wait passively
  (`OMP_WAIT_POLICY=PASSIVE`, set before torch loads; a runner's own setting stands): spinning threads
  fought each other for the 2 cores of a shared runner, one job step took 22 s against 4.2 s passive.

The numbers go into the job's summary and report (`describe`), so a timing can be read with them.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MAX_DERIVED_THREADS = 8   # past this, a small model's steps gain little and each added thread reorders sums
CGROUP = Path("/sys/fs/cgroup")


def wait_passively() -> None:
    """OpenMP's idle threads sleep instead of spinning: must run before torch (libgomp) loads."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def affinity_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def quota_cpus(root: Path = CGROUP) -> float | None:
    """The cgroup's CPU quota in CPUs (e.g. 1.5), or None where there is none (or no cgroup to read)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]        # v2: "max 100000" or "150000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())   # v1: -1 means no quota
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def usable_cpus(root: Path = CGROUP) -> int:
    """CPUs this process may use: affinity, lowered to the cgroup quota (rounded up: 1.5 CPUs keep 2 busy)."""
    cpus = affinity_cpus()
    quota = quota_cpus(root)
    if quota is not None:
        cpus = min(cpus, max(1, -(-quota // 1)))
    return max(1, int(cpus))


def _runner_share() -> int | None:
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return int(omp) if omp.isdigit() and int(omp) > 0 else None


@dataclass(frozen=True)
class ThreadPolicy:
    cpus: int                    # usable by this process
    train: int                   # intra-op threads per training process (before sharing among ranks)
    benchmark: int               # intra-op threads while variants are timed
    serve_intra_op: int          # per ONNX Runtime / torch call in serve-model
    serve_workers: int           # inference threads running calls side by side
    inter_op: int
    omp_wait_policy: str

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        return (f"{self.cpus} usable CPU(s); intra-op threads: training {self.train}, benchmark {self.benchmark}, "
                f"serving {self.serve_intra_op} × {self.serve_workers} inference threads; inter-op {self.inter_op}; "
                f"OpenMP waits {self.omp_wait_policy.lower()}")


def policy(train_threads: int | None = None, root: Path = CGROUP) -> ThreadPolicy:
    """The policy for this process; `train_threads`: the model's `train.threads`, when set."""
    cpus = usable_cpus(root)
    derived = _runner_share() or min(cpus, MAX_DERIVED_THREADS)
    return ThreadPolicy(cpus=cpus, train=train_threads or derived, benchmark=derived, serve_intra_op=1,
                        serve_workers=min(MAX_DERIVED_THREADS, cpus), inter_op=1,
                        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default").upper())


def set_torch_inter_op(threads: int = 1) -> None:
    """Torch's inter-op pool, once per process (torch refuses a second setting once work has run)."""
    import torch

    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:   # already set, or parallel work already ran: the first setting stands
        pass


def ort_session_options(options: Any, intra_op: int | None, inter_op: int = 1) -> Any:
    """An ONNX Runtime SessionOptions with the policy's threads (intra-op None: the policy's benchmark count)."""
    options.intra_op_num_threads = intra_op if intra_op is not None else policy().benchmark
    options.inter_op_num_threads = inter_op
    return options
