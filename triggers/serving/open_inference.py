"""The Open Inference Protocol (KServe v2, as Triton, KServe and MLServer speak it) over HTTP/REST:
JSON tensors and the binary tensor data extension, for one served model.

The model has one input, named `input` (the logged signature's shape, batch first), and the outputs
`logits` (FP32, [batch, classes]), `predictions` (INT64, [batch]) and, for a version that names its classes,
`labels` (BYTES, [batch]: the predicted class names). The model metadata's `parameters` carry the class
names (`classes`, in the logits' order) and a tabular version's feature names (`features`, in the input's
order).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from triggers.serving.inference_threads import off_loop
from automation.wire.json_inputs import BadInput
from automation.wire.v2_tensors import (HEADER_LENGTH, INPUT_NAME, InferRequest, bytes_tensor,  # noqa: F401
                                     parse_infer, v2_datatype)
from triggers.serving.requests import (INLINE_BYTES, REQUEST_ID, error_response, log_columns, new_request_id,
                                      predict_body_limit)

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
