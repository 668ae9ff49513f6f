"""The model contract: what a model file gives mlgate, checked before any MLflow run or GPU time.

A model file (`models/<name>.py`) defines:

    build(**params) -> nn.Module      logits, one per class, for a batch of raw inputs. If build() takes
                                      `input_shape`, `num_classes` or (a text model) `vocab_size`, mlgate
                                      passes them from the data.
    load_data(**data) -> one of
        (x, y)                        x: an array (N, *shape) or a DataFrame of named numeric columns;
                                      y: the labels (array, list or Series)
        DataFrame                     numeric feature columns plus the label column (see `label`)
        Splits                        already split (automation.data.Splits); its test split is used as is
    label = "species"                 optional: a DataFrame's label column (default "label")
    preprocess = "standardize"        optional: fitted on the training split only, then part of the model, so
                                      every variant (ONNX, int8, compiled) and serving run it on raw inputs.
                                      A built-in (automation/preprocess.py: "standardize", "minmax",
                                      "normalize_channels", "pixels" for uint8 images, {"tokenize": {…}} for
                                      text), or an object with fit(x_train) -> nn.Module.

x may also be uint8 images (with "pixels"), kept as they are, or on disk (automation.data.DiskArray: read a
batch at a time), or strings (with "tokenize"): the raw form clients send.

mlgate supports single-label classification. What it does with the data, so the loader need not:
- x: float64, integers and booleans become float32 (but an image or text model's x stays raw); text columns,
  NaN and infinity are refused.
- y: strings, integer codes (0..K-1, 1..K, any set), integral floats, booleans and one-hot rows become
  indices 0..K-1; the class names are kept (the strings, or the codes as text) and travel with the version.
- Unsplit data is split by the framework (seeded and stratified, the model's `split:` block).
- Fresh data after drift (`mlgate run --extra-train FILE`, a drift event's data_ref) is appended to the
  training split by the framework: no loader takes an extra argument for it.
Refused, in one line: continuous targets (regression), multi-label rows, one class, mismatched lengths.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from automation.preprocess import (PREPROCESSORS, ContractError, Pixels, Scale, TextEncoder, Tokenize,  # noqa: F401
                                   WithPreprocessing, declared_step, fit_preprocess, preprocess_name)
from automation.data import Splits, is_on_disk, join_examples, split_arrays

if TYPE_CHECKING:
    from automation.config import SplitConfig

log = logging.getLogger(__name__)

TASK = "single-label classification"
DEFAULT_LABEL = "label"
DEFAULT_TEXT = "text"     # a text model's fresh data: the column that holds the text
SPLIT_NAMES = ("train", "val", "test")
FRESH_SUFFIXES = (".npz", ".csv", ".parquet")
MAX_FRESH_FILES = 500_000   # a folder of fresh images: each becomes 1-4 KB of pixels in memory


# --- features (x) ----------------------------------------------------------------------------------------

def _frame_features(where: str, frame: Any) -> tuple[np.ndarray, tuple[str, ...]]:
    import pandas as pd

    names = tuple(str(c) for c in frame.columns)
    if len(set(names)) != len(names):
        raise ContractError(f"{where}: feature columns must have distinct names")
    for column in frame.columns:
        series = frame[column]
        if pd.api.types.is_bool_dtype(series) or pd.api.types.is_numeric_dtype(series):
            continue
        raise ContractError(f"{where}: column {str(column)!r} holds {series.dtype} values, not numbers",
                            hint="encode it as numbers in load_data(), or drop it")
    return frame.to_numpy(dtype=np.float64), names


def _as_images(where: str, x: Any) -> Any:
    """uint8 images, raw as clients send them; an array on disk (automation.data.DiskArray) stays there."""
    if not is_on_disk(x):
        x = np.asarray(x)
    if np.dtype(x.dtype) != np.uint8 or x.ndim not in (3, 4):
        raise ContractError(f"{where}: preprocess \"pixels\" takes uint8 images shaped (N, H, W) or (N, C, H, W); "
                            f"x holds {x.dtype} values shaped {list(x.shape)}",
                            hint="return the pixels as uint8 (0..255), unscaled")
    return x if is_on_disk(x) else np.ascontiguousarray(channels_first(where, x))


CHANNELS = (1, 3, 4)   # grey, RGB, RGBA: what a PNG or JPEG file holds


def channels_first(where: str, x: Any) -> Any:
    """Images stored channels last, (N, H, W, C) as PIL and most loaders give them, become (N, C, H, W), the
    layout serving decodes PNG/JPEG files to: converted here, once, for every split and fresh window."""
    if x.ndim != 4 or x.shape[-1] not in CHANNELS or x.shape[1] in CHANNELS:
        return x
    if is_on_disk(x):
        raise ContractError(f"{where}: images on disk are shaped {list(x.shape[1:])} (channels last); serving "
                            "decodes PNG/JPEG files to (C, H, W)", hint="store them as (N, C, H, W)")
    log.info("channels-last images converted to channels first",
             extra={"where": where, "from": list(x.shape[1:]), "to": [x.shape[3], x.shape[1], x.shape[2]]})
    return np.moveaxis(x, -1, 1)


def as_texts(where: str, x: Any) -> np.ndarray:
    """Strings, one per example, as a 1-D object array."""
    if hasattr(x, "to_numpy") and not hasattr(x, "columns"):   # a pandas Series
        x = x.to_numpy()
    array = np.asarray(x, dtype=object) if not isinstance(x, np.ndarray) else x
    if array.ndim != 1:
        raise ContractError(f"{where}: a text model's x is one string per example; got shape {list(array.shape)}")
    bad = next((i for i, v in enumerate(array.tolist()) if not isinstance(v, str)), None)
    if bad is not None:
        raise ContractError(f"{where}: x[{bad}] is {type(array[bad]).__name__}, not a string")
    return array.astype(object)


def _as_features(where: str, x: Any, kind: str = "tensor") -> tuple[Any, tuple[str, ...] | None]:
    """float32 features and their names (DataFrame columns; None for unnamed arrays); for an image or text
    model, its raw inputs (uint8 pixels, strings)."""
    if kind == "image":
        return _as_images(where, x), None
    if kind == "text":
        return as_texts(where, x), None
    names = None
    if hasattr(x, "columns") and hasattr(x, "to_numpy"):   # a pandas DataFrame
        x, names = _frame_features(where, x)
    array = np.asarray(x)
    if array.dtype == object or array.dtype.kind not in "biuf":
        raise ContractError(f"{where}: x holds {array.dtype} values; mlgate trains on numbers",
                            hint="return numeric arrays, or a DataFrame of numeric columns")
    if array.ndim < 2:
        raise ContractError(f"{where}: x has shape {list(array.shape)}; it needs one row per example "
                            "(shape (N, features) or (N, *example_shape))")
    with np.errstate(all="ignore"):
        converted = array.astype(np.float32)
    if not np.isfinite(converted).all():
        bad = ~np.isfinite(converted.reshape(len(converted), -1))
        column = int(np.argmax(bad.any(axis=0)))
        label = names[column] if names else f"feature {column}"
        raise ContractError(f"{where}: x has {int(bad.sum())} missing, infinite or out-of-float32-range values "
                            f"(first in {label!r})", hint="impute or drop them in load_data()")
    return np.ascontiguousarray(converted), names


# --- labels (y) ------------------------------------------------------------------------------------------

def _label_text(value: Any) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _raw_labels(where: str, y: Any) -> np.ndarray:
    """One label per example, as a 1-D array (one-hot rows become their column index)."""
    array = np.asarray(y.to_numpy() if hasattr(y, "to_numpy") else y)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 2:
        values = np.unique(array)
        if array.dtype.kind in "biuf" and set(values.tolist()) <= {0, 1}:
            per_row = array.sum(axis=1)
            if (per_row == 1).all():
                return array.argmax(axis=1)
            raise ContractError(f"{where}: y has rows with {int(per_row.max())} labels at once (multi-label); "
                                f"mlgate supports {TASK}")
        raise ContractError(f"{where}: y has shape {list(array.shape)}; mlgate supports {TASK}: one label per example")
    if array.ndim != 1:
        raise ContractError(f"{where}: y has shape {list(array.shape)}; it needs one label per example")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ContractError(f"{where}: y has missing (NaN) labels", hint="drop those rows in load_data()")
        if not np.equal(np.mod(array, 1), 0).all():
            sample = array[np.mod(array, 1) != 0][0]
            raise ContractError(f"{where}: y holds continuous values (e.g. {sample:g}), a regression target; "
                                f"mlgate supports {TASK}")
    elif array.dtype == object:
        if any(v is None or (isinstance(v, float) and not np.isfinite(v)) for v in array):
            raise ContractError(f"{where}: y has missing labels", hint="drop those rows in load_data()")
    return array


def _class_order(values: np.ndarray) -> list[Any]:
    """Numeric codes in numeric order; text in sorted order."""
    unique = list(dict.fromkeys(values.tolist()))
    try:
        return sorted(unique)
    except TypeError:   # mixed types: order by their text
        return sorted(unique, key=str)


def encode_labels(where: str, parts: Sequence[np.ndarray],
                  classes: Sequence[str] | None = None) -> tuple[list[np.ndarray], tuple[str, ...]]:
    """Labels of every split → indices into one class list; the names are the labels as text.

    With `classes` given (a Splits whose labels are already indices 0..K-1), they are checked instead."""
    if classes is not None:
        count = len(classes)
        out = []
        for part in parts:
            if part.dtype.kind not in "biu" and not (part.dtype.kind == "f" and np.equal(np.mod(part, 1), 0).all()):
                raise ContractError(f"{where}: a Splits' y must hold class indices, found {part.dtype} values")
            indices = part.astype(np.int64)
            if len(indices) and (indices.min() < 0 or indices.max() >= count):
                raise ContractError(f"{where}: y holds index {int(indices.max() if indices.max() >= count else indices.min())}"
                                    f" but Splits.classes names {count} classes (indices 0..{count - 1})")
            out.append(indices)
        return out, tuple(str(c) for c in classes)
    order = _class_order(np.concatenate([np.asarray(p, dtype=object) if p.dtype == object else p for p in parts]))
    names = [_label_text(v) for v in order]
    if len(set(names)) != len(names):
        raise ContractError(f"{where}: labels {names} collide once written as text")
    index = {name: i for i, name in enumerate(names)}
    return [np.array([index[_label_text(v)] for v in part.tolist()], dtype=np.int64) for part in parts], tuple(names)


# --- the whole loader output ------------------------------------------------------------------------------

def _unpack(where: str, module: Any, raw: Any) -> tuple[Any, Any] | Splits:
    if isinstance(raw, Splits):
        return raw
    if isinstance(raw, tuple) and len(raw) == 2:
        return raw
    if hasattr(raw, "columns") and hasattr(raw, "drop"):
        label = getattr(module, "label", DEFAULT_LABEL)
        if label not in raw.columns:
            raise ContractError(f"{where}: the DataFrame has no label column {label!r} "
                                f"(columns: {', '.join(map(str, list(raw.columns)[:12]))})",
                                hint="name it 'label', or set `label = \"<column>\"` in the model file")
        return raw.drop(columns=[label]), raw[label]
    raise ContractError(f"{where}: returned {type(raw).__name__}; expected (x, y), a DataFrame with a label column, "
                        "or automation.data.Splits")


def _check_lengths(where: str, x: np.ndarray, y: np.ndarray, split: str = "") -> None:
    if len(x) != len(y):
        raise ContractError(f"{where}: {split + ' ' if split else ''}x has {len(x)} rows but y has {len(y)} labels")
    if len(x) == 0:
        raise ContractError(f"{where}: the {split + ' ' if split else ''}data is empty")


def input_kind(model: str, module: Any) -> str:
    """"image" (uint8 pixels in), "text" (strings in) or "tensor" (numbers in), from the declared step."""
    step = declared_step(model, module)
    return "image" if isinstance(step, Pixels) else "text" if isinstance(step, Tokenize) else "tensor"


def prepare_data(model: str, module: Any, raw: Any, split: "SplitConfig") -> Splits:
    """The loader's output as splits with label indices, class names and feature names; or a ContractError
    naming the model and what to change. Examples are float32, except an image model's uint8 pixels and a
    text model's strings, which stay raw for their pre-processing."""
    where = f"models.{model}: load_data()"
    kind = input_kind(model, module)
    unpacked = _unpack(where, module, raw)
    if isinstance(unpacked, Splits):
        xs, names = [], None
        for name in SPLIT_NAMES:
            x, names = _as_features(f"{where} ({name} split)", getattr(unpacked, f"x_{name}"), kind)
            xs.append(x)
        ys = [_raw_labels(f"{where} ({n} split)", getattr(unpacked, f"y_{n}")) for n in SPLIT_NAMES]
        for name, x, y in zip(SPLIT_NAMES, xs, ys):
            _check_lengths(where, x, y, name)
        if len({x.shape[1:] for x in xs}) != 1:
            raise ContractError(f"{where}: the splits' examples differ in shape "
                                f"({', '.join(str(list(x.shape[1:])) for x in xs)})")
        indices, classes = encode_labels(where, ys, unpacked.classes or None)
        features = unpacked.features or names
    else:
        x_all, features = _as_features(where, unpacked[0], kind)
        y_all = _raw_labels(where, unpacked[1])
        _check_lengths(where, x_all, y_all)
        (y_all,), classes = encode_labels(where, [y_all])
        counts = np.bincount(y_all, minlength=len(classes))
        smallest = int(counts.min())
        if len(classes) > max(20, len(y_all) // 2):
            raise ContractError(f"{where}: y has {len(classes)} distinct values in {len(y_all)} rows: that looks "
                                f"like a regression target; mlgate supports {TASK}")
        if smallest < 3:
            rare = classes[int(counts.argmin())]
            raise ContractError(f"{where}: class {rare!r} has {smallest} example(s); a stratified train/val/test "
                                "split needs at least 3 of each class")
        s = split
        parts = split_arrays(x_all, y_all, classes=classes, seed=s.seed, val_fraction=s.val_fraction,
                             test_fraction=s.test_fraction)
        xs = [parts.x_train, parts.x_val, parts.x_test]
        indices = [parts.y_train, parts.y_val, parts.y_test]
    if len(classes) < 2:
        raise ContractError(f"{where}: y has a single class ({classes[0]!r}); a classifier needs two or more")
    missing = sorted(set(range(len(classes))) - set(np.unique(indices[0]).tolist()))
    if missing:
        raise ContractError(f"{where}: the training split has no example of class {classes[missing[0]]!r}")
    if features is not None and (xs[0].ndim != 2 or len(features) != xs[0].shape[1]):
        raise ContractError(f"{where}: {len(features)} feature names for examples shaped {list(xs[0].shape[1:])}")
    sources = unpacked.sources if isinstance(unpacked, Splits) else ()
    return Splits(xs[0], indices[0], xs[1], indices[1], xs[2], indices[2], tuple(classes),
                  tuple(features) if features is not None else None, sources)


# --- fresh data after drift -------------------------------------------------------------------------------

def _fresh_labels(where: str, y: np.ndarray, classes: tuple[str, ...]) -> np.ndarray:
    """Fresh labels by class name (or code written as text); integers that are not names are indices."""
    raw = _raw_labels(where, y)
    index = {name: i for i, name in enumerate(classes)}
    texts = [_label_text(v) for v in raw.tolist()]
    if all(t in index for t in texts):
        return np.array([index[t] for t in texts], dtype=np.int64)
    if raw.dtype.kind in "iu" and len(raw) and raw.min() >= 0 and raw.max() < len(classes):
        return raw.astype(np.int64)
    unknown = next(t for t in texts if t not in index)
    raise ContractError(f"{where}: label {unknown!r} is not one of the model's classes "
                        f"({', '.join(classes[:10])}{', …' if len(classes) > 10 else ''})")


def _fresh_images(where: str, path: Path, splits: Splits, resize: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A folder of image files, one sub-folder per class name (`<class>/<name>.png`). `resize`: the image
    mode ("RGB", "L") of a model whose pictures came from an image folder: fresh ones are converted and
    resized as those were; otherwise a fresh image must already be the model's size."""
    from PIL import Image

    images, labels = [], []
    for file in _folder_files(where, path):
        if file.parent.parent != path:
            raise ContractError(f"{where}: {file.relative_to(path)} is not <class>/<image file>")
        try:
            with Image.open(file) as opened:
                images.append(to_pixels(opened, splits.input_shape[-2:], resize) if resize else
                              image_pixels(opened, splits.input_shape))
        except ValueError as exc:
            raise ContractError(f"{where}: {file.relative_to(path)}: {exc}") from None
        except OSError:
            raise ContractError(f"{where}: {file.relative_to(path)} is not an image file") from None
        labels.append(file.parent.name)
    if not images:
        raise ContractError(f"{where}: no image files in <class>/ folders")
    return np.stack(images), np.array(labels, dtype=object)


def _folder_files(where: str, path: Path) -> list[Path]:
    """The files under `path`, sorted; a symbolic link (which may point outside the folder) or more than
    MAX_FRESH_FILES entries are refused before any file is read."""
    files = []
    for count, entry in enumerate(path.rglob("*"), 1):
        if count > MAX_FRESH_FILES:
            raise ContractError(f"{where}: more than {MAX_FRESH_FILES:,} entries; send fresh images as .npz "
                                "arrays or in several windows")
        if entry.is_symlink():
            raise ContractError(f"{where}: {entry.relative_to(path)} is a symbolic link; links are not followed")
        if entry.is_file():
            files.append(entry)
    return sorted(files)


def image_pixels(image: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A decoded image as uint8 pixels shaped like the model's examples ((H, W) grey, or (C, H, W))."""
    channels, (height, width) = (shape[0] if len(shape) == 3 else 0), shape[-2:]
    if image.size != (width, height):
        raise ValueError(f"the image is {image.size[0]}×{image.size[1]}, the model takes {width}×{height}")
    mode = {0: "L", 1: "L", 3: "RGB", 4: "RGBA"}.get(channels)
    if mode is None:
        raise ValueError(f"the model's images have {channels} channels")
    pixels = to_pixels(image, (height, width), mode)
    return pixels[0] if channels == 0 else pixels


def to_pixels(image: Any, size: tuple[int, ...], mode: str) -> np.ndarray:
    """A decoded image, converted to `mode` and resized to `size` (height, width) when it is not that size
    already: uint8 (C, H, W)."""
    from PIL import Image

    converted = image.convert(mode)
    if converted.size != (size[1], size[0]):
        converted = converted.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    pixels = np.asarray(converted, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)


def _fresh_texts(where: str, path: Path, label: str, text: str) -> tuple[np.ndarray, np.ndarray]:
    """JSONL ({"text": …, "label": …} per line), CSV or Parquet with a text and a label column, or a folder of
    `<class>/<file>.txt`."""
    import pandas as pd

    from automation.data_sources import csv_texts, text_folder

    if path.is_dir():
        return text_folder(where, path)
    if path.suffix == ".csv":
        return csv_texts(where, path, text, label)
    try:
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_json(path, lines=True)
    except ValueError as exc:
        raise ContractError(f"{where}: not valid {path.suffix[1:].upper()}: {str(exc).splitlines()[0][:200]}") from None
    for column in (text, label):
        if column not in frame.columns:
            raise ContractError(f"{where}: no {column!r} column")
    return as_texts(where, frame[text]), np.asarray(frame[label])


def read_fresh(path: Path, splits: Splits, label: str = DEFAULT_LABEL, kind: str = "tensor",
               text: str = DEFAULT_TEXT, resize: str | None = None) -> tuple[Any, np.ndarray]:
    """Labelled fresh examples, in the model's raw form:
    - numbers: an .npz with `x` and `y`, or CSV/Parquet with the feature columns (by name) and the label;
    - images: an .npz with uint8 `x` and `y`, or a folder of image files in one folder per class;
    - text: JSONL, CSV or Parquet with a text column (`text`) and the label column, or a folder of
      `<class>/<file>.txt`."""
    where = f"fresh data {path.name}"
    suffixes = {"image": (".npz", "a folder"), "text": (".jsonl", ".csv", ".parquet", "a folder")}.get(
        kind, FRESH_SUFFIXES)
    is_folder = kind in ("image", "text") and path.is_dir()
    if path.suffix not in suffixes and not is_folder:
        raise ContractError(f"{where}: expected one of {', '.join(suffixes)}")
    if not path.is_file() and not is_folder:
        raise ContractError(f"{where}: no such file")
    if is_folder and kind == "image":
        x, y_raw = _fresh_images(where, path, splits, resize)
    elif kind == "text":
        x, y_raw = _fresh_texts(where, path, label, text)
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data or "y" not in data:
                raise ContractError(f"{where}: an .npz needs arrays 'x' and 'y'")
            x_raw, y_raw = data["x"], data["y"]
        x, _ = _as_features(where, x_raw, kind)
        try:
            x = x.reshape((-1, *splits.input_shape))
        except ValueError:
            raise ContractError(f"{where}: x has shape {list(x_raw.shape)}, examples must be shaped "
                                f"{list(splits.input_shape)}") from None
    else:
        import pandas as pd

        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        if label not in frame.columns:
            raise ContractError(f"{where}: no label column {label!r}")
        wanted = list(splits.features or [])
        absent = [c for c in wanted if c not in frame.columns]
        if not wanted or absent:
            raise ContractError(f"{where}: missing feature column {absent[0]!r}" if absent else
                                f"{where}: the model's features have no names; send an .npz with x and y")
        x, _ = _as_features(where, frame[wanted])
        y_raw = frame[label]
    y = _fresh_labels(where, np.asarray(y_raw), splits.classes)
    _check_lengths(where, x, y)
    return x, y


def append_fresh(splits: Splits, path: Path, label: str = DEFAULT_LABEL, kind: str = "tensor",
                 text: str = DEFAULT_TEXT, resize: str | None = None) -> Splits:
    """The training split grows; validation and test stay as they were, so versions stay comparable. A
    training split on disk stays there: the fresh rows join it (automation.data.JoinedArray)."""
    x, y = read_fresh(path, splits, label, kind, text, resize)
    return Splits(join_examples(splits.x_train, x), np.concatenate([splits.y_train, y]),
                  splits.x_val, splits.y_val, splits.x_test, splits.y_test, splits.classes, splits.features,
                  splits.sources + (str(path),))


def encode_texts(splits: Splits, encoder: TextEncoder) -> Splits:
    """A text model's splits as token ids: what its network (and every variant) takes."""
    return Splits(encoder.encode(splits.x_train), splits.y_train, encoder.encode(splits.x_val), splits.y_val,
                  encoder.encode(splits.x_test), splits.y_test, splits.classes, None, splits.sources)


# --- build() ----------------------------------------------------------------------------------------------

def _build_model(build: Callable[..., Any], preprocess: Any, extra: dict[str, Any], **params: Any) -> Any:
    network = build(**(extra | params))
    if not isinstance(preprocess, nn.Module):   # none, or a host-side step (the tokenizer) outside the graph
        return network
    return WithPreprocessing(copy.deepcopy(preprocess), network)


def model_builder(build: Callable[..., Any], splits: Splits, preprocess: Any) -> Callable[..., Any]:
    """build(**params), given the data's shape when it asks for it (and a text model's `vocab_size`), behind
    the fitted in-graph pre-processing. A partial of module-level functions, so DDP can send it to its
    worker processes."""
    accepts = inspect.signature(build).parameters
    offered = {"input_shape": splits.input_shape, "num_classes": len(splits.classes)}
    if isinstance(preprocess, TextEncoder):
        offered["vocab_size"] = preprocess.vocab_size
    extra = {key: value for key, value in offered.items() if key in accepts}
    return functools.partial(_build_model, build, preprocess, extra)


INPUT_DTYPES = {"image": "uint8", "text": "string", "tensor": "float32"}


def describe(raw: Splits, preprocess: str | None, kind: str = "tensor",
             network_input: Splits | None = None) -> dict[str, Any]:
    """What travels with a registered version (its MLmodel metadata), so serving and the monitor need no loader:
    the raw input clients send (`input_kind`, `input_shape`, `input_dtype`), and for a text model, what its
    network takes after the tokenizer (`network_input`)."""
    described = {"task": TASK, "classes": list(raw.classes),
                 "features": None if raw.features is None else list(raw.features),
                 "input_kind": kind, "input_shape": list(raw.input_shape), "input_dtype": INPUT_DTYPES[kind],
                 "preprocess": preprocess, "test_examples": int(len(raw.y_test))}
    if network_input is not None and kind == "text":
        described["network_input"] = {"shape": list(network_input.input_shape), "dtype": "int64"}
    return described
