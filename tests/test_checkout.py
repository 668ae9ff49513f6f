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


SECRETS = {"GITHUB_TOKEN": "ghp_" + "S" * 36, "GITHUB_WEBHOOK_SECRET": "webhook-secret-value",
           "MLFLOW_TRACKING_TOKEN": "mlflow-token-value", "AWS_SECRET_ACCESS_KEY": "aws-secret-value",
           "ACME_VAULT_TOKEN": "a-secret-no-deny-list-knew", "PGPASSWORD": "pg-password-value"}

# what a hostile PR's model file does when it is imported: looks for every secret it could reach, and says
# what it found on stderr (the job's log); the sandbox leaves it nothing else to write to
PEEK = """
import json as _json, os as _os, sys as _sys
_secrets = {k: v[::-1] for k, v in %r.items()}   # reversed here, so this file itself holds none of them
_found = {"env": sorted(k for k in _os.environ if _os.environ[k] in _secrets.values()), "proc": [], "files": []}
for _pid in _os.listdir("/proc"):
    try:
        _environ = open(f"/proc/{_pid}/environ", "rb").read().decode(errors="replace")
    except OSError:
        continue
    _found["proc"] += [k for k, v in _secrets.items() if v in _environ]
# the system's software and the interpreter, bound read-only for every job alike, are not searched (tens of
# thousands of files); everything else the sandbox shows is
_skip = ("/proc", "/sys", "/dev", "/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", _sys.prefix, _sys.base_prefix)
for _root, _dirs, _files in _os.walk("/"):
    _dirs[:] = [d for d in _dirs if not _os.path.join(_root, d).startswith(_skip)]
    for _name in _files:
        try:
            _text = open(_os.path.join(_root, _name), "rb").read(2_000_000).decode(errors="replace")
        except OSError:
            continue
        _found["files"] += [f"{_os.path.join(_root, _name)}: {k}" for k, v in _secrets.items() if v in _text]
_found["pids"] = sorted(p for p in _os.listdir("/proc") if p.isdigit())
_found["uid"] = _os.getuid()
print("PEEK " + _json.dumps(_found), file=_sys.stderr)
""" % ({k: v[::-1] for k, v in SECRETS.items()},)

# what the same PR does to mlgate itself: its gate always passes, and its CLI prints a passing summary last
ALWAYS_PASSING_GATE = """
_real_evaluate_gates = evaluate_gates
def evaluate_gates(*args, **kwargs):
    verdict = _real_evaluate_gates(*args, **kwargs)
    for check in verdict.checks:
        check.status = "passed"
    return verdict
"""
FORGED_SUMMARY = """
import atexit as _atexit, json as _json
_atexit.register(lambda: print(_json.dumps({"model": "digits_mlp", "version": None, "gate": {"passed": True,
                 "checks": []}, "metrics": {"accuracy": 1.0}, "forged": True})))
"""


def peeked(log: Path) -> dict[str, Any]:
    [line] = [line for line in log.read_text().splitlines() if line.startswith("PEEK ")]
    return json.loads(line.removeprefix("PEEK "))


def pr_job(repository: dict[str, Any], head: str, author_writes: bool) -> tuple[Any, Any]:
    payload = {"author_writes": True} if author_writes else {}
    queue.enqueue(repository["engine"], model="digits_mlp", kind="evaluate", trigger="pr", sha=head, pr=7,
                  payload=payload)
    job = queue.claim(repository["engine"], "test-worker", lease_seconds=600)
    return job, LocalExecutor(repository["config"], str(repository["repo"] / "mlgate.yaml")).run(job, threading.Event())


def plant_secrets(repository: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    (repository["state"] / "service-secrets.env").write_text("\n".join(SECRETS.values()))   # the service's state


def assert_found_nothing(found: dict[str, Any]) -> None:
    assert found["env"] == [] and found["proc"] == [] and found["files"] == [], found
    assert found["uid"] == 65534 and len(found["pids"]) < 10, found   # nobody, seeing only its own processes


def test_an_outsiders_pr_is_judged_by_the_base_branch_and_finds_no_secret(
        repository: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A fork's PR with a worse model, a gate that always passes and a CLI that prints a passing summary: its
    code only trains and exports; the base branch's mlgate judges the ONNX it exported, and fails it."""
    from mlflow import MlflowClient

    plant_secrets(repository, monkeypatch)
    root = Path(__file__).resolve().parent.parent
    mlgate = {str(f.relative_to(root)): f.read_text() for folder in ("automation", "triggers")
              for f in (root / folder).rglob("*") if f.is_file() and f.suffix in (".py", ".yaml")}
    head = git_commit(repository["repo"], mlgate | {   # the PR carries its own copy of mlgate, edited
        "models/digits_mlp.py": WORSE_MLP.replace("Path(os.environ", "# Path(os.environ") + PEEK,
        "automation/gate.py": mlgate["automation/gate.py"] + ALWAYS_PASSING_GATE,
        "triggers/cli.py": mlgate["triggers/cli.py"] + FORGED_SUMMARY}, "a hostile PR")
    subprocess.run(["git", "reset", "-q", "--hard", repository["good"]], cwd=repository["repo"], check=True)
    job, outcome = pr_job(repository, head, author_writes=False)
    log = repository["state"] / "jobs" / job.id / "job.log"
    assert outcome.state == "gate_failed" and outcome.fields["sha"] == head, (outcome, log.read_text()[-3000:])
    summary = json.loads((repository["state"] / "reports" / job.id / "summary.json").read_text())
    assert "forged" not in summary and summary["judged"]["by"] == "the service's own mlgate"
    [accuracy] = [c for c in summary["gate"]["checks"] if c["name"] == "min accuracy"]
    assert accuracy["status"] == "failed" and summary["metrics"]["accuracy"] < 0.85, accuracy
    assert summary["production"]["version"] == "1" and summary["version"] is None
    assert_found_nothing(peeked(log))
    registry = f"sqlite:///{repository['state'] / 'mlflow.db'}"
    assert [str(v.version) for v in MlflowClient(registry, registry).search_model_versions("name='digits_mlp'")] == ["1"]
    assert not (repository["state"] / "isolated" / job.id).exists()


def test_a_writers_pr_judges_itself_in_the_sandbox_and_finds_no_secret(
        repository: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    plant_secrets(repository, monkeypatch)
    good = (Path(__file__).resolve().parent.parent / "models" / "digits_mlp.py").read_text()
    head = git_commit(repository["repo"], {"models/digits_mlp.py": good + PEEK}, "a writer's PR")
    job, outcome = pr_job(repository, head, author_writes=True)
    log = repository["state"] / "jobs" / job.id / "job.log"
    assert outcome.state == "succeeded" and outcome.fields["sha"] == head, (outcome, log.read_text()[-3000:])
    assert_found_nothing(peeked(log))
    # it compared against production, from the snapshot the executor exported, and its report came back
    summary = json.loads((repository["state"] / "reports" / job.id / "summary.json").read_text())
    assert summary["production"]["version"] == "1" and summary["version"] is None and summary["gate"]["passed"]
    assert summary["training"] is not None and summary.get("judged") is None   # its own code judged it
    assert (repository["state"] / "reports" / job.id / "report.html").is_file()
    registry = f"sqlite:///{repository['state'] / 'mlflow.db'}"
    client = MlflowClient(registry, registry)
    assert [str(v.version) for v in client.search_model_versions("name='digits_mlp'")] == ["1"]
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(experiments, f"tags.`mlgate.job_id` = '{job.id}'")   # no run in the service's store
    assert not (repository["state"] / "isolated" / job.id).exists()


# an outsider's CLI that leaves links where the service once looked (its report, its candidate), prints a passing
# summary with a forged cost, and exits 3: before, the forged summary was taken as a verdict
LINKS_AND_EXIT_3 = '''
import json as _json, os as _os, sys as _sys
if "--export-candidate" in _sys.argv:
    _folder = _sys.argv[_sys.argv.index("--export-candidate") + 1]
    _job = _sys.argv[_sys.argv.index("--job-id") + 1]
    _report = _os.path.join(_os.environ["MLGATE_WORKDIR"], "reports", _job)
    _os.makedirs(_folder, exist_ok=True)
    _os.makedirs(_report, exist_ok=True)
    for _name in ("model.onnx", "candidate.json", "tokenizer.json"):
        _os.symlink("/proc/self/environ", _os.path.join(_folder, _name))
    _os.symlink("/proc/self/environ", _os.path.join(_report, "report.html"))
    _os.symlink("/proc/self/environ", _os.path.join(_report, "summary.json"))
    print(_json.dumps({"model": "digits_mlp", "gate": {"passed": True, "checks": []}, "promoted": True,
                       "cost": {"wall_seconds": 1e11, "cpu_seconds": 99999}}))
    _sys.stdout.flush()
    _os._exit(3)
'''


def test_an_outsiders_build_that_leaves_links_and_exits_3_gets_no_verdict_of_its_own(
        repository: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    plant_secrets(repository, monkeypatch)
    cli = (Path(__file__).resolve().parent.parent / "triggers" / "cli.py").read_text()
    future = "from __future__ import annotations\n"
    head = git_commit(repository["repo"], {"triggers/cli.py": cli.replace(future, future + LINKS_AND_EXIT_3, 1)},
                      "a PR that forges its end")
    subprocess.run(["git", "reset", "-q", "--hard", repository["good"]], cwd=repository["repo"], check=True)
    job, outcome = pr_job(repository, head, author_writes=False)
    assert outcome.state == "failed", outcome
    assert outcome.fields["error"].startswith("failed: candidate") and "not a regular file" in outcome.fields["error"]
    reports = repository["state"] / "reports" / job.id
    assert not (reports / "summary.json").exists() and not (reports / "report.html").exists()
    totals = queue.job_stats(repository["engine"])   # the module's good run spent some; the forged cost adds none
    assert totals.get("cost:cpu_seconds", 0) < 1000 and totals.get("cost:wall_seconds", 0) < 1e6
    for secret in SECRETS.values():
        assert secret not in "".join(p.read_text(errors="replace") for p in reports.rglob("*") if p.is_file()) \
            if reports.exists() else True
