"""The identity middleware, called as a plain ASGI app (no server)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pdserve import identity as ident
from pdserve.worker.middleware import IdentityMiddleware, identity_middleware

pytestmark = pytest.mark.unit

ENV = {ident.ENV_ROLE: "decode", ident.ENV_INDEX: "1", ident.ENV_GLOBAL_INDEX: "3", ident.ENV_DIGEST: "abc",
       ident.ENV_SERVER_IP: "127.0.0.1", ident.ENV_DEVICES: "1", ident.ENV_MODEL: "demo",
       ident.ENV_SIDE_CHANNEL: "127.0.0.1:18201"}


class Inner:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        self.calls.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-inner", b"1")]})
        await send({"type": "http.response.body", "body": b"inner", "more_body": False})


async def call(app: Any, path: str, method: str = "GET", type_: str = "http") -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg: dict) -> None:
        sent.append(msg)

    await app({"type": type_, "path": path, "method": method, "headers": []}, receive, send)
    return sent


async def test_identity_answer() -> None:
    inner = Inner()
    sent = await call(IdentityMiddleware(inner, ENV), ident.IDENTITY_PATH)
    assert not inner.calls
    assert sent[0]["status"] == 200 and (b"content-type", b"application/json") in sent[0]["headers"]
    body = json.loads(sent[1]["body"])
    assert body == ident.identity_from_env(ENV).model_dump()
    assert body["role"] == "decode" and body["global_index"] == 3 and body["kv_side_channel"] == "127.0.0.1:18201"


async def test_reads_process_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    sent = await call(identity_middleware(Inner()), ident.IDENTITY_PATH)
    assert json.loads(sent[1]["body"])["ranktable_digest"] == "abc"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/health", "/pdserve/v1/identityx", "/"])
async def test_everything_else_passes_through(path: str) -> None:
    inner = Inner()
    sent = await call(IdentityMiddleware(inner, ENV), path, method="POST")
    assert len(inner.calls) == 1 and inner.calls[0]["path"] == path
    assert sent[1]["body"] == b"inner"


async def test_non_http_scopes_pass_through() -> None:
    inner = Inner()
    await call(IdentityMiddleware(inner, ENV), ident.IDENTITY_PATH, type_="websocket")
    assert len(inner.calls) == 1


async def test_wrong_method_and_head() -> None:
    sent = await call(IdentityMiddleware(Inner(), ENV), ident.IDENTITY_PATH, method="POST")
    assert sent[0]["status"] == 405
    sent = await call(IdentityMiddleware(Inner(), ENV), ident.IDENTITY_PATH, method="HEAD")
    assert sent[0]["status"] == 200 and sent[1]["body"] == b""


def test_vllm_loads_it_as_a_class() -> None:
    import inspect

    assert inspect.isclass(IdentityMiddleware)  # vLLM: class -> app.add_middleware (pure ASGI)


def test_with_starlette() -> None:
    starlette = pytest.importorskip("starlette")
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    app = Starlette(routes=[Route("/health", lambda r: PlainTextResponse("ok"))])
    app.add_middleware(IdentityMiddleware)
    assert starlette
    with TestClient(app) as client:
        assert client.get("/health").text == "ok"
        assert client.get(ident.IDENTITY_PATH).json()["role"] in ("prefill", "decode")
