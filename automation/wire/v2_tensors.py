"""The Open Inference Protocol's (KServe v2) request tensors, decoded: JSON tensors and the binary tensor
data extension, into the one input batch of a served version. Pure functions of the request's bytes, so the
contract check (automation/serving_check.py) decodes examples exactly as `serve-model` does."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from automation.wire.json_inputs import BadInput, checked_cast, describe_value, format_value
from automation.wire.predict import not_json

INPUT_NAME = "input"
HEADER_LENGTH = "Inference-Header-Content-Length"
TO_NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
            "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
            "FP32": np.float32, "FP64": np.float64}
FROM_NUMPY = {np.dtype(v).name: k for k, v in TO_NUMPY.items()}
LITTLE_ENDIAN = {k: np.dtype(v).newbyteorder("<") for k, v in TO_NUMPY.items()}   # the binary extension's order


def v2_datatype(dtype: str) -> str:
    return "BYTES" if dtype == "string" else FROM_NUMPY[np.dtype(dtype).name]


NOT_FINITE = "the input contains NaN or infinity"
OUTPUTS = ("logits", "predictions", "labels")
_DATA_OPENS = re.compile(rb"\s*:\s*\[")


@dataclass
class InferRequest:
    x: np.ndarray
    id: str | None
    outputs: dict[str, bool]   # requested output -> as binary


def parse_infer(body: bytes, header_length: str | None, shape: tuple[int, ...], dtype: str,
                max_batch: int, labels: bool = False, kind: str = "tensor") -> InferRequest:
    """An inference request (JSON, or JSON then binary tensors) → the input batch; BadInput says what is wrong.
    `labels`: the version names its classes, so it has a `labels` output. `kind`: a text model takes a BYTES
    tensor of UTF-8 strings; an image model a UINT8 tensor of pixels or a BYTES tensor of PNG/JPEG files."""
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            raise BadInput(f"{HEADER_LENGTH} is not a number", 400) from None
        if not 0 < split <= len(body):
            raise BadInput(f"{HEADER_LENGTH} {split} is outside the body ({len(body)} bytes)", 400)
        head, binary = body[:split], body[split:]
    else:
        head, binary = body, b""
    try:
        request = orjson.loads(head)
    except (ValueError, RecursionError):
        raise not_json(head, "the inference request") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise BadInput('an inference request is a JSON object with "inputs": a list of tensors', 400)
    tensors = request["inputs"]
    if len(tensors) != 1 or not isinstance(tensors[0], dict) or tensors[0].get("name") != INPUT_NAME:
        raise BadInput(f'this model takes one input tensor, named "{INPUT_NAME}"', 400)
    if kind in ("text", "image") and tensors[0].get("datatype") == "BYTES":
        x = _raw_tensor(tensors[0], binary, shape, max_batch, kind)
    elif kind == "text":
        raise BadInput(f"datatype {tensors[0].get('datatype')!r}: this model takes text, a BYTES tensor shaped [batch]")
    else:
        x = _tensor(tensors[0], binary, shape, dtype, max_batch, head)
    parameters = request.get("parameters") if isinstance(request.get("parameters"), dict) else {}
    default_binary = bool(parameters.get("binary_data_output", False))
    requested = request.get("outputs")
    available = OUTPUTS if labels else OUTPUTS[:2]
    if requested is None:   # all of them, as the protocol says
        outputs = {name: default_binary for name in available}
    elif isinstance(requested, list) and all(isinstance(o, dict) for o in requested):
        outputs = {}
        for output in requested:
            name = output.get("name")
            if name not in available:
                names = ", ".join(f'"{n}"' for n in available[:-1]) + f' and "{available[-1]}"'
                raise BadInput(f'unknown output "{name}": this model has {names}', 400)
            params = output.get("parameters") if isinstance(output.get("parameters"), dict) else {}
            outputs[name] = bool(params.get("binary_data", default_binary))
    else:
        raise BadInput('"outputs" must be a list of {"name": …}', 400)
    request_id = request.get("id")
    return InferRequest(x, str(request_id) if request_id is not None else None, outputs)


def numbers_span(head: bytes) -> tuple[int, int] | None:
    """Where the values of the request's one `"data"` array lie in its bytes, when that array is a flat list of
    numbers, told from the bytes (a few memchr scans, no walk over the values): inside it no byte may start a
    string (`"`), `true`, `false`, `null`, an object or a nested list, and no other `"data"` key may follow it.
    None when unsure (an escape anywhere, nested data): the values are then looked at one by one."""
    if head.find(b"\\") >= 0:   # an escaped key could spell "data" otherwise
        return None
    key = head.find(b'"data"')
    opened = _DATA_OPENS.match(head, key + 6) if key >= 0 else None
    if opened is None:
        return None
    start = opened.end()
    close = head.find(b"]", start)
    if close < 0:
        return None
    find = head.find
    plain = find(b"[", start, close) < 0 and find(b'"', start, close) < 0 and find(b"t", start, close) < 0 and \
        find(b"f", start, close) < 0 and find(b"n", start, close) < 0 and find(b"{", start, close) < 0 and \
        find(b'"data"', close) < 0
    return (start, close) if plain else None


def _may_hold_fractions(head: bytes, span: tuple[int, int] | None) -> bool:
    """Whether a value of the data may be a float (`.`, `e` or `E` in its bytes); True when unsure."""
    return span is None or any(head.find(c, *span) >= 0 for c in (b".", b"e", b"E"))


def _refuse_fractions(data: list[Any], depth: int, datatype: str) -> None:
    """An integer tensor holds whole numbers: 0.5 would be cast to 0 without a word."""
    for index, value in enumerate(_leaves(data, depth)):
        if type(value) is float and not value.is_integer():
            raise BadInput(f"{_element(index)}: value {format_value(value)} is not a whole number, as {datatype} "
                           f"needs")


def _leaves(data: list[Any], depth: int) -> Iterator[Any]:
    """The values of nested lists in row-major order (lists deeper than `depth` come out as values)."""
    for item in data:
        if isinstance(item, list) and depth > 1:
            yield from _leaves(item, depth - 1)
        else:
            yield item


def _check_data(data: list[Any], depth: int) -> None:
    for index, value in enumerate(_leaves(data, depth)):
        if type(value) is float or type(value) is int:
            continue
        kind = describe_value(value)
        if kind is not None:
            raise BadInput(f"element {index} of the input is {kind}: send numbers")


def _out_of_range(data: list[Any], depth: int, datatype: str) -> BadInput:
    """The first value of `data` that `datatype` cannot hold, named (a cast of it failed or overflowed)."""
    target = TO_NUMPY[datatype]
    low, high = (np.iinfo(target).min, np.iinfo(target).max) if np.dtype(target).kind in "iu" else (
        -float(np.finfo(target).max), float(np.finfo(target).max))
    for index, value in enumerate(_leaves(data, depth)):
        if isinstance(value, (int, float)) and not low <= value <= high:
            return BadInput(f"element {index} of the input: value {format_value(value)} is out of range for "
                            f"{datatype}")
    return BadInput(f"the data does not fit {datatype}")


def _element(index: int) -> str:
    return f"element {index} of the input"


def _tensor(tensor: dict[str, Any], binary: bytes, shape: tuple[int, ...], dtype: str, max_batch: int,
            head: bytes) -> np.ndarray:
    declared = tensor.get("shape")
    if not isinstance(declared, list) or not all(type(d) is int and d >= 0 for d in declared):
        got = orjson.dumps(declared).decode()[:80] if declared is not None else "none"
        raise BadInput(f'the input tensor needs "shape": a list of sizes (whole numbers); got {got}', 400)
    if tuple(declared[1:]) != shape or len(declared) != len(shape) + 1:
        raise BadInput(f"the input must be shaped [batch, {', '.join(map(str, shape))}]; got {declared}")
    if not 0 < declared[0] <= max_batch:
        raise BadInput(f"batch of {declared[0]} examples: between 1 and {max_batch}", 413 if declared[0] else 422)
    datatype = tensor.get("datatype")
    if datatype not in TO_NUMPY or datatype == "BOOL":
        raise BadInput(f"datatype {datatype!r} is not a number type (FP32, FP64, INT64, …)")
    count = math.prod(declared)
    parameters = tensor.get("parameters") if isinstance(tensor.get("parameters"), dict) else {}
    size = parameters.get("binary_data_size")
    if size is not None:
        expected = count * LITTLE_ENDIAN[datatype].itemsize
        if size != expected or len(binary) != size:
            raise BadInput(f"binary_data_size {size}: a {datatype} tensor shaped {declared} is {expected} bytes, "
                           f"and {len(binary)} follow the JSON", 400)
        array = np.frombuffer(binary, dtype=LITTLE_ENDIAN[datatype])
    else:
        data = tensor.get("data")
        if not isinstance(data, list):
            raise BadInput('the input tensor needs "data" (or binary data)', 400)
        depth = len(declared)
        span = numbers_span(head)
        if span is None:   # a boolean would become 1.0, null NaN and "2.5" 2.5: refused, by name
            _check_data(data, depth)
        array = _bytes_of(data) if datatype == "UINT8" and span is not None else None
        if array is None:
            try:
                with np.errstate(over="ignore", invalid="ignore"):   # past FP16/FP32's range: inf, found below
                    array = np.asarray(data, dtype=TO_NUMPY[datatype]).reshape(-1)
            except OverflowError:   # an integer type's range
                raise _out_of_range(data, depth, datatype) from None
            except (ValueError, TypeError):
                raise BadInput(f"the data is not a list of {datatype} numbers") from None
        if array.size != count:
            raise BadInput(f"{array.size} values for a tensor shaped {declared} ({count})")
        if np.dtype(TO_NUMPY[datatype]).kind in "iu" and _may_hold_fractions(head, span):   # a cast truncates 0.5
            _refuse_fractions(data, depth, datatype)
        try:
            return checked_cast(array.reshape(declared), dtype, _element, NOT_FINITE)
        except BadInput as exc:   # JSON holds no NaN nor infinity: this one is a value past FP16/FP32's range
            if exc.args[0] is NOT_FINITE:
                raise _out_of_range(data, depth, datatype) from None
            raise
    return checked_cast(array.reshape(declared), dtype, _element, NOT_FINITE)


def _bytes_of(data: list[Any]) -> np.ndarray | None:
    """A flat list of whole numbers 0-255 (an image's pixels) as UINT8, read by `bytearray()` in C: at batch 32
    of 28x28 pixels 0.065 ms, where `bytes()` takes 0.14 (it has no fast path for a list) and np.asarray 0.63.
    None for anything else (a float, a value out of range): np.asarray then reads it, and names what does not fit.
    The caller has ruled out booleans (numbers_span)."""
    try:
        return np.frombuffer(bytearray(data), dtype=np.uint8)
    except (TypeError, ValueError):
        return None


def _raw_tensor(tensor: dict[str, Any], binary: bytes, shape: tuple[int, ...], max_batch: int,
                kind: str) -> np.ndarray:
    """A BYTES tensor shaped [batch]: UTF-8 texts, or image files decoded to the version's pixels."""
    from automation.wire import raw_inputs

    declared = tensor.get("shape")
    if not isinstance(declared, list) or len(declared) != 1 or type(declared[0]) is not int or declared[0] < 0:
        got = orjson.dumps(declared).decode()[:80] if declared is not None else "none"
        raise BadInput(f"a BYTES input is shaped [batch], one element per {kind}; got {got}", 400)
    limit = min(max_batch, raw_inputs.MAX_TEXT_BATCH) if kind == "text" else max_batch
    if not 0 < declared[0] <= limit:
        raise BadInput(f"batch of {declared[0]} examples: between 1 and {limit}", 413 if declared[0] else 422)
    elements = raw_inputs.bytes_elements(tensor, binary, declared[0])
    if kind == "text":
        return raw_inputs.texts_from_bytes(elements)
    return raw_inputs.images_from_files(elements, shape)


def bytes_tensor(texts: list[str]) -> bytes:
    """A BYTES tensor in the binary extension's form: each element's length (4 bytes, little-endian), then it."""
    return b"".join(len(e).to_bytes(4, "little") + e for e in (t.encode() for t in texts))
