"""What a client sends to `/predict` and `/v2`, checked: every value a number that fits the model's input type,
examples shaped as the version expects (or records keyed by its feature names), and one-line messages for what
is not. Also how answers are named: class names and the predicted class's probability."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np


class BadInput(ValueError):
    """A request the model cannot take: answered 4xx with this message."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


# A JSON body of numbers holds no letter but `e`/`E`: an `r` or an `l` means `true`, `false` or `null` may be in
# it (`"inputs"` has neither), and only then are the values looked at one by one (a `null`, or a string, also
# shows as a non-number dtype; a boolean among numbers would silently become 1.0 or 0.0)
SUSPECT_BYTES = (b"r", b"l")


def suspect_body(raw: bytes) -> bool:
    """Whether a /predict body may hold booleans or nulls: two memchr scans, far cheaper than any walk."""
    return any(raw.find(byte) >= 0 for byte in SUSPECT_BYTES)


def describe_value(value: Any) -> str | None:
    """What a JSON value that is not a number is, for a message; None for a number."""
    if value is True or value is False:
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, (int, float)):
        return None
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"a string ({quote(value)})"
    if isinstance(value, dict):
        return "an object"
    return "a list" if isinstance(value, list) else type(value).__name__


def quote(text: str, limit: int = 40) -> str:
    """`text` as a JSON string in a message, cut at `limit` characters."""
    return json.dumps(text if len(text) <= limit else text[:limit] + "…", ensure_ascii=False)


def first_non_number(value: Any, depth: int) -> tuple[tuple[int, ...], str] | None:
    """The first value in nested lists (down to `depth` levels) that is not a number: its position and what
    it is. Deeper lists are left to the shape check, so the walk never recurses far."""
    if not isinstance(value, list):
        kind = describe_value(value)
        return None if kind is None else ((), kind)
    if depth == 0:
        return None
    for i, item in enumerate(value):
        if type(item) is float or type(item) is int:
            continue
        found = first_non_number(item, depth - 1)
        if found is not None:
            return (i, *found[0]), found[1]
    return None


def format_value(value: Any) -> str:
    value = value.item() if isinstance(value, np.generic) else value
    return f"{value:g}" if isinstance(value, float) else str(value)


def checked_cast(array: np.ndarray, dtype: str, where: Callable[[int], str], not_finite: str,
                 type_name: str | None = None) -> np.ndarray:
    """`array` as `dtype`, with no numpy warning, or BadInput: a value that does not fit `dtype` is named with
    `where(its flat index)`, and NaN or infinity gets `not_finite`. The usual case costs one cast and one
    finiteness pass; only a failing array is looked at closer."""
    target = np_dtype(dtype)
    if target.kind in "iu":   # an integer input: NaN has no integer, and a value past the range wraps silently
        if array.dtype.kind == "f":
            if not all_finite(array):
                raise BadInput(not_finite)
            fractional = array != np.trunc(array)   # 0.5 would become 0 without a word
            if fractional.any():
                index = int(np.flatnonzero(fractional.reshape(-1))[0])
                raise BadInput(f"{where(index)}: value {format_value(array.reshape(-1)[index])} is not a whole "
                               f"number, as {type_name or target.name} needs")
        if np.can_cast(array.dtype, target, "safe"):   # every value fits (uint8 pixels as uint8): no scan
            return array.astype(target)
        info = np.iinfo(target)
        if array.size and (array.min() < info.min or array.max() > info.max):
            flat = array.reshape(-1)
            index = int(np.flatnonzero((flat < info.min) | (flat > info.max))[0])
            raise BadInput(f"{where(index)}: value {format_value(flat[index])} is out of range for "
                           f"{type_name or target.name}")
        with np.errstate(invalid="ignore"):
            return array.astype(target)
    if array.dtype == target and array.flags.writeable:   # a read-only view of a request's bytes is copied
        out = array
    else:
        with np.errstate(over="ignore", invalid="ignore"):   # a value past the range becomes inf, found below
            out = array.astype(target)
    if all_finite(out):
        return out
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    overflowed = ~np.isfinite(flat_out)
    if array.dtype.kind == "f":
        overflowed &= np.isfinite(flat_in)
    if overflowed.any():
        index = int(np.argmax(overflowed))
        raise BadInput(f"{where(index)}: value {format_value(flat_in[index])} is out of range for "
                       f"{type_name or target.name}")
    raise BadInput(not_finite)


@functools.lru_cache(maxsize=16)
def np_dtype(name: str) -> np.dtype[Any]:
    return np.dtype(name)   # parsing a dtype's name costs more than the cast of a small tensor


def _position(index: int, shape: tuple[int, ...]) -> str:
    size = math.prod(shape)
    position = np.unravel_index(index % size, shape) if shape else ()
    return f"example {index // size} at [{', '.join(str(int(p)) for p in position)}]"


def _check_examples(inputs: list[Any], shape: tuple[int, ...], features: tuple[str, ...] | None) -> None:
    """BadInput naming the first value that is not a number, and where; nothing when all are numbers."""
    for i, example in enumerate(inputs):
        if isinstance(example, dict):
            raise BadInput(f"example {i} is an object: send every example as an array shaped {list(shape)}" +
                           (", or every one as a record keyed by feature name" if features else
                            " (this version names no features, so it takes no records)"))
        found = first_non_number(example, len(shape))
        if found is not None:
            position, kind = found
            if not position:
                raise BadInput(f"example {i} is {kind}: send numbers")
            raise BadInput(f"example {i} holds {kind} at [{', '.join(map(str, position))}]: send numbers")


def _records(inputs: list[Any], features: tuple[str, ...]) -> np.ndarray:
    """Records keyed by feature name → rows in the features' order; BadInput names the record and the key."""
    index = {name: i for i, name in enumerate(features)}
    rows = []
    for i, record in enumerate(inputs):
        if not isinstance(record, dict):
            raise BadInput(f"example {i} is not a record: send every example as an object keyed by feature name, "
                           "or every one as an array")
        if len(record) != len(features) or not all(key in index for key in record):
            unknown = next((key for key in record if key not in index), None)
            if unknown is not None:
                names = ", ".join(features[:12]) + (", …" if len(features) > 12 else "")
                raise BadInput(f"record {i} has an unknown key {quote(unknown)} (the features: {names})")
            missing = next(name for name in features if name not in record)
            raise BadInput(f"record {i} lacks the feature {quote(missing)}")
        row = [record[name] for name in features]
        for name, value in zip(features, row):
            if type(value) is not float and type(value) is not int:
                kind = describe_value(value)
                if kind is not None:
                    raise BadInput(f"record {i} holds {kind} for {quote(name)}: send numbers")
        rows.append(row)
    return np.asarray(rows, dtype=np.float64)


def parse_inputs(body: Any, shape: tuple[int, ...], dtype: str, max_batch: int,
                 features: tuple[str, ...] | None = None, suspect: bool = True) -> np.ndarray:
    """`{"inputs": [...]}` → an array of (batch, *shape), or BadInput naming what is wrong.

    Examples are arrays shaped `shape`, or, for a version with `features` (tabular, 1-D examples), records
    keyed by feature name. `suspect`: the raw body may hold booleans or nulls (`suspect_body`); when False, an
    array of numbers is taken as it is."""
    if not isinstance(body, dict) or "inputs" not in body:
        raise BadInput('the body must be a JSON object with "inputs": a list of examples')
    inputs = body["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise BadInput('"inputs" must be a non-empty list of examples')
    if len(inputs) > max_batch:
        raise BadInput(f"batch of {len(inputs)} examples is over the limit of {max_batch}", status=413)
    if features is not None and shape != (len(features),):
        features = None   # names that do not fit the examples name nothing
    if features is not None and isinstance(inputs[0], dict):
        width = len(features)
        return checked_cast(_records(inputs, features), dtype,
                            lambda k: f"record {k // width} ({quote(features[k % width])})",
                            "examples contain NaN or infinity")
    try:
        array: np.ndarray | None = np.asarray(inputs)
    except ValueError:    # ragged nesting
        array = None
    numbers = array is not None and array.dtype.kind in "iuf"
    if suspect or not numbers:
        _check_examples(inputs, shape, features)
        if not numbers:   # ragged, or integers past int64 beside negative ones (an object array)
            try:
                array = np.asarray(inputs, dtype=np.float64)
            except (ValueError, TypeError):
                raise BadInput(f"examples must all have shape {list(shape)}") from None
    assert array is not None
    if array.ndim != len(shape) + 1:
        raise BadInput(f"examples must all have shape {list(shape)}; got a batch shaped {list(array.shape)}")
    if tuple(array.shape[1:]) != shape:
        raise BadInput(f"examples must have shape {list(shape)}; got {list(array.shape[1:])}")
    return checked_cast(array, dtype, lambda k: _position(k, shape), "examples contain NaN or infinity")


def all_finite(array: np.ndarray) -> bool:
    """No NaN or infinity (one pass, no sum that could overflow and warn)."""
    return bool(np.isfinite(array).all())


def predicted_probabilities(logits: np.ndarray) -> np.ndarray:
    """Each example's softmax probability of its predicted class: 1 / Σ exp(logit − the largest logit)."""
    with np.errstate(all="ignore"):   # a non-finite logit gives NaN (null in JSON), never a warning
        shifted = logits - logits.max(axis=1, keepdims=True)
        return np.reciprocal(np.exp(shifted, out=shifted).sum(axis=1))


def class_names(classes: tuple[str, ...], predictions: np.ndarray) -> list[str]:
    return [classes[i] for i in predictions.tolist()]
