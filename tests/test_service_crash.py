"""The whole service killed with SIGKILL mid-job, then started again: the job is recovered once its
lease runs out and finishes exactly once, with one promotion and a final state. Both databases."""

from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest
import yaml

from automation import promote, store
from tests.conftest import (JOB_THREADS, ServeProcess, clean_tables, fast_config, git_commit, project_files,
                            seed_mlflow_store, wait_for)
from triggers.jobs import queue

pytestmark = pytest.mark.slow


class Service(ServeProcess):
    def __init__(self, directory: Path, db_url: str) -> None:
        env = {"GITHUB_WEBHOOK_SECRET": "crash-secret", "GITHUB_REPOSITORY": "Codertocat/Hello-World", "MLGATE_DATABASE_URL": db_url, **JOB_THREADS}
        super().__init__(directory / "mlgate.yaml", directory, cwd=directory, env=env)


def job_processes(pid: int) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "--job-id" in child.cmdline():
                found.append(child)
        except psutil.Error:
            continue
    return found


def test_a_service_killed_mid_job_finishes_the_job_once_after_restart(tmp_path: Path, db_url: str,
                                                                      mlflow_template: Path) -> None:
    clean_tables(db_url)
    config = fast_config(epochs=10, lean=True)
    config["models"] = {"digits_mlp": config["models"]["digits_mlp"]}
    config["service"] = {"workers": 1, "lease_seconds": 4}
    sha = git_commit(tmp_path, project_files("models") | {"mlgate.yaml": yaml.safe_dump(config),
                                                           ".gitignore": "state/\n*.log\n"})
    seed_mlflow_store(tmp_path / "state", mlflow_template)
    engine = store.open_store(db_url)
    job, _ = queue.enqueue(engine, model="digits_mlp", kind="retrain", trigger="push", sha=sha)
    first = Service(tmp_path, db_url)
    try:
        assert wait_for(lambda: bool(job_processes(first.process.pid)), 90), "the job never started"
        [child] = job_processes(first.process.pid)
        first.process.send_signal(signal.SIGKILL)                # the service and its threads, mid-job
        first.process.wait(10)
        assert wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 10)
    finally:
        first.log.close()
    assert queue.get_job(engine, job.id).state == "running"      # nobody recorded anything
    second = Service(tmp_path, db_url)
    try:
        assert wait_for(lambda: queue.get_job(engine, job.id).state not in ("queued", "running"), 180), \
            (tmp_path / "service.log").read_text()[-3000:]
    finally:
        second.stop()
    done = queue.get_job(engine, job.id)
    assert done.state == "succeeded" and done.attempts == 2 and done.version == "1", done.as_dict()
    # one promotion: the audit table outlives tests on PostgreSQL, so only this job's rows count
    assert [r.version for r in promote.audit_trail(engine, "digits_mlp") if r.job_id == job.id] == ["1"]
    assert queue.job_stats(engine).get("ended:succeeded") == 1.0
