"""Where a job's time goes, and what optimization buys. Not a test: it prints figures.

    .venv/bin/python benchmarks/pipeline.py [--config mlgate.yaml] [--model NAME ...] [--epochs N] [--against REV]
                                            [--stock-timing]

Each model's job runs as `mlgate run --json` in a fresh process and a fresh state folder, so
the wall time includes interpreter start and imports, as a user would see it. "Outside training"
is the wall time minus the train stage: what the job costs beyond the model's own training.

With `--against REV` (a commit, tag or branch) each job also runs on the code at REV, extracted
with `git archive` into a temporary folder (the repository and its working tree are not touched),
on the same config; the two runs of a model go back to back, so machine load hits both alike.

With `--stock-timing` the config's `optimize` and `benchmark` blocks are dropped (from `defaults:`, the
model and its `on_cpu`), so the job builds and times variants as mlgate's defaults do: every variant,
batch sizes 1, 32 and 256. "Benchmarking" is the benchmark stage: evaluating and timing the variants
(the optimize stage builds them, and probes them before the benchmark).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


TIMING_BLOCKS = ("optimize", "benchmark")


def stock_timing(raw: dict, model: str) -> dict:
    """The config with no optimize or benchmark block for `model` anywhere: mlgate's defaults decide both."""
    block = raw["models"][model]
    for holder in (raw.get("defaults") or {}, block, block.get("on_cpu") or {}):
        for key in TIMING_BLOCKS:
            holder.pop(key, None)
    return raw


def run_job(config: Path, model: str, workdir: Path, epochs: int | None, code: Path = ROOT,
            stock: bool = False) -> tuple[float, dict]:
    raw = yaml.safe_load(config.read_text())
    raw["workdir"] = str(workdir)
    if stock:
        raw = stock_timing(raw, model)
    if epochs:   # a fixed, longer training run: shows how the fixed overhead amortizes
        raw["models"][model]["train"] = {"epochs": epochs, "patience": epochs}
    patched = workdir / "mlgate.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    patched.write_text(yaml.safe_dump(raw))
    start = time.perf_counter()
    # cwd decides which code runs: `-m` puts it first on sys.path (models/ too, for the config's modules)
    done = subprocess.run([sys.executable, "-m", "triggers.cli", "run", "--config", str(patched), "--model", model,
                           "--json"], capture_output=True, text=True, cwd=code)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 3):
        sys.exit(f"job for {model} at {code} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1]}")
    return wall, json.loads(done.stdout.strip().splitlines()[-1])


def checkout(rev: str, into: Path) -> Path:
    """The tree at `rev`, as files, without touching the repository's working tree or index."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev], capture_output=True,
                             check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def outside_training(wall: float, summary: dict) -> float:
    return wall - summary["timings"].get("train", 0.0)


def print_job(label: str, model: str, wall: float, summary: dict) -> None:
    stages = summary["timings"]
    startup = wall - sum(stages.values())
    print(f"\n== {model} [{label}]: job wall time {wall:.2f} s "
          f"(epochs run: {len(summary['training']['history'])}, device {summary['training']['device']})")
    for name, seconds in [("startup+imports", startup), *stages.items()]:
        print(f"  {name:<16} {seconds:7.2f} s  {seconds / wall:6.1%}")
    outside = outside_training(wall, summary)
    print(f"  outside training: {outside:.2f} s = {outside / wall:.1%} of wall time")
    bench = stages.get("benchmark", 0.0)
    print(f"  benchmarking: {bench:.2f} s = {bench / wall:.1%} of wall time "
          f"(with the optimize stage's builds and probe: {(bench + stages.get('optimize', 0.0)) / wall:.1%})")
    variants = [v for v in summary["variants"] if not v["skipped"]]
    eager = next(v for v in variants if v["name"] == "torch_eager")["latency"]["1"]["p50_ms"]
    sizes = sorted({b for v in variants for b in v["latency"]}, key=int)
    columns = " ".join(f"{'p50 b' + b + ' ms':>12}" for b in sizes)
    print(f"  {'variant':<14} {'build s':>8} {columns} {'speedup b1':>10} {'accuracy':>9}")
    for v in variants:
        cells = " ".join(f"{v['latency'][b]['p50_ms']:12.4f}" if b in v["latency"] else f"{'-':>12}" for b in sizes)
        mark = "  <- chosen" if v["name"] == summary["chosen_variant"] else ""
        cached = " (cached)" if v.get("cached") else ""
        print(f"  {v['name']:<14} {v['build_seconds'] or 0:8.2f} {cells} "
              f"{eager / v['latency']['1']['p50_ms']:9.2f}× {v['accuracy']:9.2%}{mark}{cached}")
    for v in summary["variants"]:
        if v["skipped"]:
            print(f"  {v['name']:<14} skipped: {v['skipped']}")
    timing = {b: c for v in variants for b, c in v["latency"].items() if "rounds" in c}
    if timing:
        print("  timing rounds: " + ", ".join(
            f"b{b} {c['rounds']}/{c['max_rounds']}{' (stopped early)' if c['stopped_early'] else ''}"
            for b, c in sorted(timing.items(), key=lambda kv: int(kv[0]))))


def print_comparison(model: str, rev: str, before: tuple[float, dict], after: tuple[float, dict]) -> None:
    (wall_b, sum_b), (wall_a, sum_a) = before, after
    names = list(dict.fromkeys([*sum_b["timings"], *sum_a["timings"]]))
    print(f"\n== {model}: {rev} -> working tree (seconds)")
    print(f"  {'stage':<18} {rev[:12]:>12} {'now':>9}")
    for name in names:
        print(f"  {name:<18} {sum_b['timings'].get(name, 0):12.2f} {sum_a['timings'].get(name, 0):9.2f}")
    rows = [("job wall time", wall_b, wall_a),
            ("outside training", outside_training(wall_b, sum_b), outside_training(wall_a, sum_a))]
    for label, b, a in rows:
        print(f"  {label:<18} {b:12.2f} {a:9.2f}")
    share_b, share_a = (s["timings"].get("benchmark", 0.0) / w for w, s in ((wall_b, sum_b), (wall_a, sum_a)))
    print(f"  {'benchmark share':<18} {share_b:12.1%} {share_a:9.1%}")
    print(f"  chosen variant     {sum_b['chosen_variant']:>12} {sum_a['chosen_variant']:>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("mlgate.yaml"))
    parser.add_argument("--model", action="append")
    parser.add_argument("--epochs", type=int, help="train exactly this many epochs (no early stop)")
    parser.add_argument("--against", metavar="REV", help="also run each job on the code at this git revision")
    parser.add_argument("--stock-timing", action="store_true",
                        help="drop the config's optimize and benchmark blocks: time variants as mlgate's defaults do")
    args = parser.parse_args()
    config = args.config.resolve()
    models = args.model or list(yaml.safe_load(config.read_text())["models"])
    with tempfile.TemporaryDirectory(prefix="mlgate-bench-") as tmp:
        old_code = checkout(args.against, Path(tmp) / "code") if args.against else None
        results = []
        for model in models:
            before = None
            if old_code is not None:
                before = run_job(config, model, Path(tmp) / "before" / model, args.epochs, old_code,
                                 args.stock_timing)
                print_job(args.against, model, *before)
            after = run_job(config, model, Path(tmp) / "after" / model, args.epochs, stock=args.stock_timing)
            print_job("working tree", model, *after)
            results.append((model, before, after))
        if args.against:
            for model, before, after in results:
                print_comparison(model, args.against, before, after)


if __name__ == "__main__":
    main()
