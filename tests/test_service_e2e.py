"""End to end, real components only: `mlgate serve` as a process (uvicorn, SQLite queue, local
executor, Kafka consumer on Tansu), a signed push webhook and a Kafka drift event each running
the whole pipeline to a promotion visible at GET /models, and the dashboard read in headless Chromium."""

from __future__ import annotations

import copy
import json
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from tests.conftest import (JOB_THREADS, ServeProcess, fast_config, git_commit, headless_chromium, project_files,
                            seed_mlflow_store, wait_for, webhook_examples)
from triggers.local_broker import TansuBroker
from triggers.drift.events import make_event
from triggers.drift.consumer import publish
from triggers.request_guard import sign

SECRET = "e2e-secret"
pytestmark = pytest.mark.slow


def e2e_config(data_root: Path) -> dict[str, Any]:
    config = fast_config(epochs=8, lean=True)
    # the loop is under test here, not the gate: a drift retrain must not fail on latency noise
    config["defaults"]["gates"]["relative"] = {"max_accuracy_drop": 0.05, "max_latency_increase": None}
    config["defaults"]["drift"] = {"threshold": 0.3, "cooldown_minutes": 0}
    config["service"] = {"workers": 1, "lease_seconds": 30, "data_roots": [str(data_root)]}
    return config


class Service(ServeProcess):
    def __init__(self, directory: Path, bootstrap: str, mlflow_template: Path) -> None:
        # the service's repository: each job runs the commit it names, in a worktree of this repo
        self.sha = git_commit(directory, project_files("models") | {
            "mlgate.yaml": yaml.safe_dump(e2e_config(directory)), ".gitignore": "state/\n*.log\n*.npz\nchromium/\n"})
        seed_mlflow_store(directory / "state", mlflow_template)
        super().__init__(directory / "mlgate.yaml", directory, cwd=directory, env={
            "GITHUB_WEBHOOK_SECRET": SECRET, "GITHUB_REPOSITORY": "Codertocat/Hello-World", "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "MLGATE_LOG_LEVEL": "info",
            **JOB_THREADS})

    def job(self, job_id: str) -> dict[str, Any]:
        return self.get(f"/jobs/{job_id}").json()

    def finished(self, job_id: str) -> bool:
        return self.job(job_id)["state"] not in ("queued", "running")


@pytest.fixture
def service(tmp_path: Path, kafka_broker: TansuBroker, mlflow_template: Path) -> Any:
    running = Service(tmp_path, kafka_broker.bootstrap, mlflow_template)
    try:
        assert wait_for(running.ready, 60), "the service did not become healthy"
        yield running
    finally:
        print(running.stop())


def signed_push(service: Service, files: list[str]) -> httpx.Response:
    payload = copy.deepcopy(next(p for p in webhook_examples("push") if p["ref"] == "refs/heads/master"))
    payload["before"], payload["after"] = "1" * 40, service.sha
    payload["commits"][0].update(added=[], removed=[], modified=files)
    body = json.dumps(payload).encode()
    return httpx.post(service.url + "/webhooks/github", content=body, timeout=10, headers={
        "X-GitHub-Event": "push", "X-GitHub-Delivery": str(uuid.uuid4()), "Content-Type": "application/json",
        "X-Hub-Signature-256": sign(SECRET, body)})


def fresh_labelled_data(path: Path) -> str:
    """Brighter, noisier digits with their labels: what a labelling pipeline hands back after drift."""
    from models.datasets import digits

    splits = digits(seed=1)
    rng = np.random.default_rng(0)
    x = np.clip(splits.x_train[:300] * 1.3 + rng.normal(0, 0.05, splits.x_train[:300].shape), 0, 1)
    np.savez(path, x=x.astype(np.float32), y=splits.y_train[:300])
    return str(path)


def mlflow_run(workdir: Path, run_id: str) -> Any:
    from mlflow import MlflowClient

    from automation.tracking import tracking_uri

    return MlflowClient(tracking_uri(workdir)).get_run(run_id)


def dump_dom(url: str, profile: Path) -> str:
    return headless_chromium(profile, "--virtual-time-budget=10000", "--dump-dom", url)


def test_push_and_drift_each_retrain_gate_and_promote(service: Service, kafka_broker: TansuBroker,
                                                       tmp_path: Path) -> None:
    # 1. a signed push touching one model's file: one job, run by the service's worker, promoted
    response = signed_push(service, ["models/digits_mlp.py"])
    assert response.status_code == 202, response.text
    [push_job] = response.json()["jobs"]
    assert wait_for(lambda: service.finished(push_job), 240, interval=0.25), service.job(push_job)
    job = service.job(push_job)
    assert job["state"] == "succeeded", job
    assert job["version"] == "1" and job["run_id"] and job["attempts"] == 1 and job["sha"] == service.sha
    models = {m["model"]: m for m in service.get("/models").json()}
    assert models["digits_mlp"]["production"] == "1" and models["digits_cnn"]["production"] is None
    report = service.get(f"/reports/{push_job}")
    assert report.status_code == 200 and "digits_mlp" in report.text

    # 2. a drift event on Kafka: retrain on data that includes the fresh inputs, gate, promote
    now = datetime.now(timezone.utc)
    fresh = fresh_labelled_data(tmp_path / "fresh.npz")
    body = make_event("digits_mlp", 0.6, [{"column": "px_20", "score": 0.001, "method": "ks", "threshold": 0.05}],
                      window_start=now - timedelta(hours=1), window_end=now, data_ref=fresh)
    publish(kafka_broker.bootstrap, "mlgate.drift", [body])
    def drift_job() -> dict[str, Any] | None:
        return next((e for e in service.get("/drift-events").json() if e["id"] == body["id"]), None)
    assert wait_for(lambda: drift_job() is not None, 60), service.get("/drift-events").json()
    drift_job_id = drift_job()["job_id"]
    assert drift_job()["outcome"] == "job"
    assert wait_for(lambda: service.finished(drift_job_id), 240, interval=0.25), service.job(drift_job_id)
    job = service.job(drift_job_id)
    assert job["state"] == "succeeded" and job["trigger"] == "drift" and job["version"] == "2", job
    models = {m["model"]: m for m in service.get("/models").json()}
    assert models["digits_mlp"]["production"] == "2" and models["digits_mlp"]["previous"] == "1"
    assert [h["version"] for h in models["digits_mlp"]["history"]][:2] in (["2", "1"], ["1", "2"])
    run = mlflow_run(service.directory / "state", job["run_id"])
    assert run.data.params["data.fresh"] == fresh          # trained on the fresh data
    assert (service.directory / "state" / "jobs" / drift_job_id / "job.log").stat().st_size > 0

    # 3. the dashboard, rendered by a real browser from the JSON API: a card per model first, then the events
    overview = models["digits_mlp"]
    assert [v["version"] for v in overview["versions"]] == ["1", "2"] and overview["promoted"]["version"] == "2"
    assert overview["promoted"]["job_id"] == drift_job_id and overview["jobs"][0]["gate"]["passed"]
    assert overview["rollout"] is None          # no rollout: block here, so no serve-model ever rolled one out
    # a serve-model replica rolling v2 out over v1 keeps its counts in the job database, as here: the card
    # reads them (48 of 50 alike; p95 in 8-per-doubling buckets: 0.4 ms → 0.41, 0.5 ms → 0.49)
    import numpy as np

    from automation import store
    from automation.config import RolloutConfig
    from triggers.serving import rollout

    engine = store.open_store(store.database_url(service.directory / "state"))
    view = rollout.begin(engine, "digits_mlp", "1", "2", RolloutConfig())
    tally = rollout.Tally()
    for i in range(50):
        tally.add(view, rollout.Observation(f"r{i}", np.array([i % 10]), np.array([(i + (i % 25 == 0)) % 10]),
                                            4e-4, 5e-4))
    tally.flush(engine)
    # a job running on another worker reports its progress (what the local executor copies from the job's file)
    from triggers.jobs import queue

    running, _ = queue.enqueue(engine, model="digits_cnn", kind="retrain", trigger="manual")
    assert queue.claim(engine, "a-remote-worker", lease_seconds=600).id == running.id
    queue.record_progress(engine, running.id, 1, {"stage": "train", "epoch": 3, "epochs": 8, "val_accuracy": 0.91,
                                                  "eta_seconds": 50})
    dom = dump_dom(service.url + "/", tmp_path / "chromium")
    jobs_table = dom[dom.index('<table id="jobs"'):]
    row = jobs_table[jobs_table.index(f'<tr data-job="{running.id}"'):]
    row = row[:row.index("</tr>")]
    assert '<progress max="8" value="3">' in row and "train 3/8, val acc 0.910, ETA 50 s" in row, row
    start = dom.index('data-model="digits_mlp"')
    card = dom[start:dom.find("</section>", start)]
    assert 'data-state="running"' in card and \
        "rollout of v2 over v1: stage 1, 50 requests, agreement 0.960, p95 0.49 ms vs 0.41 ms" in card, card
    assert "digits_mlp: production v2 (previous v1)" in card and f"(job {drift_job_id})" in card
    assert f'data-job="{push_job}"' in card and f'data-job="{drift_job_id}"' in card and ">passed<" in card
    for metric, threshold in (("accuracy", "0.85"), ("p95_ms", "50")):
        chart = card[card.index(f'data-metric="{metric}"'):]
        chart = chart[:chart.index("</svg>")]
        assert f'data-threshold="{threshold}"' in chart and chart.count("<circle") == 2, chart
    assert "digits_cnn: nothing in production" in dom
    assert f'data-job="{push_job}"' in dom and f'href="/reports/{push_job}"' in dom and 'class="state succeeded"' in dom
    assert "3 recent jobs: 1 running, 0 queued" in dom
    assert card.count('class="cost"') >= 2 and " s (CPU " in card   # what each job cost, on its model's card
    png = tmp_path / "dashboard.png"
    headless_chromium(tmp_path / "chromium", "--hide-scrollbars", "--window-size=1280,1600",
                      "--virtual-time-budget=10000", f"--screenshot={png}", service.url + "/")
    from matplotlib.image import imread

    pixels = imread(png)
    drawn = (pixels[..., :3].min(axis=2) < 0.9).any(axis=1)
    assert pixels.shape[:2] == (1600, 1280) and drawn[:800].mean() > 0.3   # cards and charts, not a blank page

    metrics = service.get("/metrics").text
    assert 'mlgate_events_total{outcome="job",source="kafka",type="drift"} 1.0' in metrics
    assert "mlgate_job_duration_seconds_count 2.0" in metrics
    # what the two jobs cost, summed from their summaries; no GPU here, so no GPU-seconds
    cpu = [line for line in metrics.splitlines() if line.startswith("mlgate_job_cost_cpu_seconds_total ")]
    assert cpu and float(cpu[0].split()[1]) > 1.0, cpu
    assert "mlgate_job_cost_gpu_seconds_total 0.0" in metrics and "mlgate_job_preemptions_total 0.0" in metrics
