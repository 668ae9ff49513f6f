"""Load benchmark for model serving on loopback (a script, not a test).

Trains and promotes digits_mlp in a temporary workdir, then measures, on the same registered version:
a no-op FastAPI endpoint (the ceiling for any Python HTTP server here), the raw ONNX Runtime session,
`mlflow models serve`, and `mlgate serve-model` (/predict, /v2 JSON, /v2 binary; dynamic batching off
and on), at 1 and N concurrent keep-alive connections, batch 1 and 32. Prints one table.

Then the batch-1 target on its own: this machine's speed drifts by tens of percent within a minute, so
mlgate (batching on) and the no-op endpoint run side by side and are measured in alternating rounds;
the ratio of each pair is printed, with their median. With `--against REV`, the same is done at batch 32
for `/v2` binary (batching on) against `/predict` as the commit REV served it (its own checkout, the same
registered version).

    .venv/bin/python benchmarks/serving_load.py [--requests 3000] [--concurrency 8] [--skip-mlflow] [--rounds 10]
                                                [--against REV]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from service_load import fire, percentile, post  # noqa: E402

from tests.conftest import FAST_CONFIG, wait_for, write_config  # noqa: E402
from triggers.local_broker import free_port  # noqa: E402

NOOP_APP = """
from fastapi import FastAPI, Request
from fastapi.responses import Response
app = FastAPI()
@app.post("/noop")
async def noop(request: Request) -> Response:
    await request.body()
    return Response(b'{"ok":true}', media_type="application/json")
"""


def http_requests(port: int, path: str, body: bytes, count: int, headers: dict[str, str] | None = None) -> list[bytes]:
    return [post(port, path, body, {"Content-Type": "application/json", **(headers or {})})] * count


def predict_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    return json.dumps({"inputs": x.tolist()}).encode(), {}


def v2_json_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}],
                       "outputs": [{"name": "predictions"}]}).encode(), {}


def v2_binary_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "outputs": [{"name": "predictions", "parameters": {"binary_data": True}}]}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def mlflow_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    return json.dumps({"inputs": x.tolist()}).encode(), {}


def raw_session_latency(config_path: Path, x: np.ndarray, iterations: int) -> list[float]:
    from automation import promote, tracking
    from automation.config import load_config
    from automation.predictors import load_registered

    config = load_config(config_path)
    client, _ = tracking.connect(config.workdir, config.experiment)
    version = promote.alias_version(client, "digits_mlp", promote.PRODUCTION)
    loaded = load_registered(client, "digits_mlp", version, config.workdir / "bench-raw")
    for _ in range(200):
        loaded.predictor.to_numpy(loaded.predictor.run(loaded.predictor.prepare(x)))
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        loaded.predictor.to_numpy(loaded.predictor.run(loaded.predictor.prepare(x)))
        samples.append(time.perf_counter() - start)
    return samples


class Server:
    def __init__(self, command: list[str], health: str, env: dict[str, str] | None = None,
                 cwd: str | None = None) -> None:
        self.port = free_port()
        self.process = subprocess.Popen([part.replace("{port}", str(self.port)) for part in command],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env=os.environ | (env or {}), cwd=cwd)

        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{self.port}{health}", timeout=2).status_code < 500
            except httpx.HTTPError:
                return False

        if not wait_for(up, 180, interval=0.5):
            self.stop()
            raise SystemExit(f"{command[:4]} did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def measure(port: int, path: str, make: Callable[[np.ndarray], tuple[bytes, dict[str, str]]], x: np.ndarray,
            count: int, concurrency: int) -> tuple[float, float, float]:
    body, headers = make(x)
    fire(port, http_requests(port, path, body, min(300, count), headers), concurrency)   # warm-up
    elapsed, latencies, statuses = fire(port, http_requests(port, path, body, count, headers), concurrency)
    if set(statuses) != {200}:
        raise SystemExit(f"{path}: statuses {sorted(set(statuses))}")
    return count / elapsed, percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.99) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--skip-mlflow", action="store_true", help="leave out `mlflow models serve`")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds for the batch-1 ratio")
    parser.add_argument("--against", metavar="REV", help="also compare /v2 binary at batch 32 with REV's /predict")
    args = parser.parse_args()
    from models.datasets import digits
    from triggers.cli import main as mlgate

    with tempfile.TemporaryDirectory() as directory:
        path = write_config(Path(directory), FAST_CONFIG)
        os.environ["MLGATE_LOG_LEVEL"] = "warning"
        if mlgate(["--config", str(path), "run", "--model", "digits_mlp"], standalone=False) != 0:
            raise SystemExit("training the model to serve failed")
        x_all = digits(seed=0).x_test.astype(np.float32)
        py = sys.executable
        serve = [py, "-m", "triggers.cli", "--config", str(path), "serve-model", "digits_mlp", "--port", "{port}",
                 "--no-inference-log"]
        noop_file = Path(directory) / "noop.py"
        noop_file.write_text(NOOP_APP)
        targets: list[tuple[str, list[str], str, str, Callable, dict[str, str]]] = [
            ("no-op FastAPI endpoint", [py, "-m", "uvicorn", "--app-dir", directory, "noop:app", "--port", "{port}",
                                        "--log-level", "warning", "--no-access-log"], "/docs", "/noop", predict_body,
             {}),
            ("mlgate /predict", serve, "/healthz", "/predict", predict_body, {}),
            ("mlgate /v2 JSON", serve, "/healthz", "/v2/models/digits_mlp/infer", v2_json_body, {}),
            ("mlgate /v2 binary", serve, "/healthz", "/v2/models/digits_mlp/infer", v2_binary_body, {}),
            ("mlgate /predict, batching", serve + ["--batch-delay-ms", "0"], "/healthz", "/predict", predict_body, {}),
            ("mlgate /v2 binary, batching", serve + ["--batch-delay-ms", "0"], "/healthz",
             "/v2/models/digits_mlp/infer", v2_binary_body, {}),
        ]
        if not args.skip_mlflow:
            uri = f"sqlite:///{Path(directory) / 'state' / 'mlflow.db'}"
            targets.insert(1, ("mlflow models serve", [py, "-m", "mlflow", "models", "serve", "-m",
                                                       "models:/digits_mlp/1", "--env-manager", "local", "-p",
                                                       "{port}", "-h", "127.0.0.1"], "/ping", "/invocations",
                               mlflow_body, {"MLFLOW_TRACKING_URI": uri,   # it starts `uvicorn` from PATH
                                             "PATH": f"{Path(py).parent}{os.pathsep}{os.environ.get('PATH', '')}"}))
        rows = []
        for batch in (1, 32):
            raw = raw_session_latency(path, x_all[:batch], 5000)
            rows.append(("raw ORT session (no HTTP)", batch, "-", 1 / percentile(raw, 0.5), percentile(raw, 0.5) * 1e3,
                         percentile(raw, 0.99) * 1e3))
        for name, command, health, route, make, env in targets:
            server = Server(command, health, env)
            try:
                for batch in (1, 32):
                    for concurrency in (1, args.concurrency):
                        rate, p50, p99 = measure(server.port, route, make, x_all[:batch], args.requests, concurrency)
                        rows.append((name, batch, str(concurrency), rate, p50, p99))
            finally:
                server.stop()
        print(f"digits_mlp, onnx, {args.requests} requests per cell, loopback, {os.cpu_count()} cores\n")
        print(f"| {'target':<30} | batch | conns | {'req/s':>8} | {'examples/s':>10} | p50 ms | p99 ms |")
        print(f"|{'-' * 32}|-------|-------|{'-' * 10}|{'-' * 12}|--------|--------|")
        for name, batch, conns, rate, p50, p99 in rows:
            print(f"| {name:<30} | {batch:>5} | {conns:>5} | {rate:>8,.0f} | {rate * batch:>10,.0f} | {p50:>6.3f} | "
                  f"{p99:>6.3f} |")
        paired_ratio(targets, x_all[:1], args.requests, args.concurrency, args.rounds)
        if args.against:
            against_revision(args.against, serve, x_all[:32], args.requests, args.concurrency, args.rounds)


def against_revision(revision: str, serve: list[str], x: np.ndarray, count: int, concurrency: int,
                     rounds: int) -> None:
    """`/v2` binary with batching, now, against `/predict` as `revision` served it, alternating."""
    import statistics

    with tempfile.TemporaryDirectory() as checkout:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", checkout, revision], check=True,
                       capture_output=True)
        try:
            # run from the checkout: `python -m` puts the working directory first on the import path
            which = subprocess.run([sys.executable, "-c", "import triggers; print(triggers.__file__)"], cwd=checkout,
                                   capture_output=True, text=True, check=True).stdout.strip()
            if not which.startswith(os.path.realpath(checkout)):
                raise SystemExit(f"the checkout of {revision} would not be the code that runs ({which})")
            old = Server(serve, "/healthz", cwd=checkout)
            new = Server(serve + ["--batch-delay-ms", "0"], "/healthz", {})
            try:
                print(f"\nbatch 32, alternating ({rounds} rounds of {count} requests): /v2 binary with batching "
                      f"against /predict at {revision}\n")
                for connections in (1, concurrency):
                    ratios = []
                    for _ in range(rounds):
                        before = measure(old.port, "/predict", predict_body, x, count, connections)[0]
                        ratios.append(measure(new.port, "/v2/models/digits_mlp/infer", v2_binary_body, x, count,
                                              connections)[0] / before)
                    print(f"- {connections} connection(s): median {statistics.median(ratios):.1f}× the examples/s "
                          f"(rounds: {', '.join(f'{r:.1f}×' for r in ratios)})")
            finally:
                old.stop()
                new.stop()
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", checkout], capture_output=True)


def paired_ratio(targets: list[tuple[str, list[str], str, str, Callable, dict[str, str]]], x: np.ndarray,
                 count: int, concurrency: int, rounds: int) -> None:
    """Batch 1 at `concurrency` connections: each mlgate route with batching against the no-op endpoint,
    measured one right after the other, `rounds` times."""
    import statistics

    chosen = {name: target for name, *target in targets
              if name == "no-op FastAPI endpoint" or name.endswith(", batching")}
    servers = {name: Server(command, health, env) for name, (command, health, _, _, env) in chosen.items()}
    try:
        noop = servers.pop("no-op FastAPI endpoint")
        print(f"\nbatch 1, {concurrency} connections, alternating with the no-op endpoint ({rounds} rounds of "
              f"{count} requests each):\n")
        for name, server in servers.items():
            route, make = chosen[name][2], chosen[name][3]
            ratios = []
            for _ in range(rounds):
                base = measure(noop.port, "/noop", predict_body, x, count, concurrency)[0]
                ratios.append(measure(server.port, route, make, x, count, concurrency)[0] / base)
            print(f"- {name}: median {statistics.median(ratios):.0%} of the no-op's requests/s "
                  f"(rounds: {', '.join(f'{r:.0%}' for r in ratios)})")
    finally:
        noop.stop()
        for server in servers.values():
            server.stop()


if __name__ == "__main__":
    main()
