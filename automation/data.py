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
    rest, test = stratified_split(y, test_size=test_fraction, seed=seed)
    x_rest, y_rest = x[rest], y[rest]
    train, val = stratified_split(y_rest, test_size=val_fraction / (1 - test_fraction), seed=seed)
    return Splits(x_rest[train], y_rest[train], x_rest[val], y_rest[val], x[test], y[test], classes)


def stratified_split(y: np.ndarray, *, seed: int, test_size: float | int | None = None,
                     train_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers of a stratified, seeded train/test split of labels `y`: the rows scikit-learn's
    `train_test_split(..., stratify=y, random_state=seed)` picks (StratifiedShuffleSplit, same draws from the
    same RandomState), in numpy, so a job does not import scikit-learn (1.2 s) to split its data.
    `test_size` is a fraction (rounded up) or a count; `train_size` a count; the other is the rest."""
    n = len(y)
    if test_size is None and train_size is None:
        raise ValueError("stratified_split needs test_size or train_size")
    if test_size is None:
        n_test = None
    elif isinstance(test_size, (int, np.integer)):
        n_test = int(test_size)
    else:
        if not 0 < test_size < 1:
            raise ValueError(f"test_size={test_size} should be a fraction in (0, 1) or a count")
        n_test = int(np.ceil(test_size * n))
    n_train = n - n_test if train_size is None else int(train_size)
    n_test = n - n_train if n_test is None else n_test
    if n_train <= 0 or n_test <= 0 or n_train + n_test > n:
        raise ValueError(f"cannot split {n} examples into {n_train} for training and {n_test} for testing")
    classes, y_indices, class_counts = np.unique(np.asarray(y), return_inverse=True, return_counts=True)
    if class_counts.min() < 2:
        raise ValueError(f"every class needs 2 examples to be split; these have 1: "
                         f"{classes[class_counts < 2].tolist()}")
    if min(n_train, n_test) < len(classes):
        raise ValueError(f"a split of {min(n_train, n_test)} examples cannot hold all {len(classes)} classes")
    class_rows = np.split(np.argsort(y_indices.ravel(), kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for i, rows in enumerate(class_rows):
        shuffled = rows.take(rng.permutation(class_counts[i]), mode="clip")
        train.append(shuffled[:n_i[i]])
        test.append(shuffled[n_i[i]:n_i[i] + t_i[i]])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of `n_draws` each class gets: its share rounded down, then one more to the classes with the
    largest remainders, ties broken at random (scikit-learn's `_approximate_mode`, draw for draw)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


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
