"""Does two-process CPU training (DDP over gloo) finish every time on a loaded machine? Not a test: it prints
a table.

    .venv/bin/python benchmarks/gloo_stability.py [--runs 20] [--busy 2] [--epochs 6] [--against REV]

Each run is what tests/test_train.py::test_ddp_on_two_cpu_processes_with_gloo does (train_model with
world_size=2 and backend="gloo" on the digits MLP, 6 epochs), in a fresh process, while `--busy` processes
spin on the CPUs the whole time. A run fails when that process does not end with exit code 0: the table
gives its exit code or signal and the last line it printed (for a rank's abort, how the launcher reported it).
Fewer `--epochs` give more starts and teardowns (where ranks aborted) per minute.

With `--against REV` (a commit, tag or branch), the runs use the `automation` and `models` packages at REV,
extracted with `git archive` into a temporary folder (the repository and its working tree are not touched):
the figure before a change, on the same machine and load.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_SECONDS = 600

# the test's own call, in a process of its own (a __main__ guard: the code at an older commit spawns)
PROBE = """
from automation.config import TrainConfig
from automation.train import train_model
from models import digits_mlp
from models.datasets import digits

if __name__ == "__main__":
    import sys

    result = train_model(digits_mlp.build, {"hidden": 32}, digits(seed=0), TrainConfig(epochs=int(sys.argv[1]),
                         lr=3e-3), world_size=2, backend="gloo")
    if result.world_size != 2 or len(result.history) == 0:
        raise SystemExit(f"unexpected result: world size {result.world_size}, {len(result.history)} epochs")
"""

BUSY = "while True: pass"


@dataclass
class Run:
    number: int
    code: int            # the probe's exit code; negative: the signal that ended it
    seconds: float
    last_line: str

    @property
    def passed(self) -> bool:
        return self.code == 0

    @property
    def ending(self) -> str:
        if self.code >= 0:
            return f"exit code {self.code}"
        try:
            return f"signal {signal.Signals(-self.code).name}"
        except ValueError:
            return f"signal {-self.code}"


def extract(rev: str, into: Path) -> Path:
    """The packages a run imports, as they are at `rev`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "automation", "models"],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def start_busy(count: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(count)]


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.kill()
    for process in processes:
        process.wait()


def probe(number: int, code_root: Path, epochs: int) -> Run:
    env = {**os.environ, "PYTHONPATH": str(code_root)}   # that tree's automation, not the installed one
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", PROBE, str(epochs)], cwd=code_root, env=env,
                              capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired:
        code, output = 124, f"timed out after {RUN_TIMEOUT_SECONDS} s"
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return Run(number, code, time.perf_counter() - started, lines[-1][:160] if lines else "")


def report(runs: list[Run], busy: int, epochs: int, label: str) -> None:
    passed = [r for r in runs if r.passed]
    seconds = [r.seconds for r in runs]
    print(f"\n{label}: {len(runs)} runs of {epochs} epochs beside {busy} busy processes on {os.cpu_count()} CPUs")
    print(f"{'run':>4}  {'result':<8}  {'seconds':>8}  ending")
    for run in runs:
        detail = "" if run.passed else f"  {run.last_line}"
        print(f"{run.number:>4}  {'passed' if run.passed else 'FAILED':<8}  {run.seconds:>8.1f}  {run.ending}{detail}")
    print(f"runs {len(runs)}, passed {len(passed)}, failed {len(runs) - len(passed)}; seconds per run: "
          f"median {statistics.median(seconds):.1f}, min {min(seconds):.1f}, max {max(seconds):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="training runs (default 20)")
    parser.add_argument("--busy", type=int, default=2, help="processes spinning on the CPUs meanwhile (default 2)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run (default 6, as the test)")
    parser.add_argument("--against", metavar="REV", help="run the code at this commit instead of the working tree")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlgate-gloo-") as tmp:
        code_root = extract(args.against, Path(tmp)) if args.against else ROOT
        label = f"code at {args.against}" if args.against else "working tree"
        busy = start_busy(args.busy)
        runs: list[Run] = []
        try:
            for number in range(1, args.runs + 1):
                runs.append(probe(number, code_root, args.epochs))
                last = runs[-1]
                print(f"run {number}: {'passed' if last.passed else 'FAILED'} in {last.seconds:.1f} s "
                      f"({last.ending})", flush=True)
        finally:
            stop(busy)
        report(runs, args.busy, args.epochs, label)


if __name__ == "__main__":
    main()
