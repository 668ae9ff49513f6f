"""What every internet-facing request goes through before its body is trusted: a size limit enforced
while reading (never after), and a credential check (HMAC signature of the raw body, or a bearer
token), both compared in constant time."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import re
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

SIGNATURE_HEADER = "X-Mlgate-Signature-256"   # mlgate's own signed requests (drift events, runner results)
KiB, MiB = 1024, 1024 * 1024
WEBHOOK_LIMIT = 25 * MiB      # GitHub caps webhook payloads at 25 MB
EVENT_LIMIT = 64 * KiB        # a drift CloudEvent is a few KB
RESULT_LIMIT = 8 * MiB        # a runner's summary plus its HTML report


# every body must arrive within this: a client that trickles bytes holds a connection and its buffer
BODY_TIMEOUT_SECONDS = 20.0
# unauthenticated bytes buffered at once, across connections (webhooks and drift events, before their
# signature is checked): past it, a new body is refused with 503 rather than held
UNVERIFIED_BUDGET = 64 * MiB
# and from one peer (client address): one sender cannot take the whole budget and starve GitHub's deliveries.
# Above WEBHOOK_LIMIT, so that one genuine delivery of GitHub's largest size always fits.
UNVERIFIED_PEER_BUDGET = 32 * MiB
# `sha256=` + 64 lower-case hex digits, as GitHub and `sign` write it: anything else is refused unread
SIGNATURE_FORMAT = re.compile(r"sha256=[0-9a-f]{64}", re.ASCII)


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the body is larger than {limit:,} bytes")
        self.limit = limit


class BodyRefused(Exception):
    """The body did not arrive in time, or too many unauthenticated bytes are buffered (the status says which)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status

    def answer(self) -> JSONResponse:
        """`{"error": …}`, closing the connection: its unread rest is never waited for."""
        return JSONResponse({"error": str(self)}, self.status, headers={"Connection": "close"})


class SignatureRefused(BodyRefused):
    """The signature header is missing (401) or cannot be a signature (400): refused before the body is read."""


class _Unverified:
    """Unauthenticated body bytes buffered now, in all and per peer (one event loop per process: no lock)."""

    def __init__(self) -> None:
        self.total = 0
        self.by_peer: dict[str, int] = {}

    def take(self, peer: str, size: int) -> None:
        """Count `size` more bytes from `peer`, or refuse them when a budget would be passed."""
        held = self.by_peer.get(peer, 0)
        if held + size > UNVERIFIED_PEER_BUDGET:
            raise BodyRefused("too many unauthenticated bytes are in flight from your address; send it again "
                              "later", 429)
        if self.total + size > UNVERIFIED_BUDGET:
            raise BodyRefused("too many unauthenticated bytes are in flight; send it again later", 503)
        self.by_peer[peer] = held + size
        self.total += size

    def give_back(self, peer: str, size: int) -> None:
        self.total -= size
        left = self.by_peer.get(peer, 0) - size
        if left > 0:
            self.by_peer[peer] = left
        else:   # no entry per peer that ever sent: the map stays as small as what is in flight
            self.by_peer.pop(peer, None)


_unverified = _Unverified()


def peer_of(host: str) -> str:
    """Whose budget a connection spends: its IPv4 address, or its IPv6 /64 (one host is handed a whole /64, so
    one address each would let it open a budget per address)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:   # no address (a Unix socket, a test client): one shared budget
        return host or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def signature_refusal(request: Request, header: str) -> SignatureRefused | None:
    """Why `header` cannot authenticate this request's body, known before a byte of it is read; None when it
    has the form of a signature (whether it is one is known only once the body is whole)."""
    value = request.headers.get(header)
    if not value:
        return SignatureRefused(f"missing {header}", 401)
    if not SIGNATURE_FORMAT.fullmatch(value):
        return SignatureRefused(f"malformed {header}: expected sha256= and 64 lower-case hex digits", 400)
    return None


async def read_body(request: Request, limit: int, *, digest: Any = None, signed_by: str | None = None) -> bytes:
    """The raw body, refused as soon as it passes `limit`: a declared Content-Length over the limit is
    refused before a byte is read, and a chunked body is cut off as it streams. The whole body must come
    within BODY_TIMEOUT_SECONDS. `digest` (an hmac object) is fed each chunk as it arrives. `signed_by`: the
    header whose signature will authenticate the body; until then the body is unauthenticated, so it is read
    only when that header has a signature's form, and counts against the budgets while it is read."""
    declared = request.headers.get("content-length")
    if declared is not None and (not (declared.isascii() and declared.isdigit()) or int(declared) > limit):
        raise BodyTooLarge(limit)
    if signed_by is not None and (refusal := signature_refusal(request, signed_by)) is not None:
        raise refusal
    try:
        async with asyncio.timeout(BODY_TIMEOUT_SECONDS):
            return await _receive(request, limit, digest, signed_by is not None)
    except TimeoutError:
        raise BodyRefused(f"the body did not arrive within {BODY_TIMEOUT_SECONDS:g} s", 408) from None


async def _receive(request: Request, limit: int, digest: Any, unverified: bool) -> bytes:
    chunks, size, counted = [], 0, 0
    peer = peer_of(request.client.host if request.client else "") if unverified else ""
    try:
        while True:   # the ASGI messages themselves: Request.stream() does the same with more bookkeeping
            message = await request.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(limit)
            if unverified:
                _unverified.take(peer, len(chunk))
                counted += len(chunk)
            if digest is not None:
                digest.update(chunk)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        if counted:
            _unverified.give_back(peer, counted)


def unverified_bytes(peer: str | None = None) -> int:
    """Unauthenticated body bytes buffered now, across connections or from one peer (for tests and metrics)."""
    return _unverified.total if peer is None else _unverified.by_peer.get(peer, 0)


def hmac_sha256(secret: str) -> Any:
    """A running HMAC-SHA256 for `read_body(digest=…)`; `digest_ok` compares it once the body is whole."""
    return hmac.new(secret.encode(), digestmod=hashlib.sha256)


def digest_ok(secret: str, digest: Any, header: str | None) -> bool:
    """`sha256=` + the hex HMAC that `hmac_sha256(secret)` computed (streamed, or over a whole body), against
    the header, in constant time. No secret configured: nothing is genuine."""
    if not secret or not header or not header.startswith("sha256="):
        return False
    return hmac.compare_digest(("sha256=" + digest.hexdigest()).encode(), header.encode())


def sign(secret: str, body: bytes) -> str:
    digest = hmac_sha256(secret)
    digest.update(body)
    return "sha256=" + digest.hexdigest()


def signature_ok(secret: str, body: bytes, header: str | None) -> bool:
    """`sha256=` + hex HMAC-SHA256 of the raw body (GitHub's X-Hub-Signature-256 and mlgate's own)."""
    digest = hmac_sha256(secret)
    digest.update(body)
    return digest_ok(secret, digest, header)


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
    except (binascii.Error, ValueError):   # ValueError: not ASCII (a header arrives as latin-1); not UTF-8
        return False
    return hmac.compare_digest(token.encode(), password.encode())
