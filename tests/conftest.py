from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# `make test` runs the modules on pytest-xdist workers, one per core: torch's default of a thread per core in
# each would put two spinning threads per core
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import yaml

import automation  # noqa: F401  first: its OpenMP spin setting must precede any test module's torch import
from triggers.cli import main
from triggers.local_broker import TansuBroker

POSTGRES_URL = os.environ.get("MLGATE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

# Small but real: actual training on digits, actual ONNX Runtime, actual MLflow on SQLite.
FAST_CONFIG: dict[str, Any] = {
    "version": 1,
    "workdir": "state",
    "defaults": {
        "train": {"epochs": 15, "batch_size": 32, "lr": 0.003, "patience": 5},
        "benchmark": {"batch_sizes": [1, 16], "warmup": 5, "iterations": 60, "rounds": 4},
        # the compiled variants (torch_compile, torch_aoti) add 15-30 s of compiling per job on 2 cores;
        # tests that are about them ask for them (test_optimize, test_cnn_job_and_report_content)
        "optimize": {"variants": ["torch_eager", "torch_half", "onnx_fp32", "onnx_int8", "onnx_cuda",
                                  "tensorrt_fp16"]},
        "gates": {"absolute": {"min_accuracy": 0.85, "max_p95_latency_ms": 50, "max_size_mb": 10},
                  "bootstrap_samples": 500},
    },
    "models": {
        "digits_mlp": {"module": "models.digits_mlp", "params": {"hidden": 64}},
        "digits_cnn": {"module": "models.digits_cnn", "params": {"channels": 8, "hidden": 32}},
    },
}


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """POSTGRES_URL; under pytest-xdist, a database of the worker's own beside it (test_gw0, ...), created when
    missing: tests empty the tables they use, so two workers must not share one."""
    from sqlalchemy import create_engine, make_url, text

    url = make_url(POSTGRES_URL)
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    failure = None
    try:
        with admin.connect() as conn:
            conn.execute(text("select 1"))
            worker = os.environ.get("PYTEST_XDIST_WORKER")
            if worker:
                url = url.set(database=f"{url.database}_{worker}")
                if conn.execute(text("select 1 from pg_database where datname = :name"),
                                {"name": url.database}).first() is None:
                    conn.execute(text(f'create database "{url.database}"'))
    except Exception as error:
        failure = type(error).__name__
    finally:
        admin.dispose()
    if failure:   # outside the except: the driver's frames (its conninfo holds the password) stay out of the report
        pytest.fail(f"PostgreSQL at {make_url(POSTGRES_URL)!r} is not reachable, or cannot create the test worker's "
                    f"database {url.database!r} ({failure}); start it (see README, Development)", pytrace=False)
    return url.render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The job/audit store: a SQLite file, and the PostgreSQL server on this machine."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mlgate.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MLFLOW_TRACKING_URI", "MLGATE_DATABASE_URL", "GITHUB_TOKEN", "GITHUB_REPOSITORY"):
        monkeypatch.delenv(var, raising=False)


# For tests that are about what happens around a job (queue, leases, faults, GitHub, services), not about its
# variants: two variants (the fp32 reference and its ONNX export), timed at batch 1 only, with FAST_CONFIG's
# iterations and rounds so a relative latency gate compares as many rounds as before.
LEAN_OPTIMIZE: dict[str, Any] = {"variants": ["torch_eager", "onnx_fp32"]}
LEAN_BENCHMARK: dict[str, Any] = {"batch_sizes": [1], "warmup": 5, "iterations": 60, "rounds": 4}


def fast_config(epochs: int | None = None, lean: bool = False) -> dict[str, Any]:
    """A copy of FAST_CONFIG to adjust, with `epochs` when given; `lean`: LEAN_OPTIMIZE and LEAN_BENCHMARK."""
    config = copy.deepcopy(FAST_CONFIG)
    if epochs is not None:
        config["defaults"]["train"]["epochs"] = epochs
    if lean:
        config["defaults"]["optimize"] = copy.deepcopy(LEAN_OPTIMIZE)
        config["defaults"]["benchmark"] = copy.deepcopy(LEAN_BENCHMARK)
    return config


# Job processes started by a test share 2 cores with pytest and whatever services the test runs: torch's
# default of one intra-op thread per core makes its threads spin against those processes (training the
# digits models took 5-10x longer that way). One thread each; models this small gain nothing from more.
JOB_THREADS: dict[str, str] = {"OMP_NUM_THREADS": "1"}


@pytest.fixture
def single_threaded_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes this test starts (jobs, services, workers) inherit JOB_THREADS."""
    for key, value in JOB_THREADS.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, its schema migrated once per session (creating one costs seconds)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    uri = f"sqlite:///{path}"
    MlflowClient(uri, uri).search_experiments()
    return path


@pytest.fixture
def no_retry_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib3 retries (the GitHub client's) still happen, as many as configured, without sleeping between them:
    for tests about what a refused or unreachable API leads to, not about how long the backoff waits."""
    from urllib3.util.retry import Retry

    monkeypatch.setattr(Retry, "get_backoff_time", lambda self: 0.0)


def seed_mlflow_store(workdir: Path, template: Path) -> None:
    """Give `workdir` an empty, already migrated MLflow store (see mlflow_template), as an existing
    deployment's is: for tests about what happens around a job, not about creating the store."""
    import shutil

    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / "mlflow.db").exists():
        raise FileExistsError(workdir / "mlflow.db")
    shutil.copyfile(template, workdir / "mlflow.db")


def write_config(directory: Path, config: dict[str, Any] | None = None) -> Path:
    path = directory / "mlgate.yaml"
    path.write_text(yaml.safe_dump(config or FAST_CONFIG), encoding="utf-8")
    return path


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(tmp_path)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv), standalone=False)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


def error_lines(stderr: str) -> list[str]:
    """stderr without the structured (JSON) log lines: what a person reads."""
    return [line for line in stderr.splitlines() if line and not line.startswith("{")]


@pytest.fixture
def kafka_broker() -> Any:
    broker = TansuBroker()
    broker.start()
    yield broker
    broker.stop()


def read_topic(bootstrap: str, topic: str, expected: int) -> list[Any]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None,
                             consumer_timeout_ms=15_000)
    records = []
    for record in consumer:
        records.append(record)
        if len(records) >= expected:
            break
    consumer.close()
    return records


EXAMPLES = Path(__file__).resolve().parent.parent / "node_modules" / "@octokit" / "webhooks-examples" / \
    "api.github.com" / "index.json"


def webhook_examples(event: str) -> list[dict[str, Any]]:
    """Real GitHub payloads from @octokit/webhooks-examples (installed by `make test` with npm)."""
    if not EXAMPLES.exists():
        pytest.fail(f"{EXAMPLES} is missing: run `make test` (it runs `npm ci`) or `npm ci` in the repo root")
    for entry in json.loads(EXAMPLES.read_text(encoding="utf-8")):
        if entry["name"] == event:
            return entry["examples"]
    raise KeyError(event)


def clean_tables(db_url: str) -> None:
    """The PostgreSQL database outlives a test: start with no jobs, deliveries or drift events."""
    from sqlalchemy import delete

    from automation.promote import PromotionIntent
    from automation.store import open_store
    from triggers.github.job_status import OwedStatus
    from triggers.jobs import queue
    from triggers.drift import events as drift
    from triggers.intake import deliveries
    from triggers.serving import rollout

    with open_store(db_url).begin() as conn:
        for table in (deliveries.Delivery, deliveries.SeenBody, deliveries.PullRequestHead, drift.DriftRecord,
                      queue.Job, queue.JobStat, queue.RunnerAdoption, OwedStatus, PromotionIntent, rollout.Rollout, rollout.RolloutStat, rollout.RolloutPrediction):
            conn.execute(delete(table))


def wait_for(predicate: Any, timeout: float, interval: float = 0.1) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# What each module took in `make test` (seconds, both workers busy; 2 cores; the mean of two runs), to hand the
# longest out first. Re-measure with `pytest -n auto --dist loadfile --junitxml=...`, summing each module's times.
MODULE_SECONDS: dict[str, float] = {
    "test_ray_executor": 147, "test_preemption": 102, "test_examples": 102, "test_checkout": 92,
    "test_demo_loop": 92, "test_kubernetes_executor": 91, "test_mlflow_faults": 82, "test_drift_intake": 73,
    "test_pipeline": 47, "test_service_e2e": 46, "test_service_crash": 43, "test_optimize": 39, "test_fencing": 36,
    "test_serving": 35, "test_github_contract": 33, "test_workflows": 32, "test_launch": 27, "test_worker": 24,
    "test_multi_node": 23, "test_train": 22, "test_contract_change": 20, "test_promote_concurrency": 18,
    "test_monitor": 17, "test_oidc": 16, "test_webhooks": 12, "test_contract": 11, "test_boundary": 10,
    "test_data_sources": 9, "test_security": 8, "test_serving_check": 7, "test_serving_inputs": 7, "test_judge": 5,
}


def pytest_configure(config: pytest.Config) -> None:
    """Under `--dist loadfile`, xdist hands modules out by their number of tests, most first: the modules of one
    long test each (the demo, the MLflow faults, the service end to end) went last, and one worker ran them
    while the other one idled. The workers' order is kept instead (see pytest_collection_modifyitems), unless
    the command line asks for either."""
    if config.getoption("dist", "no") in ("loadfile", "loadscope") and not any(
            arg in ("--loadscope-reorder", "--no-loadscope-reorder") for arg in config.invocation_params.args):
        config.option.loadscopereorder = False


def _module_weight(items: list[pytest.Item]) -> float:
    """A module's expected seconds: MODULE_SECONDS; one not measured yet that trains (`slow`) goes first."""
    name = Path(str(items[0].fspath)).stem
    if name in MODULE_SECONDS:
        return MODULE_SECONDS[name]
    if any("slow" in item.keywords for item in items):
        return float("inf")
    return 0.1 * len(items)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests need CUDA: elsewhere they are skipped with the reason, never silently passed. On an xdist
    worker the modules are ordered longest first (each keeps its tests' order): under `--dist loadfile` the two
    workers then end together rather than one waiting on the other's last long module."""
    import torch

    if hasattr(config, "workerinput"):   # an xdist worker (its `dist` option reads "no" there)
        modules: dict[str, list[pytest.Item]] = {}
        for item in items:
            modules.setdefault(item.nodeid.split("::")[0], []).append(item)
        ordered = sorted(modules.values(), key=_module_weight, reverse=True)   # stable: ties keep their order
        items[:] = [item for module in ordered for item in module]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: run `make gpu-check` on a GPU runner")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


PROJECT = Path(__file__).resolve().parent.parent


def git_commit(repo: Path, files: dict[str, str] | None = None, message: str = "change") -> str:
    """Write `files` into the git repository at `repo` (made on branch main if needed), commit, return the SHA."""
    import subprocess

    if not (repo / ".git").exists():
        repo.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    for name, text in (files or {}).items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text, encoding="utf-8")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.email=ci@mlgate", "-c", "user.name=ci", "commit", "-qm", message],
                   cwd=repo, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()


def project_files(*folders: str) -> dict[str, str]:
    """The project's own files under `folders` (e.g. the model zoo), to commit into a test repository."""
    return {str(path.relative_to(PROJECT)): path.read_text(encoding="utf-8")
            for folder in folders for path in sorted((PROJECT / folder).rglob("*.py"))}


def headless_chromium(profile: Path, *args: str) -> str:
    """Debian's Chromium, headless, with the flags this closed network needs; returns its stdout."""
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.fail("Chromium is missing: `make test` installs the Debian package chromium")
    result = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                             "--no-first-run", "--disable-background-networking", "--disable-component-update",
                             "--disable-sync", f"--user-data-dir={profile}", *args],
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class ServeProcess:
    """`mlgate serve` in a subprocess on a free port, with a clean environment plus `env`, logging to
    `<directory>/service.log`."""

    def __init__(self, config: Path, directory: Path, env: dict[str, str], cwd: Path) -> None:
        import subprocess
        import sys

        from triggers.local_broker import free_port

        self.directory, self.port = directory, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLGATE_", "MLFLOW_", "GITHUB_"))}
        self.log = open(directory / "service.log", "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "triggers.cli", "--config", str(config), "serve",
                                         "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
                                        env=clean | env, cwd=cwd)

    def get(self, path: str) -> Any:
        import httpx

        return httpx.get(self.url + path, timeout=30)

    def ready(self) -> bool:
        import httpx

        try:
            return self.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> str:
        self.process.terminate()
        self.process.wait(20)
        self.log.close()
        return (self.directory / "service.log").read_text(errors="replace")[-4000:]


def wine_frame() -> Any:
    """A user's CSV as pandas reads it: scikit-learn's wine data (178 rows, 13 named float64 columns from
    about 0.1 to 1,680) with a string label column `cultivar`."""
    from sklearn.datasets import load_wine

    bunch = load_wine(as_frame=True)
    names = {0: "barolo", 1: "grignolino", 2: "barbera"}
    return bunch.data.astype("float64").assign(cultivar=bunch.target.map(names))


@contextlib.contextmanager
def app_on_a_port(app: Any) -> Iterator[int]:
    """An ASGI app under uvicorn on a free loopback port, in a thread, for tests that need a real socket
    (a browser, raw HTTP, another process); yields the port and stops the server afterwards."""
    import threading

    import uvicorn

    from triggers.local_broker import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: server.started, 20), "uvicorn did not start"
        yield port
    finally:
        server.should_exit = True
        thread.join(10)
