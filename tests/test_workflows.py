"""The workflows in .github: schema-valid, clean under zizmor, least-privilege by construction, and
the GPU-runner workflow executed for real by act (host mode, no Docker) on the example model."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
BIN = Path(sys.executable).parent
RETRAIN = ROOT / ".github" / "workflows" / "retrain.yml"


def load(path: Path) -> dict[str, Any]:
    # YAML 1.1 reads the key `on` as True
    return {("on" if k is True else k): v for k, v in yaml.safe_load(path.read_text()).items()}


def test_workflows_match_githubs_schema() -> None:
    done = subprocess.run([BIN / "check-jsonschema", "--builtin-schema", "vendor.github-workflows", *WORKFLOWS],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_zizmor_finds_nothing() -> None:
    done = subprocess.run([BIN / "zizmor", "--offline", "--no-progress", ROOT / ".github" / "workflows"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_action_is_pinned_and_no_input_is_interpolated_into_a_script() -> None:
    for path in WORKFLOWS:
        for job in load(path)["jobs"].values():
            for step in job["steps"]:
                if "uses" in step:
                    assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", step["uses"]), (path.name, step["uses"])
                if "run" in step:
                    assert "${{" not in step["run"], (path.name, step.get("name"), "use env: instead")


def test_gpu_runner_workflow_contract() -> None:
    workflow = load(RETRAIN)
    inputs = workflow["on"]["workflow_dispatch"]["inputs"]
    assert set(inputs) == {"model", "job_id", "trigger", "sha", "pr", "data_ref"}
    assert all("type" in spec for spec in inputs.values())
    assert inputs["trigger"]["type"] == "choice"
    [job] = workflow["jobs"].values()
    assert job["runs-on"] == ["self-hosted", "linux", "gpu"] and job["timeout-minutes"] <= 360
    assert "inputs.model" in workflow["concurrency"]["group"]
    assert workflow["permissions"]["contents"] == "read"
    assert not {k for k, v in workflow["permissions"].items() if v == "write"} - {"statuses", "pull-requests",
                                                                                   "issues"}
    labels = yaml.safe_load((ROOT / ".github" / "actionlint.yaml").read_text())["self-hosted-runner"]["labels"]
    assert "gpu" in labels


def remote_actions(path: Path) -> list[str]:
    return [step["uses"] for job in load(path)["jobs"].values() for step in job["steps"] if "uses" in step]


@pytest.mark.slow
def test_act_runs_the_gpu_runner_workflow_on_the_example_model(tmp_path: Path) -> None:
    """act in host mode on a git copy of the tracked tree. act fetches every remote action before the job
    starts, which cannot work offline: each is replaced by an empty stand-in. act then checks out the
    local tree itself (a checkout without `ref`), and the artifact upload is skipped under act (`env.ACT`)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    tree = tmp_path / "repo"
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    for git in (["init", "-q"], ["add", "-A"], ["-c", "user.email=ci@mlgate", "-c", "user.name=ci", "commit", "-qm",
                                                "tree under test"]):
        subprocess.run(["git", *git], cwd=tree, check=True, capture_output=True)
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"inputs": {"model": "digits_mlp", "job_id": "act-job-1", "trigger": "manual",
                                            "sha": "", "pr": "", "data_ref": ""}}))
    stand_ins = []
    for action in sorted(set(remote_actions(RETRAIN))):
        stub = tmp_path / "actions" / action.replace("/", "_").replace("@", "_")
        stub.mkdir(parents=True)
        shutil.copy(ROOT / "tests" / "fixtures" / "offline_action.yml", stub / "action.yml")
        stand_ins += ["--local-repository", f"{action}={stub}"]
    done = subprocess.run(
        [BIN / "act", "workflow_dispatch", "-W", ".github/workflows/retrain.yml", "-e", str(event),
         "-P", "self-hosted=-self-hosted", "-P", "linux=-self-hosted", "-P", "gpu=-self-hosted",
         "--no-cache-server", "--env", f"MLGATE_VENV={BIN.parent}", *stand_ins],
        cwd=tree, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "Job succeeded" in output, output[-4000:]
    summary = json.loads(next(line.split("| ", 1)[1] for line in output.splitlines()
                              if "| {" in line and '"job_id": "act-job-1"' in line))
    assert summary["model"] == "digits_mlp" and summary["gate"]["passed"] and summary["promoted"]
    # it ran on the checked-out tree: the gates are the repository's mlgate.yaml, not the embedded defaults
    repo_gate = yaml.safe_load((ROOT / "mlgate.yaml").read_text())["defaults"]["gates"]["absolute"]
    [accuracy] = [c for c in summary["gate"]["checks"] if c["name"] == "min accuracy"]
    assert accuracy["threshold"] == f"≥ {repo_gate['min_accuracy']:g}"
    assert len(summary["training"]["history"]) > 0
