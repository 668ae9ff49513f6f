"""`POST /feedback`: labels that come back after the answer, under the id the answer carried
(`X-Request-Id`, and `id` in `/predict`'s body). During a rollout they score both versions on the same
examples, and the rollout judges accuracy too.

Labels steer a rollback, so the endpoint is off unless `MLGATE_FEEDBACK_TOKEN` is set, and then takes
only `Authorization: Bearer <token>`, checked before the body is read; the body is size-limited as it
is read.

    {"labels": [{"id": "<request id>", "labels": [3, 1]}, {"id": "…", "label": 7}]}
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from triggers.request_guard import MiB, BodyRefused, BodyTooLarge, bearer_ok, read_body
from automation.wire.json_inputs import BadInput
from triggers.serving.requests import FEEDBACK_TOKEN_ENV, error_response, feedback_token

FEEDBACK_LIMIT = 2 * MiB
MAX_ITEMS = 10_000
MAX_ID = 64


def parse_feedback(raw: bytes, max_batch: int) -> list[tuple[str, list[int]]]:
    """The body → (request id, labels) pairs; BadInput names the first thing wrong."""
    try:
        body = orjson.loads(raw)
    except (ValueError, RecursionError):
        raise BadInput("the body is not valid JSON", 400) from None
    items = body.get("labels") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        raise BadInput('the body must be a JSON object with "labels": a list of {"id": …, "labels": […]}')
    if len(items) > MAX_ITEMS:
        raise BadInput(f"{len(items)} items is over the limit of {MAX_ITEMS} per request", 413)
    parsed: dict[str, list[int]] = {}
    for position, item in enumerate(items):
        where = f"labels[{position}]"
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not 0 < len(item["id"]) <= MAX_ID:
            raise BadInput(f'{where} needs "id": the request id an answer carried (at most {MAX_ID} characters)')
        labels = item.get("labels", [item["label"]] if "label" in item else None)
        if not isinstance(labels, list) or not 0 < len(labels) <= max_batch or not all(
                isinstance(label, int) and not isinstance(label, bool) and label >= 0 for label in labels):
            raise BadInput(f'{where} needs "label" (a class) or "labels" (one class per example of the request)')
        if item["id"] in parsed:
            raise BadInput(f"{where}: request id {item['id']} appears twice")
        parsed[item["id"]] = labels
    return list(parsed.items())


def add_route(app: Any, server: Any, max_batch: int) -> None:
    token = feedback_token()

    @app.post("/feedback", summary="Delayed labels for answered requests (bearer token)")
    async def feedback(request: Request) -> Response:
        if not token:
            return error_response(f"feedback is off: start serve-model with {FEEDBACK_TOKEN_ENV} set", 404)
        if not bearer_ok(token, request.headers.get("authorization")):
            return error_response("feedback needs Authorization: Bearer <MLGATE_FEEDBACK_TOKEN>", 401)
        try:
            raw = await read_body(request, FEEDBACK_LIMIT)
            labels = parse_feedback(raw, max_batch)
        except BodyTooLarge as exc:
            return error_response(str(exc), 413)
        except BodyRefused as exc:   # too slow: the connection is dropped, not held
            return exc.answer()
        except BadInput as exc:
            return error_response(str(exc), exc.status)
        result = await run_in_threadpool(record, server, labels)
        return JSONResponse(result.as_dict())


def record(server: Any, labels: list[tuple[str, list[int]]]) -> Any:
    from triggers.serving.rollout import record_feedback

    if server.tally is not None:   # this replica's latest predictions first, so a quick label finds its request
        server.tally.flush(server.engine())
    return record_feedback(server.engine(), server.rollout_key, labels)
