"""Jobs run the commit they name: the local executor materializes each job's SHA as a git worktree of a real
repository and runs that commit's model code and mlgate.yaml, never the service's checkout."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from automation.config import parse_config
from automation.store import open_store
from tests.conftest import JOB_THREADS, fast_config, git_commit, project_files, seed_mlflow_store
from triggers.jobs import queue
from triggers.jobs.executors import LocalExecutor

pytestmark = pytest.mark.slow

# the same model file, with a one-unit bottleneck: a commit whose code is genuinely worse; at import it
# also notes which service secret the job's process can see (it must see none)
WORSE_MLP = '''"""A two-layer perceptron squeezed through one unit."""
import os
from pathlib import Path

from torch import nn

from models.datasets import digits as load_data

Path(os.environ["MLGATE_WORKDIR"], "secret-seen-by-job.txt").write_text(str(os.environ.get("GITHUB_WEBHOOK_SECRET")))


def build(hidden: int = 128, dropout: float = 0.1) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 1), nn.ReLU(), nn.Linear(1, 10))
'''


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> dict[str, Any]:
    """The service's repository (a good commit, then a worse one) and its state once the good commit's job
    ran: version 1 in production. Trained once per module; each test runs its jobs on its own copy."""
    base = tmp_path_factory.mktemp("checkout")
    state = base / "service-state"
    config = fast_config(epochs=6, lean=True)
    config["workdir"] = str(state)
    config["models"] = {"digits_mlp": config["models"]["digits_mlp"]}
    repo = base / "repo"
    good = git_commit(repo, project_files("models") | {"mlgate.yaml": yaml.safe_dump(config)}, "good model")
    worse = git_commit(repo, {"models/digits_mlp.py": WORSE_MLP}, "worse model")
    seed_mlflow_store(state, mlflow_template)
    repository = {"repo": repo, "good": good, "worse": worse, "state": state, "engine": open_store(
        f"sqlite:///{state / 'mlgate.db'}"), "config": parse_config((repo / "mlgate.yaml").read_text(),
                                                                     str(repo / "mlgate.yaml"), repo)}
    with pytest.MonkeyPatch.context() as env:
        for name in ("MLFLOW_TRACKING_URI", "MLGATE_DATABASE_URL", "GITHUB_TOKEN", "GITHUB_REPOSITORY"):
            env.delenv(name, raising=False)
        for name, value in JOB_THREADS.items():
            env.setenv(name, value)
        outcome, summary = run(repository, good)
    repository["engine"].dispose()
    return {"repo": repo, "good": good, "worse": worse, "state": state, "good_run": (outcome, summary)}


@pytest.fixture
def repository(trained: dict[str, Any], tmp_path: Path, single_threaded_jobs: None) -> dict[str, Any]:
    """A copy of the trained service state for this test (the MLflow store's artifacts stay where the module's
    job wrote them), and the repository's main branch back at the worse commit."""
    state = tmp_path / "service-state"
    shutil.copytree(trained["state"], state)
    repo = trained["repo"]
    subprocess.run(["git", "reset", "-q", "--hard", trained["worse"]], cwd=repo, check=True)
    raw = yaml.safe_load((repo / "mlgate.yaml").read_text()) | {"workdir": str(state)}
    service_config = parse_config(yaml.safe_dump(raw), str(repo / "mlgate.yaml"), repo)
    engine = open_store(f"sqlite:///{state / 'mlgate.db'}")
    return {"repo": repo, "good": trained["good"], "worse": trained["worse"], "config": service_config,
            "engine": engine, "state": state, "good_run": trained["good_run"]}


def run(repository: dict[str, Any], sha: str | None) -> tuple[Any, dict[str, Any] | None]:
    queue.enqueue(repository["engine"], model="digits_mlp", kind="retrain", trigger="push", sha=sha)
    job = queue.claim(repository["engine"], "test-worker", lease_seconds=600)   # as a worker does: it may promote
    executor = LocalExecutor(repository["config"], str(repository["repo"] / "mlgate.yaml"))
    outcome = executor.run(job, threading.Event())
    queue.finish(repository["engine"], job.id, "test-worker", outcome.state, **outcome.fields)
    report = repository["state"] / "reports" / job.id / "report.json"
    return outcome, json.loads(report.read_text()) if report.exists() else None


def test_each_job_runs_the_code_of_its_own_commit(repository: dict[str, Any],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GITHUB_WEBHOOK_SECRET", "the-service-secret")
    good, good_summary = repository["good_run"]                 # the module's job, on the good commit
    assert good.state == "succeeded" and good.fields["sha"] == repository["good"], good
    assert good_summary["sha"] == repository["good"] and good_summary["metrics"]["accuracy"] > 0.85
    assert f"commit `{repository['good'][:12]}`" in (repository["state"] / "reports" / good_summary["job_id"] /
                                                    "report.md").read_text()
    # the worse commit is the branch head: a job that names no commit runs it (one job for both checks)
    worse, worse_summary = run(repository, None)
    assert worse.state == "gate_failed" and worse_summary["sha"] == repository["worse"]
    assert worse_summary["metrics"]["accuracy"] < good_summary["metrics"]["accuracy"] - 0.2
    # the relative gate compared two different models, and failed for the reason it states
    [relative] = [c for c in worse_summary["gate"]["checks"] if c["name"] == "accuracy vs production"]
    assert relative["status"] == "failed" and relative["reason"].startswith("significant drop beyond δ"), relative
    assert worse_summary["production_before"] == good_summary["version"] and not worse_summary["promoted"]
    # the commit's code ran, and it could not see the service's secret
    assert (repository["state"] / "secret-seen-by-job.txt").read_text() == "None"
    # a job that names no commit runs the branch head and records which commit that was
    head, head_summary = worse, worse_summary
    assert head.fields["sha"] == repository["worse"] and head_summary["sha"] == repository["worse"]
    assert not list((repository["state"] / "worktrees").iterdir())          # every worktree was removed


def test_a_commit_that_cannot_be_fetched_fails_the_job_in_one_line(repository: dict[str, Any]) -> None:
    outcome, summary = run(repository, "0badc0ffee" * 4)
    assert outcome.state == "failed" and summary is None
    assert outcome.fields["error"].startswith("commit 0badc0ffee0b is not in ") and "\n" not in outcome.fields["error"]
    outcome, _ = run(repository, "main; rm -rf /")
    assert outcome.state == "failed" and "is not a commit SHA" in outcome.fields["error"]


# as accurate, but two 2048-wide layers: many times slower at batch 1
SLOWER_MLP = '''"""A perceptron with two wide hidden layers."""
from torch import nn

from models.datasets import digits as load_data


def build(hidden: int = 128, dropout: float = 0.1) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                         nn.Linear(2048, 10))
'''


def test_a_slower_candidate_fails_the_latency_gate_and_production_stays(repository: dict[str, Any]) -> None:
    good, good_summary = repository["good_run"]
    assert good.state == "succeeded"
    slower = git_commit(repository["repo"], {"models/digits_mlp.py": SLOWER_MLP}, "a slower model")
    outcome, summary = run(repository, slower)
    assert outcome.state == "gate_failed", outcome
    [latency] = [c for c in summary["gate"]["checks"] if c["name"] == "latency vs production"]
    assert latency["status"] == "failed" and latency["reason"].startswith("significantly slower"), latency
    assert summary["production_before"] == good_summary["version"] and not summary["promoted"]
    from automation import promote, tracking

    client = tracking.connect(repository["state"], "mlgate")[0]
    assert promote.alias_version(client, "digits_mlp", promote.PRODUCTION) == good_summary["version"]


def peeking_model(seen: Path) -> str:
    """The good model, as a PR that looks for credentials and the service's state when its code is imported."""
    good = (Path(__file__).resolve().parent.parent / "models" / "digits_mlp.py").read_text()
    return good + f'''
import json as _json, os as _os
_wanted = ("GITHUB_TOKEN", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_URI", "GITHUB_WEBHOOK_SECRET",
           "AWS_SECRET_ACCESS_KEY", "MLGATE_DATABASE_URL")
open({str(seen)!r}, "w").write(_json.dumps({{"credentials": [k for k in _wanted if k in _os.environ],
                                             "workdir": _os.environ["MLGATE_WORKDIR"]}}))
'''


def test_a_pr_job_holds_no_credential_and_never_writes_the_registry(repository: dict[str, Any], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    for name in ("GITHUB_TOKEN", "MLFLOW_TRACKING_TOKEN", "GITHUB_WEBHOOK_SECRET", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, f"secret-{name}")
    good, _ = repository["good_run"]
    assert good.state == "succeeded"                            # version 1 is production
    seen = tmp_path / "seen-by-pr.json"
    head = git_commit(repository["repo"], {"models/digits_mlp.py": peeking_model(seen)}, "a PR")
    queue.enqueue(repository["engine"], model="digits_mlp", kind="evaluate", trigger="pr", sha=head, pr=7)
    job = queue.claim(repository["engine"], "test-worker", lease_seconds=600)
    outcome = LocalExecutor(repository["config"], str(repository["repo"] / "mlgate.yaml")).run(job, threading.Event())
    assert outcome.state == "succeeded" and outcome.fields["sha"] == head, outcome
    found = json.loads(seen.read_text())
    assert found["credentials"] == [] and Path(found["workdir"]) != repository["state"]
    # it compared against production, from the snapshot the executor exported, and its report came back
    summary = json.loads((repository["state"] / "reports" / job.id / "summary.json").read_text())
    assert summary["production"]["version"] == "1" and summary["version"] is None and summary["gate"]["passed"]
    assert (repository["state"] / "reports" / job.id / "report.html").is_file()
    registry = f"sqlite:///{repository['state'] / 'mlflow.db'}"
    client = MlflowClient(registry, registry)
    assert [str(v.version) for v in client.search_model_versions("name='digits_mlp'")] == ["1"]
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(experiments, f"tags.`mlgate.job_id` = '{job.id}'")   # no run in the service's store
    assert not (repository["state"] / "isolated" / job.id).exists()
