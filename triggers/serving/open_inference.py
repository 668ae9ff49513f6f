"""The Open Inference Protocol (KServe v2, as Triton, KServe and MLServer speak it) over HTTP/REST:
JSON tensors and the binary tensor data extension, for one served model.

The model has one input, named `input` (the logged signature's shape, batch first), and the outputs
`logits` (FP32, [batch, classes]), `predictions` (INT64, [batch]) and, for a version that names its classes,
`labels` (BYTES, [batch]: the predicted class names). The model metadata's `parameters` carry the class
names (`classes`, in the logits' order) and a tabular version's feature names (`features`, in the input's
order).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from triggers.serving.inference_threads import off_loop
from triggers.serving.inputs import BadInput, checked_cast, describe_value, format_value
from triggers.serving.requests import (INLINE_BYTES, REQUEST_ID, error_response, log_columns, new_request_id,
                                      predict_body_limit)

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
        raise BadInput("the inference request is not valid JSON", 400) from None
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


def _raw_tensor(tensor: dict[str, Any], binary: bytes, shape: tuple[int, ...], max_batch: int,
                kind: str) -> np.ndarray:
    """A BYTES tensor shaped [batch]: UTF-8 texts, or image files decoded to the version's pixels."""
    from triggers.serving import raw_inputs

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


def infer_response(model: str, version: str, request: InferRequest, logits: np.ndarray,
                   predictions: np.ndarray, classes: tuple[str, ...] = ()) -> tuple[bytes, dict[str, str]]:
    """The response body and headers: JSON, or JSON then the binary outputs that were asked for so.
    `classes`: the version's class names, for the `labels` output."""
    outputs, chunks = [], []
    for name, as_binary in request.outputs.items():
        data: Any
        if name == "labels":
            datatype, data = "BYTES", [classes[i] for i in predictions.tolist()]
            shape = [len(data)]
        else:
            datatype, data = ("FP32", np.ascontiguousarray(logits, dtype="<f4")) if name == "logits" else (
                "INT64", np.ascontiguousarray(predictions, dtype="<i8"))
            shape = list(data.shape)
        output: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if as_binary:
            chunk = bytes_tensor(data) if datatype == "BYTES" else data.tobytes()
            output["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            output["data"] = data if datatype == "BYTES" else data.reshape(-1)
        outputs.append(output)
    head = {"model_name": model, "model_version": version, "outputs": outputs}
    if request.id is not None:
        head["id"] = request.id
    header = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(chunks), {"Content-Type": "application/octet-stream",
                                        HEADER_LENGTH: str(len(header))}


def _cheap_to_parse(raw: bytes, header: str | None, kind: str) -> bool:
    """Parsed on the event loop: a small body, or a numeric tensor in binary form whatever its size (its JSON
    head is small and its data a zero-copy view: ~13 µs at batch 32, where a thread-pool hop costs ~0.4 ms).
    Images to decode and large JSON go to the thread pool."""
    if len(raw) <= INLINE_BYTES:
        return True
    return (kind == "tensor" and header is not None and header.isascii() and header.isdigit()
            and int(header) <= INLINE_BYTES)


def model_metadata(model: str, version: str, platform: str, shape: tuple[int, ...], dtype: str,
                   classes: int, class_names: tuple[str, ...] = (),
                   features: tuple[str, ...] | None = None, input_kind: str = "tensor") -> dict[str, Any]:
    """The protocol's model metadata; its `parameters` carry what the version's contract names: `classes`
    (the logits' order), `features` (a tabular input's order), each only when known, and `input_kind` for an
    image model (which also takes a BYTES tensor of PNG/JPEG files) or a text model (BYTES, UTF-8)."""
    metadata: dict[str, Any] = {
        "name": model, "versions": [version], "platform": platform,
        "inputs": [{"name": INPUT_NAME, "datatype": v2_datatype(dtype), "shape": [-1, *shape]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, classes]},
                    {"name": "predictions", "datatype": "INT64", "shape": [-1]}]}
    parameters: dict[str, Any] = {}
    if class_names:
        metadata["outputs"].append({"name": "labels", "datatype": "BYTES", "shape": [-1]})
        parameters["classes"] = list(class_names)
    if features is not None:
        parameters["features"] = list(features)
    if input_kind != "tensor":
        parameters["input_kind"] = input_kind
    if parameters:
        metadata["parameters"] = parameters
    return metadata




def add_routes(app: Any, server: Any, answer: Any, max_batch: int, inference_log: Any,
               errors: Any) -> list[tuple[str, Any]]:
    """The v2 routes on the serving app; `answer(served, x, request_id)` runs the model (batched or not, off
    the loop, rolling out or not) and says which version answered. Returns the inference routes, for the
    fast path (fast_path.py)."""
    from triggers.request_guard import BodyRefused, BodyTooLarge, read_body

    def served_for(name: str, version: str | None) -> Any:
        if name != server.model:
            return error_response(f"unknown model '{name}' (this server serves {server.model})", 404)
        served = server.current
        if served is None:
            return error_response(f"no version of {server.model} is loaded yet", 503)
        if version is not None and version != served.loaded.version:
            return error_response(f"version {version} of {name} is not served (serving {served.loaded.version})", 404)
        return served

    def ready() -> bool:
        candidate = server.candidate
        return server.current is not None and server.production in (
            server.current.loaded.version, candidate.loaded.version if candidate is not None else None)

    @app.get("/v2", summary="Open Inference Protocol: server metadata")
    def server_metadata() -> dict[str, Any]:
        from importlib.metadata import version

        return {"name": "mlgate", "version": version("mlgate"), "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live", summary="Open Inference Protocol: liveness")
    def live() -> Response:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready", summary="Open Inference Protocol: readiness (serving production)")
    def server_ready() -> Response:
        return JSONResponse({"ready": ready()}, 200 if ready() else 503)

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    def model_ready(name: str, version: str | None = None) -> Response:
        served = served_for(name, version)
        return served if isinstance(served, Response) else JSONResponse({"name": name, "ready": True})

    @app.get("/v2/models/{name}", summary="Open Inference Protocol: model metadata (from the logged signature)")
    @app.get("/v2/models/{name}/versions/{version}")
    def metadata(name: str, version: str | None = None) -> Response:
        served = served_for(name, version)
        if isinstance(served, Response):
            return served
        loaded = served.loaded
        return JSONResponse(model_metadata(server.model, loaded.version, f"mlgate_{loaded.served_as}",
                                           loaded.input_shape, loaded.dtype, served.classes, loaded.classes,
                                           loaded.features, loaded.input_kind))

    async def infer_route(name: str, version: str | None, request: Request) -> Response:
        served = served_for(name, version)
        if isinstance(served, Response):
            errors.labels("no_model").inc()
            return served
        loaded = served.loaded
        try:
            raw = await read_body(request, predict_body_limit(loaded.input_shape, max_batch, None, loaded.input_kind))
        except BodyTooLarge as exc:
            errors.labels("too_large").inc()
            return error_response(f"{exc}: at most {max_batch} examples per request", 413)
        except BodyRefused as exc:   # too slow: the connection is dropped, not held
            return exc.answer()
        header = request.headers.get(HEADER_LENGTH)
        args = (raw, header, loaded.input_shape, loaded.dtype, max_batch, bool(loaded.classes), loaded.input_kind)
        try:
            parsed = parse_infer(*args) if _cheap_to_parse(raw, header, loaded.input_kind) else \
                await off_loop(parse_infer, *args)
        except BadInput as exc:
            errors.labels("bad_input").inc()
            return error_response(str(exc), exc.status)
        request_id = new_request_id()
        logits, loaded = await answer(served, parsed.x, request_id)
        predictions = logits.argmax(axis=1)
        if inference_log is not None:
            inference_log.append(parsed.x, predictions, loaded.version, features=log_columns(loaded),
                                 classes=loaded.classes)
        # the version that answered may differ from the one parsed for (a rollout): its own class names
        if "labels" in parsed.outputs and not loaded.classes:
            parsed.outputs.pop("labels")
        body, headers = infer_response(server.model, loaded.version, parsed, logits, predictions, loaded.classes)
        return Response(body, headers=headers | {REQUEST_ID: request_id})

    @app.post("/v2/models/{name}/infer", summary="Open Inference Protocol: inference (JSON or binary tensors)")
    async def infer_latest(name: str, request: Request) -> Response:
        return await infer_route(name, None, request)

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer_version(name: str, version: str, request: Request) -> Response:
        return await infer_route(name, version, request)

    return [(r"/v2/models/([^/]+)/infer", infer_latest), (r"/v2/models/([^/]+)/versions/([^/]+)/infer", infer_version)]
