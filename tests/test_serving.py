"""Serving the production model: input validation, hot swap under concurrent load (promotions, a
rollback, and a version that fails to load), metrics, and the bounded inference log."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import uvicorn
import yaml
from mlflow import MlflowClient

from automation.config import load_config
from tests.conftest import fast_config, read_topic, wait_for, write_config
from triggers.local_broker import free_port
from triggers.cli import main
from triggers.serving.inference_log import InferenceLog
from triggers.drift.monitor import load_window
from triggers.serving.server import ModelServer, create_serving_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits_mlp v1 (gate passed), v2 (gate failed, never promoted), v3 (gate passed, production)."""
    directory = tmp_path_factory.mktemp("serving")
    config = fast_config(epochs=5)
    # serving is the point here, not the gate: v3 must pass whatever the 5-epoch runs' noise, so the
    # relative gate is loosened; v2 fails its gate on purpose through the strict absolute accuracy below
    config["defaults"]["gates"]["relative"] = {"max_accuracy_drop": 0.05, "max_latency_increase": None}
    path = write_config(directory, config)
    strict = copy.deepcopy(config)
    strict["defaults"]["gates"]["absolute"]["min_accuracy"] = 0.999
    strict_path = directory / "strict.yaml"
    strict_path.write_text(yaml.safe_dump(strict))
    assert main(["--config", str(path), "run", "--model", "digits_mlp"], standalone=False) == 0
    assert main(["--config", str(strict_path), "run", "--model", "digits_mlp"], standalone=False) == 3
    assert main(["--config", str(path), "run", "--model", "digits_mlp"], standalone=False) == 0
    return path


class Running:
    """The serving app under uvicorn on a real port, in a thread."""

    def __init__(self, config_path: Path, log_dir: Path, batch_delay_ms: float | None = None,
                 model: str = "digits_mlp") -> None:
        self.server = ModelServer(load_config(config_path), model, poll_seconds=0.2)
        self.server.sync()
        self.server.start()
        self.log = InferenceLog(log_dir, rows_per_file=200, max_files=3, flush_seconds=0.2)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(create_serving_app(self.server, self.log, max_batch=64,
                                                                        batch_delay_ms=batch_delay_ms),
                                                     host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        assert wait_for(lambda: self.version() is not None, 30)

    def version(self) -> str | None:
        try:
            return httpx.get(self.url + "/healthz", timeout=5).json().get("version")
        except httpx.HTTPError:
            return None

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(10)
        self.server.stop()
        self.log.close()


@pytest.fixture
def served(registry: Path, tmp_path: Path) -> Any:
    running = Running(registry, tmp_path / "inference")
    yield running
    running.stop()


def digits_batch(size: int) -> list[Any]:
    from models.datasets import digits

    return digits(seed=0).x_test[:size].tolist()


def test_bad_inputs_get_clear_4xx(served: Running) -> None:
    def post(body: Any) -> httpx.Response:
        return httpx.post(served.url + "/predict", json=body, timeout=10)

    cases = {
        "wrong shape": ({"inputs": [[0.0] * 64]}, 422, "examples must all have shape [1, 8, 8]; got a batch shaped [1, 64]"),
        "wrong dtype": ({"inputs": [[[["a"] * 8] * 8]]}, 422,
                        'example 0 holds a string ("a") at [0, 0, 0]: send numbers'),
        "booleans": ({"inputs": [[[[True] * 8] * 8]]}, 422, "example 0 holds a boolean (true) at [0, 0, 0]: send numbers"),
        "a null pixel": ({"inputs": [*digits_batch(1), [[[0.5] * 8] * 7 + [[0.5] * 5 + [None, 0.5, 0.5]]]]}, 422,
                         "example 1 holds null at [0, 7, 5]: send numbers"),
        "records": ({"inputs": [{"x0": 1.0}]}, 422, "example 0 is an object: send every example as an array shaped "
                    "[1, 8, 8] (this version names no features, so it takes no records)"),
        "ragged": ({"inputs": [[[[0.0] * 8] * 8], [[[0.0] * 7] * 8]]}, 422, "must all have shape"),
        "empty batch": ({"inputs": []}, 422, "non-empty list"),
        "no inputs": ({"x": 1}, 422, '"inputs"'),
        "oversized": ({"inputs": digits_batch(65)}, 413, "over the limit of 64"),
    }
    for name, (body, status, message) in cases.items():
        response = post(body)
        assert response.status_code == status, (name, response.text)
        assert message in response.json()["error"], (name, response.json())
    bad_json = httpx.post(served.url + "/predict", content=b"{nope", timeout=10)
    assert bad_json.status_code == 400
    nan = b'{"inputs": [[[' + b",".join([b"[" + b",".join([b"NaN"] * 8) + b"]"] * 8) + b']]]}'
    said = httpx.post(served.url + "/predict", content=nan, timeout=10)
    assert said.status_code == 400 and said.json()["error"].startswith(
        "the body is not valid JSON: NaN and Infinity are not JSON values (a missing value is written null")
    # NaN in a binary tensor is a number the model cannot take
    raw = np.full((1, 1, 8, 8), np.nan, dtype="<f4").tobytes()
    head = ('{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", '
            '"parameters": {"binary_data_size": 256}}]}').encode()
    binary_nan = httpx.post(served.url + "/v2/models/digits_mlp/infer", content=head + raw, timeout=10,
                            headers={"Inference-Header-Content-Length": str(len(head))})
    assert binary_nan.status_code == 422 and binary_nan.json()["error"] == "the input contains NaN or infinity"
    # a body no valid request can reach is refused before it is read: 64 examples of 8×8 are < 100 KB
    huge = httpx.post(served.url + "/predict", content=b"[" * (2 * 1024 * 1024), timeout=10,
                      headers={"Content-Type": "application/json"})
    assert huge.status_code == 413 and "at most 64 examples" in huge.json()["error"]
    deep = httpx.post(served.url + "/predict", content=b"[" * 50_000 + b"]" * 50_000, timeout=10)
    assert deep.status_code in (400, 413)
    good = post({"inputs": digits_batch(3)})
    assert good.status_code == 200 and len(good.json()["predictions"]) == 3 and good.json()["version"] == "3"
    # digits name their classes "0" … "9": labels are the predictions as text
    assert good.json()["labels"] == [str(p) for p in good.json()["predictions"]]


def test_a_model_that_fails_at_inference_answers_500_and_the_server_goes_on(served: Running) -> None:
    """The inference routes bypass FastAPI's routing (triggers/serving/fast_path.py): an unexpected error
    must still be a plain 500, with no traceback for the client."""
    predictor = served.server.current.loaded.predictor
    x = digits_batch(1)

    def broken(prepared: Any) -> Any:
        raise RuntimeError("onnxruntime: failed to allocate memory")

    predictor.run = broken   # an instance attribute: the class's run comes back when it is deleted
    try:
        answers = [httpx.post(served.url + "/predict", json={"inputs": x}, timeout=10),
                   httpx.post(served.url + "/v2/models/digits_mlp/infer", timeout=10, json={"inputs": [
                       {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": np.ravel(x).tolist()}]})]
    finally:
        del predictor.run
    assert [(a.status_code, a.json()) for a in answers] == [(500, {"error": "internal error"})] * 2
    assert all("Traceback" not in a.text and "allocate" not in a.text for a in answers)
    assert httpx.post(served.url + "/predict", json={"inputs": x}, timeout=10).status_code == 200


def test_hot_swap_under_load_serves_only_gated_versions_with_zero_errors(served: Running, registry: Path) -> None:
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()
    batch = digits_batch(8)

    def hammer() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                response = client.post(served.url + "/predict", json={"inputs": batch})
                results.append((response.status_code, response.json().get("version")))

    clients = [threading.Thread(target=hammer) for _ in range(4)]
    for client in clients:
        client.start()
    try:
        moves = [("promote", "1"), ("promote", "3"), ("rollback", None), ("promote", "3")]
        for action, version in moves:
            argv = ["--config", str(registry), action, "digits_mlp", *([version] if version else []),
                    "--reason", "hot-swap test"]
            assert main(argv, standalone=False) == 0
            expected = version or "1"
            assert wait_for(lambda: served.version() == expected, 30), (action, version, served.version())
        # a version that cannot load is never swapped in: break v2's model file, then promote it by hand
        client = MlflowClient(f"sqlite:///{registry.parent / 'state' / 'mlflow.db'}")
        model_id = client.get_model_version("digits_mlp", "2").source.removeprefix("models:/")   # MLflow 3 logged model
        location = client.get_logged_model(model_id).artifact_location
        broken = list(Path(urlparse(location).path).rglob("*.onnx"))
        assert broken
        for file in broken:
            file.write_bytes(b"not an onnx model")
        assert main(["--config", str(registry), "promote", "digits_mlp", "2", "--reason", "break it"],
                    standalone=False) == 0
        assert wait_for(lambda: "2" in served.server.failed, 30)
        time.sleep(0.5)
    finally:
        stop.set()
        for client in clients:
            client.join(30)
    statuses = {status for status, _ in results}
    versions = {version for _, version in results}
    assert statuses == {200}, f"{len(results)} requests, statuses {statuses}"
    assert versions == {"1", "3"}, versions                    # v2 (gate failed, then broken) never served
    assert len(results) > 100
    assert served.version() == "3"
    metrics = httpx.get(served.url + "/metrics").text
    assert 'mlgate_serving_version{model="digits_mlp"} 3.0' in metrics
    assert "mlgate_predict_seconds_count" in metrics and "mlgate_predict_batch_size_bucket" in metrics
    assert httpx.get(served.url + "/healthz", timeout=5).status_code == 503   # production is the broken v2
    # leave production as the module's fixture made it
    assert main(["--config", str(registry), "promote", "digits_mlp", "3", "--reason", "restore"],
                standalone=False) == 0


def test_a_transient_load_failure_is_retried_and_readiness_says_so(served: Running, registry: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real_load = served.server.load
    failures = iter([True, True])

    def registry_flaky(version: str) -> Any:
        if next(failures, False):
            raise ConnectionError("the artifact store reset the connection: http://ci:hunter2-registry@mlflow:5000/")
        return real_load(version)

    monkeypatch.setattr(served.server, "load", registry_flaky)
    assert main(["--config", str(registry), "promote", "digits_mlp", "1", "--reason", "flaky"], standalone=False) == 0
    try:
        assert wait_for(lambda: "1" in served.server.failed, 30)
        health = httpx.get(served.url + "/healthz", timeout=5)
        # still answering with v3, but not ready: production is v1
        assert health.status_code == 503 and health.json()["status"] == "not_production", health.json()
        assert health.json()["version"] == "3" and health.json()["production"] == "1"
        assert health.json()["not_served"]["1"]["reason"].startswith("ConnectionError")
        assert "hunter2" not in health.text and "://***@mlflow" in health.text   # readiness is public
        assert httpx.get(served.url + "/livez", timeout=5).status_code == 200
        # retried with backoff, not given up: v1 is served, and ready again
        assert wait_for(lambda: served.version() == "1", 30), served.server.failed
        assert httpx.get(served.url + "/healthz", timeout=5).status_code == 200 and "1" not in served.server.failed
    finally:
        assert main(["--config", str(registry), "promote", "digits_mlp", "3", "--reason", "back"],
                    standalone=False) == 0


def test_a_registry_outage_is_not_no_production(served: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry failing (not answering "no such alias") keeps the version served and the replica ready."""
    from mlflow.exceptions import MlflowException

    client = served.server._client()
    asked = threading.Event()

    def outage(*_: Any, **__: Any) -> Any:
        asked.set()
        raise MlflowException("API request to http://mlflow:5000 failed: Max retries exceeded",
                              error_code="INTERNAL_ERROR")

    before = served.version()
    monkeypatch.setattr(client, "get_model_version_by_alias", outage)
    assert asked.wait(10)
    time.sleep(0.5)   # several polls of the watcher, all failing
    health = httpx.get(served.url + "/healthz", timeout=5)
    assert health.status_code == 200 and health.json()["version"] == before, health.json()
    assert served.server.production == before


def test_tritonclient_speaks_the_open_inference_protocol(served: Running) -> None:
    """A real client of the ecosystem (tritonclient[http]) against /v2: health, metadata, and inference with
    JSON and binary tensors, answering what /predict answers."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(url=served.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits_mlp")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("digits_mlp")
    assert metadata["versions"] == ["3"] and metadata["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert {o["name"]: o["shape"] for o in metadata["outputs"]} == {"logits": [-1, 10], "predictions": [-1],
                                                                     "labels": [-1]}
    assert metadata["parameters"] == {"classes": [str(c) for c in range(10)]}   # images: no feature names
    x = np.asarray(digits_batch(5), dtype=np.float32)
    expected = httpx.post(served.url + "/predict", json={"inputs": x.tolist()}, timeout=10).json()
    for binary in (True, False):
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("logits", "predictions")]
        result = client.infer("digits_mlp", [tensor], outputs=outputs, request_id=f"r-{binary}")
        assert result.get_response()["model_version"] == "3" and result.get_response()["id"] == f"r-{binary}"
        np.testing.assert_allclose(result.as_numpy("logits"), np.asarray(expected["logits"]), atol=1e-4)
        assert result.as_numpy("predictions").tolist() == expected["predictions"]
    wrong = triton.InferInput("pixels", list(x.shape), "FP32")
    wrong.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match='this model takes one input tensor, named "input"'):
        client.infer("digits_mlp", [wrong])
    misshapen = triton.InferInput("input", [5, 64], "FP32")
    misshapen.set_data_from_numpy(x.reshape(5, 64))
    with pytest.raises(InferenceServerException, match=r"the input must be shaped \[batch, 1, 8, 8\]"):
        client.infer("digits_mlp", [misshapen])
    with pytest.raises(InferenceServerException, match="unknown model 'other'"):
        client.get_model_metadata("other")


def test_dynamic_batching_runs_concurrent_requests_as_one_batch(served: Running) -> None:
    """Requests that arrive together (here 16, in-process, inside a 50 ms window) share batches; each
    still gets its own rows, the same as when it runs alone."""
    import asyncio

    app = create_serving_app(served.server, None, max_batch=64, batch_delay_ms=50)
    x = np.asarray(digits_batch(16), dtype=np.float32)

    async def fire() -> list[Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://mlgate") as client:
            return await asyncio.gather(*(client.post("/predict", json={"inputs": x[i:i + 1].tolist()})
                                          for i in range(16)))

    answers = asyncio.run(fire())
    [batcher] = app.state.batchers.values()
    assert batcher.stats.examples == 16 and batcher.stats.batches < 16, batcher.stats
    alone = httpx.post(served.url + "/predict", json={"inputs": x.tolist()}, timeout=10).json()
    assert [a.json()["predictions"][0] for a in answers] == alone["predictions"]
    np.testing.assert_allclose([a.json()["logits"][0] for a in answers], alone["logits"], atol=1e-4)


def test_several_worker_processes_serve_one_port(registry: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    import psutil

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "triggers.cli", "--config", str(registry), "serve-model",
                                "digits_mlp", "--port", str(port), "--workers", "2", "--batch-delay-ms", "1",
                                "--log-dir", str(tmp_path / "inference")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            try:
                return httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(ready, 120)
        assert len([c for c in psutil.Process(process.pid).children() if "spawn_main" in " ".join(
            c.cmdline())]) == 2
        x = digits_batch(4)
        answers = {httpx.post(url + "/predict", json={"inputs": x}, timeout=10).json()["version"] for _ in range(20)}
        assert answers == {"3"}
    finally:
        process.terminate()
        process.wait(30)


# the MLP, trained as usual, but once serving (eval mode) it answers 3 for 5 and 5 for 3: wrong on two classes
SWAPPED_MLP = '''from torch import nn

from models.datasets import digits as load_data
from models.digits_mlp import build as mlp


class SwapWhenServing(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        y = self.inner(x)
        return y if self.training else y[:, [0, 1, 2, 5, 4, 3, 6, 7, 8, 9]]


def build(**params):
    return SwapWhenServing(mlp(**params))
'''


FEEDBACK_TOKEN = "feedback-token-for-tests"


def test_a_staged_rollout_rolls_a_bad_version_back_and_lets_a_good_one_through(registry: Path, tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch,
                                                                                kafka_broker: Any) -> None:
    """Two clients post requests and then their labels (POST /feedback); every stage waits for labels."""
    import json
    import sys

    from models.datasets import digits

    from automation import promote, store, tracking

    directory = registry.parent
    (directory / "swapped_mlp.py").write_text(SWAPPED_MLP)
    monkeypatch.syspath_prepend(str(directory))
    raw = yaml.safe_load(registry.read_text())
    bad = copy.deepcopy(raw)
    bad["models"] = {"digits_mlp": {"module": "swapped_mlp", "params": {"hidden": 64}}}
    (directory / "swapped.yaml").write_text(yaml.safe_dump(bad))
    assert main(["--config", str(directory / "swapped.yaml"), "run", "--model", "digits_mlp"], standalone=False) == 3
    sys.modules.pop("swapped_mlp", None)
    config = load_config(registry)
    client = tracking.connect(config.workdir, config.experiment)[0]
    versions = sorted(int(v.version) for v in client.search_model_versions("name='digits_mlp'"))
    bad_version = str(versions[-1])                                  # its gate failed: only a person promotes it
    staged = copy.deepcopy(raw)
    # labels compare the versions on 40 repeated examples: a good version that differs on one of them would
    # look 2.5 % less accurate on every repeat, so the allowed drop is wider than that
    staged["defaults"]["rollout"] = {"stages": [{"traffic": 0, "min_seconds": 0.5, "min_requests": 40,
                                                 "min_labels": 20},
                                                {"traffic": 0.5, "min_seconds": 0.5, "min_requests": 40,
                                                 "min_labels": 20}],
                                     "min_agreement": 0.95, "max_accuracy_drop": 0.05}
    (directory / "staged.yaml").write_text(yaml.safe_dump(staged))
    monkeypatch.setenv("MLGATE_FEEDBACK_TOKEN", FEEDBACK_TOKEN)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_broker.bootstrap)
    # with dynamic batching: both versions' batchers live side by side while the rollout runs
    running = Running(directory / "staged.yaml", tmp_path / "inference", batch_delay_ms=1)
    answers: list[tuple[int, str | None]] = []
    feedback: list[dict[str, Any]] = []
    stop = threading.Event()

    def traffic() -> None:
        x, y = digits_batch(40), digits(seed=0).y_test[:40].tolist()
        labels: list[dict[str, Any]] = []
        with httpx.Client(timeout=10) as http:
            i = 0
            while not stop.is_set():
                try:
                    response = http.post(running.url + "/predict", json={"inputs": [x[i % 40]]})
                except httpx.HTTPError as exc:   # a request left waiting (or refused) is a failure clients see
                    answers.append((0, f"{type(exc).__name__}"))
                    continue
                answers.append((response.status_code, response.json().get("version")))
                if "X-Request-Id" in response.headers:   # a failed answer is counted above, and has no labels
                    labels.append({"id": response.headers["X-Request-Id"], "label": y[i % 40]})
                if len(labels) == 10:
                    sent = http.post(running.url + "/feedback", json={"labels": labels},
                                     headers={"Authorization": f"Bearer {FEEDBACK_TOKEN}"})
                    feedback.append(sent.json() | {"status": sent.status_code})
                    labels = []
                i += 1

    clients = [threading.Thread(target=traffic) for _ in range(2)]
    for client_thread in clients:
        client_thread.start()
    engine = store.open_store(store.database_url(config.workdir))
    try:
        # a person promotes the bad version: shadow compares it on live traffic, and it is rolled back
        assert main(["--config", str(registry), "promote", "digits_mlp", bad_version, "--reason", "by hand"],
                    standalone=False) == 0
        # the audit row is confirmed just after the aliases move: wait for it
        assert wait_for(lambda: promote.audit_trail(engine, "digits_mlp")[-1].action == "rollback", 60)
        assert promote.alias_version(client, "digits_mlp", promote.PRODUCTION) == "3"
        last = promote.audit_trail(engine, "digits_mlp")[-1]
        assert last.action == "rollback" and last.version == "3" and last.replaced_version == bad_version
        assert last.reason.startswith(f"rollout: version {bad_version} failed its shadow stage: agreement "), \
            last.reason
        assert not any(version == bad_version for _, version in answers)     # shadow: it never answered
        # a good version goes through shadow, then the canary, and is served
        assert main(["--config", str(registry), "promote", "digits_mlp", "1", "--reason", "good"],
                    standalone=False) == 0
        assert wait_for(lambda: running.version() == "1", 60), running.server.rollout
        health = httpx.get(running.url + "/healthz", timeout=5).json()
        assert health["status"] == "ok" and health["rollout"] is None
        # back to v3 (rolled out like any promotion), then the bad version again, over the same v3 as the first
        # time: a rollout of its own, and rolled back again
        assert main(["--config", str(registry), "promote", "digits_mlp", "3", "--reason", "v3 again"],
                    standalone=False) == 0
        assert wait_for(lambda: running.version() == "3", 60), running.server.rollout
        assert main(["--config", str(registry), "promote", "digits_mlp", bad_version, "--reason", "again"],
                    standalone=False) == 0
        assert wait_for(lambda: promote.audit_trail(engine, "digits_mlp")[-1].action == "rollback", 60)
        assert promote.alias_version(client, "digits_mlp", promote.PRODUCTION) == "3"
    finally:
        stop.set()
        for client_thread in clients:
            client_thread.join(30)
        running.stop()
        assert main(["--config", str(registry), "promote", "digits_mlp", "3", "--reason", "restore"],
                    standalone=False) == 0
    assert {status for status, _ in answers} == {200}, [a for a in answers if a[0] != 200][:5]   # no failure seen
    assert {"3", "1"} <= {version for _, version in answers}
    assert {f["status"] for f in feedback} == {200} and not any(f["refused"] for f in feedback)
    assert sum(f["matched"] for f in feedback) >= 4 * 20                  # no rollout ended before its labels
    # each rollback was announced on the drift topic's sibling, as a CloudEvent
    events = [json.loads(r.value) for r in read_topic(kafka_broker.bootstrap, "mlgate.rollout", 2)]
    rollbacks = [r for r in promote.audit_trail(engine, "digits_mlp") if r.action == "rollback"][-2:]
    assert [e["type"] for e in events] == ["mlgate.rollout.rolled_back"] * 2
    assert [(e["data"]["candidate"], e["data"]["production"], e["data"]["audit_id"]) for e in events] == [
        (bad_version, "3", r.id) for r in rollbacks]
    assert all(e["data"]["reason"] == r.reason.removeprefix("rollout: ") for e, r in zip(events, rollbacks))
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from triggers.serving.rollout import Rollout

    from triggers.serving.rollout import RolloutPrediction, stage_counts

    with Session(engine) as session:
        ended = list(session.scalars(select(Rollout).order_by(Rollout.id)))[-4:]
        assert [(r.candidate, r.state) for r in ended] == [
            (bad_version, "rolled_back"), ("1", "done"), ("3", "done"), (bad_version, "rolled_back")]
        good = stage_counts(session, ended[1].id, 1)
        # the predictions kept for labels leave with their rollout
        assert session.scalar(select(func.count()).select_from(RolloutPrediction).where(
            RolloutPrediction.rollout_id.in_([r.id for r in ended]))) == 0
    assert good["labelled"] >= 20 and good["cand_correct"] / good["labelled"] > 0.8
    # the service's model card reads the same rollout state (the job database is shared)
    from triggers.model_overview import model_overview

    engine = store.open_store(store.database_url(config.workdir))   # now with the service's tables too
    card = model_overview(engine, config, "digits_mlp", [r.as_dict() for r in promote.audit_trail(engine, "digits_mlp")])
    assert card["rollout"]["candidate"] == bad_version and card["rollout"]["state"] == "rolled_back"
    assert card["rollout"]["requests"] >= 40 and card["rollout"]["agreement"] < 0.95


# the digits MLP with the same weights (seeded, and its extra buffers take nothing from the RNG), plus work
# that changes no answer: the same predictions as v3, at several times the compute per example
COSTLY_MLP = '''import torch
from torch import nn

from models.datasets import digits as load_data
from models.digits_mlp import build as mlp


class Costly(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("spread", torch.full((64, 512), 0.01))
        self.register_buffer("mix", torch.eye(512) * 0.5)

    def forward(self, x):
        z = torch.tanh(x.flatten(1) @ self.spread)
        for _ in range(12):
            z = torch.tanh(z @ self.mix)
        return self.inner(x) + 1e-30 * z.mean(dim=1, keepdim=True)   # below float32 resolution: no answer changes


def build(**params):
    return Costly(mlp(**params))
'''


def analysis_of(counts: dict[str, float]) -> Any:
    from automation.config import RolloutConfig
    from triggers.serving import rollout_analysis as analysis

    return analysis.comparison(counts, 0.95)["latency"], analysis.compute_failure(counts, RolloutConfig())


def rollout_state(engine: Any) -> list[Any]:
    """The model's rollouts and their counts, for a failure message."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from triggers.serving.rollout import Rollout, stage_counts

    with Session(engine) as session:
        return [(r.candidate, r.state, r.reason, {k: v for k, v in stage_counts(session, r.id, 0).items()
                                                  if k.startswith("cost_") or k == "requests"}, analysis_of(stage_counts(session, r.id, 0)))
                for r in session.scalars(select(Rollout).order_by(Rollout.id))]


def test_a_version_costing_several_times_the_compute_is_rolled_back_for_it(registry: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """With dynamic batching, end-to-end latency is mostly the batching wait and the queue, the same for
    both versions; the time each version's model calls take per example is what tells them apart."""
    import sys

    from automation import promote, store, tracking

    directory = registry.parent
    (directory / "costly_mlp.py").write_text(COSTLY_MLP)
    monkeypatch.syspath_prepend(str(directory))
    raw = yaml.safe_load(registry.read_text())
    costly = copy.deepcopy(raw)
    costly["models"] = {"digits_mlp": {"module": "costly_mlp", "params": {"hidden": 64}}}
    costly["defaults"]["gates"]["absolute"]["min_accuracy"] = 0.999     # never promoted by its job
    (directory / "costly.yaml").write_text(yaml.safe_dump(costly))
    assert main(["--config", str(directory / "costly.yaml"), "run", "--model", "digits_mlp"], standalone=False) == 3
    sys.modules.pop("costly_mlp", None)
    config = load_config(registry)
    client = tracking.connect(config.workdir, config.experiment)[0]
    costly_version = str(max(int(v.version) for v in client.search_model_versions("name='digits_mlp'")))
    staged = copy.deepcopy(raw)
    # enough requests that both medians' intervals are narrow on a loaded machine too: a short stage with wide
    # intervals passes, since a stage fails only on what its intervals make certain
    staged["defaults"]["rollout"] = {"stages": [{"traffic": 0, "min_seconds": 1.0, "min_requests": 300}]}
    (directory / "cost.yaml").write_text(yaml.safe_dump(staged))
    running = Running(directory / "cost.yaml", tmp_path / "inference", batch_delay_ms=1)
    stop = threading.Event()
    statuses: list[int] = []

    def traffic() -> None:
        x = digits_batch(20)
        with httpx.Client(timeout=10) as http:
            i = 0
            while not stop.is_set():
                statuses.append(http.post(running.url + "/predict", json={"inputs": [x[i % 20]]}).status_code)
                i += 1

    clients = [threading.Thread(target=traffic) for _ in range(2)]
    for thread in clients:
        thread.start()
    engine = store.open_store(store.database_url(config.workdir))
    try:
        assert main(["--config", str(registry), "promote", "digits_mlp", costly_version, "--reason", "by hand"],
                    standalone=False) == 0
        assert wait_for(lambda: promote.audit_trail(engine, "digits_mlp")[-1].action == "rollback", 90), \
            rollout_state(engine)[-1]
        last = promote.audit_trail(engine, "digits_mlp")[-1]
        assert last.version == "3" and last.replaced_version == costly_version
        assert "inference costs" in last.reason and "per example" in last.reason, last.reason
    finally:
        stop.set()
        for thread in clients:
            thread.join(30)
        running.stop()
        assert main(["--config", str(registry), "promote", "digits_mlp", "3", "--reason", "restore"],
                    standalone=False) == 0
    assert set(statuses) == {200}


def test_inference_log_stays_bounded_and_monitor_reads_it(tmp_path: Path) -> None:
    log = InferenceLog(tmp_path / "window", rows_per_file=50, max_files=3, flush_seconds=60)
    rng = np.random.default_rng(0)
    for step in range(40):
        log.append(rng.random((7, 1, 8, 8), dtype=np.float32), np.full(7, step % 10), "1")
        if step % 5 == 4:
            log.flush()
    log.close()
    files = log.files()
    import pandas as pd

    sizes = [len(pd.read_parquet(f)) for f in files]
    assert len(files) <= 3 and max(sizes) <= 50 and sum(sizes) <= 150        # 280 rows written
    window = load_window(tmp_path / "window", rows=1000)
    assert window.x.shape == (sum(sizes), 64)
    newest = pd.read_parquet(files[-1])
    assert newest["prediction"].iloc[-1] == 39 % 10                          # the newest rows are kept
