"""The PR report: rendered from the summary of a real PR job (tests/fixtures/pr_summary.json: digits_mlp
against a production version, with a gate that failed), checked the way GitHub will show it."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from automation.report import COMMENT_LIMIT, render_markdown
from triggers.reporter import report_links, status_description

SUMMARY = json.loads((Path(__file__).parent / "fixtures" / "pr_summary.json").read_text())


@pytest.fixture
def markdown() -> str:
    return render_markdown(SUMMARY, report_links(SUMMARY, "https://mlgate.example"))


def mermaid_blocks(text: str) -> list[str]:
    return re.findall(r"```mermaid\n(.*?)```", text, flags=re.S)


def test_candidate_vs_production_table_has_deltas_and_the_interval(markdown: str) -> None:
    table = markdown.split("### Candidate vs production", 1)[1].split("###", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header == ["metric", "candidate", "production", "Δ"] and rows[1] == "|---|---:|---:|---:|"
    assert all(row.count("|") == rows[0].count("|") for row in rows)          # a well-formed table
    accuracy = next(row for row in rows if row.startswith("| accuracy"))
    assert re.search(r"\| [+−-]\d+\.\d+ pts \(CI \[[+−-]\d+\.\d+, [+−-]\d+\.\d+\]\) \|$", accuracy)   # Δ and its CI
    assert {"p95 latency, batch 1 (ms)", "size (MB)", "macro-F1"} <= {r.split("|")[1].strip() for r in rows}
    assert f"Production: version {SUMMARY['production']['version']}" in markdown


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


def test_links_variant_table_and_the_commit_status_line(markdown: str) -> None:
    assert f"[HTML report](https://mlgate.example/reports/{SUMMARY['job_id']})" in markdown
    assert f"[MLflow run](https://mlflow.example.com/#/experiments/{SUMMARY['experiment_id']}/runs/" in markdown
    for variant in ("torch_eager", "onnx_fp32", "onnx_int8"):
        assert f"| `{variant}` |" in markdown
    assert status_description(SUMMARY) == "gate failed: min accuracy"


def test_size_stays_under_githubs_comment_limit_by_construction() -> None:
    huge: dict[str, Any] = copy.deepcopy(SUMMARY)
    huge["metrics"]["per_class_f1"] = {f"class_{i:04d}": 0.5 for i in range(5000)}
    huge["training"]["history"] = huge["training"]["history"] * 500
    huge["gate"]["checks"] = huge["gate"]["checks"] * 200
    huge["variants"] = huge["variants"] * 50
    text = render_markdown(huge, report_links(huge, "https://mlgate.example"))
    assert len(text) < COMMENT_LIMIT
    assert "… report truncated" not in text      # bounded by construction, not cut at the end
    assert len(mermaid_blocks(text)) == 3
