"""Workers with the local executor, running the real pipeline: a worker killed mid-job loses its
lease, its job process dies with it, and another worker retries the job to completion."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from automation.config import load_config
from automation.store import open_store
from tests.conftest import fast_config, git_commit, project_files, seed_mlflow_store, wait_for, write_config
from triggers.jobs import queue
from triggers.jobs.executors import LocalExecutor
from triggers.jobs.worker import Worker

pytestmark = pytest.mark.slow


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Path, Any, str]:
    """A config in a git repository (jobs run commits), its job database, and the commit to run."""
    config = fast_config(epochs=6, lean=True)
    config["service"] = {"lease_seconds": 3, "max_attempts": 3}
    path = write_config(tmp_path, config)
    commit = git_commit(tmp_path, project_files("models"), "the service's repository")
    monkeypatch.setenv("MLGATE_DATABASE_URL", f"sqlite:///{tmp_path / 'queue.db'}")
    loaded = load_config(path)
    return loaded, path, open_store(os.environ["MLGATE_DATABASE_URL"]), commit


def job_processes(worker: psutil.Process) -> list[psutil.Process]:
    found = []
    for child in worker.children(recursive=True):
        try:   # a short-lived child (git) may have exited, or be a zombie, by the time it is read
            command = child.cmdline()
        except psutil.Error:
            continue
        if "run" in command and "--job-id" in command:
            found.append(child)
    return found


def test_killed_worker_job_is_recovered_and_retried(setup: tuple[Any, Path, Any, str], mlflow_template: Path,
                                                    single_threaded_jobs: None) -> None:
    config, path, engine, commit = setup
    seed_mlflow_store(config.workdir, mlflow_template)
    job, _ = queue.enqueue(engine, model="digits_mlp", kind="retrain", trigger="push", sha=commit)
    worker = subprocess.Popen([sys.executable, "-m", "triggers.cli", "--config", str(path), "worker"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    parent = psutil.Process(worker.pid)
    try:
        assert wait_for(lambda: bool(job_processes(parent)), 60), "the worker never started the job"
        [child] = job_processes(parent)
        assert queue.get_job(engine, job.id).state == "running"
        os.kill(worker.pid, signal.SIGKILL)                      # mid-job: no chance to clean up
        worker.wait(10)
        assert wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 10), \
            "the job process outlived its worker"
    finally:
        if worker.poll() is None:
            worker.kill()
    # another worker recovers the job once the lease has run out, and runs it to the end
    rescuer = Worker(config, engine, LocalExecutor(config, str(path)), worker_id="rescuer")
    assert wait_for(lambda: rescuer.run_one() is not None, 30, interval=0.5)
    done = queue.get_job(engine, job.id)
    assert done.state == "succeeded" and done.attempts == 2 and done.worker_id == "rescuer", done.as_dict()
    assert done.version == "1" and done.error is None
    assert (config.workdir / "jobs" / job.id / "job.log").exists()


def test_cancelled_job_stops_its_process(setup: tuple[Any, Path, Any, str]) -> None:
    config, path, engine, _ = setup
    job, _ = queue.enqueue(engine, model="digits_cnn", kind="retrain", trigger="push")
    worker = Worker(config, engine, LocalExecutor(config, str(path)), worker_id="w")
    thread = threading.Thread(target=worker.run_one)
    thread.start()
    assert wait_for(lambda: queue.get_job(engine, job.id).state == "running", 30)
    assert queue.cancel(engine, job.id, "superseded by hand")
    thread.join(30)
    assert not thread.is_alive(), "the worker kept running a cancelled job"
    done = queue.get_job(engine, job.id)
    assert done.state == "cancelled" and done.error == "superseded by hand" and done.version is None


def test_a_job_past_its_timeout_is_stopped_and_failed_with_the_reason(setup: tuple[Any, Path, Any, str],
                                                                      tmp_path: Path) -> None:
    _, path, engine, _ = setup
    raw = fast_config(epochs=500)   # the commit trains far longer than the service allows
    raw["service"] = {"lease_seconds": 2, "job_timeout_minutes": 0.1}
    commit = git_commit(tmp_path, {"mlgate.yaml": yaml.safe_dump(raw)}, "a slow job")
    config = load_config(path)
    job, _ = queue.enqueue(engine, model="digits_mlp", kind="retrain", trigger="push", sha=commit)
    worker = Worker(config, engine, LocalExecutor(config, str(path)), worker_id="w")
    assert worker.run_one() is not None
    done = queue.get_job(engine, job.id)
    assert done.state == "failed" and done.version is None, done.as_dict()
    assert done.error == "timed out after 0.1 min (service.job_timeout_minutes); the job was stopped"
    assert not job_processes(psutil.Process())                               # its process is gone
