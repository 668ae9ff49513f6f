"""What every internet-facing request goes through before its body is trusted: a size limit enforced
while reading (never after), and a credential check (HMAC signature of the raw body, or a bearer
token), both compared in constant time."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request
from starlette.requests import ClientDisconnect

SIGNATURE_HEADER = "X-Mlgate-Signature-256"   # mlgate's own signed requests (drift events, runner results)
KiB, MiB = 1024, 1024 * 1024
WEBHOOK_LIMIT = 25 * MiB      # GitHub caps webhook payloads at 25 MB
EVENT_LIMIT = 64 * KiB        # a drift CloudEvent is a few KB
RESULT_LIMIT = 8 * MiB        # a runner's summary plus its HTML report


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the body is larger than {limit:,} bytes")
        self.limit = limit


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused as soon as it passes `limit`: a declared Content-Length over the limit is
    refused before a byte is read, and a chunked body is cut off as it streams."""
    declared = request.headers.get("content-length")
    if declared is not None and (not (declared.isascii() and declared.isdigit()) or int(declared) > limit):
        raise BodyTooLarge(limit)
    chunks, size = [], 0
    while True:   # the ASGI messages themselves: Request.stream() does the same with more bookkeeping
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signature_ok(secret: str, body: bytes, header: str | None) -> bool:
    """`sha256=` + hex HMAC-SHA256 of the raw body (GitHub's X-Hub-Signature-256 and mlgate's own)."""
    if not secret or not header or not header.startswith("sha256="):
        return False
    return hmac.compare_digest(sign(secret, body), header)


def bearer_ok(token: str, header: str | None) -> bool:
    if not token or not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(token.encode(), header.removeprefix("Bearer ").encode())


def reader_ok(token: str, header: str | None) -> bool:
    """The optional read token: `Authorization: Bearer <token>` for API clients, or HTTP Basic with the token
    as the password, which a browser asks for once and then sends with the dashboard's own requests."""
    if bearer_ok(token, header):
        return True
    if not token or not header or not header.startswith("Basic "):
        return False
    import base64
    import binascii

    try:
        _, _, password = base64.b64decode(header.removeprefix("Basic "), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return hmac.compare_digest(token.encode(), password.encode())
