"""``GET /pdserve/v1/identity`` inside vLLM's OpenAI server (loaded with ``--middleware``).

vLLM 0.32 adds a ``--middleware`` class with ``app.add_middleware`` (a coroutine function would be
wrapped by Starlette's ``BaseHTTPMiddleware``, which buffers and re-wraps every response, streams
included). This is a pure ASGI class instead: one string comparison per request, and every other
request -- SSE streams, websockets, lifespan -- goes to vLLM untouched.

The answer is built once from the ``PDSERVE_*`` variables the role daemon sets for its child
(:mod:`pdserve.identity`), so the scheduler can check that a port in NODE_PORTS really is the
instance the ranktable says it is.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from pdserve.identity import IDENTITY_PATH, identity_from_env

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def identity_body(environ: dict[str, str] | None = None) -> bytes:
    """The JSON document of this instance's identity."""
    return json.dumps(identity_from_env(environ).model_dump()).encode("utf-8")


class IdentityMiddleware:
    """Answers the identity path itself; passes everything else through unchanged."""

    def __init__(self, app: ASGIApp, environ: dict[str, str] | None = None) -> None:
        self.app = app
        # the env does not change after start; a bad PDSERVE_* value fails at start, not per request
        self._body = identity_body(environ)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != IDENTITY_PATH:
            await self.app(scope, receive, send)
            return
        if scope.get("method") not in ("GET", "HEAD"):
            await _respond(send, 405, b'{"error": "method not allowed; use GET"}', [(b"allow", b"GET, HEAD")])
            return
        body = self._body if scope.get("method") == "GET" else b""
        await _respond(send, 200, body, [], length=len(self._body))


async def _respond(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]],
                   length: int | None = None) -> None:
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body) if length is None else length).encode()),
               (b"cache-control", b"no-store"), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# pdserve/identity.py's docstring names this spelling; keep both importable (same class).
identity_middleware = IdentityMiddleware
