"""A job's output into its log file, bounded: the head as it comes, the tail kept in memory, the rest counted.

A job may print without end (an outsider's build can print a gigabyte on purpose), so neither the service's
memory nor its disk may grow with what a job prints. Each stream keeps its first HEAD_BYTES in the file as
they arrive and its last TAIL_BYTES in a ring; what falls between is dropped and counted in one line.
"""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path
from typing import IO

HEAD_BYTES = 1024 * 1024
TAIL_BYTES = 1024 * 1024
CHUNK = 64 * 1024


class CappedStream:
    """One stream (stdout or stderr) of one process, read on its own thread until the pipe closes. Every byte
    passes through the ring, so the tail (a trusted job's last line) is there however short the output."""

    def __init__(self, name: str, pipe: IO[bytes], log: "JobLog", head: int = HEAD_BYTES,
                 tail: int = TAIL_BYTES) -> None:
        self.name, self.pipe, self.log = name, pipe, log
        self.head_limit, self.tail_limit = head, tail
        self.tail: deque[bytes] = deque()
        self.tail_size = self.total = 0
        self.thread = threading.Thread(target=self._read, name=f"job-{name}", daemon=True)

    def _read(self) -> None:
        for chunk in iter(lambda: self.pipe.read1(CHUNK), b""):   # type: ignore[attr-defined]
            if self.total < self.head_limit:
                self.log.write(chunk[:self.head_limit - self.total])
            self.total += len(chunk)
            self.tail.append(chunk)
            self.tail_size += len(chunk)
            while self.tail_size - len(self.tail[0]) >= self.tail_limit:
                self.tail_size -= len(self.tail.popleft())

    @property
    def written(self) -> int:
        return min(self.total, self.head_limit)

    @property
    def dropped(self) -> int:
        """Bytes neither in the head nor in the tail."""
        return max(0, self.total - self.tail_size - self.written)

    def unwritten_tail(self) -> bytes:
        """The tail's bytes that the head has not already put in the file."""
        kept = b"".join(self.tail)
        return kept[max(0, self.written - (self.total - self.tail_size)):]

    def tail_bytes(self) -> bytes:
        return b"".join(self.tail)


class JobLog:
    """The job's log file, shared by its streams; `close()` writes each stream's tail after its head."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "ab")
        self._lock = threading.Lock()
        self.streams: list[CappedStream] = []

    def write(self, data: bytes) -> None:
        with self._lock:
            self._file.write(data)
            self._file.flush()

    def follow(self, name: str, pipe: IO[bytes]) -> CappedStream:
        stream = CappedStream(name, pipe, self)
        self.streams.append(stream)
        stream.thread.start()
        return stream

    def close(self, wait_seconds: float = 10.0) -> None:
        for stream in self.streams:
            stream.thread.join(wait_seconds)
            if stream.dropped:
                self.write(f"\n[mlgate: {stream.dropped:,} bytes of {stream.name} dropped: a job log keeps the "
                           f"first {HEAD_BYTES:,} and last {TAIL_BYTES:,} bytes of each stream]\n".encode())
            self.write(stream.unwritten_tail())
        self._file.close()

    def __enter__(self) -> "JobLog":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._file.closed:
            self.close()


def last_line(stream: CappedStream) -> str | None:
    """The last non-empty line of what a stream kept (a trusted job's `--json` summary)."""
    lines = stream.tail_bytes().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else None
