"""Load benchmark for the service's intake, on loopback (a script, not a test).

Webhooks: a real `mlgate serve` process (uvicorn, SQLite or MLGATE_DATABASE_URL) receives signed
push deliveries that each create a job (durable enqueue), from CONCURRENCY keep-alive connections;
prints deliveries/s and p50/p99 response time.

Drift: EVENTS CloudEvents are produced to a real Kafka-protocol broker (Tansu) and consumed by the
drift consumer; prints events/s through the consumer and p50/p99 from produce to recorded decision,
once for a backlog (throughput) and once for a steady stream at --rate (latency).

    .venv/bin/python benchmarks/service_load.py [--deliveries 3000] [--concurrency 16] [--events 20000]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import FAST_CONFIG, wait_for, webhook_examples  # noqa: E402
from triggers.local_broker import TansuBroker, free_port  # noqa: E402
from triggers.request_guard import sign  # noqa: E402

SECRET = "bench-secret"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def post(port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """One HTTP/1.1 POST of `body` as `fire` sends it: `headers` as given, then its Content-Length."""
    extra = "".join(f"{key}: {value}\r\n" for key, value in headers.items())
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def build_requests(count: int, port: int) -> list[bytes]:
    template = copy.deepcopy(next(p for p in webhook_examples("push") if p["ref"] == "refs/heads/master"))
    template["before"] = "1" * 40
    requests = []
    for i in range(count):
        template["after"] = f"{i + 1:040x}"
        template["commits"][0].update(added=[], removed=[], modified=["models/digits_mlp.py"])
        body = json.dumps(template).encode()
        requests.append(post(port, "/webhooks/github", body, {
            "Content-Type": "application/json", "X-GitHub-Event": "push", "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": sign(SECRET, body)}))
    return requests


class _Answers:
    """Reads HTTP/1.1 answers off one keep-alive socket: Content-Length or chunked (KServe sends its binary
    answers chunked)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, bytearray()

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk

    def line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buffer[:end])
        del self.buffer[:end + 2]
        return line

    def skip(self, size: int) -> None:
        while len(self.buffer) < size:
            self._fill()
        del self.buffer[:size]

    def status(self) -> int:
        """One whole answer read; its status."""
        status = int(self.line().split()[1])
        headers = {}
        while line := self.line():
            key, _, value = line.partition(b":")
            headers[key.strip().lower()] = value.strip().lower()
        if headers.get(b"transfer-encoding") == b"chunked":
            while size := int(self.line().split(b";")[0], 16):
                self.skip(size + 2)   # the chunk and its CRLF
            self.line()               # the empty trailer
        else:
            self.skip(int(headers.get(b"content-length", 0)))
        return status


def fire(port: int, requests: list[bytes], connections: int) -> tuple[float, list[float], list[int]]:
    """`requests` over `connections` keep-alive connections, one thread each with a blocking socket: the elapsed
    seconds, each request's latency and status. Every benchmark here measures a server on the cores this client
    shares, so it is lean: ~0.07-0.1 ms of CPU a request, where asyncio streams took 0.2-0.28 ms."""
    latencies: list[float] = []
    statuses: list[int] = []
    failures: list[BaseException] = []

    def connection(mine: list[bytes]) -> None:
        try:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                answers, took, got = _Answers(sock), [], []
                for request in mine:
                    started = time.perf_counter()
                    sock.sendall(request)
                    got.append(answers.status())
                    took.append(time.perf_counter() - started)
            latencies.extend(took)
            statuses.extend(got)
        except BaseException as exc:   # the measuring thread says what stopped it
            failures.append(exc)

    threads = [threading.Thread(target=connection, args=(requests[i::connections],)) for i in range(connections)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise failures[0]
    return elapsed, latencies, statuses


def webhook_benchmark(deliveries: int, concurrency: int, workdir: Path) -> None:
    port = free_port()
    config = copy.deepcopy(FAST_CONFIG) | {"workdir": str(workdir / "state"), "service": {"workers": 0}}
    (workdir / "mlgate.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP_SERVERS",)}
    repository = next(p for p in webhook_examples("push") if p["ref"] == "refs/heads/master")["repository"]
    # the service is pinned to one repository: the one the payloads come from
    env |= {"GITHUB_WEBHOOK_SECRET": SECRET, "MLGATE_LOG_LEVEL": "warning",
            "GITHUB_REPOSITORY": repository["full_name"]}
    server = subprocess.Popen([sys.executable, "-m", "triggers.cli", "--config", str(workdir / "mlgate.yaml"),
                               "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL)
    try:
        if not wait_for(lambda: _healthy(port), 60):
            raise SystemExit("the service did not start")
        fire(port, build_requests(200, port), concurrency)        # warm-up
        if os.environ.get("BENCH_PROFILE"):
            subprocess.Popen(["py-spy", "record", "-d", "6", "-o", os.environ["BENCH_PROFILE"], "-f", "raw",
                              "-p", str(server.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        elapsed, latencies, statuses = fire(port, build_requests(deliveries, port), concurrency)
        jobs = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        server.terminate()
        server.wait(20)
    depth = next(line for line in jobs.splitlines() if line.startswith("mlgate_queue_depth"))
    database = os.environ.get("MLGATE_DATABASE_URL", "sqlite (WAL) in the workdir").split("@")[-1]
    print(f"webhooks  database={database} deliveries={deliveries} concurrency={concurrency}")
    print(f"          accepted {deliveries / elapsed:,.0f} deliveries/s; "
          f"p50 {percentile(latencies, 0.5) * 1000:.1f} ms, p99 {percentile(latencies, 0.99) * 1000:.1f} ms; "
          f"statuses {sorted(set(statuses))}; {depth} (warm-up included)")


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def drift_benchmark(events: int, rate: int, workdir: Path) -> None:
    import logging

    from datetime import datetime, timezone

    from automation.config import parse_config
    from automation.store import open_store
    from triggers.drift import events as drift
    from triggers.drift.consumer import DriftConsumer, publish

    logging.disable(logging.INFO)
    config = parse_config(yaml.safe_dump(FAST_CONFIG), "mlgate.yaml", workdir)
    broker = TansuBroker()
    broker.start()
    try:
        for label, steady in (("backlog", False), ("stream", True)):
            engine = open_store(f"sqlite:///{workdir / f'drift-{label}.db'}")
            consumer = DriftConsumer(config, engine, broker.bootstrap)
            consumer.kafka = consumer.kafka.model_copy(update={"topic": f"bench.{label}", "group_id": label})
            now = datetime.now(timezone.utc)
            bodies = [drift.make_event(("digits_mlp", "digits_cnn")[i % 2], 0.5, [], now, now, source="bench")
                      for i in range(events)]
            if not steady:
                publish(broker.bootstrap, f"bench.{label}", bodies)
            thread = threading.Thread(target=consumer.run, daemon=True)
            thread.start()
            consumer.ready.wait(60)
            start = time.perf_counter()
            if steady:   # a steady stream at --rate events/s, each stamped when sent
                from kafka import KafkaProducer

                producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=5)
                step = max(1, rate // 20)
                for i in range(0, events, step):
                    tick = time.perf_counter()
                    stamp = datetime.now(timezone.utc).isoformat()
                    for body in bodies[i:i + step]:
                        body["time"] = stamp
                        producer.send(f"bench.{label}", key=body["data"]["model"].encode(),
                                      value=json.dumps(body).encode())
                    producer.flush()
                    time.sleep(max(0.0, 0.05 - (time.perf_counter() - tick)))
                producer.close()
            wait_for(lambda: consumer.stats.consumed >= events, 300, interval=0.05)
            elapsed = time.perf_counter() - start
            consumer.stop()
            thread.join(20)
            records = drift.list_drift_events(engine, limit=events + 10)
            sent = {b["id"]: datetime.fromisoformat(b["time"]) for b in bodies}
            lag = [(r.received_at.replace(tzinfo=timezone.utc) - sent[r.id]).total_seconds() for r in records]
            if steady:
                print(f"drift     stream: {len(records)} recorded of {events}, offered {events / elapsed:,.0f} "
                      f"events/s; produce→recorded p50 {percentile(lag, 0.5) * 1000:.0f} ms, "
                      f"p99 {percentile(lag, 0.99) * 1000:.0f} ms")
            else:
                print(f"drift     backlog: {len(records)} recorded of {events}; {events / elapsed:,.0f} events/s "
                      f"through the consumer (poll → decide → commit); outcomes {consumer.stats.outcomes}")
    finally:
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rate", type=int, default=2000, help="drift events/s offered in the stream run")
    parser.add_argument("--only", choices=["webhooks", "drift"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        if args.only in (None, "webhooks"):
            webhook_benchmark(args.deliveries, args.concurrency, Path(directory))
        if args.only in (None, "drift"):
            drift_benchmark(args.events, args.rate, Path(directory))


if __name__ == "__main__":
    main()
