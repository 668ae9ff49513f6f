"""The inference log: served inputs and predictions, appended to a bounded, rotating window of
Parquet files that `mlgate monitor --current DIR` reads as its current data.

Rows are buffered and written by a background thread, so a request never waits on the disk.
The newest file is topped up to `rows_per_file` rows, then a new one starts; at most
`max_files` files are kept (the oldest goes first), so the window is bounded in rows and bytes.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class InferenceLog:
    def __init__(self, directory: Path, *, rows_per_file: int = 5000, max_files: int = 10,
                 flush_seconds: float = 1.0) -> None:
        self.directory, self.rows_per_file, self.max_files = directory, rows_per_file, max_files
        self.flush_seconds = flush_seconds
        directory.mkdir(parents=True, exist_ok=True)
        self._pending: list[tuple[np.ndarray, np.ndarray, str, datetime]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inference-log", daemon=True)
        self._thread.start()

    def append(self, x: np.ndarray, predictions: np.ndarray, version: str) -> None:
        with self._lock:
            self._pending.append((x.reshape(len(x), -1), predictions, version, datetime.now(timezone.utc)))

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.flush()

    def flush(self) -> None:
        """Write what is buffered, in files of at most rows_per_file rows; drop the oldest files."""
        import pandas as pd

        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        frames = []
        for x, predictions, version, stamp in pending:
            frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(x.shape[1])])
            frame["prediction"], frame["version"], frame["timestamp"] = predictions, version, stamp
            frames.append(frame)
        rows = pd.concat(frames, ignore_index=True)
        try:
            files = self.files()
            target: Path | None = None
            if files:   # top up the newest file until it is full (Parquet files cannot be appended to)
                newest = pd.read_parquet(files[-1])
                if len(newest) < self.rows_per_file:
                    rows, target = pd.concat([newest, rows], ignore_index=True), files[-1]
            for start in range(0, len(rows), self.rows_per_file):
                self._write(rows.iloc[start:start + self.rows_per_file], target)
                target = None
            self._rotate()
        except OSError as exc:   # a full disk must not take serving down; the rows are lost, and said so
            log.error("inference log write failed", extra={"error": str(exc), "rows": len(rows)})

    def _write(self, rows: object, target: Path | None) -> None:
        path = target or self.directory / f"{time.time_ns()}.parquet"
        temporary = path.with_name(f".{path.name}.tmp")
        rows.to_parquet(temporary, index=False)   # type: ignore[attr-defined]
        temporary.replace(path)                   # readers never see half a file

    def _rotate(self) -> None:
        files = sorted(self.directory.glob("*.parquet"))
        for old in files[:-self.max_files] if len(files) > self.max_files else []:
            old.unlink(missing_ok=True)

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("*.parquet"))
