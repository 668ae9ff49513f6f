"""The closed-loop demo runs end to end (small epoch count) and every step happened, in order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import JOB_THREADS

pytestmark = pytest.mark.slow


def test_closed_loop_demo(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "triggers.cli", "demo", "--loop", "--workdir", str(tmp_path / "demo"),
                           "--epochs", "8"], capture_output=True, text=True, timeout=900, env=os.environ | JOB_THREADS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    steps = [s["step"] for s in summary["steps"]]
    assert steps == ["broker", "service", "push", "promoted", "serving", "normal traffic", "monitor",
                     "shifted traffic", "drift", "retrain queued", "promoted", "rollout", "hot swap"]
    by_step = {s["step"]: s for s in summary["steps"]}
    assert by_step["monitor"]["drift_share"] < 0.3 <= by_step["drift"]["drift_share"]
    assert [s["version"] for s in summary["steps"] if s["step"] == "promoted"] == ["1", "2"]
    assert by_step["hot swap"]["version"] == "2"
    assert by_step["rollout"]["stages"] == ["shadow", "canary 50%", "done"]   # compared, then half, then all
    live = by_step["rollout"]["comparison"]     # labels the demo sent back (POST /feedback) during the rollout
    assert live["labelled"] >= 100 and live["accuracy"]["candidate"] > live["accuracy"]["baseline"], live
    assert by_step["hot swap"]["accuracy"] > by_step["shifted traffic"]["accuracy"]   # the retrain helped
    for line in ("push: signed push webhook", "drift: drift share", "→ kafka:", "hot swap: serving answers"):
        assert line in done.stdout
