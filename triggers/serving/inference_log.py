"""The inference log: served inputs and predictions, appended to a bounded, rotating window of
Parquet files that `mlgate monitor --current DIR` reads as its current data.

Requests only append arrays to a buffer; a background thread writes. The newest file is kept in
memory and rewritten until it holds `rows_per_file` rows, then a new one starts; at most `max_files`
files are kept (the oldest goes first), so the window is bounded in rows and bytes. Files appear
by atomic rename, so a reader never sees half a file.

Columns: one per input value, named by the version's feature names when it has them (a tabular model;
`mlgate monitor` compares them with the reference by name), else `x0`, `x1`, …; `prediction` (the class
index), `label` (the predicted class name, for versions that name their classes), `version`, `timestamp`.
A file holds one set of columns: rows whose columns differ (another version's features) start a new file.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

RESERVED = ("prediction", "label", "version", "timestamp")


def column_names(width: int, features: tuple[str, ...] | None) -> tuple[str, ...]:
    """The input columns: the feature names when they fit (and clash with no other column), else x0, x1, …"""
    if features is not None and len(features) == width and len(set(features)) == width \
            and not set(features) & set(RESERVED):
        return tuple(features)
    return tuple(f"x{i}" for i in range(width))


@dataclass
class _Segment:
    """Rows of one file, as arrays (nothing is read back from disk)."""

    path: Path
    columns: tuple[str, ...]          # the input columns
    labelled: bool                    # a `label` column (class names)
    x: list[np.ndarray] = field(default_factory=list)
    predictions: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    versions: list[np.ndarray] = field(default_factory=list)
    stamps: list[np.ndarray] = field(default_factory=list)
    rows: int = 0

    def add(self, x: np.ndarray, predictions: np.ndarray, version: str, stamp: np.datetime64,
            classes: tuple[str, ...]) -> None:
        self.x.append(x)
        self.predictions.append(predictions)
        if self.labelled:
            self.labels.append(np.asarray(classes, dtype=object)[predictions])
        self.versions.append(np.full(len(x), version, dtype=object))
        self.stamps.append(np.full(len(x), stamp, dtype="datetime64[us]"))
        self.rows += len(x)

    def write(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        x = np.concatenate(self.x)
        columns: dict[str, Any] = {name: x[:, i] for i, name in enumerate(self.columns)}
        columns["prediction"] = np.concatenate(self.predictions)
        if self.labelled:
            columns["label"] = pa.array(np.concatenate(self.labels), type=pa.string())
        columns["version"] = pa.array(np.concatenate(self.versions), type=pa.string())
        columns["timestamp"] = pa.array(np.concatenate(self.stamps), type=pa.timestamp("us", tz="UTC"))
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        pq.write_table(pa.table(columns), temporary)
        temporary.replace(self.path)


class InferenceLog:
    def __init__(self, directory: Path, *, rows_per_file: int = 5000, max_files: int = 10,
                 flush_seconds: float = 1.0) -> None:
        self.directory, self.rows_per_file, self.max_files = directory, rows_per_file, max_files
        self.flush_seconds = flush_seconds
        directory.mkdir(parents=True, exist_ok=True)
        self._pending: list[tuple[np.ndarray, np.ndarray, str, np.datetime64, tuple[str, ...] | None,
                                  tuple[str, ...]]] = []
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._open: _Segment | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inference-log", daemon=True)
        self._thread.start()

    def append(self, x: np.ndarray, predictions: np.ndarray, version: str, *,
               features: tuple[str, ...] | None = None, classes: tuple[str, ...] = ()) -> None:
        """Rows to log (the writer thread does the rest): `features` name the input columns, `classes` the
        predicted labels, when the version knows them."""
        stamp = np.datetime64(time.time_ns() // 1000, "us")
        with self._lock:
            self._pending.append((x.reshape(len(x), -1), predictions, version, stamp, features, classes))

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.flush()

    def flush(self) -> None:
        """Write what is buffered; a full file is closed and a new one started; the oldest files go."""
        with self._flushing:
            with self._lock:
                pending, self._pending = self._pending, []
            if not pending:
                return
            try:
                for x, predictions, version, stamp, features, classes in pending:
                    columns = column_names(x.shape[1], features)
                    labelled = bool(classes)
                    start = 0
                    while start < len(x):
                        if self._open is None or self._open.rows >= self.rows_per_file or \
                                (self._open.columns, self._open.labelled) != (columns, labelled):
                            if self._open is not None:
                                self._open.write()   # the full file (or one of other columns), final
                            self._open = _Segment(self._new_path(), columns, labelled)
                        take = min(len(x) - start, self.rows_per_file - self._open.rows)
                        self._open.add(x[start:start + take], predictions[start:start + take], version, stamp,
                                       classes)
                        start += take
                self._open.write()   # type: ignore[union-attr]
                self._rotate()
            except OSError as exc:   # a full disk must not take serving down; the rows are lost, and said so
                log.error("inference log write failed", extra={"error": str(exc)})

    def _new_path(self) -> Path:
        """A new file's name: nanoseconds, so the names sort in the order the files were started."""
        stamp = time.time_ns()
        if self._open is not None and self._open.path.name >= f"{stamp}.parquet":   # a coarse clock
            stamp = int(self._open.path.stem) + 1
        return self.directory / f"{stamp}.parquet"

    def _rotate(self) -> None:
        files = self.files()
        for old in files[:-self.max_files] if len(files) > self.max_files else []:
            old.unlink(missing_ok=True)

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("*.parquet"))
