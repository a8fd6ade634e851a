"""The scheduler's HTTP routes (aiohttp): the OpenAI API (USE_OPENAI=1) or vLLM's plain
/generate (USE_OPENAI=0), plus /health and /metrics.

Requests are validated and bounded here, before any instance is involved: bad input gets a 4xx
OpenAI-style error and costs no prefill; overload gets 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import time
import uuid
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from pdserve.scheduler import membership, models
from pdserve.scheduler.adapters import AdapterAdmin, LoadRequest, UnloadRequest
from pdserve.scheduler.admission import Admission
from pdserve.scheduler.affinity import (CHAT_OVERHEAD_TOKENS, AffinityFirst, PrefixPoints, PrefixTracker,
                                        prompt_upper_tokens, upper_tokens)
from pdserve.scheduler.auth import ApiKeys, instance_headers
from pdserve.scheduler.backlog import prefill_locally, work_tokens
from pdserve.scheduler.capture import CaptureRecord, CaptureSink
from pdserve.scheduler.config import SchedulerConfig
from pdserve.scheduler.drain import Drain
from pdserve.scheduler.errors import ApiError, ClientStalled, UpstreamClientError, bad_request, model_not_found
from pdserve.scheduler.features import RequestShaper
from pdserve.scheduler.lease_release import LeaseReleaser
from pdserve.scheduler.metrics import SchedulerMetrics
from pdserve.scheduler.pd_flow import TRACE_HEADERS, PDFlow, RequestContext
from pdserve.scheduler.policies import Policy, RouteKey, make_policy
from pdserve.scheduler.pool import Instance, InstancePool
from pdserve.scheduler.relay import GenerateRelay, MessagesRelay, OpenAIRelay, ResponsesRelay, dumps, loads

log = logging.getLogger("pdserve.scheduler")
access_log = logging.getLogger("pdserve.scheduler.access")

_RID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_ENDPOINTS = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
    "/v1/messages/count_tokens": "count_tokens",
    "/generate": "generate",
    "/v1/models": "models",
    "/health": "health",
    "/ping": "health",
    "/metrics": "metrics",
    "/tokenize": "tokenize",
    "/detokenize": "detokenize",
    "/version": "version",
    "/v1/load_lora_adapter": "lora",
    "/v1/unload_lora_adapter": "lora",
}
_UNTRACKED = frozenset({"/health", "/ping", "/metrics"})
# the inference endpoints: a refusal of one of these gets an access-log line
_INFERENCE = frozenset({"completions", "chat", "generate", "responses", "messages"})
STATE = web.AppKey("pdserve_scheduler", object)
RID = web.RequestKey("pdserve_request_id", str)
CTX = web.RequestKey("pdserve_ctx", RequestContext)
_Admin = TypeVar("_Admin", LoadRequest, UnloadRequest)


class Scheduler:
    """State shared by the routes of one app: config, pool, session, metrics, admission, and the
    per-deployment features (API keys, drain, request shaping, decode affinity, capture)."""

    def __init__(self, cfg: SchedulerConfig, session: aiohttp.ClientSession | None = None) -> None:
        self.cfg = cfg
        self.metrics = SchedulerMetrics()
        self.tracker: PrefixTracker | None = None
        decode_policy: Policy = make_policy(cfg.decode_policy, cfg.affinity_load_factor)
        self.affinity: AffinityFirst | None = None
        if cfg.decode_affinity or cfg.decode_only_uncached_below:
            self.tracker = PrefixTracker(cfg.affinity_chunk_chars)
            # the wrapper acts only on requests whose RouteKey carries affinity scores
            decode_policy = self.affinity = AffinityFirst(decode_policy, cfg.affinity_load_factor)
        self.pool = InstancePool(
            cfg.instances,
            make_policy(cfg.prefill_policy, cfg.affinity_load_factor),
            decode_policy,
            self.metrics,
            max_per_instance=cfg.max_inflight_per_instance,
            max_queue=cfg.max_queue,
            queue_timeout=cfg.queue_timeout,
            health_interval=cfg.health_interval,
            health_timeout=cfg.health_timeout,
        )
        if self.tracker is not None:
            tracker = self.tracker
            self.pool.on_down.append(lambda inst: tracker.forget(inst.spec.name))
        self.admission = Admission(cfg.max_inflight, self.pool.queue, cfg.queue_timeout)
        self.keys = ApiKeys(cfg.api_keys, cfg.protect_metrics)
        self.drain = Drain(self.metrics.draining)
        self.shaper = RequestShaper(cfg)
        self.adapters = AdapterAdmin(self.pool.all, cfg.served_model_names, cfg.upstream_model,
                                     cfg.prefill_timeout, cfg.health_timeout, cfg.lora_adapters)
        self.adapters.on_unload.append(self.metrics.forget_model)
        self.pool.on_recover.append(self.adapters.reload)
        self._refresher: asyncio.Task[None] | None = None
        self.membership_lock = asyncio.Lock()
        self.leaving: list[Instance] = []  # removed instances still needed by requests in flight
        up = self.shaper.upstream_bytes()
        self.rename_prefix = up
        self.capture: CaptureSink | None = None
        self._own_session = session is None
        self.session = session
        self.flow: PDFlow | None = None

    async def start(self) -> None:
        if self.session is None:
            self.session = make_session(self.cfg)
        if self.cfg.capture is not None and self.capture is None:
            self.capture = CaptureSink(self.cfg.capture, on_drop=self.metrics.capture_dropped.inc)
        self.flow = PDFlow(self.cfg, self.pool, self.metrics, self.session, self.tracker, LeaseReleaser())
        self.adapters.session = self.session
        self.pool.start(self.session)
        if self.cfg.use_openai and self.cfg.health_interval > 0:
            self._refresher = asyncio.create_task(self.adapters.refresh_every(self.cfg.health_interval),
                                                  name="pdserve-lora-refresh")

    async def close(self) -> None:
        await self.pool.stop()
        if self._refresher is not None:
            self._refresher.cancel()
        await self.adapters.close()
        if self.flow is not None and self.flow.releaser is not None:
            self.flow.releaser.close()
        if self.capture is not None:
            await asyncio.to_thread(self.capture.close)
        if self._own_session and self.session is not None:
            await self.session.close()

    def relay_for(self, answer_model: str | None, endpoint: str = "completions") -> OpenAIRelay:
        kind: type[OpenAIRelay] = {"responses": ResponsesRelay, "messages": MessagesRelay}.get(endpoint, OpenAIRelay)
        if answer_model is None or self.rename_prefix is None:
            return kind()
        return kind((self.rename_prefix, b'"model":' + dumps(answer_model)))


def make_session(cfg: SchedulerConfig) -> aiohttp.ClientSession:
    """One shared session: pooled keep-alive connections to every instance, connect timeout only
    (the flow applies the per-stage timeouts itself)."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=cfg.per_host_connections, keepalive_timeout=60,
                                     ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),  # instances set no cookies; skip the per-request jar lookup
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout),
        auto_decompress=False,
        headers=instance_headers(cfg.instance_api_key),  # never the client's Authorization
    )


def _state(request: web.Request) -> Scheduler:
    return request.app[STATE]  # type: ignore[return-value]


_OPENAI_ONLY = ("/v1/completions", "/v1/chat/completions", "/v1/models")


def _client_error(exc: web.HTTPException, request: web.Request, use_openai: bool) -> ApiError:
    if exc.status == 413:
        return ApiError(413, f"request body too large: {exc.text or ''}".strip(), param=None)
    if exc.status == 404:
        hint = ""
        if request.path == "/generate" and use_openai:
            hint = " (a scheduler started with USE_OPENAI=0 serves it; this one serves /v1/*)"
        elif request.path in _OPENAI_ONLY and not use_openai:
            hint = " (this scheduler runs with USE_OPENAI=0 and serves /generate)"
        return ApiError(404, f"not found: no route {request.path}{hint}")
    if exc.status == 405:
        return ApiError(405, "method not allowed")
    return ApiError(exc.status, exc.reason or "error")


@web.middleware
async def _middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Request id, API key, drain, error shaping, metrics and the access-log line — for every route."""
    state = _state(request)
    rid = request.headers.get("X-Request-Id", "")
    if not _RID_OK.match(rid):
        rid = os.urandom(16).hex()  # same shape as uuid4().hex, a fifth of the cost
    request[RID] = rid
    t0 = time.perf_counter()
    status = 500
    error: str | None = None
    tracked = request.path not in _UNTRACKED
    anthropic = request.path.startswith("/v1/messages")  # its clients read Anthropic's error shape
    if tracked:
        state.drain.enter()
    try:
        state.keys.check(request.path, request.headers)
        if tracked and state.drain.draining:
            raise ApiError(503, "the scheduler is draining (shutting down); retry on another replica",
                           headers={"Retry-After": "1"})
        resp = await handler(request)
        status = resp.status
    except ApiError as exc:
        resp, status, error = exc.response(rid, anthropic), exc.status, exc.message
        if status in (400, 401, 404, 413, 415, 429) or (status == 503 and state.drain.draining):
            state.metrics.rejected.labels(str(status)).inc()
    except UpstreamClientError as exc:
        resp, status = exc.response(rid), exc.status
    except web.HTTPException as exc:
        err = _client_error(exc, request, state.cfg.use_openai)
        resp, status, error = err.response(rid, anthropic), err.status, err.message
        state.metrics.rejected.labels(str(status)).inc()
    except asyncio.CancelledError:
        status = 499  # client closed the connection
        _finish(state, request, status, t0)
        raise
    except Exception as exc:  # a bug must cost one request, never the server
        if isinstance(exc, ConnectionResetError) and (request.transport is None or request.transport.is_closing()):
            # the client left (or stalled and was cut off) while we wrote to it. Re-raised, aiohttp
            # would log a traceback; a response it cannot send ends as a premature disconnection.
            _finish(state, request, 499, t0, str(exc) if isinstance(exc, ClientStalled) else "client disconnected")
            return web.Response(status=499)
        log.exception("request %s failed", rid)
        err = ApiError(500, f"internal scheduler error: {type(exc).__name__}")
        ctx_ = request.get(CTX)
        if ctx_ is not None and ctx_.client is not None:
            # its stream had started, so no error answer can follow: cut the connection, or the
            # client would wait for the rest of the stream until its own timeout
            ctx_.client.abort()  # (not close(): a client that stopped reading would keep it open)
            _finish(state, request, 500, t0, err.message)
            return web.Response(status=500)
        resp, status = err.response(rid, anthropic), 500
    finally:
        if tracked:
            state.drain.leave()
    if not resp.prepared:
        resp.headers["X-Request-Id"] = rid
        if state.drain.draining:
            resp.force_close()  # keep-alive clients reconnect (to another replica)
    _finish(state, request, status, t0, error)
    return resp


def _finish(state: Scheduler, request: web.Request, status: int, t0: float, error: str | None = None) -> None:
    endpoint = _ENDPOINTS.get(request.path, "other")
    ctx: RequestContext | None = request.get(CTX)
    e2e = time.perf_counter() - t0
    # the name the client used, else the one the answer carries (never an unknown name: bounded labels)
    model = (ctx.model or ctx.model_alias or state.cfg.upstream_model or "") if ctx is not None else ""
    state.metrics.child(state.metrics.requests, endpoint, str(status), model).inc()
    if ctx is None:
        # refused before it became a request (bad input, API key, draining, overload): one short
        # line, so refusals are auditable too (never with headers: no key reaches a log)
        if status >= 400 and endpoint in _INFERENCE and state.cfg.access_log and access_log.isEnabledFor(logging.INFO):
            access_log.info(dumps({"request_id": request[RID], "endpoint": endpoint, "status": status,
                                   "e2e_ms": round(e2e * 1e3, 2), "error": error}).decode())
        return
    state.metrics.child(state.metrics.e2e, endpoint).observe(e2e)
    if ctx.capture is not None and state.capture is not None:
        ctx.capture.meta.update(status=status, e2e_ms=round(e2e * 1e3, 2), **_timings(ctx))
        state.capture.offer(ctx.capture)
    if state.cfg.access_log and access_log.isEnabledFor(logging.INFO):
        access_log.info(dumps({
            "request_id": ctx.request_id, "endpoint": endpoint, "status": status, "stream": ctx.stream,
            "model": ctx.model or ctx.model_alias, "decode_only": ctx.decode_only,
            "instances": ctx.instances, "retries": ctx.retries,
            "prefill_ms": None if ctx.prefill_s is None else round(ctx.prefill_s * 1e3, 2),
            "ttft_ms": None if ctx.ttft_s is None else round(ctx.ttft_s * 1e3, 2),
            "e2e_ms": round(e2e * 1e3, 2), "prompt_tokens": ctx.prompt_tokens,
            "cached_tokens": ctx.cached_tokens, "completion_tokens": ctx.completion_tokens,
            "error": ctx.error,
        }).decode())


def _timings(ctx: RequestContext) -> dict[str, Any]:
    return {"ttft_ms": None if ctx.ttft_s is None else round(ctx.ttft_s * 1e3, 2),
            "prefill_ms": None if ctx.prefill_s is None else round(ctx.prefill_s * 1e3, 2),
            "instances": ctx.instances, "retries": ctx.retries, "decode_only": ctx.decode_only,
            "usage": {"prompt_tokens": ctx.prompt_tokens, "cached_tokens": ctx.cached_tokens,
                      "completion_tokens": ctx.completion_tokens}, "error": ctx.error}


async def _read_json(request: web.Request, check_type: bool = True) -> tuple[bytes, Any]:
    """The body's bytes and its JSON: 415 when it is not sent as JSON (as vLLM's OpenAI server,
    which says 400; vLLM's plain /generate never checked it), 400 when it does not parse, 413
    from client_max_size beyond --max-body-bytes."""
    if check_type and request.content_type != "application/json":
        raise ApiError(415, f"unsupported media type {request.content_type!r}: send the body as JSON "
                            "with 'Content-Type: application/json'")
    raw = await request.read()
    try:
        return raw, loads(raw)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"invalid JSON body: {exc}") from None


async def _inference(request: web.Request, endpoint: models.Endpoint) -> web.StreamResponse:
    state = _state(request)
    cfg = state.cfg
    raw, body = await _read_json(request, check_type=endpoint != "generate")
    client_model = body.get("model") if isinstance(body, dict) else None
    adapter = client_model if isinstance(client_model, str) and client_model in state.adapters else None
    if isinstance(client_model, str) and cfg.served_model_names and client_model not in cfg.served_model_names \
            and adapter is None:
        raise model_not_found(client_model)
    shaped = state.shaper.shape(endpoint, body)  # aliases, defaults, system prompt (no-op when unset)
    req = models.validate(endpoint, body)
    stateless = endpoint == "responses" and body.get("store") is not False
    if stateless:  # nothing can read a stored response back through the scheduler (see models)
        body["store"] = False
    if models.normalize_flags(body, req) or shaped.changed or stateless:
        raw = dumps(body)
    est = models.check_length(endpoint, req, body, cfg.max_model_len, cfg.chars_per_token_bound)
    max_tokens = models.max_tokens_of(endpoint, req) or 16
    prefix = models.prompt_text_for_routing(endpoint, body, cfg.prefix_chars)
    if adapter is not None and isinstance(prefix, str):  # its KV is not the base model's: cached apart
        prefix = f"lora:{adapter}\x00{prefix}"
    key = RouteKey(prefix.encode("utf-8", "surrogatepass") if isinstance(prefix, str) else prefix,
                   est + max_tokens * (req.n or 1))
    relay: OpenAIRelay | GenerateRelay
    if endpoint == "generate":
        relay = GenerateRelay(body["prompt"])
        upstream = dict(body)
        default_model = cfg.upstream_model or (cfg.served_model_names[0] if cfg.served_model_names else None)
        if "model" not in upstream and default_model:
            upstream["model"] = default_model
        body, raw, path = upstream, dumps(upstream), "/v1/completions"
    else:
        relay = state.relay_for(shaped.answer_model, endpoint)
        path = request.path
    ctx = RequestContext(request_id=request[RID], endpoint=endpoint, path=path, body=body, raw=raw,
                         stream=bool(req.stream), key=key,
                         model=client_model if isinstance(client_model, str) else "")
    ctx.model_alias = shaped.answer_model
    ctx.adapter = adapter
    ctx.trace = {h: v for h in TRACE_HEADERS if (v := request.headers.get(h))}
    if cfg.decode_only_when_queued:  # backlog accounting is only needed by the busy fallback
        ctx.work_tokens = work_tokens(endpoint, body)
    request[CTX] = ctx
    _route_decode(state, ctx)
    if state.capture is not None and (cfg.capture is not None and random.random() < cfg.capture.sample_rate):
        ctx.capture = CaptureRecord(meta={"ts": time.time(), "request_id": ctx.request_id, "endpoint": endpoint,
                                          "model": ctx.model or shaped.answer_model or cfg.upstream_model,
                                          "stream": ctx.stream},
                                    request=body, stream=ctx.stream)
    await state.admission.acquire()
    state.metrics.inflight.inc()
    try:
        assert state.flow is not None
        return await state.flow.run(ctx, request, relay)
    except (ApiError, UpstreamClientError) as exc:
        ctx.error = str(exc) if isinstance(exc, UpstreamClientError) else exc.message
        raise
    finally:
        state.metrics.inflight.dec()
        state.admission.release()
        for inst in ctx.prefills:
            inst.users -= 1


def _uncached_tokens(endpoint: str, pp: PrefixPoints, matched: int) -> int:
    """Upper token estimate of the prompt past the ``matched`` characters, with the chat template's
    per-message overhead for every message that starts in that part."""
    tokens = upper_tokens(pp.suffix(matched))
    if endpoint == "chat":
        start = 0
        for piece in pp.pieces:
            if start >= matched:
                tokens += CHAT_OVERHEAD_TOKENS
            start += len(piece)
    return tokens


def _route_decode(state: Scheduler, ctx: RequestContext) -> None:
    """Whether the request can skip the prefill instance (``--decode-only-below``,
    ``--decode-only-uncached-below``, ``--decode-only-when-queued``), and the prompt's prefix
    hashes for conversation affinity."""
    cfg = state.cfg
    ctx.decode_only = models.decode_only_reason(ctx.endpoint, ctx.body)
    if cfg.decode_only_below and not ctx.decode_only:
        if prompt_upper_tokens(ctx.endpoint, ctx.body, cfg.decode_only_below) < cfg.decode_only_below:
            ctx.decode_only = "short"
    if state.tracker is not None:
        _route_by_cache(state, ctx)
    if cfg.decode_only_when_queued and not ctx.decode_only and prefill_locally(
            state.pool.prefill.healthy(), state.pool.decode.healthy(), ctx.work_tokens,
            cfg.decode_only_when_queued):
        ctx.decode_only = "busy"
    if ctx.decode_only:
        state.metrics.decode_only.labels(ctx.decode_only).inc()


def _route_by_cache(state: Scheduler, ctx: RequestContext) -> None:
    """Conversation affinity and ``--decode-only-uncached-below``, from the decode-side tracker."""
    assert state.tracker is not None
    cfg = state.cfg
    pp = ctx.points = state.tracker.points(ctx.endpoint, ctx.body, ctx.adapter)
    healthy = state.pool.decode.healthy()
    affinity = {}
    for inst in healthy:
        n = state.tracker.matched(inst.spec.name, pp)
        if n:
            affinity[inst.spec.name] = n
    if not affinity:
        pass
    elif not ctx.decode_only and cfg.decode_only_uncached_below and state.affinity is not None:
        cap = cfg.max_inflight_per_instance
        avail = [i for i in healthy if cap <= 0 or i.inflight < cap]
        best = state.affinity.preferred(avail, healthy, RouteKey(None, 0, affinity))
        if best is not None:
            matched = affinity[best.spec.name]
            if _uncached_tokens(ctx.endpoint, pp, matched) < cfg.decode_only_uncached_below:
                ctx.decode_only = "cached"
                # acquire() follows synchronously, so the policy picks this very instance
                ctx.key = RouteKey(ctx.key.prefix, ctx.key.tokens, {best.spec.name: matched})
    if cfg.decode_affinity and affinity and ctx.key.affinity is None:
        ctx.key = RouteKey(ctx.key.prefix, ctx.key.tokens, affinity)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _inference(request, "completions")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _inference(request, "chat")


async def responses(request: web.Request) -> web.StreamResponse:
    return await _inference(request, "responses")


async def messages(request: web.Request) -> web.StreamResponse:
    return await _inference(request, "messages")


async def generate(request: web.Request) -> web.StreamResponse:
    return await _inference(request, "generate")


async def list_models(request: web.Request) -> web.Response:
    """Every served name (alias) as its own model card, as vLLM lists several --served-model-name:
    ``root`` and ``owned_by`` come from the instances' own /v1/models."""
    state = _state(request)
    cfg = state.cfg
    now = int(time.time())
    owner = cfg.model_owned_by or "vllm"
    data = [{"id": name, "object": "model", "created": now, "owned_by": owner,
             "root": cfg.model_root or cfg.upstream_model or name, "parent": None,
             "max_model_len": cfg.max_model_len, "permission": [model_permission(now)]}
            for name in cfg.served_model_names]
    base = cfg.served_model_names[0] if cfg.served_model_names else None
    data += [{"id": a.name, "object": "model", "created": now, "owned_by": owner, "root": a.path,
              "parent": base or a.parent, "max_model_len": None, "permission": [model_permission(now)]}
             for a in state.adapters.served.values()]
    return web.json_response({"object": "list", "data": data})


async def _admin_body(request: web.Request, schema: type[_Admin]) -> _Admin:
    return models.validate_as(schema, (await _read_json(request))[1])


async def load_lora_adapter(request: web.Request) -> web.Response:
    """Load a LoRA adapter on every instance (all or none), as vLLM's own route does on one."""
    adapters = _state(request).adapters
    return web.Response(text=await adapters.load(await _admin_body(request, LoadRequest)))


async def unload_lora_adapter(request: web.Request) -> web.Response:
    adapters = _state(request).adapters
    return web.Response(text=await adapters.unload(await _admin_body(request, UnloadRequest)))


def model_permission(created: int) -> dict[str, Any]:
    """The permission entry vLLM puts in each model card (clients written for OpenAI read it)."""
    return {"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": created,
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
            "organization": "*", "group": None, "is_blocking": False}


async def on_an_instance(request: web.Request) -> web.Response:
    """``/tokenize``, ``/detokenize``, ``/version``: no KV involved, so one healthy instance
    answers, as it would answer the client itself (an alias is renamed, a system prompt added)."""
    state = _state(request)
    raw: bytes | None = None
    if request.method == "POST":
        raw, body = await _read_json(request)
        model = body.get("model") if isinstance(body, dict) else None
        if isinstance(model, str) and model not in state.cfg.served_model_names and model not in state.adapters:
            raise model_not_found(model)
        if state.shaper.shape(_ENDPOINTS[request.path], body).changed:
            raw = dumps(body)
    insts = state.pool.decode.healthy() or state.pool.prefill.healthy()
    if not insts:
        raise ApiError(503, "no healthy instance")
    inst = min(insts, key=lambda i: i.inflight)
    try:
        async with state.session.request(  # type: ignore[union-attr]
                request.method, inst.url + request.path, data=raw,
                headers={"Content-Type": "application/json"} if raw is not None else None,
                timeout=aiohttp.ClientTimeout(total=state.cfg.prefill_timeout,
                                              sock_connect=state.cfg.connect_timeout)) as resp:
            return web.Response(status=resp.status, body=await resp.read(),
                                content_type=(resp.content_type or "application/json"))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise ApiError(502, f"{inst.spec.name} failed: {type(exc).__name__} {exc}".strip()) from None


async def health(request: web.Request) -> web.Response:
    state = _state(request)
    if state.drain.draining:  # load balancers take this replica out while it drains
        raise ApiError(503, "draining")
    pool = state.pool
    # without prefill instances the decode instances still answer (decode-only fallback)
    needed = (pool.decode,) if state.cfg.decode_only_fallback else (pool.prefill, pool.decode)
    for role in needed:
        if not role.healthy():
            raise ApiError(503, f"no healthy {role.role} instance")
    return web.Response(status=200)


async def metrics(request: web.Request) -> web.Response:
    body = _state(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def instances(request: web.Request) -> web.Response:
    """The pool as the scheduler sees it: health, load, last error (for operators and tests)."""
    state = _state(request)
    return web.json_response({"instances": [
        {"name": i.spec.name, "role": i.spec.role, "index": i.spec.index, "url": i.url, "healthy": i.healthy,
         "inflight": i.inflight, "last_error": i.last_error} for i in state.pool.all], "leaving": [
        {"name": i.spec.name, "role": i.spec.role, "url": i.url, "inflight": i.inflight + i.users}
        for i in membership.leaving(state)]})


async def add_instance(request: web.Request) -> web.Response:
    """Scale out: one more instance, checked as at start-up (see :mod:`membership`)."""
    return web.json_response(await membership.add(_state(request), (await _read_json(request))[1]), status=201)


async def remove_instance(request: web.Request) -> web.Response:
    """Scale in: out of routing at once, then a bounded wait for its requests in flight."""
    q = request.query
    status, answer = await membership.remove(_state(request), q.get("url"), q.get("wait"),
                                             q.get("force", "").lower() in ("1", "true", "yes"))
    return web.json_response(answer, status=status)


def _off(what: str, switch: str) -> Any:
    """A route that is off: 404, as when it does not exist, saying which switch turns it on."""
    async def handler(request: web.Request) -> web.Response:
        raise ApiError(404, f"not found: {what} is off on this scheduler; start it with {switch}")
    return handler


def build_app(cfg: SchedulerConfig, session: aiohttp.ClientSession | None = None) -> web.Application:
    """The aiohttp app; the pool's health loop and session start with the app."""
    app = web.Application(middlewares=[_middleware], client_max_size=cfg.max_body_bytes)
    state = Scheduler(cfg, session)
    app[STATE] = state
    if cfg.use_openai:
        app.router.add_post("/v1/completions", completions)
        app.router.add_post("/v1/chat/completions", chat_completions)
        app.router.add_get("/v1/models", list_models)
        app.router.add_post("/v1/responses", responses)
        app.router.add_post("/v1/messages", messages)
        app.router.add_post("/v1/messages/count_tokens", on_an_instance)
        if cfg.runtime_lora_updating:  # vLLM's switch: without it, vLLM has no such routes either
            app.router.add_post("/v1/load_lora_adapter", load_lora_adapter)
            app.router.add_post("/v1/unload_lora_adapter", unload_lora_adapter)
        else:
            off = _off("loading LoRA adapters at run time",
                       "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (or --allow-runtime-lora-updating)")
            for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
                app.router.add_post(path, off)
        app.router.add_post("/tokenize", on_an_instance)
        app.router.add_post("/detokenize", on_an_instance)
        app.router.add_get("/version", on_an_instance)
    else:
        app.router.add_post("/generate", generate)
    app.router.add_get("/health", health)
    app.router.add_route("*", "/ping", health)  # SageMaker's health route, as vLLM serves it (GET and POST)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/pdserve/v1/instances", instances)
    if cfg.instance_updates:
        app.router.add_post("/pdserve/v1/instances", add_instance)
        app.router.add_delete("/pdserve/v1/instances", remove_instance)
    else:
        off = _off("adding and removing instances", "--allow-instance-updates")
        app.router.add_route("POST", "/pdserve/v1/instances", off)
        app.router.add_route("DELETE", "/pdserve/v1/instances", off)

    async def _lifecycle(_app: web.Application):  # type: ignore[no-untyped-def]
        await state.start()
        yield
        await state.close()

    app.cleanup_ctx.append(_lifecycle)
    return app
