"""Where a job's time goes, and what optimization buys. Not a test: it prints figures.

    .venv/bin/python benchmarks/pipeline.py [--config mlgate.yaml] [--model NAME ...] [--epochs N]

Each model's job runs as `mlgate run --json` in a fresh process and a fresh state folder, so
the wall time includes interpreter start and imports, as a user would see it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def run_job(config: Path, model: str, workdir: Path, epochs: int | None) -> tuple[float, dict]:
    raw = yaml.safe_load(config.read_text())
    raw["workdir"] = str(workdir)
    if epochs:   # a fixed, longer training run: shows how the fixed overhead amortizes
        raw["models"][model]["train"] = {"epochs": epochs, "patience": epochs}
    patched = workdir / "mlgate.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    patched.write_text(yaml.safe_dump(raw))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "triggers.cli", "run", "--config", str(patched), "--model", model,
                           "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 3):
        sys.exit(f"job for {model} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1]}")
    return wall, json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("mlgate.yaml"))
    parser.add_argument("--model", action="append")
    parser.add_argument("--epochs", type=int, help="train exactly this many epochs (no early stop)")
    args = parser.parse_args()
    models = args.model or list(yaml.safe_load(args.config.read_text())["models"])
    with tempfile.TemporaryDirectory(prefix="mlgate-bench-") as tmp:
        for model in models:
            wall, summary = run_job(args.config, model, Path(tmp) / model, args.epochs)
            stages = summary["timings"]
            accounted = sum(stages.values())
            startup = wall - accounted
            train = stages["train"]
            print(f"\n== {model}: job wall time {wall:.2f} s "
                  f"(epochs run: {len(summary['training']['history'])}, device {summary['training']['device']})")
            for name, seconds in [("startup+imports", startup), *stages.items()]:
                print(f"  {name:<16} {seconds:7.2f} s  {seconds / wall:6.1%}")
            print(f"  outside training: {wall - train:.2f} s = {(wall - train) / wall:.1%} of wall time")
            variants = [v for v in summary["variants"] if not v["skipped"]]
            eager = next(v for v in variants if v["name"] == "torch_eager")["latency"]["1"]["p50_ms"]
            print(f"  {'variant':<14} {'p50 b1 ms':>10} {'speedup':>8} {'accuracy':>9}")
            for v in variants:
                p50 = v["latency"]["1"]["p50_ms"]
                mark = "  <- chosen" if v["name"] == summary["chosen_variant"] else ""
                print(f"  {v['name']:<14} {p50:10.4f} {eager / p50:7.2f}× {v['accuracy']:9.2%}{mark}")
            for v in summary["variants"]:
                if v["skipped"]:
                    print(f"  {v['name']:<14} skipped: {v['skipped']}")


if __name__ == "__main__":
    main()
