"""Long jobs on runners that go away, through the real service pieces (queue, worker, local executor, `mlgate
run` in a subprocess), on SQLite and on PostgreSQL:

- a runner killed outright (SIGKILL, worker and job) at epoch k: the retry resumes at epoch k or later, trains
  only the remaining epochs, and ends with exactly the weights of an uninterrupted run (`mlgate run --job-id` by
  hand, twice under one id: a job deletes its checkpoints when it ends, so the second trains every epoch too);
- a preempted runner (SIGTERM): the job checkpoints within its grace period, the attempt is recorded as
  `preempted`, and the retry does not count toward max_attempts.

The model is a user's own file, not one of the examples: an MLP on digits whose training steps are slowed
down, so that a kill lands mid-training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from automation.config import load_config
from automation.store import open_store
from tests.conftest import fast_config, seed_mlflow_store, wait_for, write_config
from triggers.github.job_status import summary_file
from triggers.jobs import queue
from triggers.jobs.executors import LocalExecutor
from triggers.jobs.worker import Worker

pytestmark = pytest.mark.slow

EPOCHS = 6
SLOW_MODEL = '''
"""A user's model: an MLP whose training steps take a while, like a real one's."""
import time

from torch import nn

from models.datasets import digits as load_data


class SlowMLP(nn.Sequential):
    def forward(self, x):
        if self.training:
            time.sleep(0.03)
        return super().forward(x)


def build(hidden: int = 32, dropout: float = 0.2) -> nn.Module:
    return SlowMLP(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10))
'''


@pytest.fixture
def service(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch, mlflow_template: Path,
            single_threaded_jobs: None) -> tuple[Any, Path, Any]:
    return _service(tmp_path, db_url, monkeypatch, mlflow_template)


@pytest.fixture
def sqlite_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_template: Path,
                   single_threaded_jobs: None) -> tuple[Any, Path, Any]:
    """The job side of a preemption does not depend on the database (its accounting is tested on both)."""
    return _service(tmp_path, f"sqlite:///{tmp_path / 'mlgate.db'}", monkeypatch, mlflow_template)


def _service(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch,
             mlflow_template: Path) -> tuple[Any, Path, Any]:
    (tmp_path / "slow_mlp.py").write_text(SLOW_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))   # this process loads the registered (pickled) model too
    config = fast_config(lean=True)
    config["models"] = {"slow_mlp": {
        "module": "slow_mlp", "params": {"hidden": 32, "dropout": 0.2},
        "train": {"epochs": EPOCHS, "batch_size": 128, "lr": 0.01, "lr_schedule": "onecycle", "patience": EPOCHS,
                  "preemption_grace_seconds": 20}}}
    config["service"] = {"lease_seconds": 3, "checkout": "in_place"}
    path = write_config(tmp_path, config)
    monkeypatch.setenv("MLGATE_DATABASE_URL", db_url)
    loaded = load_config(path)
    seed_mlflow_store(loaded.workdir, mlflow_template)
    return loaded, path, open_store(db_url)


def checkpoints_of(config: Any, job_id: str) -> list[int]:
    """The epochs of the job's complete checkpoints (those with a sidecar)."""
    folder = config.workdir / "jobs" / job_id / "checkpoints"
    return sorted(json.loads(p.read_text())["epoch"] for p in folder.glob("ckpt-*.pt.json")) if folder.is_dir() \
        else []


def job_process(parent: psutil.Process) -> psutil.Process | None:
    for child in parent.children(recursive=True):
        try:
            if "--job-id" in child.cmdline():
                return child
        except psutil.Error:
            continue
    return None


def summary(config: Any, job_id: str) -> dict[str, Any]:
    return json.loads(summary_file(config.workdir, job_id).read_text())


def trained_weights(config: Any, run_id: str) -> dict[str, torch.Tensor]:
    import mlflow

    from automation import tracking

    tracking.connect(config.workdir, config.experiment)
    return mlflow.pytorch.load_model(f"runs:/{run_id}/torch", map_location="cpu").state_dict()


def test_a_runner_killed_at_epoch_k_resumes_there_and_ends_with_the_uninterrupted_weights(
        service: tuple[Any, Path, Any], db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    config, path, engine = service
    # a lost lease is an attempt: this job may have one retry
    job, _ = queue.enqueue(engine, model="slow_mlp", kind="retrain", trigger="manual", max_attempts=2)
    worker = subprocess.Popen([sys.executable, "-m", "triggers.cli", "--config", str(path), "worker"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        assert wait_for(lambda: max(checkpoints_of(config, job.id), default=0) >= 2, 120), \
            "no checkpoint of epoch 2 appeared"
        child = job_process(psutil.Process(worker.pid))
        os.kill(worker.pid, signal.SIGKILL)            # the machine is gone: worker and job, no clean-up
        if child is not None:
            child.kill()
        worker.wait(10)
    finally:
        if worker.poll() is None:
            worker.kill()
    killed_at = max(checkpoints_of(config, job.id))
    assert killed_at < EPOCHS, "the job finished before it could be killed: slow the model down"

    rescuer = Worker(config, engine, LocalExecutor(config, str(path), engine), worker_id="rescuer")
    assert wait_for(lambda: rescuer.run_one() is not None, 30, interval=0.5)
    done = queue.get_job(engine, job.id)
    assert done.state == "succeeded" and done.attempts == 2, done.as_dict()
    assert [a.state for a in queue.attempts(engine, job.id)] == ["lost", "succeeded"]
    training = summary(config, job.id)["training"]
    assert training["resumed_from"]["epoch"] >= 2 and training["resumed_from"]["epoch"] >= killed_at
    assert training["epochs_this_attempt"] == EPOCHS - training["resumed_from"]["epoch"]   # only the rest
    assert len(training["history"]) == EPOCHS
    assert not (config.workdir / "jobs" / job.id / "checkpoints").exists()   # ended: nothing left to resume

    if not db_url.startswith("sqlite"):
        return   # the weights do not depend on the queue's database: compared once, on SQLite
    # the same job, never interrupted: `mlgate run --job-id` without the service around it (as a runner runs it),
    # twice under one id. The job itself deletes its checkpoints once it ends: run again, it trains every epoch
    from tests.conftest import last_json, run_cli

    folder = config.workdir / "jobs" / "by-hand" / "checkpoints"
    by_hand = []
    for _ in range(2):
        code, out, _ = run_cli(capsys, "--config", str(path), "run", "--model", "slow_mlp", "--job-id", "by-hand",
                               "--json")
        assert code in (0, 3)   # a passed or a failed gate: either is an end
        by_hand.append(last_json(out))
        assert by_hand[-1]["training"]["resumed_from"] is None
        assert by_hand[-1]["training"]["epochs_this_attempt"] == EPOCHS
        assert not folder.exists()
    uninterrupted = by_hand[0]
    resumed_weights = trained_weights(config, done.run_id)
    for name, tensor in trained_weights(config, uninterrupted["run_id"]).items():
        assert torch.equal(tensor, resumed_weights[name]), name
    assert [h["val_loss"] for h in training["history"]] == \
        [h["val_loss"] for h in uninterrupted["training"]["history"]]


def test_a_preempted_runner_checkpoints_in_its_grace_period_and_the_retry_is_not_an_attempt(
        sqlite_service: tuple[Any, Path, Any]) -> None:
    config, path, engine = sqlite_service
    job, _ = queue.enqueue(engine, model="slow_mlp", kind="retrain", trigger="manual", max_attempts=1)
    worker = Worker(config, engine, LocalExecutor(config, str(path), engine), worker_id="spot")
    thread = threading.Thread(target=worker.run_one)
    thread.start()
    try:
        assert wait_for(lambda: max(checkpoints_of(config, job.id), default=0) >= 1, 120)
        process = job_process(psutil.Process())
        assert process is not None
        noticed = time.monotonic()
        worker.preempt()                               # the spot notice: SIGTERM to the job
        thread.join(60)
        took = time.monotonic() - noticed
    finally:
        worker.preempt()
        thread.join(60)
    assert not thread.is_alive()
    assert took < 20, f"the job took {took:.1f} s to checkpoint and stop, past its 20 s grace period"
    state = queue.get_job(engine, job.id)
    assert state.state == "queued" and state.attempts == 1 and state.max_attempts == 2, state.as_dict()
    assert "preempted at epoch" in state.error
    [first] = queue.attempts(engine, job.id)
    assert first.state == "preempted" and first.ended_at is not None
    assert "checkpointed in" in first.error
    log = (config.workdir / "jobs" / job.id / "job.log").read_text()
    assert "Traceback" not in log
    assert checkpoints_of(config, job.id)                          # preempted: kept to resume

    # a fresh worker resumes it, though max_attempts was 1
    second = Worker(config, engine, LocalExecutor(config, str(path), engine), worker_id="next")
    assert second.run_one() is not None
    done = queue.get_job(engine, job.id)
    assert done.state == "succeeded" and done.attempts == 2, done.as_dict()
    assert [a.state for a in queue.attempts(engine, job.id)] == ["preempted", "succeeded"]
    result = summary(config, job.id)
    assert result["training"]["resumed_from"]["step"] > 0          # mid-epoch: the step the notice came at
    resumed = result["training"]["resumed_from"]
    assert f"resuming from the checkpoint at epoch {resumed['epoch']}, step {resumed['step']}" in \
        (config.workdir / "jobs" / job.id / "job.log").read_text()
    resume = result["cost"]["resume"]
    assert resume["earlier_attempts"] == 1 and resume["preempted_attempts"] == 1
    assert resume["saved_seconds"] > 0
    assert result["cost"]["gpu"] is None and result["cost"]["gpu_absent"] == "the job ran on the CPU"
    assert set(result["cost"]["stages"]) >= {"validate", "train", "benchmark", "report"}


def test_too_many_preemptions_fail_the_job_with_the_reason(service: tuple[Any, Path, Any]) -> None:
    config, _, engine = service
    job, _ = queue.enqueue(engine, model="slow_mlp", kind="retrain", trigger="manual")
    for attempt in range(1, 4):
        claimed = queue.claim(engine, f"w{attempt}")
        assert claimed is not None and claimed.id == job.id and claimed.attempts == attempt
        assert queue.preempt(engine, job.id, attempt, "spot notice", max_preemptions=2) == \
            ("queued" if attempt <= 2 else "failed")
    done = queue.get_job(engine, job.id)
    assert done.state == "failed" and "preempted 3 times (service.max_preemptions is 2)" in done.error
    # a stale or replayed preemption of an attempt that is not the running one changes nothing
    assert queue.preempt(engine, job.id, 1, "late", max_preemptions=2) is None


def test_a_preempted_job_whose_config_changed_trains_from_scratch_and_says_why(
        sqlite_service: tuple[Any, Path, Any]) -> None:
    """The retry of a preempted job runs the config it finds: with another lr, the checkpoint (written under
    the old one) is not resumed, and the job's log says why."""
    import yaml

    config, path, engine = sqlite_service
    job, _ = queue.enqueue(engine, model="slow_mlp", kind="retrain", trigger="manual")
    worker = Worker(config, engine, LocalExecutor(config, str(path), engine), worker_id="spot")
    thread = threading.Thread(target=worker.run_one)
    thread.start()
    try:
        assert wait_for(lambda: max(checkpoints_of(config, job.id), default=0) >= 1, 120)
        worker.preempt()
        thread.join(60)
    finally:
        worker.preempt()
        thread.join(60)
    assert queue.get_job(engine, job.id).state == "queued"
    assert checkpoints_of(config, job.id)                          # kept for the retry
    changed = yaml.safe_load(path.read_text())
    changed["models"]["slow_mlp"]["train"]["lr"] = 0.02
    path.write_text(yaml.safe_dump(changed))

    assert Worker(config, engine, LocalExecutor(config, str(path), engine), worker_id="next").run_one() is not None
    assert queue.get_job(engine, job.id).state == "succeeded"
    training = summary(config, job.id)["training"]
    assert training["resumed_from"] is None and training["epochs_this_attempt"] == EPOCHS
    assert "was written by another config (lr 0.01 -> 0.02); starting fresh" in training["fresh_start"]
    assert training["fresh_start"] in (config.workdir / "jobs" / job.id / "job.log").read_text()
