"""Report: Markdown for the PR comment, a self-contained HTML page, and the JSON summary.

The Markdown stays under GitHub's 65,536-character comment limit by construction: every
list in it is bounded (variants, checks, classes) and charts are downsampled.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

COMMENT_LIMIT = 65_536
MAX_CHART_POINTS = 40
MAX_CLASSES = 30
MARKER = "<!-- mlgate-report model={model} -->"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2%}"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _downsample(values: list[float], limit: int = MAX_CHART_POINTS) -> tuple[list[int], list[float]]:
    if len(values) <= limit:
        return list(range(1, len(values) + 1)), values
    step = len(values) / limit
    idx = [int(i * step) for i in range(limit - 1)] + [len(values) - 1]
    return [i + 1 for i in idx], [values[i] for i in idx]


def _mermaid_label(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


def mermaid_line_chart(title: str, x_label: str, y_label: str, series: dict[str, list[float]]) -> str:
    longest = max((len(v) for v in series.values()), default=0)
    xs, _ = _downsample(list(range(longest)))
    lines = ["```mermaid", "xychart-beta", f"    title {_mermaid_label(title)}",
             f"    x-axis {_mermaid_label(x_label)} [{', '.join(str(x) for x in xs)}]"]
    values = [v for vs in series.values() for v in vs]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    pad = (high - low) * 0.05 or 0.01
    floor = max(0.0, low - pad) if low >= 0 else low - pad
    lines.append(f"    y-axis {_mermaid_label(y_label)} {floor:.4g} --> {high + pad:.4g}")
    for data in series.values():
        _, ys = _downsample(data)
        lines.append(f"    line [{', '.join(f'{y:.4g}' for y in ys)}]")
    lines.append("```")
    return "\n".join(lines)


def mermaid_bar_chart(title: str, y_label: str, bars: dict[str, float]) -> str:
    top = max(bars.values(), default=1.0)
    return "\n".join([
        "```mermaid", "xychart-beta", f"    title {_mermaid_label(title)}",
        f"    x-axis [{', '.join(_mermaid_label(k) for k in bars)}]",
        f"    y-axis {_mermaid_label(y_label)} 0 --> {top * 1.1:.4g}",
        f"    bar [{', '.join(f'{v:.4g}' for v in bars.values())}]", "```"])


def _headline(summary: dict[str, Any]) -> str:
    passed = summary["gate"]["passed"]
    mark = "✅ gate passed" if passed else "❌ gate failed"
    if summary["promoted"]:
        outcome = f"promoted version {summary['version']} to `@production`"
    elif summary["trigger"] == "pr":
        outcome = "evaluation only (PR jobs never promote)"
    else:
        outcome = "nothing promoted"
    return f"## mlgate · `{summary['model']}` · {mark} — {outcome}"


def _comparison_table(summary: dict[str, Any]) -> list[str]:
    cand, prod = summary["metrics"], summary.get("production")
    delta_line = next((c for c in summary["gate"]["checks"] if c["name"] == "accuracy vs production"), None)
    rows = ["| metric | candidate | production | Δ |", "|---|---:|---:|---:|"]

    def row(name: str, c: float | None, p: float | None, fmt: Any, delta: str | None = None) -> None:
        if delta is None and c is not None and p is not None:
            delta = f"{c - p:+.4g}"
        rows.append(f"| {name} | {fmt(c)} | {fmt(p)} | {delta or '—'} |")

    acc_delta = None
    if prod and delta_line and delta_line["observed"] is not None:
        acc_delta = f"{delta_line['observed'] * 100:+.2f} pts"
        if delta_line.get("ci"):
            low, high = delta_line["ci"]
            acc_delta += f" (CI [{low * 100:+.2f}, {high * 100:+.2f}])"
    row("accuracy", cand["accuracy"], prod and prod["accuracy"], _pct, acc_delta)
    row("macro-F1", cand["macro_f1"], prod and prod["macro_f1"], lambda v: "—" if v is None else f"{v:.4f}")
    for stat in ("p50_ms", "p95_ms", "p99_ms"):
        c = cand["latency"]["1"][stat]
        p = prod["latency"]["1"][stat] if prod else None
        row(f"{stat.replace('_ms', '')} latency, batch 1 (ms)", c, p, _ms,
            None if p is None else f"{(c / p - 1):+.1%}")
    row("size (MB)", cand["size_mb"], prod and prod["size_mb"], lambda v: "—" if v is None else f"{v:.3f}")
    if prod:
        rows.append(f"\nProduction: version {prod['version']} (`{prod['variant']}`), benchmarked in this job "
                    "on the same hardware.")
    else:
        rows.append("\nNothing is in production yet: relative checks are skipped.")
    return rows


def _variant_table(summary: dict[str, Any]) -> list[str]:
    batch = max(int(b) for b in summary["metrics"]["latency"])
    eager = next((v for v in summary["variants"] if v["name"] == "torch_eager" and v["latency"]), None)
    base = eager["latency"]["1"]["p50_ms"] if eager else None
    rows = [f"| variant | accuracy | p50 b1 (ms) | p95 b1 (ms) | throughput b{batch} (/s) | size (MB) | "
            "speedup b1 | |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for v in summary["variants"]:
        if v["skipped"]:
            rows.append(f"| `{v['name']}` | — | — | — | — | — | — | skipped: {v['skipped']} |")
            continue
        lat1, latb = v["latency"]["1"], v["latency"][str(batch)]
        speedup = f"{base / lat1['p50_ms']:.2f}×" if base else "—"
        chosen = "**chosen**" if v["name"] == summary["chosen_variant"] else ""
        rows.append(f"| `{v['name']}` | {_pct(v['accuracy'])} | {_ms(lat1['p50_ms'])} | {_ms(lat1['p95_ms'])} | "
                    f"{latb['throughput_per_s']:.0f} | {v['size_mb']:.3f} | {speedup} | {chosen} |")
    return rows


def render_markdown(summary: dict[str, Any], links: dict[str, str] | None = None) -> str:
    links = links or {}
    history = summary["training"]["history"]
    lines = [MARKER.format(model=summary["model"]), _headline(summary), "",
             f"Job `{summary['job_id']}` · trigger `{summary['trigger']}`"
             + (f" · commit `{summary['sha'][:12]}`" if summary.get("sha") else "")
             + f" · variant `{summary['chosen_variant']}` · data `{summary['data_fingerprint']}`"
             + f" · {summary['environment']['device']}", ""]
    if links:
        lines += [" · ".join(f"[{name}]({url})" for name, url in links.items()), ""]
    lines += ["### Candidate vs production", *_comparison_table(summary), "", "### Gate"]
    lines += [f"- {c['line']}" for c in summary["gate"]["checks"][:30]]
    per_class = list(summary["metrics"]["per_class_f1"].items())[:MAX_CLASSES]
    lines += ["", f"Per-class F1 (candidate{', first ' + str(MAX_CLASSES) if len(per_class) == MAX_CLASSES else ''}):",
              "", "| " + " | ".join(name for name, _ in per_class) + " |", "|" + "---:|" * len(per_class),
              "| " + " | ".join(f"{score:.3f}" for _, score in per_class) + " |"]
    lines += ["", "### Variants", *_variant_table(summary), "", f"Chosen: {summary['chosen_because']}.", ""]
    lines += ["### Training", f"{len(history)} epochs, best epoch {summary['training']['best_epoch']}"
              + (" (early stop)" if summary["training"]["stopped_early"] else "")
              + f", {summary['training']['seconds']:.1f} s on {summary['training']['device']}"
              + f" × {summary['training']['world_size']}.", "",
              mermaid_line_chart("Loss per epoch (train, validation)", "epoch", "loss",
                                 {"train": [h["train_loss"] for h in history],
                                  "val": [h["val_loss"] for h in history]}), "",
              mermaid_line_chart("Validation accuracy per epoch", "epoch", "accuracy",
                                 {"val": [h["val_accuracy"] for h in history]}), ""]
    bars = {v["name"]: v["latency"]["1"]["p50_ms"] for v in summary["variants"] if not v["skipped"]}
    if summary.get("production"):
        bars["production"] = summary["production"]["latency"]["1"]["p50_ms"]
    lines += ["### Latency", mermaid_bar_chart("p50 latency at batch 1 (ms)", "ms", bars), ""]
    text = "\n".join(lines)
    if len(text) > COMMENT_LIMIT:   # cannot happen with the bounds above; kept as the last line of defence
        text = text[:COMMENT_LIMIT - 200] + "\n\n… report truncated; see the HTML report."
    return text


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _plots(summary: dict[str, Any], samples: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = summary["training"]["history"]
    epochs = range(1, len(history) + 1)
    figures = []
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    left.plot(epochs, [h["train_loss"] for h in history], label="train")
    left.plot(epochs, [h["val_loss"] for h in history], label="validation")
    left.set(title="Loss", xlabel="epoch")
    left.legend()
    right.plot(epochs, [h["val_accuracy"] for h in history], color="tab:green")
    right.set(title="Validation accuracy", xlabel="epoch")
    figures.append(("Training curves", _png(fig)))
    plt.close(fig)
    if samples:
        fig, ax = plt.subplots(figsize=(10, 3.2))
        ax.boxplot(list(samples.values()), tick_labels=list(samples), showfliers=False, vert=False)
        ax.set(title="Latency at batch 1 (ms), all timed calls", xlabel="ms")
        figures.append(("Latency distributions", _png(fig)))
        plt.close(fig)
    if summary.get("production"):
        cand, prod = summary["metrics"], summary["production"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
        axes[0].bar(["candidate", "production"], [cand["accuracy"], prod["accuracy"]], color=["tab:blue", "tab:gray"])
        axes[0].set(title="Test accuracy", ylim=(min(cand["accuracy"], prod["accuracy"]) - 0.05, 1))
        axes[1].bar(["candidate", "production"], [cand["latency"]["1"]["p95_ms"], prod["latency"]["1"]["p95_ms"]],
                    color=["tab:blue", "tab:gray"])
        axes[1].set(title="p95 latency, batch 1 (ms)")
        figures.append(("Candidate vs production", _png(fig)))
        plt.close(fig)
    return figures


def render_html(summary: dict[str, Any], samples: dict[str, Any]) -> str:
    import markdown_it

    body = markdown_it.MarkdownIt("commonmark").enable("table").render(
        "\n".join(line for line in render_markdown(summary).splitlines() if not line.startswith("<!--")))
    plots = "".join(f'<h3>{html.escape(title)}</h3><img alt="{html.escape(title)}" src="{uri}">'
                    for title, uri in _plots(summary, samples))
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
             "img{max-width:100%}pre{background:#f6f8fa;padding:8px;overflow:auto}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>mlgate {html.escape(summary['model'])} "
            f"{html.escape(summary['job_id'])}</title><style>{style}</style></head><body>{body}"
            f"<h2>Plots</h2>{plots}<h2>Summary</h2><pre>{html.escape(json.dumps(summary, indent=2, default=str))}"
            "</pre></body></html>")


def write_reports(summary: dict[str, Any], variants: list[Any], production: dict[str, Any] | None,
                  out_dir: Path) -> None:
    """report.md and report.html; the job writes report.json last, once its timings are complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = {v.name: v.latency[1].samples_ms for v in variants if v.latency}
    if production is not None:
        samples["production"] = production["latency"][1].samples_ms
    (out_dir / "report.md").write_text(render_markdown(summary), encoding="utf-8")
    (out_dir / "report.html").write_text(render_html(summary, samples), encoding="utf-8")
