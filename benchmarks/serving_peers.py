"""Serving the Fashion-MNIST ResNet against the servers users would pick instead (a script, not a test).

Every server speaks the KServe v2 / Open Inference Protocol over HTTP/REST (`POST /v2/models/<name>/infer`) and
is measured by the same load generator (service_load.fire: raw HTTP/1.1 on 1 or 8 keep-alive connections, a
thread and a blocking socket each, in this process), at batch 1 and 32:

- `mlgate serve-model fashion_resnet`, JSON tensors and the binary tensor extension, with its default (no dynamic
  batching) and with `--batch-delay-ms 0` (dynamic batching of what is already queued), and its own `POST /predict`
  (JSON examples as nested lists);
- Seldon's MLServer (PyPI `mlserver`), a custom runtime (an `mlserver.MLModel` subclass) running an ONNX Runtime
  session; JSON only (MLServer's REST has no binary tensor extension);
- KServe's Python model server (PyPI `kserve`), a `kserve.Model` subclass running the same session, v2 protocol,
  JSON and binary;
- the raw ONNX Runtime session in this process (no HTTP): "connections" are caller threads there.

What makes it the same work on each:
- The model: the `fashion_resnet` job runs once (its `on_cpu` config on a machine without CUDA) in a workdir,
  with its variants limited to `onnx_fp32`, so the version it registers and promotes is served as that ONNX file.
  mlgate downloads it from the registry; the peers and the raw session load the same file (the version's MLflow
  artifact).
- The input: the exported graph takes raw uint8 pixels, [batch, 28, 28]; the scaling to the network's floats
  (/255, then the training split's mean and deviation) is inside the graph. So every server gets the very same
  UINT8 tensor (real Fashion-MNIST test images) and does the same arithmetic in ONNX Runtime; none scales pixels
  on the host.
- The output: `logits` (FP32, [batch, 10]) and `predictions` (INT64 argmax, [batch]), asked for by name; the
  answers' predictions are checked against the raw session's before a server is measured.
- The runtime: the peers' venvs get the onnxruntime version this project runs, and every session has mlgate's
  options (ORT_ENABLE_ALL, one intra-op thread; mlgate runs concurrent requests on inference threads instead).
  The raw session is shown with those options and, at one caller, with ONNX Runtime's default threads.
- Per-request logging is off everywhere: mlgate with `--no-inference-log` (it writes no access log), MLServer with
  `debug: false` (its access log), KServe with `--configure_logging false --enable_latency_logging false`.
  Everything else is each server's default: MLServer runs inference in one parallel worker process, no adaptive
  batching, and its uvicorn parses HTTP with h11 (pip brings no httptools for it; mlgate's and KServe's have it);
  KServe one worker, its sync `predict` on the event loop; their gRPC and metrics servers are off or on other ports.
- The client: service_load.fire's keep-alive connections, reading Content-Length and chunked answers (KServe sends
  its binary answers chunked), the same for every server. It shares the 2 cores with the server; the raw session has
  no client to feed. So it is lean: a blocking socket per connection costs ~0.1 ms of CPU per request, where
  the asyncio client it replaced cost 0.2-0.28 ms (measured with getrusage beside the server's CPU) — 2-4 % of
  a batch-32 request's 6 ms that the raw session never pays.

Then mlgate's overhead against the raw session at batch 32, which is what the goal (`/v2` binary at least 95 % of
the raw session's examples/s, JSON at least 85 %, at 8 connections: a server's throughput) is about: this machine's
speed drifts by tens of percent within a minute, so mlgate (batching off) and the raw session are measured in
alternating rounds (`--rounds` of `--paired-requests`), with the median ratio of their examples/s. At one
connection a request's time is split into the session, the HTTP floor (the same body sent to an unknown model:
answered 404 before anything is parsed) and the rest (mlgate's parsing, thread hops, answer); mlgate's own steps are
also timed in this process; and at 8 connections the CPU per request of the server's event loop, its other threads
and the load generator, beside the raw session's per call (`cpu_split`, from /proc and getrusage).

Each peer is installed into its own venv under `.bench/<peer>/` (python3 -m venv, then pip from PyPI: the peer,
`onnxruntime==<this project's>`, `numpy`; MLServer also `uvloop<0.22`), only when missing. A peer that cannot be
installed or started is reported in one line, and the others go on. The job needs 1.5-3 min on 2 CPU cores;
`--workdir` keeps its registry for the next run.

    .venv/bin/python benchmarks/serving_peers.py [--requests 2000] [--rounds 15] [--workdir DIR]
                                                  [--servers mlgate,mlserver,kserve]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from importlib.metadata import version as installed_version
from pathlib import Path

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from examples import run_job
from service_load import fire, percentile, post
from serving_load import Server

from tests.conftest import wait_for
from triggers.local_broker import free_port

MODEL = "fashion_resnet"
V2_PATH = f"/v2/models/{MODEL}/infer"
BENCH = ROOT / ".bench"
# uvloop 0.22 broke MLServer 1.7's inference workers ("There is no current event loop"; SeldonIO/MLServer#2286):
# pinned below it, as MLflow pins it for MLServer
PEERS = {"mlserver": ["mlserver", "uvloop<0.22"], "kserve": ["kserve"]}
CONNECTIONS = (1, 8)
BATCHES = (1, 32)
OUTPUTS = [{"name": "logits"}, {"name": "predictions"}]

# the peers' model code: an ONNX Runtime session on the file, with mlgate's session options
SESSION = """
import onnxruntime as ort

def session(path):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
"""

MLSERVER_RUNTIME = SESSION + """
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OrtModel(MLModel):
    async def load(self) -> bool:
        self.session = session(self.settings.parameters.uri)
        self.input_name = self.session.get_inputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        logits = self.session.run(None, {self.input_name: x})[0]
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=[
            NumpyCodec.encode_output("logits", logits), NumpyCodec.encode_output("predictions", logits.argmax(1))])
"""

KSERVE_SERVER = SESSION + """
import sys
import uuid

import kserve
from kserve import InferOutput, InferRequest, InferResponse


class OrtModel(kserve.Model):
    def __init__(self, name, path):
        super().__init__(name)
        self.path = path
        self.load()

    def load(self):
        self.session = session(self.path)
        self.input_name = self.session.get_inputs()[0].name
        self.ready = True

    def predict(self, payload: InferRequest, headers=None) -> InferResponse:
        x = payload.inputs[0].as_numpy()
        logits = self.session.run(None, {self.input_name: x})[0]
        predictions = logits.argmax(1)
        outputs = [InferOutput("logits", list(logits.shape), "FP32", logits),
                   InferOutput("predictions", list(predictions.shape), "INT64", predictions)]
        return InferResponse(response_id=payload.id or uuid.uuid4().hex, model_name=self.name, infer_outputs=outputs,
                             use_binary_outputs=payload.use_binary_outputs, requested_outputs=payload.request_outputs)


if __name__ == "__main__":   # kserve reads its own flags (--http_port, ...) from the command line
    kserve.ModelServer().start([OrtModel(sys.argv[1], sys.argv[2])])
"""


def peer_venv(peer: str) -> tuple[Path | None, str]:
    """The peer's own venv under .bench/ (created and filled from PyPI when missing): its python, or None and why.
    It gets the onnxruntime this project runs, so every server runs the same ONNX Runtime."""
    venv = BENCH / peer
    python = venv / "bin" / "python"
    wanted = [*PEERS[peer], f"onnxruntime=={installed_version('onnxruntime')}", "numpy"]
    marker = venv / ".installed"
    if marker.exists() and marker.read_text() == " ".join(wanted):
        return python, ""
    print(f"installing {' '.join(wanted)} into {venv.relative_to(ROOT)} (once) …", flush=True)
    try:
        if not python.exists():
            subprocess.run(["python3", "-m", "venv", str(venv)], check=True, capture_output=True, text=True,
                           timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *wanted],
                       check=True, capture_output=True, text=True, timeout=1200)
    except subprocess.CalledProcessError as exc:
        lines = (exc.stderr or exc.stdout or "").strip().splitlines()
        return None, f"{' '.join(exc.cmd[:4])} failed: {lines[-1] if lines else f'exit {exc.returncode}'}"
    except (subprocess.TimeoutExpired, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    marker.write_text(" ".join(wanted))
    return python, ""


def peer_version(python: Path, package: str) -> str:
    return subprocess.run([str(python), "-c", f"from importlib.metadata import version; print(version({package!r}))"],
                          capture_output=True, text=True, check=True).stdout.strip()


def registered_model(workdir: Path, fresh: bool, scratch: Path) -> tuple[Path, object]:
    """Run the fashion_resnet job in `workdir` (unless it already promoted a version there): its config path and
    the promoted version, loaded as mlgate serves it (the ONNX file, one intra-op thread)."""
    from automation import promote, tracking
    from automation.config import load_config
    from automation.predictors import load_registered

    config = workdir / "mlgate.yaml"
    if fresh or not config.exists():
        raw = yaml.safe_load((ROOT / "mlgate.yaml").read_text())
        block = raw["models"][MODEL]
        block["optimize"] = {**block.get("optimize", {}), "variants": ["onnx_fp32"]}   # served: the ONNX file
        raw["models"] = {MODEL: block}
        base = scratch / "base.yaml"
        base.write_text(yaml.safe_dump(raw))
        print(f"running the {MODEL} job in {workdir} …", flush=True)
        summary, wall, _ = run_job(base, MODEL, workdir)
        if not summary.get("promoted"):
            raise SystemExit(f"the {MODEL} job promoted nothing: {json.dumps(summary.get('gate'))[:500]}")
        print(f"  {wall:.0f} s, accuracy {summary['metrics']['accuracy']:.4f}, variant {summary['chosen_variant']}")
    loaded_config = load_config(config)
    client, _ = tracking.connect(loaded_config.workdir, loaded_config.experiment)
    version = promote.alias_version(client, MODEL, promote.PRODUCTION)
    if version is None:
        raise SystemExit(f"nothing is in production for {MODEL} in {workdir}: run without --workdir, or with a new one")
    loaded = load_registered(client, MODEL, version, workdir / "bench-raw", cpu_threads=1)
    if loaded.served_as != "onnx_fp32":
        raise SystemExit(f"version {version} is served as {loaded.served_as}, not the ONNX file: no common artifact")
    return config, loaded


def infer_body(x: np.ndarray, form: str) -> tuple[bytes, dict[str, str]]:
    """A request for `x`: `json` (v2 JSON tensor), `binary` (v2: JSON then the raw tensor, binary outputs asked for
    too) or `predict` (mlgate's `POST /predict` body: the examples as nested lists)."""
    if form == "predict":
        return json.dumps({"inputs": x.tolist()}).encode(), {"Content-Type": "application/json"}
    datatype = {"uint8": "UINT8", "float32": "FP32"}[x.dtype.name]
    tensor: dict = {"name": "input", "shape": list(x.shape), "datatype": datatype}
    if form == "json":
        tensor["data"] = x.reshape(-1).tolist()
        return json.dumps({"inputs": [tensor], "outputs": OUTPUTS}).encode(), {"Content-Type": "application/json"}
    raw = np.ascontiguousarray(x).tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    outputs = [{**o, "parameters": {"binary_data": True}} for o in OUTPUTS]
    head = json.dumps({"inputs": [tensor], "outputs": outputs}).encode()
    return head + raw, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}


def raw_http(port: int, path: str, body: bytes, headers: dict[str, str], count: int) -> list[bytes]:
    return [post(port, path, body, headers)] * count


def measure(port: int, path: str, x: np.ndarray, form: str, count: int, connections: int,
            expect: int = 200) -> tuple[float, float, float]:
    """req/s, p50 ms and p95 ms over `count` requests (after a warm-up of up to 200), each answered `expect`."""
    body, headers = infer_body(x, form)
    fire(port, raw_http(port, path, body, headers, min(200, count)), connections)
    elapsed, latencies, statuses = fire(port, raw_http(port, path, body, headers, count), connections)
    if set(statuses) != {expect}:
        raise RuntimeError(f"{path}: statuses {sorted(set(statuses))}")
    return count / elapsed, percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.95) * 1e3


def predictions_agree(port: int, path: str, x: np.ndarray, expected: np.ndarray) -> str:
    """'' when the server answers `x` (JSON) with the raw session's predictions, else what is wrong; waits up to
    60 s for the model to be ready."""
    form = "predict" if path == "/predict" else "json"
    body, headers = infer_body(x, form)
    answer: list[httpx.Response] = []

    def answered() -> bool:
        try:
            answer[:] = [httpx.post(f"http://127.0.0.1:{port}{path}", content=body, headers=headers, timeout=10)]
        except httpx.HTTPError:
            return False
        return answer[0].status_code == 200

    if not wait_for(answered, 60, interval=0.5):
        return f"no answer: {answer[0].status_code} {answer[0].text[:200]}" if answer else "no answer"
    if form == "predict":
        got = np.asarray(answer[0].json()["predictions"])
    else:
        outputs = {o["name"]: o for o in answer[0].json()["outputs"]}
        got = np.asarray(outputs.get("predictions", {}).get("data", []))
    return "" if np.array_equal(got, expected) else f"predictions differ: {got[:8]} against {expected[:8]}"


class Started:
    """A server process (serving_load.Server), its output kept in a log, and every process it started ended."""

    def __init__(self, command: list[str], health: str, log: Path, env: dict[str, str] | None = None,
                 cwd: str | None = None) -> None:
        line = " ".join(shlex.quote(part) for part in command)   # "{port}" survives the quoting
        self.log = log
        self.server = Server(["sh", "-c", f"exec {line} >{shlex.quote(str(log))} 2>&1"], health, env, cwd)
        self.port = self.server.port

    def stop(self) -> None:
        import psutil

        try:
            children = psutil.Process(self.server.process.pid).children(recursive=True)
        except psutil.Error:
            children = []
        try:
            self.server.stop()
        except subprocess.TimeoutExpired:
            self.server.process.kill()
            self.server.process.wait(10)
        for child in children:   # a worker process that outlived its parent
            try:
                child.kill()
            except psutil.Error:
                pass

    def tail(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        return lines[-1][:300] if lines else "(no output)"


def start(name: str, command: list[str], health: str, log: Path, env: dict[str, str] | None = None,
          cwd: str | None = None) -> Started | None:
    try:
        return Started(command, health, log, env, cwd)
    except SystemExit:   # serving_load.Server gives up after 180 s
        text = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
        print(f"- {name}: did not start ({text[-1][:300] if text else 'no output'})", flush=True)
        return None


def serve_rows(name: str, server: Started, forms: list[tuple[str, str, str]], x_all: np.ndarray,
               expected: np.ndarray, count: int, rows: list) -> None:
    """Every cell for one running server: each (label, body form, path), batch and connection count."""
    for path in dict.fromkeys(path for _, _, path in forms):
        wrong = predictions_agree(server.port, path, x_all[:32], expected[:32])
        if wrong:
            print(f"- {name} {path}: not measured, {wrong} (log: {server.tail()})", flush=True)
            return
    for label, form, path in forms:
        for batch in BATCHES:
            for connections in CONNECTIONS:
                try:
                    rate, p50, p95 = measure(server.port, path, x_all[:batch], form, count, connections)
                except (RuntimeError, OSError, ValueError, IndexError) as exc:
                    print(f"- {name} {label}, batch {batch}, {connections} conns: {type(exc).__name__}: {exc}")
                    continue
                rows.append((f"{name} {label}", batch, str(connections), rate, p50, p95))
                print(f"  {name} {label} batch {batch} conns {connections}: {rate:,.0f} req/s", flush=True)


def raw_session(predictor: object, x: np.ndarray, count: int, threads: int) -> tuple[float, float, float]:
    """The session in this process, as `measure` gives a server's figures: `threads` callers side by side (ONNX
    Runtime releases the GIL), `count` calls in all."""
    feed = predictor.prepare(x)
    for _ in range(50):
        predictor.run(feed)
    latencies: list[float] = []
    lock = threading.Lock()

    def calls(n: int) -> None:
        mine = []
        for _ in range(n):
            started = time.perf_counter()
            predictor.run(feed)
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(calls, [count // threads] * threads))
    elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.95) * 1e3


def _thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of process `pid`."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:   # a thread that ended meanwhile
            continue
        seconds[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def cpu_split(port: int, pid: int, predictor: object, x: np.ndarray, form: str, count: int,
              connections: int) -> str:
    """Where the CPU goes per request at batch len(x): the server's event loop (its main thread), its other
    threads (the inference threads), the load generator (this process), against the raw session's CPU per call
    with as many caller threads. Linux only (/proc)."""
    import resource

    def own_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    started = own_cpu()
    raw_session(predictor, x, count, connections)   # its 50 warm-up calls are counted too: they are few
    raw = (own_cpu() - started) / (count + 50)
    body, headers = infer_body(x, form)
    fire(port, raw_http(port, V2_PATH, body, headers, 200), connections)   # warm-up, not counted
    before, client = _thread_cpu(pid), own_cpu()
    _, _, statuses = fire(port, raw_http(port, V2_PATH, body, headers, count), connections)
    after, client = _thread_cpu(pid), own_cpu() - client
    if set(statuses) != {200}:
        raise RuntimeError(f"statuses {sorted(set(statuses))}")
    spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    loop = spent.pop(pid, 0.0)
    return (f"CPU per request, {'JSON' if form == 'json' else form}, {connections} conns: the event loop "
            f"{1e3 * loop / count:.2f} ms, the other threads (inference) {1e3 * sum(spent.values()) / count:.2f} ms, "
            f"the load generator {1e3 * client / count:.2f} ms; the raw session {1e3 * raw:.2f} ms per call")


def paired(port: int, pid: int, predictor: object, x: np.ndarray, count: int, rounds: int) -> list[str]:
    """mlgate (batching off) against the raw session at batch len(x), in alternating rounds (this machine's speed
    drifts by tens of percent within a minute), and a request's time split: the session, the HTTP floor (the same
    body to an unknown model, answered 404 before any parsing) and the rest; then where the CPU goes (cpu_split)."""
    import statistics

    lines = []
    for form in ("binary", "json"):
        for connections in CONNECTIONS:
            ratios, raw_ms, served_ms, floor_ms = [], [], [], []
            for _ in range(rounds):
                raw = raw_session(predictor, x, count, connections)[0]
                served = measure(port, V2_PATH, x, form, count, connections)[0]
                floor = measure(port, "/v2/models/unknown/infer", x, form, count, connections, expect=404)[0]
                ratios.append(served / raw)
                raw_ms.append(1e3 / raw)
                served_ms.append(1e3 / served)
                floor_ms.append(1e3 / floor)
            ratio = statistics.median(ratios)
            each = ", ".join(f"{r:.0%}" for r in ratios)
            line = (f"- {'JSON' if form == 'json' else form}, {connections} conn: median {ratio:.0%} of raw ORT's "
                    f"examples/s ({1 / ratio - 1:+.0%} time per example; rounds {each})")
            if connections == 1:
                session, whole, floor = (statistics.median(v) for v in (raw_ms, served_ms, floor_ms))
                line += (f"; a request takes {whole:.2f} ms: the session {session:.2f}, the HTTP floor {floor:.2f}, "
                         f"the rest {whole - session - floor:.2f}")
            lines.append(line)
    lines += [f"- {cpu_split(port, pid, predictor, x, form, count, CONNECTIONS[-1])}" for form in ("binary", "json")]
    return lines


def breakdown(loaded: object, x: np.ndarray, iterations: int = 300) -> dict[str, float]:
    """mlgate's own steps for one request of `x`, in this process, ms each: parsing the body, the session, the
    answer's body (JSON and binary)."""
    from triggers.serving import open_inference

    def timed(fn: Callable[[], object]) -> float:
        for _ in range(20):
            fn()
        samples = []
        for _ in range(iterations):
            started = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - started)
        return percentile(samples, 0.5) * 1e3

    figures = {}
    for form in ("json", "binary"):
        body, headers = infer_body(x, form)
        split = headers.get("Inference-Header-Content-Length")
        args = (body, split, loaded.input_shape, loaded.dtype, 1024, bool(loaded.classes), loaded.input_kind)
        parsed = open_inference.parse_infer(*args)
        logits = loaded.predictor.run(loaded.predictor.prepare(parsed.x))
        figures[f"parse {form}"] = timed(partial(open_inference.parse_infer, *args))
        figures[f"answer {form}"] = timed(partial(open_inference.infer_response, MODEL, loaded.version, parsed,
                                                  logits, logits.argmax(axis=1), loaded.classes))
    feed = loaded.predictor.prepare(x)
    figures["session"] = timed(lambda: loaded.predictor.run(feed))
    return figures


def mlgate_rows(config: Path, loaded: object, x_all: np.ndarray, expected: np.ndarray, args: argparse.Namespace,
                scratch: Path, rows: list) -> list[str]:
    """mlgate with batching off (its default; /v2 and /predict) and with --batch-delay-ms 0 (/v2); the paired rounds
    run on the first."""
    serve = [sys.executable, "-m", "triggers.cli", "--config", str(config), "serve-model", MODEL, "--port", "{port}",
             "--no-inference-log"]
    lines: list[str] = []
    for label, extra in (("", []), (", batching 0ms", ["--batch-delay-ms", "0"])):
        server = start("mlgate", serve + extra, "/healthz", scratch / f"mlgate{len(extra)}.log", cwd=str(ROOT))
        if server is None:
            continue
        try:
            forms = [(f"/v2 JSON{label}", "json", V2_PATH), (f"/v2 binary{label}", "binary", V2_PATH)]
            serve_rows("mlgate", server, forms + ([] if extra else [("/predict", "predict", "/predict")]),
                       x_all, expected, args.requests, rows)
            if not extra and args.rounds:
                lines = paired(server.port, server.server.process.pid, loaded.predictor, x_all[:32],
                               args.paired_requests, args.rounds)
        finally:
            server.stop()
    return lines


def peer_rows(peer: str, onnx_file: str, x_all: np.ndarray, expected: np.ndarray, count: int, scratch: Path,
              rows: list, versions: dict[str, str]) -> None:
    """One peer: its venv, its model code written to a scratch folder, its server started, measured, stopped."""
    python, why = peer_venv(peer)
    if python is None:
        print(f"- {peer}: not installed here ({why})", flush=True)
        return
    versions[peer] = peer_version(python, peer)
    name = f"{'MLServer' if peer == 'mlserver' else 'KServe'} {versions[peer]}"
    home = scratch / peer
    (home / MODEL).mkdir(parents=True)
    if peer == "mlserver":   # a model folder: its settings and the runtime beside them; the server's settings
        (home / MODEL / "runtime.py").write_text(MLSERVER_RUNTIME)
        (home / MODEL / "model-settings.json").write_text(json.dumps(
            {"name": MODEL, "implementation": "runtime.OrtModel", "parameters": {"uri": onnx_file}}))
        (home / "settings.json").write_text(json.dumps({"debug": False, "host": "127.0.0.1"}))
        env = {"MLSERVER_GRPC_PORT": str(free_port()), "MLSERVER_METRICS_PORT": str(free_port())}
        command = ["env", "MLSERVER_HTTP_PORT={port}", str(python.parent / "mlserver"), "start", str(home)]
        forms = [("JSON", "json", V2_PATH)]
    else:
        (home / "server.py").write_text(KSERVE_SERVER)
        env = {}
        command = [str(python), str(home / "server.py"), MODEL, onnx_file, "--http_port", "{port}",
                   "--enable_grpc", "false", "--configure_logging", "false", "--enable_latency_logging", "false"]
        forms = [("JSON", "json", V2_PATH), ("binary", "binary", V2_PATH)]
    server = start(name, command, "/v2/health/live", scratch / f"{peer}.log", env, cwd=str(home))
    if server is not None:
        try:
            serve_rows(name, server, forms, x_all, expected, count, rows)
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per cell (after a warm-up)")
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds of mlgate and the raw session at "
                        "batch 32 (0: none); a round now and then runs while the machine stalls, so a median of many")
    parser.add_argument("--paired-requests", type=int, default=400, help="requests per round of those (each ~3 s)")
    parser.add_argument("--workdir", help="where the job runs and its registry stays (reused when it already "
                        "promoted a version there); default: a temporary folder")
    parser.add_argument("--servers", default="mlgate,mlserver,kserve", help="comma-separated: mlgate,mlserver,kserve")
    args = parser.parse_args()
    servers = set(args.servers.split(","))
    os.environ["MLGATE_LOG_LEVEL"] = "warning"
    from automation.predictors import OnnxPredictor
    from models.datasets import fashion_mnist

    with tempfile.TemporaryDirectory(prefix="mlgate-peers-") as tmp:
        scratch = Path(tmp)
        workdir = Path(args.workdir).resolve() if args.workdir else scratch / "state"
        workdir.parent.mkdir(parents=True, exist_ok=True)
        config, loaded = registered_model(workdir, args.workdir is None, scratch)
        onnx_file = str(loaded.artifact)
        x_all = np.ascontiguousarray(fashion_mnist().x_test[:32])
        expected = loaded.predictor.run(loaded.predictor.prepare(x_all)).argmax(1)
        print(f"{MODEL} version {loaded.version}: {onnx_file}, input {loaded.dtype} {list(loaded.input_shape)}",
              flush=True)
        rows: list = []
        default_threads = OnnxPredictor(onnx_file)
        for batch in BATCHES:
            for threads in CONNECTIONS:
                rows.append(("raw ORT, 1 intra-op thread", batch, f"{threads} thr",
                             *raw_session(loaded.predictor, x_all[:batch], args.requests, threads)))
            rows.append((f"raw ORT, default threads ({os.cpu_count()})", batch, "1 thr",
                         *raw_session(default_threads, x_all[:batch], args.requests, 1)))
        versions = {"onnxruntime": installed_version("onnxruntime")}
        lines = mlgate_rows(config, loaded, x_all, expected, args, scratch, rows) if "mlgate" in servers else []
        for peer in ("mlserver", "kserve"):
            if peer in servers:
                peer_rows(peer, onnx_file, x_all, expected, args.requests, scratch, rows, versions)
        steps = breakdown(loaded, x_all[:32]) if "mlgate" in servers else {}
    print(f"\n{MODEL} (on_cpu), ONNX fp32 v{loaded.version}, {args.requests} requests per cell, loopback, "
          f"{os.cpu_count()} cores; " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "\n")
    print(f"| {'server':<34} | batch | conns | {'req/s':>8} | {'examples/s':>10} | p50 ms | p95 ms |")
    print(f"|{'-' * 36}|-------|-------|{'-' * 10}|{'-' * 12}|--------|--------|")
    for name, batch, conns, rate, p50, p95 in rows:
        print(f"| {name:<34} | {batch:>5} | {conns:>5} | {rate:>8,.0f} | {rate * batch:>10,.0f} | {p50:>6.3f} | "
              f"{p95:>6.3f} |")
    if lines:
        print(f"\nmlgate (batching off) against the raw session (1 intra-op thread; N connections against N caller "
              f"threads) at batch 32, {args.rounds} alternating rounds of {args.paired_requests}:")
        print("\n".join(lines))
    if steps:
        print("\nmlgate's own steps for one batch-32 request, in this process (p50): "
              + ", ".join(f"{k} {v:.3f} ms" for k, v in steps.items()))


if __name__ == "__main__":
    main()
