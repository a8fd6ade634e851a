"""FakeInstance: an engine-less TEST DOUBLE of a prefill/decode instance (vLLM's OpenAI server
with a KV connector). Never used for serving.

It speaks what the scheduler talks to — /v1/completions and /v1/chat/completions (stream and
non-stream, n>1, usage with prompt_tokens_details.cached_tokens from a simulated prefix cache),
the kv_transfer_params hand-over (as prefill it answers fake block ids / engine id / host / port,
as decode it requires and records them), /pdserve/v1/identity, /health, /v1/models — and it
records every request it got, including whether the client closed the connection before the
answer ended (that is how the scheduler aborts work).

Latency (time to first token, time per token) and failures (HTTP error, hang, dying mid-stream,
dropping connections, failing health, a malformed answer) are switchable at runtime:
``POST /_fake/config`` with a JSON object of :class:`FakeConfig` fields, or
``instance.config.<field> = ...`` in-process.
``GET /_fake/requests`` lists the recorded requests (``raw``: the request's bytes exactly as
received, listed as UTF-8 text), ``DELETE /_fake/requests`` clears them.

Run: ``python -m pdserve.testing.fake_instance --port 8001 --role prefill --index 0``.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from pdserve.identity import IDENTITY_PATH


@dataclass
class FakeConfig:
    ttft: float = 0.0  # seconds before the first token (prefill: before the answer)
    token_latency: float = 0.0  # seconds per further token
    output_tokens: int | None = None  # tokens generated; default max_tokens (or 16)
    fail_status: int | None = None  # answer inference requests with this HTTP status
    fail_times: int = -1  # how many requests fail_status applies to (-1: all)
    hang: bool = False  # accept inference requests and never answer
    die_after_tokens: int | None = None  # drop the connection after N tokens (0: before any answer)
    refuse: bool = False  # drop every inference connection at once
    healthy: bool = True  # /health: 200 or 503
    return_kv_params: bool = True  # prefill: answer kv_transfer_params
    require_kv_params: bool = True  # decode: 400 when kv_transfer_params are missing
    block_size: int = 4  # simulated prefix-cache block, in (whitespace) tokens
    kv_port: int = 0  # prefill: the side-channel port its kv_transfer_params name (0: 20000 + index)
    api_key: str | None = None  # like vLLM --api-key: /v1/* need "Authorization: Bearer <key>"
    identity: dict[str, Any] = field(default_factory=dict)  # override identity fields
    # answer inference requests with HTTP 200 and exactly this body (a malformed answer: invalid
    # JSON, no choices, an empty stream, a stream without [DONE]); None: a normal answer
    raw_answer: str | None = None
    # LoRA adapters served (name -> path), listed in /v1/models with the model as parent and
    # accepted as a request's model; with runtime_lora, /v1/load_lora_adapter and
    # /v1/unload_lora_adapter edit them (without, those routes answer FastAPI's 404, as vLLM
    # without VLLM_ALLOW_RUNTIME_LORA_UPDATING); lora_fail_status fails every load with it
    lora_adapters: dict[str, str] = field(default_factory=dict)
    runtime_lora: bool = False
    lora_fail_status: int | None = None
    lora_unload_fail_status: int | None = None  # fail every unload with it
    lora_load_delay: float = 0.0  # seconds a load takes; it completes even if the caller left, as in vLLM


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _words(text: str) -> list[str]:
    return text.split()


OUTPUT_ID_BASE = 1_000_000  # token id of output token k is OUTPUT_ID_BASE + k


def _token_id(tok: str) -> int:
    """A stable stand-in id for a prompt word (output tokens have their own range)."""
    if tok.isascii() and tok.isdigit():
        return int(tok)
    return int.from_bytes(hashlib.blake2b(tok.encode(), digest_size=3).digest(), "big")


def _prompt_tokens(path: str, body: dict[str, Any]) -> list[str]:
    """A deterministic stand-in for tokenization: whitespace words (token ids as themselves)."""
    if path.endswith("/messages") or path.endswith("/count_tokens"):  # Anthropic's: system, then text blocks
        items = ([{"role": "system", "content": body["system"]}] if body.get("system") else []) + \
            [{"role": m.get("role"), "content": m.get("content") if isinstance(m.get("content"), str) else
              " ".join(b.get("text", "") for b in m.get("content") or () if isinstance(b, dict))}
             for m in body.get("messages") or () if isinstance(m, dict)]
        return _prompt_tokens("chat/completions", {"messages": items})
    if path.endswith("/responses"):
        inp = body.get("input")
        items = [{"role": "user", "content": inp}] if isinstance(inp, str) else inp if isinstance(inp, list) else []
        return _prompt_tokens("chat/completions", {"messages": items})
    if path.endswith("chat/completions"):
        toks: list[str] = []
        for m in body.get("messages") or ():
            toks.append(f"<{m.get('role')}>")
            c = m.get("content")
            toks.extend(_words(c) if isinstance(c, str) else _words(json.dumps(c)))
        return toks
    p = body.get("prompt")
    if isinstance(p, str):
        return _words(p)
    if isinstance(p, list) and p:
        if isinstance(p[0], str):
            return _words(p[0])
        if isinstance(p[0], int):
            return [str(t) for t in p]
        if isinstance(p[0], list):
            return [str(t) for t in p[0]]
    return []


class FakeInstance:
    """One fake instance; ``await start()`` serves it on 127.0.0.1, or use ``app()`` in a TestServer."""

    def __init__(self, role: str = "prefill", index: int = 0, global_index: int | None = None, *,
                 model: str = "fake-model", digest: str = "", server_ip: str = "127.0.0.1",
                 max_model_len: int = 4096, **config: Any) -> None:
        self.role = role
        self.index = index
        self.global_index = index if global_index is None else global_index
        self.model = model
        self.digest = digest
        self.server_ip = server_ip
        self.max_model_len = max_model_len
        self.config = FakeConfig(**copy.deepcopy(config))  # no dict shared between instances
        self.requests: list[dict[str, Any]] = []
        self.port: int | None = None
        self._cache: set[bytes] = set()
        self._runner: web.AppRunner | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self._inference)
        app.router.add_post("/v1/chat/completions", self._inference)
        app.router.add_post("/v1/responses", self._inference)
        app.router.add_post("/v1/messages", self._inference)
        app.router.add_post("/v1/messages/count_tokens", self._tokenize)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/load_lora_adapter", self._load_lora)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_get("/version", self._version)
        app.router.add_post("/v1/unload_lora_adapter", self._unload_lora)
        app.router.add_get("/health", self._health)
        app.router.add_get(IDENTITY_PATH, self._identity)
        app.router.add_get("/_fake/requests", self._get_requests)
        app.router.add_delete("/_fake/requests", self._clear_requests)
        app.router.add_get("/_fake/config", self._get_config)
        app.router.add_post("/_fake/config", self._set_config)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeInstance:
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def configure(self, **changes: Any) -> None:
        for k, v in changes.items():
            if not hasattr(self.config, k):
                raise KeyError(f"FakeConfig has no field {k!r}")
            setattr(self.config, k, v)

    def inference_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"].endswith(("/completions", "/responses", "/messages"))]

    # -- small endpoints -------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.config.healthy else 503)

    async def _identity(self, request: web.Request) -> web.Response:
        ident = {"role": self.role, "index": self.index, "global_index": self.global_index,
                 "server_ip": self.server_ip, "device_ids": [], "ranktable_digest": self.digest,
                 "served_model_names": [self.model], "kv_side_channel": None}
        ident.update(self.config.identity)
        return web.json_response(ident)

    def _authorized(self, request: web.Request) -> bool:
        key = self.config.api_key
        return not key or request.headers.get("Authorization") == f"Bearer {key}"

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "Unauthorized"}, status=401)
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "fake", "root": f"/models/{self.model}",
             "max_model_len": self.max_model_len}] + [
            {"id": name, "object": "model", "created": 0, "owned_by": "fake", "root": path, "parent": self.model,
             "max_model_len": None} for name, path in self.config.lora_adapters.items()]})

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append({"path": request.path, "body": body})
        if body.get("model") not in (None, self.model, *self.config.lora_adapters):
            return self._error(404, f"The model `{body.get('model')}` does not exist.")
        if request.path.endswith("/count_tokens"):  # Anthropic's
            return web.json_response({"input_tokens": len(_prompt_tokens(request.path, body))})
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        ids = [_token_id(t) for t in _prompt_tokens(path, body)]
        return web.json_response({"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids,
                                  "token_strs": None})

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": f"fake-{self.role}{self.index}"})

    async def _load_lora(self, request: web.Request) -> web.Response:
        self.requests.append({"path": request.path, "body": await request.json()})
        if not self.config.runtime_lora:
            return web.json_response({"detail": "Not Found"}, status=404)
        body = self.requests[-1]["body"]
        name = body["lora_name"]
        if self.config.lora_fail_status is not None:
            return self._error(self.config.lora_fail_status, f"injected failure loading {name}")
        if name in self.config.lora_adapters and not body.get("load_inplace"):
            return self._error(400, f"The lora adapter '{name}' has already been loaded.")

        async def load() -> None:
            await asyncio.sleep(self.config.lora_load_delay)
            self.config.lora_adapters[name] = body["lora_path"]

        await asyncio.shield(asyncio.ensure_future(load()))
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload_lora(self, request: web.Request) -> web.Response:
        self.requests.append({"path": request.path, "body": await request.json()})
        if not self.config.runtime_lora:
            return web.json_response({"detail": "Not Found"}, status=404)
        name = self.requests[-1]["body"]["lora_name"]
        if self.config.lora_unload_fail_status is not None:
            return self._error(self.config.lora_unload_fail_status, f"injected failure unloading {name}")
        if self.config.lora_adapters.pop(name, None) is None:
            return self._error(404, f"The lora adapter '{name}' cannot be found.")
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def _get_requests(self, request: web.Request) -> web.Response:
        return web.json_response(self.requests, dumps=lambda o: json.dumps(
            o, default=lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b)))

    async def _clear_requests(self, request: web.Request) -> web.Response:
        self.requests.clear()
        return web.Response(status=204)

    async def _get_config(self, request: web.Request) -> web.Response:
        return web.json_response(dataclasses.asdict(self.config))

    async def _set_config(self, request: web.Request) -> web.Response:
        try:
            self.configure(**(await request.json()))
        except (KeyError, TypeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(dataclasses.asdict(self.config))

    # -- inference -------------------------------------------------------------------------------
    def _error(self, status: int, message: str) -> web.Response:
        return web.Response(status=status, content_type="application/json", body=_dumps(
            {"error": {"message": message, "type": "BadRequestError" if status < 500 else "InternalServerError",
                       "param": None, "code": status}}))

    def _cached(self, toks: list[str]) -> int:
        """Simulated prefix cache: leading full blocks seen before count as cached."""
        bs = self.config.block_size
        h = hashlib.blake2b(digest_size=16)
        cached = 0
        hit = True
        keys = []
        for start in range(0, len(toks) - len(toks) % bs, bs):
            h.update("\x00".join(toks[start:start + bs]).encode())
            key = h.digest()
            keys.append(key)
            if hit and key in self._cache:
                cached = start + bs
            else:
                hit = False
        self._cache.update(keys)
        return min(cached, max(len(toks) - 1, 0))

    async def _inference(self, request: web.Request) -> web.StreamResponse:
        rec: dict[str, Any] = {"path": request.path, "request_id": request.headers.get("X-Request-Id"),
                               "t_start": time.time(), "t_end": None, "status": None, "aborted": False,
                               "tokens_sent": 0, "raw": None, "body": None, "kv_transfer_params": None,
                               "authorization": request.headers.get("Authorization"),
                               "x_api_key": request.headers.get("x-api-key"),
                               "traceparent": request.headers.get("traceparent")}
        self.requests.append(rec)
        cfg = self.config
        try:
            if not self._authorized(request):
                rec["status"] = 401
                return web.json_response({"error": "Unauthorized"}, status=401)
            # (responses and messages streams open before their first token: they die after it, below)
            if cfg.refuse or (cfg.die_after_tokens == 0 and not request.path.endswith(("/responses", "/messages"))):
                return self._drop(request, rec, "dropped")
            rec["raw"] = raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                rec["status"] = 400
                return self._error(400, "invalid JSON")
            rec["body"] = body
            rec["kv_transfer_params"] = body.get("kv_transfer_params")
            if cfg.hang:
                await asyncio.Event().wait()
            if cfg.fail_status is not None and cfg.fail_times != 0:
                if cfg.fail_times > 0:
                    cfg.fail_times -= 1
                rec["status"] = cfg.fail_status
                return self._error(cfg.fail_status, f"injected failure {cfg.fail_status}")
            if cfg.raw_answer is not None:
                rec["status"] = 200
                return web.Response(body=cfg.raw_answer.encode(), content_type="text/event-stream"
                                    if isinstance(body, dict) and body.get("stream") else "application/json")
            if body.get("model") not in (None, self.model, *cfg.lora_adapters):
                rec["status"] = 404
                return self._error(404, f"The model `{body.get('model')}` does not exist.")
            resp = await self._answer(request, body, rec)
            if rec["status"] is None:
                rec["status"] = resp.status
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            rec["aborted"] = True
            raise
        finally:
            rec["t_end"] = time.time()

    async def _answer(self, request: web.Request, body: dict[str, Any], rec: dict[str, Any]) -> web.StreamResponse:
        cfg = self.config
        chat = request.path.endswith("chat/completions")
        rid = rec["request_id"] or uuid.uuid4().hex
        toks = _prompt_tokens(request.path, body)
        n_prompt = len(toks)
        kvtp_in = body.get("kv_transfer_params") or None
        kvtp_out = None
        if self.role == "prefill":
            cached = self._cached(toks)
            if isinstance(kvtp_in, dict) and kvtp_in.get("do_remote_decode") and cfg.return_kv_params:
                nblocks = (n_prompt + cfg.block_size - 1) // cfg.block_size
                kvtp_out = {"do_remote_prefill": True, "do_remote_decode": False,
                            "remote_engine_id": f"fake-prefill-{self.index}",
                            "remote_block_ids": list(range(nblocks)), "remote_host": "127.0.0.1",
                            "remote_port": cfg.kv_port or 20000 + self.index, "remote_request_id": rid, "tp_size": 1}
        else:
            if cfg.require_kv_params and not (isinstance(kvtp_in, dict) and kvtp_in.get("do_remote_prefill")):
                rec["status"] = 400
                return self._error(400, "fake decode instance: request has no kv_transfer_params from a prefill")
            # like vLLM, the decode side counts the KV it pulled as cached
            cached = n_prompt if kvtp_in else self._cached(toks)
        if request.path.endswith("/responses"):
            return await self._responses(request, body, rec, n_prompt, cached, kvtp_out)
        if request.path.endswith("/messages"):
            return await self._messages(request, body, rec, n_prompt, cached, kvtp_out)
        # like vLLM: max_completion_tokens exists for chat only (elsewhere an ignored extra field)
        max_tokens = (body.get("max_completion_tokens") if chat else None) or body.get("max_tokens") or 16
        n_out = min(cfg.output_tokens, max_tokens) if cfg.output_tokens is not None else max_tokens
        n_choices = int(body.get("n") or 1)
        # a prompt of token ids that ends with an output token continues that answer (the scheduler
        # sent the prefill's token along): number the tokens on from there
        last = toks[-1] if toks else ""
        first_k = int(last) - OUTPUT_ID_BASE + 1 if last.isascii() and last.isdigit() and \
            int(last) >= OUTPUT_ID_BASE else 0
        if not 1 <= n_choices <= 64 or not 1 <= int(max_tokens) <= 1_000_000:
            rec["status"] = 400
            return self._error(400, "fake instance: n must be in 1..64 and max_tokens in 1..1e6")
        finish = "length" if n_out >= max_tokens else "stop"
        usage = {"prompt_tokens": n_prompt, "total_tokens": n_prompt + n_out * n_choices,
                 "completion_tokens": n_out * n_choices, "prompt_tokens_details": {"cached_tokens": cached}}
        created = int(time.time())
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + rid,
                "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": body.get("model") or self.model}
        if cfg.ttft:
            await asyncio.sleep(cfg.ttft)
        if not body.get("stream"):
            if cfg.token_latency and n_out > 1:
                await asyncio.sleep(cfg.token_latency * (n_out - 1))
            if cfg.die_after_tokens is not None:
                return self._drop(request, rec, "dropped")
            ks = range(first_k, first_k + n_out)
            texts = ["".join(f" c{i}t{k}" for k in ks) for i in range(n_choices)]
            if chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": t, "tool_calls": []},
                            "logprobs": None, "finish_reason": finish, "stop_reason": None}
                           for i, t in enumerate(texts)]
                obj = {**head, "object": "chat.completion"}
            else:
                choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": finish, "stop_reason": None,
                            "prompt_logprobs": None} for i, t in enumerate(texts)]
                obj = dict(head)
            if body.get("return_token_ids"):  # like vLLM: the ids of the output and of the prompt
                prompt_ids = [_token_id(t) for t in toks]
                for c in choices:
                    c["token_ids"] = [OUTPUT_ID_BASE + k for k in ks]
                    if not chat:
                        c["prompt_token_ids"] = prompt_ids
                if chat:
                    obj["prompt_token_ids"] = prompt_ids
            obj.update(choices=choices, usage=usage, kv_transfer_params=kvtp_out)
            rec["tokens_sent"] = n_out
            return web.Response(body=_dumps(obj), content_type="application/json")
        return await self._stream(request, body, rec, head, chat, n_out, n_choices, finish, usage, first_k)

    @staticmethod
    def _drop(request: web.Request, rec: dict[str, Any], status: str) -> web.Response:
        """Drop the connection (an instance dying mid-answer)."""
        rec["status"] = status
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=500)

    async def _before_token(self, request: web.Request, rec: dict[str, Any], k: int) -> bool:
        """Wait the per-token latency before token ``k``; False (connection dropped) when the
        instance is set to die before it."""
        cfg = self.config
        if cfg.die_after_tokens is not None and k >= cfg.die_after_tokens:
            self._drop(request, rec, "died")
            return False
        if k and cfg.token_latency:
            await asyncio.sleep(cfg.token_latency)
        return True

    async def _whole(self, request: web.Request, rec: dict[str, Any], n_out: int,
                     answer: dict[str, Any]) -> web.Response:
        """A non-stream answer of ``n_out`` tokens after the time to first token (or a drop)."""
        if self.config.ttft:
            await asyncio.sleep(self.config.ttft)
        if self.config.die_after_tokens is not None:
            return self._drop(request, rec, "dropped")
        rec["tokens_sent"] = n_out
        return web.Response(body=_dumps(answer), content_type="application/json")

    async def _responses(self, request: web.Request, body: dict[str, Any], rec: dict[str, Any], n_prompt: int,
                         cached: int, kvtp_out: dict[str, Any] | None) -> web.StreamResponse:
        """``/v1/responses`` as vLLM 0.32 answers it: one message of ``output_text``; streamed as
        numbered ``event: <type>`` events that open (created, in_progress) before the engine has
        computed anything, carry the text in ``response.output_text.delta`` and end with
        ``response.completed`` (no [DONE])."""
        cfg = self.config
        limit = int(body.get("max_output_tokens") or 16)
        n_out = min(cfg.output_tokens, limit) if cfg.output_tokens is not None else limit
        deltas = [f" r{k}" for k in range(n_out)]
        usage = {"input_tokens": n_prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                 "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": n_prompt + n_out}
        resp = {"id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()),
                "model": body.get("model") or self.model, "status": "completed", "output": [], "usage": None,
                "kv_transfer_params": kvtp_out}
        message = {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "role": "assistant", "status": "completed",
                   "content": [{"type": "output_text", "text": "".join(deltas), "annotations": []}]}
        if not body.get("stream"):
            return await self._whole(request, rec, n_out, {**resp, "output": [message], "usage": usage})
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        seq = iter(range(1_000_000))

        async def event(kind: str, **fields: Any) -> None:
            data = _dumps({"type": kind, **fields, "sequence_number": next(seq)})
            await out.write(f"event: {kind}\n".encode() + b"data: " + data + b"\n\n")

        await event("response.created", response={**resp, "status": "in_progress"})
        await event("response.in_progress", response={**resp, "status": "in_progress"})
        if cfg.ttft:
            await asyncio.sleep(cfg.ttft)
        for k, delta in enumerate(deltas):
            if not await self._before_token(request, rec, k):
                return out
            if k == 0:  # (vLLM adds the output item with the first token)
                await event("response.output_item.added", output_index=0, item={**message, "content": []})
            await event("response.output_text.delta", item_id=message["id"], output_index=0, content_index=0,
                        delta=delta)
            rec["tokens_sent"] = k + 1
        await event("response.completed", response={**resp, "output": [message], "usage": usage})
        await out.write_eof()
        return out

    async def _messages(self, request: web.Request, body: dict[str, Any], rec: dict[str, Any], n_prompt: int,
                        cached: int, kvtp_out: dict[str, Any] | None) -> web.StreamResponse:
        """Anthropic's ``/v1/messages`` as vLLM answers it: one text block; streamed as
        ``message_start``, ``content_block_*`` (the text in ``content_block_delta``),
        ``message_delta`` (stop reason, output tokens) and ``message_stop``."""
        cfg = self.config
        limit = int(body.get("max_tokens") or 16)
        n_out = min(cfg.output_tokens, limit) if cfg.output_tokens is not None else limit
        deltas = [f" m{k}" for k in range(n_out)]
        stop = "max_tokens" if n_out >= limit else "end_turn"
        # as vLLM's: input_tokens leave out the cache reads (message_start has the whole prompt only)
        usage = {"input_tokens": n_prompt - cached, "output_tokens": n_out, "cache_read_input_tokens": cached,
                 "cache_creation_input_tokens": 0}
        msg = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "content": [],
               "model": body.get("model") or self.model, "stop_reason": None, "stop_sequence": None}
        if not body.get("stream"):
            return await self._whole(request, rec, n_out, {
                **msg, "content": [{"type": "text", "text": "".join(deltas)}], "stop_reason": stop, "usage": usage,
                "kv_transfer_params": kvtp_out})
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)

        async def event(kind: str, **fields: Any) -> None:
            await out.write(f"event: {kind}\n".encode() + b"data: " + _dumps({"type": kind, **fields}) + b"\n\n")

        await event("message_start", message={**msg, "usage": {"input_tokens": n_prompt, "output_tokens": 0}})
        if cfg.ttft:
            await asyncio.sleep(cfg.ttft)
        for k, delta in enumerate(deltas):
            if not await self._before_token(request, rec, k):
                return out
            if k == 0:
                await event("content_block_start", index=0, content_block={"type": "text", "text": ""})
            await event("content_block_delta", index=0, delta={"type": "text_delta", "text": delta})
            rec["tokens_sent"] = k + 1
        await event("content_block_stop", index=0)
        await event("message_delta", delta={"stop_reason": stop, "stop_sequence": None}, usage=usage)
        await event("message_stop")
        await out.write_eof()
        return out

    async def _stream(self, request: web.Request, body: dict[str, Any], rec: dict[str, Any], head: dict[str, Any],
                      chat: bool, n_out: int, n_choices: int, finish: str, usage: dict[str, Any],
                      first_k: int = 0) -> web.StreamResponse:
        cfg = self.config
        opts = body.get("stream_options") or {}
        continuous = bool(opts.get("continuous_usage_stats"))
        prompt_ids = [_token_id(t) for t in _prompt_tokens(request.path, body)]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)

        def event(choices: list[dict[str, Any]], k: int) -> bytes:
            obj = dict(head, choices=choices)
            if continuous:
                obj["usage"] = {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": k,
                                "total_tokens": usage["prompt_tokens"] + k}
            return b"data: " + _dumps(obj) + b"\n\n"

        if chat:
            await resp.write(event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None} for i in range(n_choices)], 0))
        for k in range(n_out):
            if not await self._before_token(request, rec, k):
                return resp
            last = k == n_out - 1
            fr = finish if last else None
            for i in range(n_choices):
                text = f" c{i}t{first_k + k}"
                if chat:
                    ch = {"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": fr}
                else:
                    ch = {"index": i, "text": text, "logprobs": None, "finish_reason": fr, "stop_reason": None}
                if body.get("return_token_ids"):  # like vLLM: each chunk's ids, the prompt's on the first
                    ch["token_ids"] = [OUTPUT_ID_BASE + first_k + k]
                    if not chat:
                        ch["prompt_token_ids"] = prompt_ids if k == 0 else None
                await resp.write(event([ch], k + 1))
            rec["tokens_sent"] = k + 1
        if opts.get("include_usage"):
            await resp.write(b"data: " + _dumps(dict(head, choices=[], usage=usage)) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdserve.testing.fake_instance",
                                description="Engine-less fake prefill/decode instance (a test double).")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, required=True, help="listen port")
    p.add_argument("--role", choices=("prefill", "decode"), default="prefill", help="default prefill")
    p.add_argument("--index", type=int, default=0, help="index inside its role (default 0)")
    p.add_argument("--global-index", type=int, default=None,
                   help="place in the global ranktable / NODE_PORTS, prefill first (default: --index; a "
                        "decode fake behind P prefill fakes needs P + index)")
    p.add_argument("--model", default="fake-model", help="served model name (default fake-model)")
    p.add_argument("--digest", default="",
                   help="ranktable digest it reports (`pdserve ranktable show` prints it; empty: not checked)")
    p.add_argument("--max-model-len", type=int, default=4096, help="context length (default 4096)")
    p.add_argument("--ttft", type=float, default=0.0, help="seconds before the first token")
    p.add_argument("--token-latency", type=float, default=0.0, help="seconds per further token")
    p.add_argument("--output-tokens", type=int, default=None, help="tokens per answer (default max_tokens)")
    p.add_argument("--no-require-kv-params", action="store_true",
                   help="decode: accept requests without kv_transfer_params")
    args = p.parse_args(argv)
    fake = FakeInstance(args.role, args.index, args.global_index, model=args.model, digest=args.digest,
                        max_model_len=args.max_model_len, ttft=args.ttft, token_latency=args.token_latency,
                        output_tokens=args.output_tokens, require_kv_params=not args.no_require_kv_params)

    async def _run() -> None:
        await fake.start(args.host, args.port)
        print(f"fake {args.role} instance {args.index} on http://{args.host}:{fake.port}", flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop
        uvloop.run(_run())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
