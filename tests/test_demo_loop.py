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


def test_closed_loop_demo_with_promotion_through_pull_requests(tmp_path: Path) -> None:
    """The demo with `--promotion pull_request` (GitOps): each passing job pushes a promotion branch, a merge moves
    production, `git revert` moves it back, and an alias moved by hand is put back by the reconciler."""
    done = subprocess.run([sys.executable, "-m", "triggers.cli", "demo", "--loop", "--workdir", str(tmp_path / "demo"),
                           "--epochs", "8", "--promotion", "pull_request"], capture_output=True, text=True,
                          timeout=900, env=os.environ | JOB_THREADS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    steps = [s["step"] for s in summary["steps"]]
    assert steps == ["broker", "service", "push", "pull request", "merged", "promoted", "serving", "normal traffic",
                     "monitor", "shifted traffic", "drift", "retrain queued", "pull request", "merged", "promoted",
                     "rollout", "hot swap", "git revert", "drift"]
    by_step = {s["step"]: s for s in summary["steps"]}
    monitor, drift = by_step["monitor"], [s for s in summary["steps"] if s["step"] == "drift"][0]
    assert monitor["drift_share"] < 0.3 <= drift["drift_share"]
    assert [s["version"] for s in summary["steps"] if s["step"] == "promoted"] == ["1", "2"]
    assert [s["version"] for s in summary["steps"] if s["step"] == "pull request"] == ["1", "2"]
    assert by_step["hot swap"]["version"] == "2"
    assert by_step["rollout"]["stages"] == ["shadow", "canary 50%", "done"]   # compared, then half, then all
    live = by_step["rollout"]["comparison"]     # labels the demo sent back (POST /feedback) during the rollout
    assert live["labelled"] >= 100 and live["accuracy"]["candidate"] > live["accuracy"]["baseline"], live
    assert by_step["hot swap"]["accuracy"] > by_step["shifted traffic"]["accuracy"]   # the retrain helped
    assert by_step["git revert"]["version"] == "1"                  # the revert brought version 1 back
    assert summary["steps"][-1]["version"] == "1"                   # the hand-moved alias was put back
    remote = tmp_path / "demo" / "remote.git"
    declared = subprocess.run(["git", "show", "main:deploy/production/digits_mlp.yaml"], cwd=remote,
                              capture_output=True, text=True, check=True).stdout
    assert "version: '1'" in declared and "digest: sha256:" in declared   # git says what production is
    for line in ("push: signed push webhook", "drift: drift share", "→ kafka:", "hot swap: serving answers",
                 "git revert: reverted"):
        assert line in done.stdout
