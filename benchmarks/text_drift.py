"""Text drift on BBC News: the monitor's false-alarm rate on unshifted windows, and what real shifts score
(a script, not a test).

The news_transformer job (its `on_cpu` config on a machine without CUDA) runs with 30 % of the articles left out
of every split (`data: {unseen_fraction: 0.3}`, stratified): news from the same distribution that the version
never trained, validated or was tested on, so the reference the job logs (validation and test) and the windows
share no article. Then, through the monitor's own path (`embed_window`, then `drift_tests`: Evidently's
model-based embedding drift and one test per text descriptor):
- `--windows` unshifted windows of `--rows` articles, each drawn without replacement from the unseen ones (seeded;
  the pool holds ~670 articles, so windows overlap one another);
- shifted windows: the first unshifted window with 25 % of its letters replaced at random (noise), all in
  uppercase, and with each article's words in shuffled order (the tokenizer lower-cases and the network
  mean-pools, so the embeddings barely see either); and articles of one category only.

A window raises an alarm when its drift share (`signal_share`: the embeddings, and the descriptors together)
reaches the model's `drift.threshold`, as `mlgate monitor` decides. Printed: the JSON of every window's scores,
then a table (window, alarm, the tests that drifted with their scores), the alarms at the monitor's thresholds,
and how many windows Evidently's default for these sizes (KS at p < 0.05) would have flagged.

    .venv/bin/python benchmarks/text_drift.py [--windows 20] [--rows 100] [--workdir DIR]

With `--workdir`, the trained version is kept there and reused by the next run (training takes minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from examples import run_job

MODEL = "news_transformer"
UNSEEN = 0.3


def window_result(reference, texts: list[str], scratch: Path, threshold: float) -> dict:
    from triggers.drift.embeddings import drift_tests, embed_window, signal_share

    embeddings, descriptors = embed_window(reference, np.array(texts, dtype=object), scratch / "model")
    _, tests = drift_tests(reference, embeddings, descriptors, picture=False)
    scores = {t["column"]: t["score"] for t in tests}
    share = signal_share(tests)
    at_p05 = signal_share([t | {"drifted": t["score"] < 0.05} if t["column"] != "embeddings" else t for t in tests])
    return {"scores": {k: round(v, 6) for k, v in scores.items()}, "share": round(share, 3),
            "alarm": share >= threshold, "alarm_at_p05": at_p05 >= threshold,
            "moved": {t["column"]: f"{t['score']:.3g} ({t['method']}, threshold {t['threshold']:.3g})"
                      for t in tests if t["drifted"]}}


def noisy(texts: list[str], seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(c if rng.random() > 0.25 else chr(rng.integers(97, 123)) for c in t) for t in texts]


def shuffled(texts: list[str], seed: int = 0) -> list[str]:
    """Each text's words (split at whitespace) in random order: the same words, counts and length."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.permutation(t.split())) for t in texts]


def trained(base: dict, workdir: Path) -> tuple[dict, float]:
    """The job's summary and wall time: run now, or read from a workdir a previous run trained in."""
    saved = workdir / "text_drift_job.json"
    if saved.exists():
        kept = json.loads(saved.read_text())
        return kept["summary"], kept["wall_s"]
    config = workdir / "base.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(base))
    summary, wall, _ = run_job(config, MODEL, workdir / "state")
    if not summary.get("promoted"):
        raise SystemExit(f"the {MODEL} job promoted nothing: {summary.get('gate')}")
    saved.write_text(json.dumps({"summary": summary, "wall_s": wall}))
    return summary, wall


def table(rows: dict[str, dict]) -> str:
    lines = ["| window | alarm | share | drifted tests (score, method, threshold) |", "|---|---|---|---|"]
    for name, result in rows.items():
        moved = "; ".join(f"{column} {text}" for column, text in result["moved"].items()) or "—"
        lines.append(f"| {name} | {'yes' if result['alarm'] else 'no'} | {result['share']:.2f} | {moved} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "mlgate.yaml"))
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--rows", type=int, default=100, help="articles per window")
    parser.add_argument("--workdir", help="keep the trained version here and reuse it (default: a temporary one)")
    args = parser.parse_args()
    from automation.config import load_config
    from models.datasets import bbc_news_unseen
    from triggers.drift.monitor import load_reference

    raw = yaml.safe_load(Path(args.config).read_text())
    block = raw["models"][MODEL]
    block["data"] = {**block.get("data", {}), "unseen_fraction": UNSEEN}
    # the version only has to exist: drift is measured here, and the latency gate fails on a busy machine
    block["gates"] = {"absolute": {"min_accuracy": 0.5, "max_p95_latency_ms": 1000.0, "max_size_mb": 100}}
    block.get("on_cpu", {}).pop("gates", None)
    raw["models"] = {MODEL: block}
    with tempfile.TemporaryDirectory(prefix="mlgate-text-drift-") as tmp:
        scratch = Path(tmp)
        workdir = Path(args.workdir) if args.workdir else scratch
        summary, wall = trained(raw, workdir)
        config = load_config(workdir / "state" / "mlgate.yaml")
        reference = load_reference(config, MODEL)
        threshold = config.model(MODEL).drift.threshold
        texts, labels = bbc_news_unseen(**block["data"])
        rng = np.random.default_rng(1)
        windows = [list(texts[rng.choice(len(texts), args.rows, replace=False)]) for _ in range(args.windows)]
        unshifted = [window_result(reference, w, scratch, threshold) for w in windows]
        one_class = list(texts[labels == 0][:args.rows])
        shifted = {"noisy (25 % of letters)": window_result(reference, noisy(windows[0]), scratch, threshold),
                   "all uppercase": window_result(reference, [t.upper() for t in windows[0]], scratch, threshold),
                   "shuffled word order": window_result(reference, shuffled(windows[0]), scratch, threshold),
                   f"one category ({summary['contract']['classes'][0]})": window_result(reference, one_class,
                                                                                        scratch, threshold)}
    print(json.dumps({"job": {"accuracy": summary["metrics"]["accuracy"], "wall_s": round(wall),
                              "config_profile": summary["config_profile"]},
                      "reference_rows": int(len(reference.embeddings)), "unseen_pool": int(len(texts)),
                      "windows": args.windows, "window_rows": args.rows, "threshold_share": threshold,
                      "unshifted": unshifted, "shifted": shifted}, indent=1))
    print(f"\nfalse alarms: {sum(r['alarm'] for r in unshifted)}/{args.windows} unshifted windows at the monitor's "
          f"thresholds; {sum(r['alarm_at_p05'] for r in unshifted)}/{args.windows} with Evidently's KS p < 0.05")
    for column in unshifted[0]["scores"]:
        values = [r["scores"][column] for r in unshifted]
        print(f"  {column}: min {min(values):.4g}, median {float(np.median(values)):.4g}, max {max(values):.4g}")
    print()
    print(table({f"unshifted {i + 1}": r for i, r in enumerate(unshifted)} | shifted))
    return 0


if __name__ == "__main__":
    sys.exit(main())
