"""The framework's data types: the splits a loader's output becomes, and arrays that stay on disk.

A model file may return `Splits` from load_data() (already split), and an example may keep its training images
on disk (`DiskArray`, read a batch at a time); both live here, in the framework, so `models/` holds only the
user's files and the examples.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Splits:
    """Train/validation/test arrays. The test split is never trained on."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    features: tuple[str, ...] | None = None   # column names of tabular examples, when the data has them
    # the files the examples were read from: the job's data fingerprint is their manifest (sizes and content
    # hashes), not a hash of every array in memory
    sources: tuple[str, ...] = ()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def split_arrays(
    x: np.ndarray, y: np.ndarray, *, classes: tuple[str, ...], seed: int,
    val_fraction: float, test_fraction: float,
) -> Splits:
    """Stratified, seeded split; the same seed always yields the same test set."""
    from sklearn.model_selection import train_test_split

    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_fraction / (1 - test_fraction),
        random_state=seed, stratify=y_rest)
    return Splits(x_train, y_train, x_val, y_val, x_test, y_test, classes)


class DataMissing(RuntimeError):
    """A data set's package is not installed; the message says which command installs it."""


# --- arrays on disk, read in batches ----------------------------------------------------------------------

class DiskArray:
    """Rows of an .npy file on disk, optionally a subset of them, read only when indexed: a training split
    that does not fit in memory. Indexing by a batch of row numbers reads those rows (in file order)."""

    def __init__(self, path: str | os.PathLike[str], rows: np.ndarray | None = None) -> None:
        self.path = Path(path)
        self._file = np.load(self.path, mmap_mode="r")
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self._file.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self._file.dtype

    @property
    def ndim(self) -> int:
        return self._file.ndim

    def __len__(self) -> int:
        return len(self._file) if self.rows is None else len(self.rows)

    def __getitem__(self, index: int | slice | np.ndarray) -> np.ndarray:
        rows = np.arange(len(self))[index] if self.rows is None else self.rows[index]
        if np.ndim(rows) == 0:
            return np.array(self._file[int(rows)])
        order = np.argsort(rows, kind="stable")       # read forwards through the file, answer in the order asked
        out = np.empty((len(rows), *self._file.shape[1:]), dtype=self._file.dtype)
        out[order] = self._file[np.asarray(rows)[order]]
        return out

    def subset(self, rows: np.ndarray) -> DiskArray:
        return DiskArray(self.path, np.asarray(rows) if self.rows is None else self.rows[rows])

    def __getstate__(self) -> dict[str, object]:   # to another process (DDP ranks, loader workers): the path,
        state = dict(self.__dict__)                  # not a copy of the file's contents
        state["_file"] = None
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._file = np.load(self.path, mmap_mode="r")

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:   # the whole split, in memory
        whole = self[np.arange(len(self))]
        return whole if dtype is None else whole.astype(dtype)


class JoinedArray(DiskArray):
    """A split on disk followed by rows in memory (fresh data appended after drift)."""

    def __init__(self, head: DiskArray, tail: np.ndarray) -> None:
        self.head, self.tail = head, np.ascontiguousarray(tail, dtype=head.dtype)
        if self.tail.shape[1:] != head.shape[1:]:
            raise ValueError(f"rows shaped {list(self.tail.shape[1:])} cannot join rows shaped {list(head.shape[1:])}")
        self.path, self.rows, self._file = head.path, None, head._file

    def __len__(self) -> int:
        return len(self.head) + len(self.tail)

    def __getitem__(self, index: int | slice | np.ndarray) -> np.ndarray:
        rows = np.arange(len(self))[index]
        if np.ndim(rows) == 0:
            return self.head[int(rows)] if rows < len(self.head) else np.array(self.tail[int(rows) - len(self.head)])
        out = np.empty((len(rows), *self.head.shape[1:]), dtype=self.head.dtype)
        in_head = rows < len(self.head)
        out[in_head] = self.head[rows[in_head]]
        out[~in_head] = self.tail[rows[~in_head] - len(self.head)]
        return out

    def subset(self, rows: np.ndarray) -> DiskArray:
        raise NotImplementedError("a joined split is not subset again")


def is_on_disk(x: object) -> bool:
    return isinstance(x, DiskArray)


def join_examples(head: object, tail: np.ndarray) -> object:
    """`tail`'s rows after `head`'s, without reading a split on disk into memory."""
    if isinstance(head, JoinedArray):
        return JoinedArray(head.head, np.concatenate([head.tail, tail]))
    if isinstance(head, DiskArray):
        return JoinedArray(head, tail)
    return np.concatenate([head, tail])


def cache_dir() -> Path:
    root = os.environ.get("MLGATE_DATA_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                               os.path.expanduser("~/.cache"), "mlgate", "data")
    return Path(root)


def content_key(files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]
