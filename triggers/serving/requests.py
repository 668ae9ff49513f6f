"""What every serving request shares, whichever route it comes by (`POST /predict` in predict_route.py, the Open
Inference Protocol's `/v2/…/infer` in open_inference.py, both through data_plane.py; `POST /feedback` in
feedback.py): the id an answer carries, the limits on a request body, the feedback token, and the shape of an error
answer.

It imports none of those modules, so each of them can import it at the top.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from typing import Any

from fastapi.responses import JSONResponse

REQUEST_ID = "X-Request-Id"    # every answer's id, for the labels that come back later
INLINE_BYTES = 16 * 1024    # a request body up to this is parsed on the event loop (tens of µs); larger, off it
FEEDBACK_TOKEN_ENV = "MLGATE_FEEDBACK_TOKEN"

_ID_PREFIX, _ID_COUNTER = os.urandom(6).hex(), itertools.count()


def new_request_id() -> str:
    """The id a client sends its labels back under (`POST /feedback`): unique per process (a counter) and
    across processes and replicas (48 random bits per process)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):x}"


@functools.lru_cache(maxsize=64)   # asked for every request, the same few versions' answers
def predict_body_limit(input_shape: tuple[int, ...], max_batch: int,
                       features: tuple[str, ...] | None = None, input_kind: str = "tensor") -> int:
    """The largest body a valid request can have: every number written out in full (~24 bytes as JSON), and
    with records, every feature's name beside it; for text, a fixed bound; an image file as large as allowed
    (base64)."""
    from automation.wire import raw_inputs

    if input_kind == "text":
        return raw_inputs.MAX_TEXT_BODY
    per_example = math.prod(input_shape) * 24
    if input_kind == "image":   # pixels as numbers, or files as base64
        per_example = max(per_example, raw_inputs.image_file_limit(input_shape) * 4 // 3 + 64)
        return min(max_batch * per_example + 4096, raw_inputs.MAX_IMAGE_BODY)
    if features is not None:
        per_example = max(per_example, sum(len(name.encode()) * 6 + 32 for name in features))   # \uXXXX escapes
    return max_batch * per_example + 4096


def feedback_token() -> str:
    """The bearer token POST /feedback checks labels against; empty: feedback is off."""
    return os.environ.get(FEEDBACK_TOKEN_ENV, "")


def feedback_enabled() -> bool:
    return bool(feedback_token())


def error_response(message: str, status: int) -> JSONResponse:
    """A refused request's answer: `{"error": message}` with the HTTP status."""
    return JSONResponse({"error": message}, status)


def log_columns(loaded: Any) -> tuple[str, ...] | None:
    """The inference log's input columns: a text model logs its texts whole, in one `text` column."""
    return ("text",) if loaded.input_kind == "text" else loaded.features
