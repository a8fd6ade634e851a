"""OpenAI-style error responses of the scheduler.

Every error the scheduler itself produces has the shape vLLM's OpenAI server uses
(``{"error": {"message", "type", "param", "code"}}`` with ``code`` the HTTP status), so a client
sees the same error format whether the scheduler or an instance rejected its request. Errors an
instance returns (a 4xx from vLLM) are relayed unchanged.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    408: "RequestTimeoutError",
    413: "RequestEntityTooLargeError",
    415: "UnsupportedMediaTypeError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class ApiError(Exception):
    """An error answered to the client as OpenAI-style JSON (or an SSE error event mid-stream)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or _TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
        self.param = param
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict()).encode()

    def anthropic_dict(self) -> dict[str, Any]:
        """The error in Anthropic's shape, for ``/v1/messages`` clients, with the error type names
        vLLM's Anthropic handler uses (``BadRequestError``, ``NotFoundError``, ...)."""
        return {"type": "error", "error": {"type": self.type, "message": self.message}}

    def response(self, request_id: str | None = None, anthropic: bool = False) -> web.Response:
        headers = dict(self.headers)
        if request_id:
            headers["X-Request-Id"] = request_id
        body = json.dumps(self.anthropic_dict()).encode() if anthropic else self.to_bytes()
        return web.Response(status=self.status, body=body, content_type="application/json", headers=headers)

    def sse_event(self) -> bytes:
        """The error as one SSE event, as vLLM emits it when a stream fails after it started."""
        return b"data: " + self.to_bytes() + b"\n\n"


class UpstreamClientError(Exception):
    """An instance rejected the request with a 4xx: relayed to the client as is (it is the
    client's fault, e.g. a prompt longer than the model's context), never retried."""

    def __init__(self, status: int, body: bytes, content_type: str | None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body
        self.content_type = content_type or "application/json"

    def response(self, request_id: str | None = None) -> web.Response:
        headers = {"X-Request-Id": request_id} if request_id else {}
        resp = web.Response(status=self.status, body=self.body, headers=headers)
        resp.content_type = self.content_type.split(";")[0]
        return resp


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist.", param="model")


def overloaded(message: str, retry_after: float) -> ApiError:
    secs = max(1, int(retry_after + 0.999))
    return ApiError(429, message, headers={"Retry-After": str(secs)})


class ClientStalled(ConnectionResetError):
    """The client kept its connection open but stopped reading for ``--idle-timeout``.

    aiohttp waits for a full socket buffer to drain without a limit, so such a client would hold
    its admission and instance slots until shutdown; the scheduler aborts its connection instead.
    Raised as a ConnectionResetError so it ends like any other client that left (a 499).
    """
