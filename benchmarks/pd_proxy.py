#!/usr/bin/env python
"""A minimal proxy of the kind vLLM's PD examples use (toy_proxy_server), for the comparison only.

  --mode pd  every request: POST the prefill server with max_tokens=1, stream=false and
             kv_transfer_params={"do_remote_decode": true, ...}; then POST the decode server with
             the original request + the kv_transfer_params the prefill answer returned, and relay
             its answer (SSE or JSON) chunk by chunk. Prefill and decode servers round-robin.
  --mode rr  every request goes whole to the next backend (round-robin), relayed chunk by chunk.

Nothing else: no validation, retries, health checks or metrics -- this stands for "vLLM's own
recipe", not for a production router. Loopback only.

    python benchmarks/pd_proxy.py --port 8000 --mode pd --prefill 127.0.0.1:8100 --decode 127.0.0.1:8200
    python benchmarks/pd_proxy.py --port 8000 --mode rr --backend 127.0.0.1:8100 --backend 127.0.0.1:8101
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from typing import Any

import aiohttp
from aiohttp import web

REMOTE_DECODE = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                 "remote_block_ids": None, "remote_host": None, "remote_port": None}


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill-side request: one token, no stream, ask the connector to keep the KV (pure)."""
    p = dict(body)
    p["max_tokens"] = 1
    if "max_completion_tokens" in p:
        p["max_completion_tokens"] = 1
    p["stream"] = False
    p.pop("stream_options", None)
    p["kv_transfer_params"] = dict(REMOTE_DECODE)
    return p


def decode_body(body: dict[str, Any], prefill_answer: dict[str, Any]) -> dict[str, Any]:
    d = dict(body)
    kv = prefill_answer.get("kv_transfer_params")
    if kv:
        d["kv_transfer_params"] = kv
    return d


def build_app(mode: str, prefill: list[str], decode: list[str], backends: list[str]) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    cycles = {"p": itertools.cycle(prefill or [""]), "d": itertools.cycle(decode or [""]),
              "b": itertools.cycle(backends or [""])}
    state: dict[str, aiohttp.ClientSession] = {}

    async def on_startup(_app: web.Application) -> None:
        state["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                           timeout=aiohttp.ClientTimeout(total=None), trust_env=False)

    async def on_cleanup(_app: web.Application) -> None:
        await state["s"].close()

    async def relay(request: web.Request, url: str, body: dict[str, Any]) -> web.StreamResponse:
        async with state["s"].post(url, json=body) as up:
            resp = web.StreamResponse(status=up.status, headers={
                "Content-Type": up.headers.get("Content-Type", "application/json")})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        path = request.path
        if mode == "rr":
            return await relay(request, f"http://{next(cycles['b'])}{path}", body)
        async with state["s"].post(f"http://{next(cycles['p'])}{path}", json=prefill_body(body)) as r:
            text = await r.text()
            if r.status != 200:
                return web.Response(status=r.status, text=text, content_type="application/json")
        return await relay(request, f"http://{next(cycles['d'])}{path}", decode_body(body, json.loads(text)))

    async def models(_request: web.Request) -> web.StreamResponse:
        target = next(cycles["b"]) if mode == "rr" else next(cycles["d"])
        async with state["s"].get(f"http://{target}/v1/models") as r:
            return web.Response(status=r.status, body=await r.read(), content_type="application/json")

    async def health(_request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok")

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_post("/v1/completions", handle)
    app.router.add_post("/v1/chat/completions", handle)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="minimal PD / round-robin proxy (benchmark baseline)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=("pd", "rr"), required=True)
    p.add_argument("--prefill", action="append", default=[], metavar="HOST:PORT")
    p.add_argument("--decode", action="append", default=[], metavar="HOST:PORT")
    p.add_argument("--backend", action="append", default=[], metavar="HOST:PORT")
    a = p.parse_args(argv)
    if a.mode == "pd" and not (a.prefill and a.decode):
        p.error("--mode pd needs --prefill and --decode")
    if a.mode == "rr" and not a.backend:
        p.error("--mode rr needs --backend")
    web.run_app(build_app(a.mode, a.prefill, a.decode, a.backend), host=a.host, port=a.port,
                access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
