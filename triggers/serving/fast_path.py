"""The inference routes skip FastAPI's routing and dependency machinery.

At batch 1 the model takes tens of microseconds and the web framework most of the rest: route matching,
dependency solving, the exception and exit-stack layers cost more than parsing and answering the request.
This ASGI wrapper, outside the FastAPI app, hands `POST /predict` and `POST /v2/models/…/infer` straight
to their handlers (the same functions FastAPI lists in its OpenAPI page); every other request, and the
lifespan, goes through FastAPI. An unexpected error in a handler is answered 500 and logged, as FastAPI
would. Attributes (`state`, `router`) are the FastAPI app's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[Response]]


class InferenceFastPath:
    """`routes`: (a regular expression for the whole path, whose groups are the handler's leading arguments;
    the handler, which takes them and then the request)."""

    def __init__(self, app: Any, routes: list[tuple[str, Handler]]) -> None:
        self.app = app
        self.routes = [(re.compile(pattern), handler) for pattern, handler in routes]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            for pattern, handler in self.routes:
                match = pattern.fullmatch(scope["path"])
                if match:
                    scope["app"] = self.app   # what FastAPI would set: a handler finds the data plane there
                    try:
                        response = await handler(*match.groups(), Request(scope, receive))
                    except Exception as exc:
                        log.error("inference request failed", exc_info=True,
                                  extra={"path": scope["path"], "error": f"{type(exc).__name__}: {exc}"})
                        response = JSONResponse({"error": "internal error"}, 500)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)
