"""The MLflow server misbehaving mid-job: a real `mlflow server` over HTTP, behind a proxy that refuses or
holds chosen registry calls. Whatever fails, production stays where it was or moved with its audit row:
never moved without one, never a half-done pair of aliases, and a job killed mid-promotion is settled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session

from automation import promote, store
from tests.conftest import JOB_THREADS, fast_config, last_json, seed_mlflow_store, wait_for, write_config
from triggers.local_broker import free_port

pytestmark = pytest.mark.slow
MODEL = "digits_mlp"
ALIAS_CALL = "/api/2.0/mlflow/registered-models/alias"


class FaultProxy(ThreadingHTTPServer):
    """Forwards to the MLflow server; a request matching `rule` (method, path part, body part) is refused
    with 503, or held until `release` is set (the caller is killed meanwhile)."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream = upstream
        # one pooled client for every forwarded call: a client per call pays for its set-up (TLS context
        # included) each time, and registering a model makes dozens of calls
        self.client = httpx.Client(timeout=60, limits=httpx.Limits(keepalive_expiry=2))   # < uvicorn's 5 s
        self.rule: tuple[str, str, str, str] | None = None
        self.matched = threading.Event()
        self.release = threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(BaseHTTPRequestHandler):
    server: FaultProxy
    protocol_version = "HTTP/1.1"

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        rule = self.server.rule
        if rule and self.command == rule[0] and rule[1] in self.path and rule[2].encode() in body:
            self.server.matched.set()
            if rule[3] == "hold":
                self.server.release.wait(120)
            self._send(503, b'{"error_code": "TEMPORARILY_UNAVAILABLE"}', {"Content-Type": "application/json"})
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        answer = self.server.client.request(self.command, self.server.upstream + self.path, content=body,
                                            headers=headers)
        self._send(answer.status_code, answer.content, {k: v for k, v in answer.headers.items() if k.lower() in (
            "content-type",)})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("mlflow-server")
    seed_mlflow_store(directory, mlflow_template)   # the server starts on a migrated store
    port = free_port()
    log = open(directory / "server.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                                "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
                                "--artifacts-destination", str(directory / "artifacts"), "--workers", "1"],
                               # no job-execution consumers (seven huey processes polling): nothing here uses them
                               stdout=log, stderr=subprocess.STDOUT,
                               env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_for(up, 120, interval=0.5), (directory / "server.log").read_text()[-3000:]
        yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


class Project:
    def __init__(self, directory: Path, proxy: FaultProxy) -> None:
        config = fast_config(epochs=4, lean=True)
        config["models"] = {MODEL: config["models"][MODEL]}
        # the second and later runs retrain the same model: the gate is not what these tests are about
        config["defaults"]["gates"]["relative"] = {"max_accuracy_drop": 0.05, "max_latency_increase": None}
        self.path = write_config(directory, config)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("MLGATE_", "MLFLOW_", "GITHUB_"))}
        self.env |= {"MLFLOW_TRACKING_URI": proxy.url, "MLGATE_DATABASE_URL": f"sqlite:///{directory / 'jobs.db'}",
                     **JOB_THREADS}
        self.engine = store.open_store(self.env["MLGATE_DATABASE_URL"])
        from mlflow import MlflowClient

        self.client = MlflowClient(proxy.url, proxy.url)

    def run(self, **popen: Any) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "triggers.cli", "--config", str(self.path), "run", "--model",
                                 MODEL, "--trigger", "push", "--json"], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **popen)

    def production(self) -> tuple[str | None, str | None]:
        state = promote.alias_state(self.client, MODEL)
        return state.production, state.previous

    def trail(self) -> list[tuple[str, str | None]]:
        return [(r.version, r.replaced_version) for r in promote.audit_trail(self.engine, MODEL)]


def test_mlflow_failing_mid_job_never_leaves_production_without_its_audit_row(mlflow_server: str,
                                                                             tmp_path: Path) -> None:
    proxy = FaultProxy(mlflow_server)
    project = Project(tmp_path, proxy)
    first = project.run()
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert project.production() == ("1", None) and project.trail() == [("1", None)]

    # down during register: the job fails in one line; nothing was registered or promoted
    proxy.rule = ("POST", "/api/2.0/mlflow/model-versions/create", "", "refuse")
    done = project.run()
    out, err = done.communicate(timeout=600)
    assert done.returncode == 1 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("Error:")][0].startswith(
        "Error: stage 'register' failed")
    assert project.production() == ("1", None) and project.trail() == [("1", None)]

    # down between the two alias moves: production had moved to the new version; the move is undone
    proxy.rule = ("POST", ALIAS_CALL, '"alias": "previous"', "refuse")
    done = project.run()
    out, err = done.communicate(timeout=600)
    assert done.returncode == 1 and "stage 'promote' failed" in err, err[-2000:]
    assert project.production() == ("1", None) and project.trail() == [("1", None)]
    with Session(project.engine) as session:
        states = [i.state for i in session.query(promote.PromotionIntent).order_by(promote.PromotionIntent.id)]
    assert states == ["done", "failed"]

    # the job is killed -9 while its second alias move hangs: production moved, no audit row yet
    proxy.rule, proxy.release = ("POST", ALIAS_CALL, '"alias": "previous"', "hold"), threading.Event()
    proxy.matched.clear()
    killed = project.run(start_new_session=True)
    try:
        assert proxy.matched.wait(600), "the job never reached its promotion"
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(30)
    finally:
        proxy.release.set()
    proxy.rule = None
    new_version = project.production()[0]
    assert new_version not in ("1", None) and project.trail() == [("1", None)]   # the crash window itself
    # the next mover (or the next job, once the intent is stale) settles it: the audit row is written
    settled = promote.reconcile(project.client, project.engine, MODEL, older_than=timedelta(0))
    assert settled == [f"{MODEL}: version {new_version} is production; audit row written"]
    assert project.production() == (new_version, "1") and project.trail() == [("1", None), (new_version, "1")]

    # and the registry is usable: the next job gates against the settled production and promotes
    done = project.run()
    out, err = done.communicate(timeout=600)
    assert done.returncode == 0, err[-2000:]
    summary = last_json(out)
    assert summary["production_before"] == new_version and summary["promoted"]
    assert project.trail()[-1] == (summary["version"], new_version)
