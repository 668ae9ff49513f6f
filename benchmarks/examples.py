"""The real examples, measured. Not a test: it prints figures.

    .venv/bin/python benchmarks/examples.py [--config mlgate.yaml] [--windows 20] [--models fashion_resnet ...]

For each example (the config this runner would run: `on_cpu` on a CPU), the job as a user runs it (`mlgate run
--json`, a fresh process and state folder): accuracy, wall time, the share outside training, and the peak
resident memory of the job's process tree, overall and per stage. For the Fashion-MNIST ResNet also:
- training throughput (examples/s) of the job's train stage against a plain PyTorch loop on the same
  model, data, batch size, epochs and device, run in this process right after;
- drift on embeddings with the version the job registered: the false-alarm rate over `--windows`
  unshifted windows of Fashion-MNIST test images the reference never saw, and the ROC AUC on rotated
  and brightened windows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXAMPLES = ("fashion_resnet", "news_transformer")
SAMPLE_SECONDS = 0.05


class TreeMemory:
    """Resident memory of a job's process tree, sampled every SAMPLE_SECONDS, and its peak overall and per stage
    (the job logs "stage started" on stderr; "startup" before the first). The job counts its resident set, a
    child only its unique pages: what it shares with the job since it was forked is counted once (a child
    caught between fork and exec would otherwise read as a second job)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.stage = "startup"
        self.peak_mb = 0.0
        self.by_stage: dict[str, float] = {}
        self.stop = threading.Event()

    def watch(self) -> None:
        import psutil

        try:
            job = psutil.Process(self.pid)
            while not self.stop.is_set():
                self._record(job.memory_info().rss + sum(_unique_bytes(c) for c in job.children(recursive=True)))
                time.sleep(SAMPLE_SECONDS)
        except psutil.Error:   # the job ended between two samples
            pass

    def _record(self, total: int) -> None:
        mb = total / 2**20
        self.peak_mb = max(self.peak_mb, mb)
        self.by_stage[self.stage] = max(self.by_stage.get(self.stage, 0.0), mb)

    def follow(self, stderr: Any, tail: list[str]) -> None:
        """Read the job's log lines as they come: the stage running, and the last lines (a failed job's why)."""
        for line in stderr:
            tail[:] = [*tail[-19:], line.rstrip()]
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("msg") == "stage started":
                self.stage = str(entry.get("stage"))


def _unique_bytes(process: Any) -> int:
    import psutil

    try:
        return process.memory_full_info().uss
    except psutil.Error:   # gone, or not ours to read
        return 0


def run_job(config: Path, model: str, workdir: Path) -> tuple[dict, float, TreeMemory]:
    raw = yaml.safe_load(config.read_text())
    raw["workdir"] = str(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    patched = workdir / "mlgate.yaml"
    patched.write_text(yaml.safe_dump(raw))
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "triggers.cli", "--config", str(patched), "run", "--model",
                                model, "--json"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    memory, tail = TreeMemory(process.pid), []
    threads = [threading.Thread(target=memory.watch), threading.Thread(target=memory.follow,
                                                                        args=(process.stderr, tail))]
    for thread in threads:
        thread.start()
    stdout = process.stdout.read()
    process.wait()
    memory.stop.set()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    lines = stdout.strip().splitlines()
    if not lines:
        raise SystemExit(f"{model}: the job printed no summary (exit {process.returncode}):\n" + "\n".join(tail))
    return json.loads(lines[-1]), wall, memory


def plain_loop(spec, runner) -> float:
    """The same model, data, batch size, epochs and device, as a user would write it: examples/s."""
    import torch
    from torch import nn

    from automation import contract
    from models import fashion_resnet

    torch.manual_seed(spec.train.seed)
    splits = contract.prepare_data("fashion_resnet", fashion_resnet, fashion_resnet.load_data(**spec.data), spec.split)
    step = contract.fit_preprocess("fashion_resnet", fashion_resnet, splits.x_train)
    model = contract.model_builder(fashion_resnet.build, splits, step)(**spec.params).to(runner.torch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.train.lr, weight_decay=spec.train.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    x, y = splits.x_train, torch.from_numpy(splits.y_train)

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(y)

        def __getitems__(self, rows: list[int]):
            return torch.from_numpy(np.asarray(x[np.asarray(rows)])), y[rows]

    loader = torch.utils.data.DataLoader(Rows(), batch_size=spec.train.batch_size, shuffle=True,
                                         collate_fn=lambda b: b, num_workers=spec.train.loader_workers)
    seen, start = 0, time.perf_counter()
    for _ in range(spec.train.epochs):
        model.train()
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb.to(runner.torch)), yb.to(runner.torch))
            loss.backward()
            optimizer.step()
            seen += len(yb)
        model.eval()
        with torch.no_grad():   # the job validates every epoch: so does the plain loop
            model(torch.from_numpy(np.asarray(splits.x_val)).to(runner.torch)).argmax(1)
    runner.synchronize()
    return seen / (time.perf_counter() - start)


def drift_figures(summary: dict, workdir: Path, windows: int) -> dict:
    import mlflow.pytorch

    from automation.config import load_config
    from automation.embeddings import embed
    from models.datasets import fashion_mnist
    from triggers.drift.monitor import load_reference
    from triggers.drift.embeddings import EMBEDDING_AUC_THRESHOLD, embedding_drift_score

    reference = load_reference(load_config(workdir / "mlgate.yaml"), "fashion_resnet")
    model = mlflow.pytorch.load_model(reference.torch_uri, map_location="cpu")
    spec_data = summary["contract"]
    every = fashion_mnist().x_test                       # 10,000; the job's test subset is a stratified part
    rng = np.random.default_rng(1)
    size = 500
    pool = every[rng.permutation(len(every))[: windows * size]]
    scores = [embedding_drift_score(reference.embeddings, embed(model, pool[i * size:(i + 1) * size]))
              for i in range(windows)]
    sample = pool[:size]
    shifted = {"rotated 90°": np.rot90(sample, 1, axes=(1, 2)).copy(),
               "brightened +60": np.clip(sample.astype(np.int16) + 60, 0, 255).astype(np.uint8)}
    return {"windows": windows, "window_rows": size, "reference_rows": int(len(reference.embeddings)),
            "false_alarms": int(sum(s > EMBEDDING_AUC_THRESHOLD for s in scores)),
            "unshifted_auc_max": round(max(scores), 3), "unshifted_auc_median": round(float(np.median(scores)), 3),
            "shifted_auc": {k: round(embedding_drift_score(reference.embeddings, embed(model, v)), 3)
                            for k, v in shifted.items()},
            "note": "the job's test subset overlaps the windows' pool" if spec_data["test_examples"] < 10_000 else ""}


def job_figures(summary: dict, wall: float, memory: TreeMemory) -> dict:
    train = summary["timings"]["train"]
    return {"device": summary["environment"]["device_name"], "config_profile": summary["config_profile"],
            "accuracy": round(summary["metrics"]["accuracy"], 4), "test_examples": summary["contract"]["test_examples"],
            "gate_passed": summary["gate"]["passed"], "job_wall_s": round(wall, 1), "train_stage_s": round(train, 1),
            "outside_training_share": round(1 - train / wall, 3), "peak_rss_mb": round(memory.peak_mb),
            "peak_rss_mb_by_stage": {stage: round(mb) for stage, mb in memory.by_stage.items()},
            "chosen_variant": summary["chosen_variant"],
            "latency_ms_p50": {v["name"]: {b: round(s["p50_ms"], 3) for b, s in v["latency"].items()}
                               for v in summary["variants"] if v["latency"]},
            "stages_s": {k: round(v, 1) for k, v in summary["timings"].items()}}


def fashion_extras(summary: dict, config: Path, workdir: Path, windows: int) -> dict:
    """Training throughput against a plain loop, and drift on embeddings, for the Fashion-MNIST ResNet."""
    from automation.config import load_config
    from automation.device import select_device

    spec = load_config(config).model("fashion_resnet")
    runner = select_device(spec.device)
    spec = spec if runner.is_cuda else spec.for_cpu()
    trained_examples = spec.data.get("train_examples") or 55_000
    epochs = len(summary["training"]["history"])
    job_rate = trained_examples * epochs / summary["training"]["seconds"]
    plain = plain_loop(spec.model_copy(update={"train": spec.train.model_copy(update={"epochs": epochs})}), runner)
    return {"train_examples_per_s": {"job": round(job_rate), "plain_loop": round(plain),
                                     "job_vs_plain": round(job_rate / plain, 3)},
            "drift": drift_figures(summary, workdir, windows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "mlgate.yaml"))
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--models", nargs="+", choices=EXAMPLES, default=list(EXAMPLES))
    args = parser.parse_args()
    figures = {}
    for model in args.models:
        with tempfile.TemporaryDirectory(prefix="mlgate-examples-") as tmp:
            summary, wall, memory = run_job(Path(args.config), model, Path(tmp))
            figures[model] = job_figures(summary, wall, memory)
            if model == "fashion_resnet":
                figures[model] |= fashion_extras(summary, Path(args.config), Path(tmp), args.windows)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
