"""Report: Markdown for the PR comment, a self-contained HTML page, and the JSON summary.

The Markdown stays under GitHub's 65,536-character comment limit by construction: every
list in it is bounded (variants, batch sizes, checks, classes), free text is clipped, and
charts are downsampled.

Both outputs come from one renderer in two flavours: GitHub gets emoji marks and Mermaid
charts (it draws them); the HTML page gets text badges (headless browsers often have no
emoji font) and the matplotlib PNGs instead of Mermaid (a browser would show its source).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COMMENT_LIMIT = 65_536
MAX_CHART_POINTS = 40
MAX_CLASSES = 30
MAX_CHECKS = 30
MAX_VARIANTS = 24          # the registry has 8; the bound only keeps a runaway config from breaking the comment
MAX_BATCH_SIZES = 6
MAX_REASON = 300           # skip reasons are clipped to 300 already (optimize.one_line); this bounds any other
REFERENCE = "torch_eager"  # speedups are relative to it (automation/optimize.py: REFERENCE)
EXACT_PRECISIONS = ("fp32", "tf32")   # parity gates these; lossy ones are judged by accuracy
MEMORY_KINDS = {"cuda_peak_allocated": "GPU peak", "cuda_device_used": "GPU used", "host_rss": "host RSS"}
EMOJI = {"passed": "✅", "failed": "❌", "skipped": "⏭️"}
BADGE = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}
MARKER = "<!-- mlgate-report model={model} -->"
UNSTEADY, IMPLAUSIBLE = "†", "‡"   # latency cells: rounds disagree; more work measured faster (noise)
MAX_FLAGGED = 12                   # flagged cells named in a footnote; the rest are counted


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2%}"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _acc(value: float | None, n: int | None) -> str:
    """An accuracy with the size of the test set it was measured on: 100.00% of 36 is not 100.00% of 3,600."""
    return _pct(value) if value is None or not n else f"{value:.2%} (n={n:,})"


def _test_examples(summary: dict[str, Any]) -> int | None:
    """The test set's size: every accuracy in a job is on the same examples (the gate pairs them)."""
    return next((v.get("test_examples") for v in summary["variants"]
                 if v["name"] == summary.get("chosen_variant") and v.get("test_examples")), None) or \
        next((v["test_examples"] for v in summary["variants"] if v.get("test_examples")), None)


def _implausible(latency: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Cells that are plainly noise: a larger batch measured faster (p50) than a smaller one of the same
    variant. Which of the two is off cannot be told, so both are marked; the value says against which."""
    sizes = sorted(latency, key=int)
    marked: dict[str, str] = {}
    for i, small in enumerate(sizes):
        for large in sizes[i + 1:]:
            if latency[small]["p50_ms"] > latency[large]["p50_ms"]:
                marked.setdefault(small, large)
                marked.setdefault(large, small)
    return marked


def _flags(latency: dict[str, dict[str, Any]], batch: str) -> str:
    """Markers for one latency cell (see `_noise_notes`)."""
    cell = latency.get(batch) or {}
    marks = UNSTEADY if cell.get("rounds_disagree") else ""
    if batch in _implausible(latency):
        marks += IMPLAUSIBLE
    return f" {marks}" if marks else ""


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _sci(value: float) -> str:
    return "0" if value == 0 else f"{value:.1e}"


def _text(value: Any, limit: int = MAX_REASON) -> str:
    """Free text from the summary, safe inside a Markdown table cell on GitHub and in the HTML page."""
    text = " ".join(str(value).split())
    if len(text) > limit:
        text = text[:limit - 1] + "…"
    return html.escape(text, quote=False).replace("|", "\\|")


@dataclass(frozen=True)
class Flavor:
    """Where the rendered Markdown goes: a GitHub comment, or markdown-it for the HTML page."""

    html: bool = False

    def mark(self, status: str, label: str = "") -> str:
        if self.html:
            return f'<span class="badge {status}">{html.escape(label or BADGE[status])}</span>'
        return f"{EMOJI[status]} {label}".rstrip()


GITHUB, PAGE = Flavor(html=False), Flavor(html=True)


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


def _headline(summary: dict[str, Any], flavor: Flavor) -> str:
    passed = summary["gate"]["passed"]
    mark = flavor.mark("passed", "gate passed") if passed else flavor.mark("failed", "gate failed")
    if summary["promoted"]:
        outcome = f"promoted version {summary['version']} to `@production`"
    elif summary["trigger"] == "pr":
        outcome = "evaluation only (PR jobs never promote)"
    else:
        outcome = "nothing promoted"
    return f"## mlgate · `{summary['model']}` · {mark} — {outcome}"


def contract_change_line(summary: dict[str, Any]) -> str | None:
    """Both contracts, when the candidate's differs from production's (job.py's summary `contract_change`)."""
    changed = summary.get("contract_change")
    if not changed:
        return None
    return str(changed.get("line") or
               f"Input contract changed: production {changed['production']} → candidate {changed['candidate']}")


def _production_line(prod: dict[str, Any] | None, summary: dict[str, Any]) -> str:
    why = summary.get("not_comparable")
    if why:   # production exists but was not judged beside the candidate
        lines = [f"Production version {summary.get('production_before')} was not benchmarked, "
                 f"{_text(why, 600)}: relative checks are skipped."]
        changed = contract_change_line(summary)
        return "\n\n".join(lines + ([_text(changed, 600)] if changed else []))
    if not prod:
        return "Nothing is in production yet: relative checks are skipped."
    served_as, reason = prod.get("served_as") or prod["variant"], prod.get("fallback_reason")
    if reason:
        serving = f"served here by its fallback `{served_as}` because {_text(reason)}"
    else:
        serving = f"served as `{served_as}`"
    return (f"Production: version {prod['version']} (`{prod['variant']}`, {serving}), benchmarked in this job "
            "on the same hardware.")


def _comparison_table(summary: dict[str, Any]) -> list[str]:
    cand, prod = summary["metrics"], summary.get("production")
    delta_line = next((c for c in summary["gate"]["checks"] if c["name"] == "accuracy vs production"), None)
    rows = ["| metric | candidate | production | Δ |", "|---|---:|---:|---:|"]

    def row(name: str, c: float | None, p: float | None, fmt: Any, delta: str | None = None) -> None:
        if delta is None and c is not None and p is not None:
            delta = f"{c - p:+.4g}"
        rows.append(f"| {name} | {fmt(c)} | {fmt(p)} | {delta or '—'} |")

    n = _test_examples(summary)
    acc_delta = None
    if prod and delta_line and delta_line["observed"] is not None:
        acc_delta = f"{delta_line['observed'] * 100:+.2f} pts"
        if delta_line.get("ci"):
            low, high = delta_line["ci"]
            acc_delta += f" (CI [{low * 100:+.2f}, {high * 100:+.2f}]" + (f", n={n:,})" if n else ")")
    row("accuracy", cand["accuracy"], prod and prod["accuracy"], lambda v: _acc(v, n), acc_delta)
    row("macro-F1", cand["macro_f1"], prod and prod["macro_f1"], lambda v: "—" if v is None else f"{v:.4f}")
    for stat in ("p50_ms", "p95_ms", "p99_ms"):
        c = cand["latency"]["1"][stat]
        p = prod["latency"]["1"][stat] if prod else None
        row(f"{stat.replace('_ms', '')} latency, batch 1 (ms)", c, p, _ms,
            None if p is None else f"{(c / p - 1):+.1%}")
    row("size (MB)", cand["size_mb"], prod and prod["size_mb"], lambda v: "—" if v is None else f"{v:.3f}")
    rows.append("\n" + _production_line(prod, summary))
    if n:
        rows.append("\n" + _evidence_line(n, delta_line if prod else None))
    return rows


def _evidence_line(n: int, delta_line: dict[str, Any] | None) -> str:
    """What an accuracy on n examples can show: one example is 100/n points."""
    line = f"Accuracy is measured on n={n:,} test examples: one example moves it by {100 / n:.2f} pts."
    ci = delta_line.get("ci") if delta_line else None
    if ci and ci[0] == ci[1]:
        line += (f" The interval [{ci[0] * 100:+.2f}, {ci[1] * 100:+.2f}] has no width because both models got "
                 "exactly the same examples right: it describes this test set, not how the models would differ "
                 "on other data.")
    elif n < 1000:
        line += " Differences of a few examples are within what another draw of the test set could change."
    return line


ACCURACY_METRICS = ("accuracy", "macro_f1", "Δ accuracy")   # gate metrics measured on the test set


def _gate_lines(summary: dict[str, Any], flavor: Flavor) -> list[str]:
    checks = summary["gate"]["checks"][:MAX_CHECKS]
    n = _test_examples(summary)

    def size(c: dict[str, Any]) -> str:
        return f" (n={n:,})" if n and c.get("metric") in ACCURACY_METRICS else ""

    if not flavor.html:
        return [f"- {c['line']}{size(c)}" for c in checks]
    # the page builds each line from the check's fields: `line` starts with an emoji mark
    lines = []
    for c in checks:
        observed = "missing" if c["observed"] is None else f"{c['observed']:.4g}"
        lines.append(f"- {flavor.mark(c['status'])} **{_text(c['name'])}**: {_text(c['metric'])} = {observed} "
                     f"(threshold {_text(c['threshold'])}) — {_text(c['reason'])}{size(c)}")
    return lines


def _shown_variants(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return summary["variants"][:MAX_VARIANTS]


def _batch_sizes(variants: list[dict[str, Any]]) -> list[str]:
    sizes = sorted({int(b) for v in variants if v["latency"] for b in v["latency"]})
    if len(sizes) > MAX_BATCH_SIZES:     # keep batch 1 (the gate's) and the largest ones
        sizes = sizes[:1] + sizes[-(MAX_BATCH_SIZES - 1):]
    return [str(b) for b in sizes]


def _memory(variant: dict[str, Any]) -> str:
    if variant.get("memory_mb") is None:
        return "—"
    kind = MEMORY_KINDS.get(variant.get("memory_kind") or "", variant.get("memory_kind") or "?")
    return f"{variant['memory_mb']:.1f} ({kind})"


def _parity(variant: dict[str, Any]) -> str:
    check = variant.get("parity")
    if not check:
        return "reference" if variant["name"] == REFERENCE else "—"
    if variant.get("precision") in EXACT_PRECISIONS:
        sign = "≤" if check["passed"] else ">"
        return f"{_sci(check['max_abs_diff'])} {sign} {_sci(check['tolerance'])}"
    return f"{_sci(check['max_abs_diff'])} (info)"


def _variant_row(v: dict[str, Any], summary: dict[str, Any], largest: str, base: float | None,
                 flavor: Flavor) -> str:
    lead = f"| `{v['name']}` | {v.get('device', '—')} | {v.get('precision', '—')} | "
    if v["skipped"]:
        built = _num(v.get("build_seconds") or None, ".3g")      # a failed compile's time is worth showing
        reason = (f"{flavor.mark('skipped', 'skipped')} {_text(v['skipped'])}" if flavor.html
                  else f"{flavor.mark('skipped')} skipped: {_text(v['skipped'])}")
        return lead + f"{built} | — | — | — | — | — | — | — | — | — | — | {reason} |"
    lat = v["latency"]
    one, big = lat.get("1", {}), lat.get(largest, {})
    f1, fbig = (_flags(lat, "1"), _flags(lat, largest)) if lat else ("", "")
    speedup = f"{base / one['p50_ms']:.2f}×" if base and one.get("p50_ms") else "—"
    status = "**chosen**" if v["name"] == summary["chosen_variant"] else "built"
    built = _num(v.get("build_seconds"), ".3g") + (" (cached)" if v.get("cached") else "")
    return lead + (f"{built} | {_acc(v['accuracy'], v.get('test_examples'))} | "
                   f"{_num(v.get('size_mb'), '.3f')} | {_parity(v)} | "
                   f"{_ms(one.get('p50_ms'))}{f1} | {_ms(one.get('p95_ms'))}{f1} | {_ms(one.get('p99_ms'))}{f1} | "
                   f"{_ms(big.get('p50_ms'))}{fbig} | {_num(big.get('throughput_per_s'), ',.0f')} | {_memory(v)} | "
                   f"{speedup} | {status} |")


def _variant_table(summary: dict[str, Any], flavor: Flavor) -> list[str]:
    variants = _shown_variants(summary)
    largest = max(_batch_sizes(variants) or ["1"], key=int)
    eager = next((v for v in variants if v["name"] == REFERENCE and v["latency"]), None)
    base = eager["latency"]["1"]["p50_ms"] if eager and "1" in eager["latency"] else None
    rows = ["| variant | device | precision | build (s) | accuracy | size (MB) | parity max Δ vs tol | "
            f"p50 b1 (ms) | p95 b1 (ms) | p99 b1 (ms) | p50 b{largest} (ms) | throughput b{largest} (/s) | memory (MB) | "
            f"speedup b1 vs `{REFERENCE}` | status |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    rows += [_variant_row(v, summary, largest, base, flavor) for v in variants]
    if len(summary["variants"]) > len(variants):
        rows.append(f"\n… {len(summary['variants']) - len(variants)} more variants in report.json.")
    rows.append("\nParity: max |Δlogit| against torch fp32 on the variant's own device; an fp32 variant above its "
                "tolerance is skipped, lossy ones (bf16, fp16, int8) show it for information and are judged by "
                "accuracy. Memory: GPU peak = torch's peak allocation, GPU used = device memory taken "
                "(ONNX Runtime's allocator), host RSS = growth of the process's resident memory.")
    return rows


def _latency_by_batch(summary: dict[str, Any]) -> list[str]:
    variants = [v for v in _shown_variants(summary) if not v["skipped"] and v["latency"]]
    sizes = _batch_sizes(variants)
    rows = ["| variant | " + " | ".join(f"batch {b}" for b in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for v in variants:
        cells = [" / ".join(_ms(v["latency"][b][k]) for k in ("p50_ms", "p95_ms", "p99_ms")) + _flags(v["latency"], b)
                 if b in v["latency"] else "—" for b in sizes]
        rows.append(f"| `{v['name']}` | " + " | ".join(cells) + " |")
    return rows + _noise_notes(summary)


def _named(cells: list[str]) -> str:
    shown = "; ".join(cells[:MAX_FLAGGED])
    return shown + (f"; and {len(cells) - MAX_FLAGGED} more" if len(cells) > MAX_FLAGGED else "")


def _noise_notes(summary: dict[str, Any]) -> list[str]:
    """Footnotes for the latency cells that should not be read at face value."""
    unsteady, implausible = [], []
    contenders = [(v["name"], v["latency"]) for v in _shown_variants(summary) if not v["skipped"] and v["latency"]]
    for name, latency in contenders:
        for batch in sorted(latency, key=int):
            cell = latency[batch]
            if cell.get("rounds_disagree"):
                low, high = min(cell["round_p95_ms"]), max(cell["round_p95_ms"])
                unsteady.append(f"`{_text(name, 40)}` b{batch}: p95 per round {low:.3f}–{high:.3f} ms")
        for batch, other in sorted(_implausible(latency).items(), key=lambda kv: int(kv[0])):
            if int(batch) < int(other):
                implausible.append(f"`{_text(name, 40)}` p50 b{batch} {latency[batch]['p50_ms']:.3f} ms > "
                                   f"b{other} {latency[other]['p50_ms']:.3f} ms")
    notes = []
    if unsteady:
        notes.append(f"\n{UNSTEADY} Rounds disagree beyond their noise: the 95 % intervals of two rounds' p95s do "
                     "not overlap, so the machine's load changed while this cell was timed; read it as a range, "
                     "not a figure. " + _named(unsteady) + ".")
    if implausible:
        notes.append(f"\n{IMPLAUSIBLE} Plainly noise: a larger batch of the same variant measured faster than a "
                     "smaller one, which more work cannot do; at least one of the two cells is off. "
                     + _named(implausible) + ".")
    return notes


def _cost_lines(summary: dict[str, Any]) -> list[str]:
    """What the job spent, what it decided not to spend, and why."""
    lines = ["### Job cost"]
    timings = summary.get("timings") or {}
    if timings:
        outside = sum(t for name, t in timings.items() if name != "train")
        lines.append("- Stage times: " + " · ".join(f"{_text(name, 20)} {t:.1f} s" for name, t in timings.items())
                     + f"; outside training {outside:.1f} s" + (" (so far: the report's own time is in report.json)"
                                                               if "report" not in timings else "") + ".")
    lines += _spend_lines(summary.get("cost"))
    variants = _shown_variants(summary)
    for v in variants:
        if v["skipped"] and v["skipped"].startswith("cannot win"):
            lines.append(f"- `{v['name']}` not built: {_text(v['skipped'])}.")
        elif v.get("cached") and not v["skipped"]:
            key = f" (key `{_text(v['cache_key'], 24)}`)" if v.get("cache_key") else ""
            lines.append(f"- `{v['name']}` cached: its artifact was built by an earlier job for the same weights, "
                         f"graph, input shape, torch and device{key}; reusing it took "
                         f"{_num(v.get('build_seconds'), '.3g')} s. It passed parity like a fresh build.")
    timed = [v["latency"] for v in variants if not v["skipped"] and v["latency"]]
    for batch in _batch_sizes(variants):
        cells = [lat[batch] for lat in timed if batch in lat and "rounds" in lat[batch]]
        if not cells:
            continue
        cell = cells[0]   # every contender at a batch size runs the same rounds
        if cell.get("stopped_early"):
            lines.append(f"- Timing, batch {batch}: stopped after {cell['rounds']} of {cell['max_rounds']} rounds "
                         f"({cell['samples']:,} calls per variant): every contender's per-round p95s already "
                         "agreed within benchmark.steady_spread (or steady_floor_ms).")
        elif cell["rounds"] > 1:
            disagree = [v["name"] for v in variants if not v["skipped"]
                        and (v["latency"].get(batch) or {}).get("steady") is False]
            why = (f"the per-round p95s of {', '.join(f'`{n}`' for n in disagree[:MAX_FLAGGED])} stayed further "
                   "apart than benchmark.steady_spread" if disagree else "the rounds agreed only at the last one")
            lines.append(f"- Timing, batch {batch}: all {cell['rounds']} rounds ran "
                         f"({cell['samples']:,} calls per variant): {why}.")
    lines.append(f"- Variants were built one after another: the compilers (inductor, AOTInductor's C++ build) "
                 f"already use every core ({os.cpu_count() or '?'} on the machine that wrote this report), so "
                 "parallel builds would contend for them and disturb each other's warm-up timing.")
    return lines


def _spend_lines(cost: dict[str, Any] | None) -> list[str]:
    """CPU and GPU time, GPU energy and memory, and what preemption cost and a resume saved."""
    if not cost:
        return []
    stages = cost.get("stages") or {}
    lines = [f"- CPU time: {_num(cost.get('cpu_seconds'), '.1f')} s over {_num(cost.get('wall_seconds'), '.1f')} s "
             "wall (" + " · ".join(f"{_text(name, 20)} {_num(c.get('cpu_seconds'), '.1f')} s"
                                   for name, c in stages.items()) + ")."]
    gpu = cost.get("gpu")
    if gpu:
        energy = "not counted by this driver" if gpu.get("energy_joules") is None else \
            f"{gpu['energy_joules'] / 1000:.2f} kJ (the whole GPU's counter)"
        lines.append(f"- GPU `{_text(gpu.get('device'), 60)}`: {_num(gpu.get('seconds'), '.1f')} GPU-seconds, "
                     f"energy {energy}, peak memory {_num(gpu.get('peak_memory_mb'), '.0f')} MB (PyTorch's "
                     "allocations).")
    else:
        lines.append(f"- GPU: none ({_text(cost.get('gpu_absent') or 'absent')}).")
    resume = cost.get("resume") or {}
    if resume.get("earlier_attempts") or resume.get("resumed_from"):
        start = resume.get("resumed_from") or {}
        lines.append(f"- Attempts before this one: {resume.get('earlier_attempts', 0)} "
                     f"({resume.get('preempted_attempts', 0)} preempted), lost "
                     f"{_num(resume.get('lost_seconds'), '.1f')} s; this attempt resumed at epoch "
                     f"{start.get('epoch', 0)}, step {start.get('step', 0)}, which saved "
                     f"{_num(resume.get('saved_seconds'), '.1f')} s of training.")
    return lines


def _environment(summary: dict[str, Any]) -> list[str]:
    env, training = summary["environment"], summary["training"]
    device = env.get("device", "cpu")
    cuda = "no CUDA" if env.get("cuda") in (None, "None") else f"CUDA {env['cuda']}"
    lines = [f"- Runner: **{_text(env.get('device_name', device))}** (`{device}`); fp32 math "
             f"`{env.get('fp32_precision', 'fp32')}` (torch matmul precision `{env.get('matmul_precision', '—')}`, "
             f"cuDNN TF32 `{env.get('cudnn_tf32', 'n/a')}`)",
             f"- Software: torch {env.get('torch', '—')} · onnxruntime {env.get('onnxruntime', '—')} · "
             f"{cuda} · Python {env.get('python', '—')} · {_text(env.get('platform', '—'))}",
             f"- Training: on `{training['device']}` × {training['world_size']}, "
             f"precision {training.get('precision', 'fp32')}" if training else
             "- Training: by the pull request's own code, in a sandbox; only its ONNX export was judged"]
    if isinstance(env.get("threads"), dict):   # automation/threads.py: the counts every timing ran with
        from automation.threads import ThreadPolicy

        lines.append(f"- Threads: {_text(ThreadPolicy(**env['threads']).text())}")
    if summary.get("timed_region"):
        lines.append(f"- Timed region: {_text(summary['timed_region'], 400)}.")
    cross = summary.get("cross_device")
    if cross:
        lines.append(f"- Cross-device difference (informational, gates nothing): torch fp32 on `{device}` vs "
                     f"{_text(cross['reference'])}: max |Δlogit| {_sci(cross['max_abs_diff'])} "
                     f"(fp32 tolerance {_sci(cross['tolerance'])}), argmax agreement {cross['argmax_agreement']:.2%}.")
    return lines


def _training(summary: dict[str, Any], flavor: Flavor) -> list[str]:
    if not summary["training"]:   # a judged candidate: its training ran untrusted, so none of it is reported
        judged = summary.get("judged") or {}
        return ["### Judged", f"By {judged.get('by', 'trusted code')}: the candidate's {judged.get('artifact', 'artifact')}"
                f", on {judged.get('test_split', 'the base')} test split, against {judged.get('gates', 'its gates')}.", ""]
    history, training = summary["training"]["history"], summary["training"]
    lines = ["### Training", f"{len(history)} epochs, best epoch {training['best_epoch']}"
             + (" (early stop)" if training["stopped_early"] else "")
             + f", {training['seconds']:.1f} s on {training['device']} × {training['world_size']}"
             + f", {training.get('precision', 'fp32')}.", ""]
    if training.get("resumed_from"):
        lines[-1:-1] = [f"Resumed from a checkpoint at epoch {training['resumed_from']['epoch']}, step "
                        f"{training['resumed_from']['step']}: an earlier attempt trained that far."]
    if training.get("budget_reached"):
        lines[-1:-1] = ["**Stopped at the training budget** (train.max_minutes): the best weights so far are what "
                        "was judged; the last epoch was cut short."]
    if training.get("hopeless"):
        lines[-1:-1] = [f"**Stopped as hopeless** (train.abort_when_hopeless): {_text(training['hopeless'], 300)}."]
    if not flavor.html:     # the page has the same curves as PNGs
        lines += [mermaid_line_chart("Loss per epoch (train, validation)", "epoch", "loss",
                                     {"train": [h["train_loss"] for h in history],
                                      "val": [h["val_loss"] for h in history]}), "",
                  mermaid_line_chart("Validation accuracy per epoch", "epoch", "accuracy",
                                     {"val": [h["val_accuracy"] for h in history]}), ""]
    return lines


def _latency_chart(summary: dict[str, Any]) -> list[str]:
    bars = {v["name"]: v["latency"]["1"]["p50_ms"] for v in _shown_variants(summary)
            if not v["skipped"] and "1" in (v["latency"] or {})}
    if summary.get("production"):
        bars["production"] = summary["production"]["latency"]["1"]["p50_ms"]
    return ["### Latency", mermaid_bar_chart("p50 latency at batch 1 (ms)", "ms", bars), ""]


def _render(summary: dict[str, Any], links: dict[str, str], flavor: Flavor) -> str:
    env = summary["environment"]
    lines = [MARKER.format(model=summary["model"]), _headline(summary, flavor), "",
             f"Job `{summary['job_id']}` · trigger `{summary['trigger']}`"
             + (f" · commit `{summary['sha'][:12]}`" if summary.get("sha") else "")
             + f" · variant `{summary['chosen_variant']}` · data `{summary['data_fingerprint']}`"
             + f" · {_text(env.get('device_name', env['device']))} (`{env['device']}`)", ""]
    if links:
        lines += [" · ".join(f"[{name}]({url})" for name, url in links.items()), ""]
    lines += ["### Candidate vs production", *_comparison_table(summary), "", "### Gate", *_gate_lines(summary, flavor)]
    per_class = list(summary["metrics"]["per_class_f1"].items())[:MAX_CLASSES]
    lines += ["", f"Per-class F1 (candidate{', first ' + str(MAX_CLASSES) if len(per_class) == MAX_CLASSES else ''}):",
              "", "| " + " | ".join(_text(name, 40) for name, _ in per_class) + " |", "|" + "---:|" * len(per_class),
              "| " + " | ".join(f"{score:.3f}" for _, score in per_class) + " |"]
    lines += _confusion_lines(summary)
    lines += ["", "### Variants", *_variant_table(summary, flavor), "",
              "Latency by batch size (ms, p50 / p95 / p99):", "", *_latency_by_batch(summary), "",
              f"Chosen: {_text(summary['chosen_because'], 400)}.", ""]
    lines += [*_cost_lines(summary), ""]
    lines += ["### Environment", *_environment(summary), ""]
    lines += _training(summary, flavor)
    if not flavor.html:     # the page shows the latency distributions as a PNG
        lines += _latency_chart(summary)
    return "\n".join(lines)


MAX_CONFUSION_SHOWN = 12   # classes; a larger matrix is in report.json


def _confusion_lines(summary: dict[str, Any]) -> list[str]:
    """The chosen variant's confusion matrix, rows the true class and columns the predicted one, by name."""
    errors = summary.get("errors") or {}
    matrix = errors.get("confusion")
    classes = (summary.get("contract") or {}).get("classes") or []
    if not matrix or len(matrix) > MAX_CONFUSION_SHOWN or len(classes) != len(matrix):
        return []
    names = [_text(c, 16) for c in classes]
    lines = ["", "Confusion matrix (rows: true class, columns: predicted; test split):", "",
             "| true / predicted | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for i, (name, row) in enumerate(zip(names, matrix)):   # the diagonal (right) in bold, zeros as dots
        cells = [f"**{v}**" if i == j else (str(v) if v else "·") for j, v in enumerate(row)]
        lines.append(f"| **{name}** | " + " | ".join(cells) + " |")
    return lines


def render_markdown(summary: dict[str, Any], links: dict[str, str] | None = None) -> str:
    text = _render(summary, links or {}, GITHUB)
    if len(text) > COMMENT_LIMIT:   # cannot happen with the bounds above; kept as the last line of defence
        text = text[:COMMENT_LIMIT - 200] + "\n\n… report truncated; see the HTML report."
    return text


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _plots(summary: dict[str, Any], samples: dict[str, Any]) -> list[tuple[str, str]]:
    from matplotlib.figure import Figure   # not pyplot: no backend or figure manager to load, nothing global

    figures = []
    if summary["training"]:   # none for a judged candidate
        history = summary["training"]["history"]
        epochs = range(1, len(history) + 1)
        fig = Figure(figsize=(10, 3.2))
        left, right = fig.subplots(1, 2)
        left.plot(epochs, [h["train_loss"] for h in history], label="train")
        left.plot(epochs, [h["val_loss"] for h in history], label="validation")
        left.set(title="Loss", xlabel="epoch")
        left.legend()
        right.plot(epochs, [h["val_accuracy"] for h in history], color="tab:green")
        right.set(title="Validation accuracy", xlabel="epoch")
        figures.append(("Training curves", _png(fig)))
    if samples:
        fig = Figure(figsize=(10, 3.2))
        ax = fig.subplots()
        ax.boxplot(list(samples.values()), tick_labels=list(samples), showfliers=False, vert=False)
        ax.set(title="Latency at batch 1 (ms), all timed calls", xlabel="ms")
        figures.append(("Latency distributions", _png(fig)))
    if summary.get("production"):
        cand, prod = summary["metrics"], summary["production"]
        fig = Figure(figsize=(10, 3.2))
        axes = fig.subplots(1, 2)
        axes[0].bar(["candidate", "production"], [cand["accuracy"], prod["accuracy"]], color=["tab:blue", "tab:gray"])
        n = _test_examples(summary)
        axes[0].set(title=f"Test accuracy (n={n:,})" if n else "Test accuracy",
                    ylim=(min(cand["accuracy"], prod["accuracy"]) - 0.05, 1))
        axes[1].bar(["candidate", "production"], [cand["latency"]["1"]["p95_ms"], prod["latency"]["1"]["p95_ms"]],
                    color=["tab:blue", "tab:gray"])
        axes[1].set(title="p95 latency, batch 1 (ms)")
        figures.append(("Candidate vs production", _png(fig)))
    return figures


PAGE_STYLE = (
    "body{font-family:'DejaVu Sans',system-ui,sans-serif;max-width:1240px;margin:2em auto;padding:0 1em;"
    "color:#1f2328;line-height:1.45}"
    "h2{border-bottom:1px solid #d0d7de;padding-bottom:.3em}h3{margin-top:1.6em}"
    "table{border-collapse:collapse;display:block;overflow-x:auto;font-size:12px;margin:.5em 0}"
    "td,th{border:1px solid #d0d7de;padding:3px 6px}th{background:#f6f8fa;vertical-align:bottom}"
    # numbers stay on one line; the last cell (a status or skip reason) wraps so the table fits the page
    "td{white-space:nowrap}td:last-child{white-space:normal}"
    "tr:nth-child(even) td{background:#fafbfc}code{background:#eff1f3;padding:0 4px;border-radius:4px}"
    ".badge{display:inline-block;padding:1px 7px;border-radius:10px;color:#fff;font-size:12px;font-weight:bold;"
    "letter-spacing:.03em}.badge.passed{background:#1a7f37}.badge.failed{background:#cf222e}"
    ".badge.skipped{background:#6e7781}"
    "img{max-width:100%}pre{background:#f6f8fa;padding:8px;overflow:auto;font-size:12px}"
    "summary{cursor:pointer;font-weight:bold}")


def _misclassified(summary: dict[str, Any], test_inputs: Any) -> str:
    """The first misclassified test examples: a grid of thumbnails for images, escaped snippets for text."""
    errors = (summary.get("errors") or {}).get("misclassified") or []
    contract = summary.get("contract") or {}
    classes = contract.get("classes") or []
    if not errors or test_inputs is None or not classes:
        return ""
    kind = contract.get("input_kind")
    title = "<h3>Misclassified test examples (true → predicted)</h3>"
    if kind == "text":
        items = "".join(f"<li><b>{html.escape(classes[true])} → {html.escape(classes[guess])}</b>: "
                        f"{html.escape(str(test_inputs[index])[:240])}…</li>" for index, true, guess in errors[:8])
        return f"{title}<ul class='snippets'>{items}</ul>"
    if kind != "image":
        return ""
    import numpy as np
    from matplotlib.figure import Figure

    columns = 8
    rows = (len(errors) + columns - 1) // columns
    fig = Figure(figsize=(columns * 1.3, rows * 1.55))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (index, true, guess) in zip(axes.flat, errors):
        image = np.asarray(test_inputs[index])
        image = image[0] if image.ndim == 3 and image.shape[0] == 1 else (
            np.moveaxis(image, 0, -1) if image.ndim == 3 else image)
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        ax.set_title(f"{classes[true][:12]}\n→ {classes[guess][:12]}", fontsize=7)
    uri = _png(fig)
    return f'{title}<img alt="misclassified test images" src="{uri}">'


def render_html(summary: dict[str, Any], samples: dict[str, Any], test_inputs: Any = None) -> str:
    import markdown_it

    body = markdown_it.MarkdownIt("commonmark").enable("table").render(
        "\n".join(line for line in _render(summary, {}, PAGE).splitlines() if not line.startswith("<!--")))
    plots = "".join(f'<h3>{html.escape(title)}</h3><img alt="{html.escape(title)}" src="{uri}">'
                    for title, uri in _plots(summary, samples)) + _misclassified(summary, test_inputs)
    # ensure_ascii keeps the gate lines' emoji out of the page as characters (they would be empty boxes)
    raw = html.escape(json.dumps(summary, indent=2, default=str, ensure_ascii=True))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>mlgate {html.escape(summary['model'])} "
            f"{html.escape(summary['job_id'])}</title><style>{PAGE_STYLE}</style></head><body>{body}"
            f"<h2>Plots</h2>{plots}<h2>Summary</h2><details><summary>report.json</summary><pre>{raw}</pre></details>"
            "</body></html>")


def write_reports(summary: dict[str, Any], variants: list[Any], production: dict[str, Any] | None,
                  out_dir: Path, test_inputs: Any = None) -> None:
    """report.md and report.html; the job writes report.json last, once its timings are complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = {v.name: v.latency[1].samples_ms for v in variants if v.latency}
    if production is not None:
        samples["production"] = production["latency"][1].samples_ms
    (out_dir / "report.md").write_text(render_markdown(summary), encoding="utf-8")
    (out_dir / "report.html").write_text(render_html(summary, samples, test_inputs), encoding="utf-8")
