"""Data a user names in `mlgate.yaml` instead of writing a loader (a model block's `source:`):

    source: {images: data/pets, size: [64, 64], mode: RGB}   # <class>/<file>.png|jpg|jpeg|bmp|gif|webp
    source: {texts: data/tickets}                            # <class>/<file>.txt
    source: {csv: data/tickets.csv, text: body, label: team} # a text column and a label column

Images of any size and colour are converted (PIL) and resized once, to (C, H, W) uint8 pixels: the layout
serving decodes PNG/JPEG files to. They are written a file at a time into a .npy in the data cache (keyed by
the folder's names, sizes and mtimes, and the size and mode), so a large folder streams: training reads a
batch of rows at a time from disk, and only validation and test are held in memory. Splits are stratified
and seeded (the model's `split:` block) on the labels alone.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from automation.contract import to_pixels
from automation.data import DiskArray, Splits, cache_dir, split_arrays
from automation.preprocess import ContractError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MAX_FILES = 2_000_000
MODES = {"RGB": 3, "L": 1}


def folder_files(where: str, root: Path, suffixes: tuple[str, ...]) -> list[tuple[Path, str]]:
    """(file, class name) for every `<class>/<file>` under `root` with one of `suffixes`, sorted. A link
    (which may point anywhere) is refused; other files (a README, .DS_Store) are left out."""
    if not root.is_dir() or root.is_symlink():
        raise ContractError(f"{where}: {root} is not a folder")
    found: list[tuple[Path, str]] = []
    for folder in sorted(root.iterdir()):
        if folder.is_symlink():
            raise ContractError(f"{where}: {folder.name} is a symbolic link; links are not followed")
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        for file in sorted(folder.iterdir()):
            if file.is_symlink():
                raise ContractError(f"{where}: {folder.name}/{file.name} is a symbolic link; links are not followed")
            if file.is_file() and file.suffix.lower() in suffixes:
                found.append((file, folder.name))
                if len(found) > MAX_FILES:
                    raise ContractError(f"{where}: more than {MAX_FILES:,} files")
    if not found:
        raise ContractError(f"{where}: no {'/'.join(s[1:] for s in suffixes[:3])} files in <class>/ folders under "
                            f"{root}")
    return found


def _cache_key(files: list[tuple[Path, str]], size: tuple[int, int], mode: str) -> str:
    digest = hashlib.sha256(f"{size}:{mode}".encode())
    for file, label in files:
        stat = file.stat()
        digest.update(f"{label}/{file.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def decode_folder(where: str, files: list[tuple[Path, str]], size: tuple[int, int], mode: str) -> Path:
    """Every image as (C, H, W) uint8 rows of one .npy in the data cache, written a file at a time; a folder
    read before (same names, sizes, mtimes, size and mode) is not decoded again."""
    from PIL import Image, UnidentifiedImageError

    target = cache_dir() / "image-folders" / f"{_cache_key(files, size, mode)}.npy"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp.npy")
    rows = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(len(files), MODES[mode], *size))
    try:
        for i, (file, label) in enumerate(files):
            try:
                with Image.open(file) as image:
                    rows[i] = to_pixels(image, size, mode)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                raise ContractError(f"{where}: {label}/{file.name} is not a readable image file") from None
        rows.flush()
    except BaseException:
        del rows
        partial.unlink(missing_ok=True)
        raise
    del rows
    os.replace(partial, target)   # another job reading the cache never sees half a file
    return target


def split_rows(y: np.ndarray, split: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, validation and test row numbers, split as contract.split_arrays splits examples (stratified,
    seeded): the split of the row numbers themselves, so no image is read to split them."""
    rows = split_arrays(np.arange(len(y)), y, classes=(), seed=split.seed, val_fraction=split.val_fraction,
                        test_fraction=split.test_fraction)
    return np.sort(rows.x_train), np.sort(rows.x_val), np.sort(rows.x_test)


def _enough_per_class(where: str, labels: list[str]) -> tuple[tuple[str, ...], np.ndarray]:
    classes = tuple(sorted(set(labels)))
    y = np.array([classes.index(label) for label in labels], dtype=np.int64)
    counts = np.bincount(y, minlength=len(classes))
    if len(classes) < 2:
        raise ContractError(f"{where}: one class folder ({classes[0]!r}); a classifier needs two or more")
    if counts.min() < 3:
        raise ContractError(f"{where}: class {classes[int(counts.argmin())]!r} has {int(counts.min())} file(s); a "
                            "stratified train/val/test split needs at least 3 of each class")
    return classes, y


def image_folder(where: str, root: Path, size: tuple[int, int], mode: str, split: Any) -> Splits:
    files = folder_files(where, root, IMAGE_SUFFIXES)
    classes, y = _enough_per_class(where, [label for _, label in files])
    images = DiskArray(decode_folder(where, files, size, mode))
    train, val, test = split_rows(y, split)
    # validation and test are read whole by every epoch and benchmark: in memory; training streams from disk
    return Splits(images.subset(train), y[train], images[val], y[val], images[test], y[test], classes,
                  sources=tuple(str(f) for f, _ in files))


def text_folder(where: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    files = folder_files(where, root, (".txt",))
    texts = [f.read_bytes().decode("utf-8", errors="replace").strip() for f, _ in files]
    empty = next((f"{label}/{f.name}" for (f, label), t in zip(files, texts) if not t), None)
    if empty is not None:
        raise ContractError(f"{where}: {empty} is empty")
    return np.array(texts, dtype=object), np.array([label for _, label in files], dtype=object)


def csv_texts(where: str, path: Path, text: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    if not path.is_file():
        raise ContractError(f"{where}: {path} is not a file")
    try:
        frame = pd.read_csv(path, dtype={text: str}, keep_default_na=False)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ContractError(f"{where}: {path.name} is not a readable CSV file: {str(exc).splitlines()[0][:200]}") \
            from None
    for column in (text, label):
        if column not in frame.columns:
            raise ContractError(f"{where}: {path.name} has no {column!r} column "
                                f"(columns: {', '.join(map(str, list(frame.columns)[:12]))})")
    blank = frame[text].str.strip() == ""
    if blank.any():
        raise ContractError(f"{where}: {path.name} row {int(np.argmax(blank.to_numpy())) + 2} has an empty "
                            f"{text!r}")
    return frame[text].to_numpy(dtype=object), frame[label].to_numpy()


def load_source(model: str, source: Any, base_dir: Path, split: Any) -> Any:
    """The named source's examples: Splits for an image folder (its training rows on disk), else (x, y)."""
    where = f"models.{model}.source"
    if source.images is not None:
        return image_folder(where, base_dir / source.images, tuple(source.size), source.mode, split)
    if source.texts is not None:
        return text_folder(where, base_dir / source.texts)
    return csv_texts(where, base_dir / source.csv, source.text, source.label)


def with_source(model: str, module: Any, source: Any, base_dir: Path, split: Any) -> Any:
    """The model file as the contract sees it when its data comes from `source:`: its build() and any
    `preprocess` it declares (else pixels for images, a tokenizer for text), and a loader made from the
    source (split by the model block's `split:`)."""
    default = "pixels" if source.images is not None else {"tokenize": {}}
    return SimpleNamespace(build=module.build, preprocess=getattr(module, "preprocess", default),
                           load_data=lambda **_data: load_source(model, source, base_dir, split),
                           __name__=getattr(module, "__name__", model), label=source.label, text=source.text,
                           # fresh pictures (`--extra-train`, a drift event's data) are resized as these were
                           image_mode=source.mode if source.images is not None else None)
