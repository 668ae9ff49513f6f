"""`POST /predict`: mlgate's own JSON body (`{"inputs": [example, …]}`) in, predictions, labels, probabilities and
logits out. The steps are the data plane's (data_plane.py); this module says what is particular to the route."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from automation.predictors import RegisteredModel
from automation.wire.json_inputs import BadInput, class_names, predicted_probabilities
from automation.wire.predict import parse_predict
from triggers.serving.data_plane import Refused
from triggers.serving.requests import INLINE_BYTES, REQUEST_ID, predict_body_limit

DESCRIPTION = """Examples are arrays shaped like the version's input (`GET /healthz`: `input_shape`), or, for a
tabular version that names its features, records keyed by feature name:
`{"inputs": [{"alcohol": 14.2, "malic_acid": 1.7, …}, …]}`. Values are raw (pre-processing is inside the model).
An image version (`/healthz`, `/v2` metadata: `input_kind` image) takes uint8 pixels, or PNG/JPEG files as
`{"b64": "…"}`; a text version takes strings, `{"inputs": ["…", …]}`, through the tokenizer it was trained with.

The answer: `predictions` (class indices), `labels` (class names; absent for versions logged without them),
`probabilities` (each example's softmax probability of its predicted class), `logits` (one per class), `id`
(also the `X-Request-Id` header, for `POST /feedback`), `model`, `version`, `variant`.

A value that is not a number (null, a boolean, a string), a value out of the input type's range, a missing or
unknown feature, or a wrong shape is answered 422 with one line naming the example and where."""


@dataclass
class PredictRequest:
    x: np.ndarray


class PredictCodec:
    timed = True

    def resolve(self, server: Any) -> Any:
        served = server.current
        if served is None:
            raise Refused(f"no production version of {server.model} is loaded yet", 503, "no_model")
        return served

    def body_limit(self, loaded: RegisteredModel, max_batch: int) -> int:
        return predict_body_limit(loaded.input_shape, max_batch, loaded.features, loaded.input_kind)

    def inline(self, raw: bytes, request: Request, loaded: RegisteredModel) -> bool:
        return len(raw) <= INLINE_BYTES

    def decode(self, raw: bytes, request: Request, loaded: RegisteredModel, max_batch: int) -> PredictRequest:
        try:
            return PredictRequest(parse_predict(raw, loaded.input_kind, loaded.input_shape, loaded.dtype, max_batch,
                                                loaded.features))
        except (ValueError, RecursionError) as exc:
            raise exc if isinstance(exc, BadInput) else BadInput("the body is not valid JSON", 400) from None

    def encode(self, model: str, decoded: PredictRequest, logits: np.ndarray, predictions: np.ndarray,
               loaded: RegisteredModel, request_id: str) -> Response:
        body: dict[str, Any] = {"id": request_id, "model": model, "version": loaded.version,
                                "variant": loaded.variant, "predictions": np.ascontiguousarray(predictions)}
        if loaded.classes:   # versions logged before mlgate kept class names answer without labels
            body["labels"] = class_names(loaded.classes, predictions)
        body["probabilities"] = predicted_probabilities(logits)   # float32: its shortest digits
        body["logits"] = np.ascontiguousarray(np.round(logits, 5))
        return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json",
                        headers={REQUEST_ID: request_id})


PREDICT = PredictCodec()
router = APIRouter()


@router.post("/predict", summary="Predict a batch: {\"inputs\": [example, …]} → predictions, labels, probabilities, "
             "logits", description=DESCRIPTION)
async def predict_endpoint(request: Request) -> Response:
    return await request.app.state.plane.handle(PREDICT, request)


FAST_ROUTES = [("/predict", predict_endpoint)]
