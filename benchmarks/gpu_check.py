"""The GPU check: the example jobs twice (the second against production), then the `gpu` tests.

The examples: digits (MLP, CNN), the Fashion-MNIST ResNet (batch 256 is where the GPU variants should beat
eager by a clear ratio) and the BBC News Transformer. On a GPU their full configs run (`on_cpu` is not
applied). Fashion-MNIST comes from Debian's dataset-fashion-mnist: a machine without it reports the job
as failed with the command that installs it (or set MLGATE_DATA_CACHE to a folder holding the IDX files'
.npy cache).

Run on a CUDA machine with no network:  make gpu-check   (or: python benchmarks/gpu_check.py)
It prints the variant table (p50/p95/p99 at batch 1 and at the largest batch, speedup over eager,
build seconds, peak memory, accuracy) and the stage timings of every job, and exits non-zero when
a job or a test fails. With $OUT set (a lent device machine), the tables and logs are written there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from automation.report import MEMORY_KINDS  # noqa: E402   (the report's memory labels)


def _run_job(config: Path, model: str, sha: str, log: Path) -> tuple[int, dict[str, Any] | None, float]:
    started = time.perf_counter()
    with log.open("a") as sink:
        done = subprocess.run([sys.executable, "-m", "triggers.cli", "run", "--config", str(config), "--model", model,
                               "--trigger", "push", "--sha", sha, "--json"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=sink, text=True)
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    return done.returncode, summary, time.perf_counter() - started


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def variant_table(summary: dict[str, Any]) -> list[str]:
    batches = sorted({int(b) for v in summary["variants"] for b in v["latency"]})
    large = str(batches[-1]) if batches else "1"
    eager = next((v for v in summary["variants"] if v["name"] == "torch_eager"), None)
    rows = [f"| variant | device | precision | build s | accuracy | p50/p95/p99 b1 (ms) | p50/p95/p99 b{large} (ms) "
            f"| speedup b1 / b{large} | memory MB | |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for v in summary["variants"]:
        build = "—" if v["build_seconds"] is None else f"{v['build_seconds']:.1f}"
        if v["skipped"]:
            rows.append(f"| {v['name']} | {v['device']} | {v['precision']} | {build} | — | — | — | — | — | "
                        f"skipped: {v['skipped']} |")
            continue
        b1, bl = v["latency"]["1"], v["latency"][large]
        speed = "—"
        if eager and eager["latency"]:
            speed = (f"{eager['latency']['1']['p50_ms'] / b1['p50_ms']:.2f}× / "
                     f"{eager['latency'][large]['p50_ms'] / bl['p50_ms']:.2f}×")
        memory = "—" if v["memory_mb"] is None else f"{v['memory_mb']:.1f} {MEMORY_KINDS.get(v['memory_kind'], '')}"
        chosen = "**chosen**" if v["name"] == summary["chosen_variant"] else ""
        rows.append(f"| {v['name']} | {v['device']} | {v['precision']} | {build} | {v['accuracy']:.2%} | "
                    f"{_ms(b1['p50_ms'])}/{_ms(b1['p95_ms'])}/{_ms(b1['p99_ms'])} | "
                    f"{_ms(bl['p50_ms'])}/{_ms(bl['p95_ms'])}/{_ms(bl['p99_ms'])} | {speed} | {memory} | {chosen} |")
    return rows


def job_section(model: str, run: int, code: int, seconds: float, summary: dict[str, Any] | None) -> list[str]:
    lines = [f"### {model}, run {run}: exit {code} in {seconds:.0f} s"]
    if summary is None:
        return lines + ["(no summary: see the job log)", ""]
    production = summary.get("production")
    versus = (f"against production v{production['version']} ({production['variant']}, served as "
              f"{production['served_as']})" if production else "nothing in production yet")
    gate = "passed" if summary["gate"]["passed"] else "FAILED"
    lines += [f"gate {gate}, {versus}; chosen `{summary['chosen_variant']}`; promoted: {summary['promoted']}",
              f"training: {summary['training']['device']}, {summary['training']['precision']}, "
              f"{summary['training']['seconds']:.1f} s, {len(summary['training']['history'])} epochs"]
    if summary.get("cross_device"):
        c = summary["cross_device"]
        lines.append(f"cross-device (torch on the GPU vs on the CPU): max |Δlogit| {c['max_abs_diff']:.2e}, "
                     f"argmax agreement {c['argmax_agreement']:.2%} (informational)")
    served = summary.get("served_path")
    if served:   # a text model: every variant was timed with its tokenizer; the network alone beside it
        lines.append("served path (tokenizer included), chosen variant p50 ms: " + ", ".join(
            f"b{b} {s['p50_ms']:.3f} (network alone {served['network_alone'][b]['p50_ms']:.3f})"
            for b, s in served["latency"].items() if b in served["network_alone"]))
    cost = summary.get("cost") or {}
    gpu = cost.get("gpu")
    if gpu:
        joules = gpu.get("energy_joules")
        energy = "not counted by the driver" if joules is None else f"{joules / 1000:.2f} kJ"
        lines.append(f"cost: {gpu['seconds']:.1f} GPU-seconds, energy {energy}, peak memory "
                     f"{gpu.get('peak_memory_mb')} MB on {gpu.get('device')}")
    else:
        lines.append(f"cost: no GPU metered ({cost.get('gpu_absent', 'no cost section')})")
    lines += ["stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["timings"].items()), "",
              *variant_table(summary), ""]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "mlgate.yaml"))
    parser.add_argument("--models", nargs="*", default=["digits_cnn", "digits_mlp", "fashion_resnet",
                                                         "news_transformer"])
    parser.add_argument("--skip-tests", action="store_true", help="jobs only, no `pytest -m gpu`")
    parser.add_argument("--allow-cpu", action="store_true", help="run anyway without CUDA (to try the script)")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="mlgate-gpu-check-"))
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu-check: no CUDA device is visible; nothing to check here")
        return 2
    import onnxruntime

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA)"
    header = [f"# mlgate GPU check: {device}",
              f"torch {torch.__version__} (CUDA {torch.version.cuda}), onnxruntime {onnxruntime.__version__} "
              f"{onnxruntime.get_available_providers()}, Python {sys.version.split()[0]}", ""]
    report = out / "gpu_check.md"
    report.write_text("\n".join(header) + "\n")
    print("\n".join(header), flush=True)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="mlgate-gpu-") as tmp:
        config = Path(tmp) / "mlgate.yaml"   # a fresh registry: run 1 promotes, run 2 faces production
        config.write_text(Path(args.config).read_text().replace("workdir: .mlgate", f"workdir: {tmp}/state"))
        for run, sha in ((1, "gpucheck1"), (2, "gpucheck2")):
            for model in args.models:
                code, summary, seconds = _run_job(config, model, sha, out / "jobs.log")
                failed += code not in (0, 3)
                section = job_section(model, run, code, seconds, summary)
                print("\n".join(section), flush=True)
                with report.open("a") as sink:
                    sink.write("\n".join(section) + "\n")
    if not args.skip_tests:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                "-W", "ignore"], cwd=ROOT)
        failed += tests.returncode != 0
    print(f"gpu-check: {'FAILED' if failed else 'passed'}; tables in {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
