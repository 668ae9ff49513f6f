"""A real, local Ray head for the ray executor's tests: `ray start --head` on loopback only, on free ports, in a
temp dir of its own, and stopped by killing exactly the processes it started (never `ray stop`, which ends every
Ray on the machine).

Ray binds to every interface by default. `--node-ip-address=127.0.0.1` alone is not enough on Linux: `ray start`
rewrites a loopback node address to the machine's own (services.resolve_ip_for_localhost), and the GCS and raylet
then listen on `::`. With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 it keeps 127.0.0.1, and with `--dashboard-host` and
the two metric ports set, every listener is on loopback; `non_loopback_listeners()` lets a test check that."""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

BIN = Path(sys.executable).parent
# what Ray is asked to bind, each on a free port: with a default, two heads on one machine would collide
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
              "--node-manager-port", "--object-manager-port")
# the service's own variables never reach Ray's processes: a job sees only what its submission gives it
SERVICE_PREFIXES = ("MLGATE_", "MLFLOW_", "GITHUB_", "RAY_")


class RayHeadFailed(RuntimeError):
    """`ray start` did not bring a head up (the message quotes its output)."""


@dataclass
class RayHead:
    temp_dir: Path
    ports: dict[str, int]

    @property
    def address(self) -> str:
        """The dashboard's URL: where the job submission API answers."""
        return f"http://127.0.0.1:{self.ports['--dashboard-port']}"

    def client(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address)

    def started_processes(self) -> list[psutil.Process]:
        """This head's live processes: those whose command line names its temp dir (GCS, raylet, dashboard,
        autoscaler), and their descendants (agents and workers rename themselves `ray::…`, their command lines
        no longer say whose they are). Nothing of another Ray on this machine."""
        roots = []
        for process in psutil.process_iter(["cmdline"]):
            try:
                if any(str(self.temp_dir) in part for part in process.info["cmdline"] or ()):
                    roots.append(process)
            except psutil.Error:
                continue
        found = {p.pid: p for p in roots}
        for root in roots:
            try:
                found.update({child.pid: child for child in root.children(recursive=True)})
            except psutil.Error:
                continue
        return list(found.values())

    def non_loopback_listeners(self) -> list[str]:
        """`address:port (process)` for each TCP socket this head's processes listen on outside loopback."""
        pids = {p.pid: p for p in self.started_processes()}
        found = []
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status != psutil.CONN_LISTEN or conn.pid not in pids or not conn.laddr:
                continue
            if not _loopback(conn.laddr.ip):
                try:
                    name = pids[conn.pid].name()
                except psutil.Error:
                    name = "?"
                found.append(f"{conn.laddr.ip}:{conn.laddr.port} ({name})")
        return found

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 3 s, to this head's processes only; then its temp dir is removed."""
        for _ in range(3):   # workers started while we stop are found on the next pass
            processes = self.started_processes()
            if not processes:
                break
            for process in processes:
                try:
                    process.send_signal(signal.SIGTERM)
                except psutil.Error:
                    pass
            _, alive = psutil.wait_procs(processes, timeout=3)
            for process in alive:
                try:
                    process.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)   # ::ffff:127.0.0.1, as the GCS and raylet show it
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def head_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The head's environment: this one without the service's variables, this interpreter's bin first on PATH
    (a job's entrypoint runs `python`, as on a node whose image puts mlgate's Python there)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SERVICE_PREFIXES)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"   # keeps the node address 127.0.0.1 (see the module's doc)
    return env | (extra or {})


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago (all held at once while chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def start_head(num_cpus: int = 2, env: dict[str, str] | None = None, timeout: float = 60.0, tries: int = 3) -> RayHead:
    """`ray start --head` on loopback, in a short temp dir of its own (Ray's socket paths must stay under
    107 characters, which pytest's tmp_path can pass). A port taken between its choice and Ray's bind (another
    process's outgoing connection) fails a start: it is tried again on other ports."""
    for attempt in range(1, tries + 1):
        try:
            return _start_once(num_cpus, env, timeout)
        except RayHeadFailed:
            if attempt == tries:
                raise
    raise AssertionError("unreachable")


def _start_once(num_cpus: int, env: dict[str, str] | None, timeout: float) -> RayHead:
    temp_dir = Path(tempfile.mkdtemp(prefix="mlray-", dir="/tmp"))
    *chosen, dashboard_metrics, autoscaler_metrics = free_ports(len(PORT_FLAGS) + 2)
    ports = dict(zip(PORT_FLAGS, chosen))
    head = RayHead(temp_dir, ports)
    # workers take ports from Ray's default range (10002-19999), below the kernel's ephemeral range
    command = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               "--include-dashboard=true", f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={temp_dir}",
               "--disable-usage-stats", "--include-log-monitor=false",
               *(f"{flag}={port}" for flag, port in ports.items())]
    # the dashboard's and the autoscaler's metric servers take fixed ports (44227, 44217) unless told otherwise
    metric_ports = {"DASHBOARD_METRIC_PORT": str(dashboard_metrics), "AUTOSCALER_METRIC_PORT": str(autoscaler_metrics)}
    done = subprocess.run(command, env=head_environment(metric_ports | (env or {})), capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        head.stop()
        raise RayHeadFailed(f"ray start failed ({done.returncode}): {(done.stdout + done.stderr)[-3000:]}")
    deadline = time.monotonic() + timeout
    while True:   # `ray start` returns once the GCS answers; the job API comes up a moment later
        try:
            head.client()
            break
        except Exception as exc:   # ConnectionError, or the dashboard still loading its modules
            if time.monotonic() > deadline:
                head.stop()
                raise RayHeadFailed(f"the job submission API at {head.address} never answered: {exc}") from None
            time.sleep(0.5)
    return head
