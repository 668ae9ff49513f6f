"""Jobs through the ray executor, end to end, on a real Ray head (tests/ray_head.py: loopback only, its own ports
and temp dir): the queue, workers and the ray executor here, the FastAPI app on a real port that the runners on
Ray post their results to, MLflow and the job database on SQLite.

- a push job retrains and promotes through one Ray submission; its runner posts the JSON summary; its worker is
  killed mid-job and a new one started (one job for both checks): one Ray submission in all, one promotion;
- an outsider's PR is built in the sandbox by a submission holding no credential (nothing of the PR's runs
  outside it, nothing of the service's reaches it), and the base branch's judge reports the verdict;
- cancelling stops the submission, after the checkpoint its SIGTERM asks for (longer than Ray's default 3 s);
- a reused submission id re-attaches instead of running twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from automation.config import RayExecutorConfig, load_config
from automation.store import open_store
from tests.conftest import JOB_THREADS, fast_config, git_commit, project_files, seed_mlflow_store, wait_for
from tests.ray_head import RayHead, start_head
from triggers.github.job_status import summary_file
from triggers.jobs import queue
from triggers.jobs.ray_executor import RayExecutor, stage_tree, submission_id
from triggers.jobs.worker import Worker
from triggers.local_broker import free_port

STOP_MARGIN_SECONDS = int(RayExecutorConfig().stop_grace_margin_seconds)

pytestmark = pytest.mark.slow
SECRET = "result-minting-secret-for-ray-tests"
# the slow-saving model's preemption_grace_seconds: an epoch's end and the save on SIGTERM read its weights
# three times, 4 s each
GRACE = 20

# a user's model that takes 4 s to save its weights: a checkpoint on SIGTERM outlives Ray's default 3 s stop
SLOW_SAVE_MODEL = '''
"""A user's model whose weights take seconds to save, like a large one's."""
import time

from torch import nn

from models.datasets import digits as load_data


class SlowSave(nn.Sequential):
    def forward(self, x):
        if self.training:
            time.sleep(0.02)
        return super().forward(x)

    def state_dict(self, *args, **kwargs):
        time.sleep(4)
        return super().state_dict(*args, **kwargs)


def build(hidden: int = 32) -> nn.Module:
    return SlowSave(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
'''

# an outsider's change to the model file: at import (in the build) it notes what it can see and reach
PROBE = '''
import json as _json
import os as _os
import socket as _socket
from pathlib import Path as _Path

_seen = {"uid": _os.getuid(), "env": sorted(_os.environ), "token": _os.environ.get("MLGATE_RESULT_TOKEN")}
try:
    _socket.create_connection(("127.0.0.1", DASHBOARD_PORT), timeout=3).close()
    _seen["dashboard"] = "reached"
except OSError as _exc:
    _seen["dashboard"] = f"unreachable: {_exc}"
try:
    _seen["leak"] = (_Path(__file__).parent / "leak.txt").read_text()
except OSError as _exc:
    _seen["leak"] = f"absent: {type(_exc).__name__}"
print("SANDBOX-PROBE " + _json.dumps(_seen), flush=True)
'''


class App:
    """The service's FastAPI app (triggers/app.py) under uvicorn on a port chosen before the repository's
    mlgate.yaml names it."""

    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        assert wait_for(lambda: self.server.started, 20), "uvicorn did not start"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def head() -> Iterator[RayHead]:
    """One head per module (about 10 s to start); its jobs' torch runs one thread per process (2 cores)."""
    started = start_head(num_cpus=2, env=dict(JOB_THREADS))
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def service(head: RayHead, tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Iterator[dict[str, Any]]:
    """The service's repository (the model zoo, a slow-saving model, mlgate.yaml naming the head and the app),
    its state, and the app, up for the whole module."""
    from automation import tracking
    from triggers.app import ServiceState, create_app
    from triggers.metrics import ServiceMetrics

    root = tmp_path_factory.mktemp("ray")
    repo, state = root / "repo", root / "state"
    port = free_port()
    config = fast_config(epochs=4, lean=True)
    config["workdir"] = str(state)
    small = {"resources": {"cpus": 1, "memory": "1Gi"}}
    config["models"] = {
        "digits_mlp": {"module": "models.digits_mlp", "params": {"hidden": 64}} | small,
        "two_nodes": {"module": "models.digits_mlp", "params": {"hidden": 32}, "train": {"epochs": 3, "nodes": 2}}
        | small,
        "slow_save": {"module": "slow_save", "params": {"hidden": 32}, "train": {
            "epochs": 30, "batch_size": 64, "patience": 30, "preemption_grace_seconds": GRACE}} | small}
    config["service"] = {"executor": "ray", "lease_seconds": 3, "workers": 1,
                         "ray": {"address": head.address, "service_url": f"http://127.0.0.1:{port}",
                                 "poll_seconds": 0.5, "placement_strategy": "SPREAD"}}   # one machine here
    base = git_commit(repo, project_files("models") | {"slow_save.py": SLOW_SAVE_MODEL,
                                                       "mlgate.yaml": yaml.safe_dump(config)}, "the service's repo")
    loaded = load_config(repo / "mlgate.yaml")
    seed_mlflow_store(loaded.workdir, mlflow_template)
    tracking.connect(loaded.workdir, loaded.experiment)   # the experiment and its artifact root, made here
    engine = open_store(f"sqlite:///{state / 'mlgate.db'}")
    app = App(create_app(ServiceState(config=loaded, engine=engine, webhook_secret="webhook-secret",
                                      metrics=ServiceMetrics(engine), result_secret=SECRET)), port)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLGATE_RESULT_SECRET", SECRET)   # the service mints each runner's credential with it
        for name in ("MLFLOW_TRACKING_URI", "MLGATE_DATABASE_URL", "GITHUB_TOKEN", "GITHUB_REPOSITORY"):
            env.delenv(name, raising=False)
        try:
            yield {"config": loaded, "engine": engine, "repo": repo, "base": base, "root": root, "head": head,
                   "client": head.client()}
        finally:
            app.stop()


def worker(service: dict[str, Any], name: str) -> Worker:
    executor = RayExecutor(service["config"], str(service["repo"] / "mlgate.yaml"), service["engine"])
    return Worker(service["config"], service["engine"], executor, worker_id=name)


def submissions(service: dict[str, Any], job_id: str) -> list[Any]:
    """Every Ray submission this job ever had, by its deterministic ids."""
    return sorted((j for j in service["client"].list_jobs() if (j.submission_id or "").startswith(f"mlgate-{job_id}-")),
                  key=lambda j: j.submission_id)


def promotions(service: dict[str, Any], job_id: str) -> list[Any]:
    from automation.promote import audit_trail

    return [r for r in audit_trail(service["engine"]) if r.job_id == job_id]


def production(service: dict[str, Any], model: str) -> str | None:
    from automation import tracking
    from automation.promote import alias_version

    client, _ = tracking.connect(service["config"].workdir, service["config"].experiment)
    return alias_version(client, model, "production")


def job_log(service: dict[str, Any], job_id: str) -> str:
    path = service["config"].workdir / "jobs" / job_id / "job.log"
    return path.read_text(errors="replace") if path.exists() else ""


def test_a_push_job_retrains_and_promotes_through_one_ray_submission_though_its_worker_was_killed(
        service: dict[str, Any]) -> None:
    """One job for two checks: a push job's path through Ray, and its worker killed mid-job (the service's
    machine gone) with a new one taking the job over: one Ray submission in all, one promotion."""
    job, _ = queue.enqueue(service["engine"], model="digits_mlp", kind="retrain", trigger="push",
                           sha=service["base"])
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "GITHUB_"))}
    killed = subprocess.Popen([sys.executable, "-m", "triggers.cli", "--config", str(service["repo"] / "mlgate.yaml"),
                               "worker"], cwd=service["repo"], env=clean | {"MLGATE_RESULT_SECRET": SECRET},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: any(str(s.status) == "RUNNING" for s in submissions(service, job.id)), 60), \
            queue.get_job(service["engine"], job.id).as_dict()
        killed.send_signal(signal.SIGKILL)   # the service's machine is gone: no clean-up, no goodbye to Ray
        killed.wait(10)
    finally:
        if killed.poll() is None:
            killed.kill()
    [running] = submissions(service, job.id)
    assert str(running.status) == "RUNNING"   # Ray's, not the worker's: it goes on
    rescuer = worker(service, "ray-rescuer")
    assert wait_for(lambda: rescuer.run_one() is not None, 30, interval=0.5)   # once the lease expired
    done = queue.get_job(service["engine"], job.id)
    assert done.state == "succeeded" and done.attempts == 2, (done.as_dict(), job_log(service, job.id)[-3000:])
    assert [a.state for a in queue.attempts(service["engine"], job.id)] == ["lost", "succeeded"]
    assert queue.runner_origin(service["engine"], job.id, 2) == 1   # attempt 2 adopted attempt 1's runner
    # the runner's summary came back through POST /jobs/{id}/result
    summary = json.loads(summary_file(service["config"].workdir, job.id).read_text())
    assert summary["job_id"] == job.id and summary["promoted"] is True and summary["sha"] == service["base"]
    assert production(service, "digits_mlp") == summary["version"] == done.version
    assert [r.version for r in promotions(service, job.id)] == [summary["version"]]
    # the runner exits a moment after posting (the executor follows it for up to 10 s; a loaded machine is slower)
    assert wait_for(lambda: [str(s.status) for s in submissions(service, job.id)] == ["SUCCEEDED"], 60)
    [ran] = submissions(service, job.id)
    assert ran.submission_id == submission_id(job.id, 1)
    env = ran.runtime_env["env_vars"]
    assert env["MLGATE_RESULT_TOKEN"].startswith(f"{job.id}.1.")        # a trusted runner's own credential
    assert env["RAY_JOB_STOP_WAIT_TIME_S"] == str(30 + STOP_MARGIN_SECONDS)   # the default 30 s grace, and a margin
    assert env["MLGATE_WORKDIR"] == str(service["config"].workdir.resolve())   # it promoted into this registry
    assert ran.metadata["mlgate_role"] == "job" and ran.entrypoint.startswith("python -m triggers.cli --config "
                                                                              "mlgate.yaml run --model digits_mlp")
    log = job_log(service, job.id)
    assert f"--- Ray job {ran.submission_id} ---" in log and "Running entrypoint" in log
    assert env["MLGATE_RESULT_TOKEN"] not in log
    assert not (service["config"].workdir / "exchange" / job.id).exists()


@pytest.fixture
def outsider_pr(service: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """A PR by someone who cannot write: its model file probes the sandbox, a link points at a file of the
    service's, and a sitecustomize.py would note any Python that ran the PR's tree outside the sandbox."""
    repo = service["repo"]
    secret_file = tmp_path / "service-secret.txt"
    secret_file.write_text(SECRET)
    marker = tmp_path / "sitecustomize-ran-outside-the-sandbox"
    model = (repo / "models" / "digits_mlp.py").read_text() + PROBE.replace(
        "DASHBOARD_PORT", str(service["head"].ports["--dashboard-port"]))
    subprocess.run(["git", "checkout", "-q", "-b", f"pr-{tmp_path.name}"], cwd=repo, check=True)
    try:
        (repo / "models" / "leak.txt").symlink_to(secret_file)
        sha = git_commit(repo, {"models/digits_mlp.py": model, "sitecustomize.py":
                                f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"}, "a PR")
    finally:
        subprocess.run(["git", "checkout", "-q", "main"], cwd=repo, check=True)
    return {"sha": sha, "marker": marker}


def test_an_outsiders_pr_is_built_without_a_credential_in_the_sandbox_and_judged_by_the_base_branch(
        service: dict[str, Any], outsider_pr: dict[str, Any]) -> None:
    from triggers.jobs.sandbox import SandboxUnavailable, bubblewrap

    try:
        bubblewrap()
    except SandboxUnavailable as exc:
        pytest.skip(f"an outsider's build runs only sandboxed: {exc}")
    production_before = production(service, "digits_mlp")
    job, _ = queue.enqueue(service["engine"], model="digits_mlp", kind="evaluate", trigger="pr", pr=7,
                           sha=outsider_pr["sha"], payload={"author_writes": False})
    assert worker(service, "ray-pr").run_one() is not None
    done = queue.get_job(service["engine"], job.id)
    log = job_log(service, job.id)
    assert done.state in ("succeeded", "gate_failed"), (done.as_dict(), log[-3000:])
    # the verdict is the judge's: its summary came back with its credential
    summary = json.loads(summary_file(service["config"].workdir, job.id).read_text())
    assert summary["job_id"] == job.id and summary["trigger"] == "pr" and summary["promoted"] is False
    assert summary["sha"] == outsider_pr["sha"] and summary["gate"]["passed"] == (done.state == "succeeded")
    assert production(service, "digits_mlp") == production_before
    build, judge = submissions(service, job.id)
    assert (build.submission_id, judge.submission_id) == (submission_id(job.id, 1, "build"),
                                                          submission_id(job.id, 1, "judge"))
    # the build's submission holds no credential, nor anything the dashboard would give away
    shown = json.dumps({"entrypoint": build.entrypoint, "runtime_env": build.runtime_env, "metadata": build.metadata})
    assert "MLGATE_RESULT_TOKEN" not in shown and SECRET not in shown and f"{job.id}.1." not in shown
    assert set(build.runtime_env["env_vars"]) == {"RAY_JOB_STOP_WAIT_TIME_S"}
    assert build.entrypoint.startswith("python -I -m triggers.jobs.ray_executor sandbox-build --archive tree.tar")
    assert judge.runtime_env["env_vars"]["MLGATE_RESULT_TOKEN"].startswith(f"{job.id}.1.")
    # inside, the build was nobody, with nothing of the service's: no credential, no dashboard, no linked file
    [probe] = {line for line in log.splitlines() if line.startswith("SANDBOX-PROBE ")}
    seen = json.loads(probe.removeprefix("SANDBOX-PROBE "))
    assert seen["uid"] == 65534 and seen["token"] is None, seen
    assert seen["dashboard"].startswith("unreachable"), seen
    assert seen["leak"].startswith("absent"), seen
    assert not any(name.startswith(("MLGATE_RESULT", "RAY_", "MLFLOW_")) for name in seen["env"]), seen["env"]
    # and no Python ran the PR's tree outside the sandbox (Ray's workers put a working_dir on their path)
    assert not outsider_pr["marker"].exists()
    assert not (service["config"].workdir / "exchange" / job.id).exists()


def test_a_writers_pr_judges_itself_on_ray_with_a_store_of_its_own(service: dict[str, Any]) -> None:
    """A PR by someone who can write runs its own code with its credential (it reports, and fetches production
    from the service), but nothing of the service's registry: it cannot promote."""
    production_before = production(service, "digits_mlp")
    job, _ = queue.enqueue(service["engine"], model="digits_mlp", kind="evaluate", trigger="pr", pr=8,
                           sha=service["base"], payload={"author_writes": True})
    assert worker(service, "ray-writer").run_one() is not None
    done = queue.get_job(service["engine"], job.id)
    assert done.state in ("succeeded", "gate_failed"), (done.as_dict(), job_log(service, job.id)[-3000:])
    summary = json.loads(summary_file(service["config"].workdir, job.id).read_text())
    assert summary["job_id"] == job.id and summary["trigger"] == "pr" and summary["promoted"] is False
    private = service["config"].workdir.resolve() / "exchange" / job.id / "work"
    assert summary["tracking_uri"] == f"sqlite:///{private / 'mlflow.db'}"   # its own store, not the service's
    assert production(service, "digits_mlp") == production_before
    [ran] = submissions(service, job.id)
    env = ran.runtime_env["env_vars"]
    assert env["MLGATE_RESULT_TOKEN"].startswith(f"{job.id}.1.") and env["MLGATE_WORKDIR"] == str(private)
    assert not any(name.startswith(("MLFLOW_", "MLGATE_DATABASE")) for name in env), env
    assert not private.parent.exists()   # the job's exchange folder went with it


def test_cancelling_a_job_stops_its_submission_after_the_checkpoint(service: dict[str, Any]) -> None:
    job, _ = queue.enqueue(service["engine"], model="slow_save", kind="retrain", trigger="manual")
    rayed = worker(service, "ray-cancel")
    thread = threading.Thread(target=rayed.run_one, daemon=True)
    thread.start()
    def epoch() -> int:   # the runner's progress, as the executor forwards it to the queue
        return queue.running_progress(service["engine"], [job.id]).get(job.id, {}).get("epoch") or 0

    try:   # in the training loop: an epoch is done
        assert wait_for(lambda: epoch() >= 1, 120), job_log(service, job.id)[-3000:]
        cancelled, cancelled_at = time.monotonic(), time.time()
        assert queue.cancel(service["engine"], job.id, "cancelled by a test")
        thread.join(GRACE + 2 * STOP_MARGIN_SECONDS + 15)
        took = time.monotonic() - cancelled
    finally:
        queue.cancel(service["engine"], job.id, "the test ended")   # a failed wait leaves no worker behind
        thread.join(GRACE + 2 * STOP_MARGIN_SECONDS + 15)
    assert not thread.is_alive()
    [ran] = submissions(service, job.id)
    assert str(ran.status) == "STOPPED", ran
    assert ran.runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == str(GRACE + STOP_MARGIN_SECONDS)
    assert queue.get_job(service["engine"], job.id).state == "cancelled"
    # the SIGTERM's checkpoint (the model's weights take 4 s to read) outlived Ray's default 3 s before its
    # SIGKILL: it was written, and the runner said so before it exited
    log = job_log(service, job.id)
    assert "checkpointed in" in log and "the next attempt resumes there" in log, log[-3000:]
    assert ran.end_time / 1000 - cancelled_at >= 4, (ran.end_time, cancelled_at)
    assert took < GRACE + 2 * STOP_MARGIN_SECONDS, took


def test_a_reused_submission_id_re_attaches_instead_of_running_twice(service: dict[str, Any],
                                                                    tmp_path: Path) -> None:
    """A submission already under this attempt's id (the service died between Ray's answer and its own record):
    Ray refuses the id, and the executor waits on the submission that is there instead of starting another."""
    job, _ = queue.enqueue(service["engine"], model="digits_mlp", kind="retrain", trigger="manual")
    claimed = queue.claim(service["engine"], "ray-reuse", lease_seconds=60)
    assert claimed is not None and claimed.id == job.id
    sid = submission_id(job.id, 1)
    service["client"].submit_job(entrypoint="echo already-here; sleep 2; exit 3", submission_id=sid)
    executor = RayExecutor(service["config"], str(service["repo"] / "mlgate.yaml"), service["engine"])
    outcome = executor.run(claimed, threading.Event())
    [ran] = submissions(service, job.id)
    assert ran.entrypoint == "echo already-here; sleep 2; exit 3"   # the one that was there, run once
    assert outcome is not None and outcome.state == "failed"
    # Ray's reason, not the runner's output
    assert outcome.fields["error"] == (f"the Ray job {sid} ended FAILED, exit code 3 without reporting a result: "
                                       "Job entrypoint command failed with exit code 3"), outcome.fields
    assert "already-here" in job_log(service, job.id)   # its log is kept in the job's log all the same
    queue.finish(service["engine"], job.id, "ray-reuse", "failed", **outcome.fields)


def test_links_out_of_the_tree_are_never_shipped(tmp_path: Path) -> None:
    """Ray's packaging follows links: a commit's link to a file of the service's machine would ship its content."""
    tree, staged = tmp_path / "tree", tmp_path / "staged"
    (tree / "models").mkdir(parents=True)
    (tree / "models" / "model.py").write_text("x = 1\n")
    (tree / ".git").write_text("gitdir: elsewhere\n")
    (tmp_path / "secret.txt").write_text(SECRET)
    (tree / "models" / "leak.txt").symlink_to(tmp_path / "secret.txt")
    (tree / "environ").symlink_to("/proc/self/environ")
    (tree / "etc").symlink_to("/etc")
    (tree / "models" / "alias.py").symlink_to("model.py")   # inside the tree: shipped as the file it names
    left_out = stage_tree(tree, staged)
    assert sorted(left_out) == ["environ", "etc", "models/leak.txt"]
    shipped = sorted(str(p.relative_to(staged)) for p in staged.rglob("*"))
    assert shipped == ["models", "models/alias.py", "models/model.py"]
    assert not any(p.is_symlink() for p in staged.rglob("*"))
    assert (staged / "models" / "alias.py").read_text() == "x = 1\n"


def test_nothing_the_head_started_listens_beyond_loopback(head: RayHead) -> None:
    """Last: by now the head has started its agents and workers for the jobs above."""
    assert head.started_processes()
    assert head.non_loopback_listeners() == []


def test_a_model_on_two_nodes_trains_with_torchrun_per_worker_and_node_0_reports(service: dict[str, Any]) -> None:
    """train.nodes: 2 on Ray: one submission whose entrypoint places two bundles and runs `mlgate run` on each
    with the launcher's rendezvous; node 0 registers and reports, once."""
    job, _ = queue.enqueue(service["engine"], model="two_nodes", kind="retrain", trigger="push", sha=service["base"])
    assert worker(service, "ray-nodes").run_one() is not None
    done = queue.get_job(service["engine"], job.id)
    assert done.state == "succeeded", (done.as_dict(), job_log(service, job.id)[-3000:])
    summary = json.loads(summary_file(service["config"].workdir, job.id).read_text())
    assert summary["training"]["world_size"] == 2 and summary["promoted"] is True
    assert [r.version for r in promotions(service, job.id)] == [summary["version"]]
    [ran] = submissions(service, job.id)
    assert ran.entrypoint.startswith("python -m triggers.jobs.ray_nodes --nodes 2 --cpus 1 ")
