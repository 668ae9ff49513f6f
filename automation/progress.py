"""Progress for long stages: a rich display on a terminal, silence otherwise; and, for the service, a small
JSON file (stage, epoch k/N, the validation metric, an ETA) that the executor copies into the job's record."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from stat import S_ISREG
from typing import Any

Advance = Callable[[int], None]
PROGRESS_FILE = "progress.json"
MAX_PROGRESS_BYTES = 4096


class JobProgress:
    def __init__(self, enabled: bool | None = None, record_to: Path | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress: Any = None
        self.record_to = record_to          # a job's progress.json; see record()
        self.state: dict[str, Any] = {}

    def record(self, **fields: Any) -> None:
        """Merge `fields` (stage, epoch, epochs, val_accuracy, eta_seconds, …) into the job's progress file,
        written whole and renamed, so a reader never sees half of it."""
        self.state |= fields
        self.state["updated"] = time.time()
        if self.record_to is None:
            return
        self.record_to.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.record_to.with_name(f"{self.record_to.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.state, default=str))
        tmp.replace(self.record_to)

    def __enter__(self) -> "JobProgress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        if self._progress is None:
            yield lambda _n: None
            return
        task_id = self._progress.add_task(description, total=total)
        try:
            yield lambda n: self._progress.advance(task_id, n)
        finally:
            self._progress.update(task_id, completed=total)


class ProgressFile:
    """The service's side: a job's progress file, read when it has changed. Its content came from the job
    (a PR job's is untrusted): only a small JSON object of plain values is passed on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int] | None = None

    def changed(self) -> dict[str, Any] | None:
        try:   # O_NOFOLLOW: a sandboxed job could leave a link to a file only the service may read
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            stat = os.fstat(fd)
            if (stat.st_mtime_ns, stat.st_size) == self._seen or not S_ISREG(stat.st_mode) or \
                    stat.st_size > MAX_PROGRESS_BYTES:
                return None
            self._seen = (stat.st_mtime_ns, stat.st_size)
            value = json.loads(os.read(fd, MAX_PROGRESS_BYTES + 1))
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        if not isinstance(value, dict):
            return None
        return {str(k)[:40]: v for k, v in list(value.items())[:20]
                if v is None or isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) <= 200)}
