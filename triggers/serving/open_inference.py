"""The Open Inference Protocol (KServe v2, as Triton, KServe and MLServer speak it) over HTTP/REST:
JSON tensors and the binary tensor data extension, for one served model.

The model has one input, named `input` (the logged signature's shape, batch first), and the outputs
`logits` (FP32, [batch, classes]), `predictions` (INT64, [batch]) and, for a version that names its classes,
`labels` (BYTES, [batch]: the predicted class names). The model metadata's `parameters` carry the class
names (`classes`, in the logits' order) and a tabular version's feature names (`features`, in the input's
order).

The steps of an inference request are the data plane's (data_plane.py); `V2Codec` says what is particular to
the protocol, and the module's router holds its other routes (metadata, health).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from automation.predictors import RegisteredModel
from automation.wire.v2_tensors import (HEADER_LENGTH, INPUT_NAME, InferRequest, bytes_tensor,  # noqa: F401
                                        parse_infer, v2_datatype)
from triggers.serving.data_plane import Refused
from triggers.serving.health import serving_production
from triggers.serving.requests import INLINE_BYTES, REQUEST_ID, error_response, predict_body_limit


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
    head is small and its data a zero-copy view: ~13 µs at batch 32, where a thread-pool hop costs ~0.2 ms), an
    image model's pixels included: only a BYTES tensor (image files, whose head names that datatype) has files to
    decode. Image files, texts and large JSON go to the thread pool."""
    if len(raw) <= INLINE_BYTES:
        return True
    # a header of thousands of digits is not converted here (past 4,300 Python refuses): parse_infer words it
    if header is None or not (len(header) <= 8 and header.isascii() and header.isdigit()) or \
            (split := int(header)) > INLINE_BYTES:
        return False
    return kind == "tensor" or (kind == "image" and raw.find(b'"BYTES"', 0, split) < 0)


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


class V2Codec:
    timed = False

    def resolve(self, server: Any, name: str, version: str | None = None) -> Any:
        if name != server.model:
            raise Refused(f"unknown model '{name}' (this server serves {server.model})", 404, "no_model")
        served = server.current
        if served is None:
            raise Refused(f"no version of {server.model} is loaded yet", 503, "no_model")
        if version is not None and version != served.loaded.version:
            raise Refused(f"version {version} of {name} is not served (serving {served.loaded.version})", 404,
                          "no_model")
        return served

    def body_limit(self, loaded: RegisteredModel, max_batch: int) -> int:
        return predict_body_limit(loaded.input_shape, max_batch, None, loaded.input_kind)

    def inline(self, raw: bytes, request: Request, loaded: RegisteredModel) -> bool:
        return _cheap_to_parse(raw, request.headers.get(HEADER_LENGTH), loaded.input_kind)

    def decode(self, raw: bytes, request: Request, loaded: RegisteredModel, max_batch: int) -> InferRequest:
        return parse_infer(raw, request.headers.get(HEADER_LENGTH), loaded.input_shape, loaded.dtype, max_batch,
                           bool(loaded.classes), loaded.input_kind)

    def encode(self, model: str, decoded: InferRequest, logits: np.ndarray, predictions: np.ndarray,
               loaded: RegisteredModel, request_id: str) -> Response:
        # the version that answered may differ from the one parsed for (a rollout): its own class names
        if "labels" in decoded.outputs and not loaded.classes:
            decoded.outputs.pop("labels")
        body, headers = infer_response(model, loaded.version, decoded, logits, predictions, loaded.classes)
        return Response(body, headers=headers | {REQUEST_ID: request_id})


V2 = V2Codec()
router = APIRouter()


def _served(request: Request, name: str, version: str | None) -> Any:
    """The version a metadata or readiness request is about, or the error answer."""
    try:
        return V2.resolve(request.app.state.plane.server, name, version)
    except Refused as exc:
        return error_response(str(exc), exc.status)


@router.get("/v2", summary="Open Inference Protocol: server metadata")
def server_metadata() -> dict[str, Any]:
    from importlib.metadata import version

    return {"name": "mlgate", "version": version("mlgate"), "extensions": ["binary_tensor_data"]}


@router.get("/v2/health/live", summary="Open Inference Protocol: liveness")
def live() -> Response:
    return JSONResponse({"live": True})


@router.get("/v2/health/ready", summary="Open Inference Protocol: readiness (serving production)")
def server_ready(request: Request) -> Response:
    ready = serving_production(request.app.state.plane.server)
    return JSONResponse({"ready": ready}, 200 if ready else 503)


@router.get("/v2/models/{name}/ready")
@router.get("/v2/models/{name}/versions/{version}/ready")
def model_ready(request: Request, name: str, version: str | None = None) -> Response:
    served = _served(request, name, version)
    return served if isinstance(served, Response) else JSONResponse({"name": name, "ready": True})


@router.get("/v2/models/{name}", summary="Open Inference Protocol: model metadata (from the logged signature)")
@router.get("/v2/models/{name}/versions/{version}")
def metadata(request: Request, name: str, version: str | None = None) -> Response:
    served = _served(request, name, version)
    if isinstance(served, Response):
        return served
    loaded = served.loaded
    return JSONResponse(model_metadata(request.app.state.plane.server.model, loaded.version, f"mlgate_{loaded.served_as}", loaded.input_shape,
                                       loaded.dtype, served.classes, loaded.classes, loaded.features,
                                       loaded.input_kind))


@router.post("/v2/models/{name}/infer", summary="Open Inference Protocol: inference (JSON or binary tensors)")
async def infer_latest(name: str, request: Request) -> Response:
    return await request.app.state.plane.handle(V2, request, name)


@router.post("/v2/models/{name}/versions/{version}/infer")
async def infer_version(name: str, version: str, request: Request) -> Response:
    return await request.app.state.plane.handle(V2, request, name, version)


# for the fast path (fast_path.py): the whole path, its groups the handler's leading arguments
FAST_ROUTES = [(r"/v2/models/([^/]+)/infer", infer_latest), (r"/v2/models/([^/]+)/versions/([^/]+)/infer",
                                                            infer_version)]
