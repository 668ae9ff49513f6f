"""The PR report: rendered from the summary of a real PR job (tests/fixtures/pr_summary.json: digits_cnn
on a CPU runner, against a production version, with a gate that failed), checked the way GitHub will show
it, plus a CUDA-flavoured copy for what only a GPU runner reports, and the HTML page as a browser draws it."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from automation.report import COMMENT_LIMIT, render_html, render_markdown
from tests.conftest import headless_chromium
from triggers.github.reporter import report_links, status_description

SUMMARY = json.loads((Path(__file__).parent / "fixtures" / "pr_summary.json").read_text())
EMOJI = ("\u2705", "\u274c", "\u23ed")     # ✅ ❌ ⏭ — no emoji font in headless Chromium: empty boxes
SKIP_REASON = "TensorRT engine build failed: <IBuilder> returned null | see the build log"
FALLBACK_REASON = "torch_aoti cannot run here (RuntimeError: package was built for cuda:0)"


@pytest.fixture
def markdown() -> str:
    return render_markdown(SUMMARY, report_links(SUMMARY, "https://mlgate.example"))


def mermaid_blocks(text: str) -> list[str]:
    return re.findall(r"```mermaid\n(.*?)```", text, flags=re.S)


def section(text: str, title: str) -> str:
    return text.split(f"### {title}", 1)[1].split("\n### ", 1)[0]


def table_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert all(row.count("|") - row.count("\\|") == rows[0].count("|") for row in rows)   # a well-formed table
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]


def cuda_summary() -> dict[str, Any]:
    """The fixture as a GPU runner would report it: TF32, a cross-device check, a third batch size,
    GPU memory kinds, a variant skipped with an awkward reason, and production served by its fallback."""
    summary: dict[str, Any] = copy.deepcopy(SUMMARY)
    summary["environment"] |= {"device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3", "cuda": "12.8",
                               "torch": "2.13.0+cu128", "fp32_precision": "tf32", "matmul_precision": "high",
                               "cudnn_tf32": "True"}
    summary["cross_device"] = {"reference": "torch fp32 on cpu", "precision": "fp32", "max_abs_diff": 3.1e-4,
                               "tolerance": 5.8e-3, "argmax_agreement": 1.0, "passed": True}
    summary["training"] |= {"device": "cuda:0", "precision": "bf16 autocast"}
    summary["production"] |= {"variant": "torch_aoti", "served_as": "torch_eager", "fallback_reason": FALLBACK_REASON}
    for variant in summary["variants"]:
        variant["device"] = "cuda:0"
        if variant["latency"]:
            stats = variant["latency"]["32"]
            variant["latency"]["256"] = stats | {"batch_size": 256, "p50_ms": stats["p50_ms"] * 4,
                                                 "throughput_per_s": stats["throughput_per_s"] * 2}
            variant["memory_kind"] = "cuda_device_used" if variant["name"].startswith("onnx") else "cuda_peak_allocated"
    onnx_cuda = next(v for v in summary["variants"] if v["name"] == "onnx_cuda")
    onnx_cuda |= copy.deepcopy({k: v for k, v in summary["variants"][4].items() if k not in ("name", "device")})
    tensorrt = next(v for v in summary["variants"] if v["name"] == "tensorrt_fp16")
    tensorrt |= {"skipped": SKIP_REASON, "precision": "fp16", "build_seconds": 41.5}
    return summary


def samples_of(summary: dict[str, Any]) -> dict[str, list[float]]:
    """Stand-ins for the timed calls the job keeps in memory: enough for the box plot."""
    return {v["name"]: [v["latency"]["1"][k] for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms")]
            for v in summary["variants"] if v["latency"]}


def test_candidate_vs_production_table_has_deltas_and_the_interval(markdown: str) -> None:
    table = markdown.split("### Candidate vs production", 1)[1].split("###", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header == ["metric", "candidate", "production", "Δ"] and rows[1] == "|---|---:|---:|---:|"
    assert all(row.count("|") == rows[0].count("|") for row in rows)          # a well-formed table
    accuracy = next(row for row in rows if row.startswith("| accuracy"))
    assert re.search(r"\| [+−-]\d+\.\d+ pts \(CI \[[+−-]\d+\.\d+, [+−-]\d+\.\d+\]\) \|$", accuracy)   # Δ and its CI
    assert {"p95 latency, batch 1 (ms)", "size (MB)", "macro-F1"} <= {r.split("|")[1].strip() for r in rows}
    assert (f"Production: version {SUMMARY['production']['version']} (`onnx_fp32`, served as `onnx_fp32`)"
            in markdown)


def test_every_gate_check_has_its_mark_and_reason(markdown: str) -> None:
    gate = markdown.split("### Gate", 1)[1].split("\n\n", 1)[0]
    lines = [line for line in gate.splitlines() if line.startswith("- ")]
    assert len(lines) == len(SUMMARY["gate"]["checks"])
    for line, check in zip(lines, SUMMARY["gate"]["checks"]):
        assert line.startswith("- " + {"passed": "✅", "failed": "❌", "skipped": "⏭️"}[check["status"]])
        assert check["reason"] in line
    assert any(line.startswith("- ❌ min accuracy") for line in lines)


def test_mermaid_blocks_are_well_formed(markdown: str) -> None:
    blocks = mermaid_blocks(markdown)
    assert len(blocks) == 3 and markdown.count("```") == 2 * len(blocks)
    for block in blocks:
        lines = [line.strip() for line in block.strip().splitlines()]
        assert lines[0] == "xychart-beta" and lines[1].startswith('title "')
        x_axis = next(line for line in lines if line.startswith("x-axis"))
        series = [line for line in lines if line.startswith(("line [", "bar ["))]
        assert series and re.match(r'x-axis (\[.*\]|"[^"]*" \[.*\])', x_axis)
        labels = len(re.search(r"\[(.*)\]", x_axis).group(1).split(","))
        for line in series:
            values = re.search(r"\[(.*)\]", line).group(1).split(",")
            assert len(values) == labels and all(re.fullmatch(r"-?[\d.]+(e-?\d+)?", v.strip()) for v in values)
        assert re.search(r'y-axis "[^"]+" -?[\d.e+-]+ --> [\d.e+-]+', block)


def test_links_and_the_commit_status_line(markdown: str) -> None:
    assert f"[HTML report](https://mlgate.example/reports/{SUMMARY['job_id']})" in markdown
    assert f"[MLflow run](https://mlflow.example.com/#/experiments/{SUMMARY['experiment_id']}/runs/" in markdown
    assert status_description(SUMMARY) == "gate failed: min accuracy"


def test_every_variant_has_its_numbers_or_its_skip_reason(markdown: str) -> None:
    header, _, *rows = table_rows(section(markdown, "Variants").split("\n\n", 1)[0])
    assert header[:3] == ["variant", "device", "precision"] and "throughput b32 (/s)" in header
    by_name = {row[0].strip("`"): dict(zip(header, row)) for row in rows}
    assert list(by_name) == [v["name"] for v in SUMMARY["variants"]]
    for variant in SUMMARY["variants"]:
        row = by_name[variant["name"]]
        assert (row["device"], row["precision"]) == (variant["device"], variant["precision"])
        if variant["skipped"]:
            assert row["status"] == f"⏭️ skipped: {variant['skipped']}" and row["p50 b1 (ms)"] == "—"
            continue
        assert row["p50 b1 (ms)"] == f"{variant['latency']['1']['p50_ms']:.3f}"
        assert row["p99 b1 (ms)"] == f"{variant['latency']['1']['p99_ms']:.3f}"
        assert row["throughput b32 (/s)"] == f"{variant['latency']['32']['throughput_per_s']:,.0f}"
        assert row["memory (MB)"].endswith("(host RSS)") and row["accuracy"].endswith("%")
        assert row["size (MB)"] == f"{variant['size_mb']:.3f}"
        assert row["status"] == ("**chosen**" if variant["name"] == SUMMARY["chosen_variant"] else "built")
    assert by_name["torch_eager"]["speedup b1 vs `torch_eager`"] == "1.00×"
    assert re.fullmatch(r"\S+ ≤ \S+", by_name["onnx_fp32"]["parity max Δ vs tol"])     # fp32: gated by parity
    assert by_name["onnx_int8"]["parity max Δ vs tol"].endswith("(info)")              # lossy: judged by accuracy


def test_latency_by_batch_size_has_every_batch_size() -> None:
    for summary, sizes in ((SUMMARY, ["1", "32"]), (cuda_summary(), ["1", "32", "256"])):
        text = render_markdown(summary)
        table = text.split("Latency by batch size (ms, p50 / p95 / p99):", 1)[1].split("\n\n", 2)[1]
        header, _, *rows = table_rows(table)
        assert header == ["variant"] + [f"batch {b}" for b in sizes]
        built = [v for v in summary["variants"] if not v["skipped"]]
        assert [row[0].strip("`") for row in rows] == [v["name"] for v in built]
        for row, variant in zip(rows, built):
            for cell, size in zip(row[1:], sizes):
                stats = variant["latency"][size]
                assert cell == " / ".join(f"{stats[k]:.3f}" for k in ("p50_ms", "p95_ms", "p99_ms"))
        assert f"throughput b{sizes[-1]} (/s)" in text


def test_environment_on_a_cpu_runner(markdown: str) -> None:
    env = section(markdown, "Environment")
    assert "**x86_64** (`cpu`); fp32 math `fp32` (torch matmul precision `highest`, cuDNN TF32 `n/a`)" in env
    assert "torch 2.13.0+cpu · onnxruntime 1.32.0 · no CUDA · Python 3.11.7" in env
    assert "Training: on `cpu` × 1, precision fp32" in env
    assert f"Timed region: {SUMMARY['timed_region']}." in env
    assert "Cross-device" not in env                     # nothing to compare on a CPU runner


def test_environment_fallback_and_skip_reasons_on_a_gpu_runner() -> None:
    summary = cuda_summary()
    text = render_markdown(summary)
    env = section(text, "Environment")
    assert ("**NVIDIA H100 80GB HBM3** (`cuda:0`); fp32 math `tf32` (torch matmul precision `high`, "
            "cuDNN TF32 `True`)") in env
    assert "CUDA 12.8" in env and "Training: on `cuda:0` × 1, precision bf16 autocast" in env
    assert ("Cross-device difference (informational, gates nothing): torch fp32 on `cuda:0` vs torch fp32 on cpu: "
            "max |Δlogit| 3.1e-04 (fp32 tolerance 5.8e-03), argmax agreement 100.00%.") in env
    assert ("Production: version 1 (`torch_aoti`, served here by its fallback `torch_eager` because "
            f"{FALLBACK_REASON})") in text
    rows = {row[0].strip("`"): row for row in table_rows(section(text, "Variants").split("\n\n", 1)[0])[2:]}
    # the reason is escaped, not dropped: `<…>` would vanish as a tag on GitHub, `|` would split the cell
    assert rows["tensorrt_fp16"][-1] == ("⏭️ skipped: TensorRT engine build failed: &lt;IBuilder&gt; returned null "
                                         "\\| see the build log")
    assert rows["tensorrt_fp16"][2:4] == ["fp16", "41.5"]      # a failed build's time is shown
    assert rows["onnx_cuda"][1] == "cuda:0" and rows["onnx_cuda"][12].endswith("(GPU used)")
    assert rows["torch_eager"][12].endswith("(GPU peak)")


def test_size_stays_under_githubs_comment_limit_by_construction() -> None:
    huge: dict[str, Any] = cuda_summary()
    huge["metrics"]["per_class_f1"] = {f"class_{i:04d}": 0.5 for i in range(5000)}
    huge["training"]["history"] = huge["training"]["history"] * 500
    huge["gate"]["checks"] = huge["gate"]["checks"] * 200
    for variant in huge["variants"]:
        if variant["latency"]:
            variant["latency"] |= {str(b): variant["latency"]["32"] for b in range(64, 64 * 40, 64)}
        else:
            variant["skipped"] = "x" * 5000
    huge["variants"] = huge["variants"] * 50
    huge["production"]["fallback_reason"] = "y" * 5000
    text = render_markdown(huge, report_links(huge, "https://mlgate.example"))
    assert len(text) < COMMENT_LIMIT
    assert "… report truncated" not in text      # bounded by construction, not cut at the end
    assert len(mermaid_blocks(text)) == 3
    assert "more variants in report.json" in text


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_html_has_no_mermaid_source_and_no_emoji(flavour: str) -> None:
    summary = SUMMARY if flavour == "cpu" else cuda_summary()
    page = render_html(summary, samples_of(summary))
    assert "```mermaid" not in page and "xychart-beta" not in page            # the PNG plots stand in
    assert not [mark for mark in EMOJI if mark in page]
    assert len(mermaid_blocks(render_markdown(summary))) == 3                  # GitHub still gets the charts
    assert page.count("<img ") == 3 and "data:image/png;base64," in page
    # the gate list is built from each check's fields, with a text badge for its status
    for check in summary["gate"]["checks"]:
        badge = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}[check["status"]]
        assert f'<span class="badge {check["status"]}">{badge}</span> <strong>{check["name"]}</strong>' in page
        assert check["reason"] in page
    assert '<span class="badge failed">gate failed</span>' in page
    for variant in summary["variants"]:
        assert f"<code>{variant['name']}</code>" in page
    if flavour == "cuda":
        assert ('<span class="badge skipped">skipped</span> TensorRT engine build failed: &lt;IBuilder&gt; '
                "returned null | see the build log") in page
        assert "gates nothing" in page and "NVIDIA H100 80GB HBM3" in page


def screenshot(page: Path, png: Path, profile: Path) -> None:
    headless_chromium(profile, "--hide-scrollbars", "--window-size=1200,2400", f"--screenshot={png}", page.as_uri())


def test_html_report_renders_in_a_browser(tmp_path: Path) -> None:
    from matplotlib.image import imread

    summary = cuda_summary()
    page, png = tmp_path / "report.html", tmp_path / "report.png"
    page.write_text(render_html(summary, samples_of(summary)), encoding="utf-8")
    screenshot(page, png, tmp_path / "chromium")
    assert png.stat().st_size > 100_000                    # a page of tables and plots, not a blank one
    pixels = imread(png)
    assert pixels.shape[:2] == (2400, 1200)
    drawn = (pixels[..., :3].min(axis=2) < 0.9).any(axis=1)    # rows with anything on them
    assert drawn[:1200].mean() > 0.5 and drawn[1200:].mean() > 0.5     # text, tables and plots down the page


def evidence_summary() -> dict[str, Any]:
    """The fixture as this job now records it: the test set's size per variant, per-cell round counts and
    noise verdicts, a compiled variant skipped as unable to win and an AOTInductor package from the cache."""
    summary: dict[str, Any] = copy.deepcopy(SUMMARY)
    for variant in summary["variants"]:
        if variant["accuracy"] is not None:
            variant["test_examples"] = 36
        for batch, cell in variant["latency"].items():
            early = batch == "1"   # every contender at a batch size stops together
            cell |= {"rounds": 3 if early else 5, "max_rounds": 5, "samples": 600 if early else 1000,
                     "stopped_early": early, "steady": True, "rounds_disagree": False}
    by_name = {v["name"]: v for v in summary["variants"]}
    by_name["torch_eager"]["latency"]["32"] |= {"steady": False, "rounds_disagree": True}
    by_name["onnx_int8"]["latency"]["1"]["p50_ms"] = 2.0          # above its p50 at batch 32 (1.419): noise
    by_name["torch_compile"] |= {"skipped": "cannot win: onnx_fp32 is 4.8× faster than torch_eager at batch 1 on "
                                            "this CPU", "latency": {}, "accuracy": None, "test_examples": None}
    by_name["torch_aoti"] |= {"cached": True, "cache_key": "0123456789abcdef01234567", "build_seconds": 0.9}
    summary["gate"]["checks"][3]["ci"] = [0.0, 0.0]
    return summary


def test_every_accuracy_shows_the_size_of_the_test_set() -> None:
    text = render_markdown(evidence_summary())
    comparison = section(text, "Candidate vs production")
    accuracy = next(row for row in table_rows(comparison) if row[0] == "accuracy")
    assert accuracy[1:] == ["95.56% (n=36)", "95.56% (n=36)", "+0.00 pts (CI [+0.00, +0.00], n=36)"]
    # a zero-width interval on 36 examples says less than it seems to, and the report says so
    assert "one example moves it by 2.78 pts" in comparison and "has no width" in comparison
    header, _, *rows = table_rows(section(text, "Variants").split("\n\n", 1)[0])
    cells = {row[0].strip("`"): dict(zip(header, row))["accuracy"] for row in rows}
    assert cells["onnx_fp32"] == "95.56% (n=36)" and cells["torch_compile"] == "—"
    gate = section(text, "Gate")
    assert "- ❌ min accuracy: accuracy = 0.9556 (threshold ≥ 0.995) — below the limit (n=36)" in gate
    assert "p95 ms (batch 1) = 0.02019 (threshold ≤ 2) — within limit\n" in gate   # latency checks: no n
    assert "(n=36)" in render_html(evidence_summary(), samples_of(SUMMARY))


def test_noisy_latency_cells_are_marked_with_a_footnote() -> None:
    text = render_markdown(evidence_summary())
    table = text.split("Latency by batch size (ms, p50 / p95 / p99):", 1)[1].split("\n\n", 2)[1]
    rows = {row[0].strip("`"): row[1:] for row in table_rows(table)[2:]}
    assert rows["torch_eager"][1].endswith(" †") and not rows["torch_eager"][0].endswith(("†", "‡"))
    assert rows["onnx_int8"][0].endswith(" ‡") and rows["onnx_int8"][1].endswith(" ‡")     # b1 slower than b32
    assert not any(cell.endswith(("†", "‡")) for cell in rows["onnx_fp32"])
    notes = text.split("Latency by batch size", 1)[1].split("### Job cost", 1)[0]
    assert "† Rounds disagree beyond their noise" in notes
    assert "`torch_eager` b32: p95 per round 0.732–1.434 ms" in notes
    assert "‡ Plainly noise" in notes and "`onnx_int8` p50 b1 2.000 ms > b32 1.419 ms" in notes
    variants = {row[0].strip("`"): row for row in table_rows(section(text, "Variants").split("\n\n", 1)[0])[2:]}
    assert variants["onnx_int8"][7] == "2.000 ‡" and variants["torch_eager"][10] == "0.548 †"
    # unmarked where nothing was recorded: the flags come from the benchmark, not guessed afterwards
    assert "†" not in render_markdown(SUMMARY) and "Rounds disagree" not in render_markdown(SUMMARY)


def test_the_report_says_what_was_skipped_cached_and_cut_short() -> None:
    summary = evidence_summary()
    cost = section(render_markdown(summary), "Job cost")
    assert "- Stage times: validate 1.4 s · connect 1.5 s · train 2.2 s" in cost and "outside training 28.7 s" in cost
    assert "- `torch_compile` not built: cannot win: onnx_fp32 is 4.8× faster than torch_eager" in cost
    assert "- `torch_aoti` cached: its artifact was built by an earlier job" in cost and "0123456789abcdef" in cost
    assert "- Timing, batch 1: stopped after 3 of 5 rounds (600 calls per variant)" in cost
    assert ("- Timing, batch 32: all 5 rounds ran (1,000 calls per variant): the per-round p95s of `torch_eager` "
            "stayed further apart than benchmark.steady_spread.") in cost
    assert "one after another" in cost
    rows = {row[0].strip("`"): row for row in table_rows(section(render_markdown(summary), "Variants")
                                                         .split("\n\n", 1)[0])[2:]}
    assert rows["torch_aoti"][3] == "0.9 (cached)"
    assert rows["torch_compile"][-1].startswith("⏭️ skipped: cannot win")
    page = render_html(summary, samples_of(SUMMARY))
    assert "<h3>Job cost</h3>" in page and "(cached)" in page


def test_the_report_says_what_the_job_cost_and_how_training_ended() -> None:
    """The cost section on a GPU runner that resumed after a preemption, and on a CPU; and a training cut
    short by its budget or stopped as hopeless says so."""
    import copy

    summary = copy.deepcopy(SUMMARY)
    summary["cost"] = {
        "stages": {"train": {"wall_seconds": 3600.0, "cpu_seconds": 900.0, "gpu_seconds": 3600.0,
                             "gpu_energy_joules": 1.2e6},
                   "benchmark": {"wall_seconds": 60.0, "cpu_seconds": 61.5, "gpu_seconds": 60.0,
                                 "gpu_energy_joules": 9000.0}},
        "wall_seconds": 3660.0, "cpu_seconds": 961.5,
        "gpu": {"device": "NVIDIA H100 80GB HBM3", "seconds": 3660.0, "energy_joules": 1209000.0,
                "peak_memory_mb": 20480.0},
        "gpu_absent": None,
        "resume": {"resumed_from": {"epoch": 12, "step": 340}, "saved_seconds": 5400.0, "earlier_attempts": 2,
                   "preempted_attempts": 1, "lost_seconds": 240.0}}
    summary["training"] |= {"resumed_from": {"epoch": 12, "step": 340}, "budget_reached": True,
                            "hopeless": None}
    markdown = render_markdown(summary)
    cost = section(markdown, "Job cost")
    assert "- CPU time: 961.5 s over 3660.0 s wall (train 900.0 s · benchmark 61.5 s)." in cost
    assert ("- GPU `NVIDIA H100 80GB HBM3`: 3660.0 GPU-seconds, energy 1209.00 kJ (the whole GPU's counter), "
            "peak memory 20480 MB") in cost
    assert ("- Attempts before this one: 2 (1 preempted), lost 240.0 s; this attempt resumed at epoch 12, step 340, "
            "which saved 5400.0 s of training.") in cost
    training = section(markdown, "Training")
    assert "Resumed from a checkpoint at epoch 12, step 340" in training
    assert "**Stopped at the training budget** (train.max_minutes)" in training
    on_cpu = copy.deepcopy(summary)
    on_cpu["cost"] |= {"gpu": None, "gpu_absent": "the job ran on the CPU",
                       "resume": {"resumed_from": None, "earlier_attempts": 0}}
    on_cpu["training"] |= {"budget_reached": False, "hopeless": "after 3 epochs, validation accuracy 40.00% …"}
    markdown = render_markdown(on_cpu)
    assert "- GPU: none (the job ran on the CPU)." in section(markdown, "Job cost")
    assert "Attempts before" not in markdown and "Resumed from" in markdown   # the training block says it resumed
    assert "**Stopped as hopeless** (train.abort_when_hopeless): after 3 epochs" in section(markdown, "Training")
    assert "<h3>Job cost</h3>" in render_html(on_cpu, samples_of(SUMMARY))
