"""Load benchmark for `mlgate serve-model` on loopback (a script, not a test).

Trains and promotes digits_mlp in a temporary workdir, starts `mlgate serve-model`, then prints
POST /predict requests/s and p50/p99 latency at batch 1 and 32 (one connection, then CONCURRENCY),
next to the raw ONNX Runtime session latency for the same inputs in the same run, so the serving
overhead is a measured ratio.

    .venv/bin/python benchmarks/serving_load.py [--requests 3000] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from service_load import _fire, percentile  # noqa: E402

from tests.conftest import FAST_CONFIG, wait_for, write_config  # noqa: E402
from triggers.local_broker import free_port  # noqa: E402


def predict_requests(port: int, x: np.ndarray, count: int) -> list[bytes]:
    body = json.dumps({"inputs": x.tolist()}).encode()
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return [head + body] * count


def raw_session_latency(config_path: Path, x: np.ndarray, iterations: int) -> list[float]:
    from automation import promote, tracking
    from automation.config import load_config
    from automation.predictors import load_registered

    config = load_config(config_path)
    client, _ = tracking.connect(config.workdir, config.experiment)
    version = promote.alias_version(client, "digits_mlp", promote.PRODUCTION)
    loaded = load_registered(client, "digits_mlp", version, config.workdir / "bench-raw")
    prepared = loaded.predictor.prepare(x)
    for _ in range(200):
        loaded.predictor.run(prepared)
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        loaded.predictor.to_numpy(loaded.predictor.run(loaded.predictor.prepare(x)))
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--no-inference-log", action="store_true", help="serve without the inference log")
    args = parser.parse_args()
    from models.datasets import digits
    from triggers.cli import main as mlgate

    with tempfile.TemporaryDirectory() as directory:
        path = write_config(Path(directory), FAST_CONFIG)
        os.environ["MLGATE_LOG_LEVEL"] = "warning"
        if mlgate(["--config", str(path), "run", "--model", "digits_mlp"], standalone=False) != 0:
            raise SystemExit("training the model to serve failed")
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "triggers.cli", "--config", str(path), "serve-model",
                                   "digits_mlp", "--port", str(port),
                                   *(["--no-inference-log"] if args.no_inference_log else [])], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            def up() -> bool:
                try:
                    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            if not wait_for(up, 120):
                raise SystemExit("serve-model did not start")
            x_all = digits(seed=0).x_test
            print(f"serving digits_mlp ({httpx.get(f'http://127.0.0.1:{port}/healthz').json()['variant']}), "
                  f"{args.requests} requests per run")
            for batch in (1, 32):
                x = x_all[:batch]
                raw = raw_session_latency(path, x, 5000)
                print(f"batch {batch:>2}: raw ORT session   p50 {percentile(raw, 0.5) * 1e3:.3f} ms, "
                      f"p99 {percentile(raw, 0.99) * 1e3:.3f} ms")
                for concurrency in (1, args.concurrency):
                    asyncio.run(_fire(port, predict_requests(port, x, 200), concurrency))   # warm-up
                    elapsed, latencies, statuses = asyncio.run(
                        _fire(port, predict_requests(port, x, args.requests), concurrency))
                    assert set(statuses) == {200}, set(statuses)
                    print(f"          /predict, {concurrency} conn: {args.requests / elapsed:,.0f} req/s "
                          f"({args.requests * batch / elapsed:,.0f} examples/s), p50 "
                          f"{percentile(latencies, 0.5) * 1e3:.3f} ms, p99 {percentile(latencies, 0.99) * 1e3:.3f} ms"
                          + (f"; p50 overhead {percentile(latencies, 0.5) / percentile(raw, 0.5):.1f}× the raw "
                             f"session" if concurrency == 1 else ""))
        finally:
            server.terminate()
            server.wait(20)


if __name__ == "__main__":
    main()
