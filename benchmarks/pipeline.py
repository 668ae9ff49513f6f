"""Where a job's time goes, and what optimization buys. Not a test: it prints figures.

    .venv/bin/python benchmarks/pipeline.py [--config mlgate.yaml] [--model NAME ...] [--epochs N] [--against REV]

Each model's job runs as `mlgate run --json` in a fresh process and a fresh state folder, so
the wall time includes interpreter start and imports, as a user would see it. "Outside training"
is the wall time minus the train stage: what the job costs beyond the model's own training.

With `--against REV` (a commit, tag or branch) each job also runs on the code at REV, extracted
with `git archive` into a temporary folder (the repository and its working tree are not touched),
on the same config; the two runs of a model go back to back, so machine load hits both alike.
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


def run_job(config: Path, model: str, workdir: Path, epochs: int | None, code: Path = ROOT) -> tuple[float, dict]:
    raw = yaml.safe_load(config.read_text())
    raw["workdir"] = str(workdir)
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
    variants = [v for v in summary["variants"] if not v["skipped"]]
    eager = next(v for v in variants if v["name"] == "torch_eager")["latency"]["1"]["p50_ms"]
    print(f"  {'variant':<14} {'build s':>8} {'p50 b1 ms':>10} {'speedup':>8} {'accuracy':>9}")
    for v in variants:
        p50 = v["latency"]["1"]["p50_ms"]
        mark = "  <- chosen" if v["name"] == summary["chosen_variant"] else ""
        cached = " (cached)" if v.get("cached") else ""
        print(f"  {v['name']:<14} {v['build_seconds'] or 0:8.2f} {p50:10.4f} {eager / p50:7.2f}× "
              f"{v['accuracy']:9.2%}{mark}{cached}")
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
    print(f"  chosen variant     {sum_b['chosen_variant']:>12} {sum_a['chosen_variant']:>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("mlgate.yaml"))
    parser.add_argument("--model", action="append")
    parser.add_argument("--epochs", type=int, help="train exactly this many epochs (no early stop)")
    parser.add_argument("--against", metavar="REV", help="also run each job on the code at this git revision")
    args = parser.parse_args()
    config = args.config.resolve()
    models = args.model or list(yaml.safe_load(config.read_text())["models"])
    with tempfile.TemporaryDirectory(prefix="mlgate-bench-") as tmp:
        old_code = checkout(args.against, Path(tmp) / "code") if args.against else None
        results = []
        for model in models:
            before = None
            if old_code is not None:
                before = run_job(config, model, Path(tmp) / "before" / model, args.epochs, old_code)
                print_job(args.against, model, *before)
            after = run_job(config, model, Path(tmp) / "after" / model, args.epochs)
            print_job("working tree", model, *after)
            results.append((model, before, after))
        if args.against:
            for model, before, after in results:
                print_comparison(model, args.against, before, after)


if __name__ == "__main__":
    main()
