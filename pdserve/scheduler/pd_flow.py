"""The prefill → decode flow of one request: routing, retries, timeouts, the streaming relay.

1. prefill: the request with max_tokens=1, stream=false and
   ``kv_transfer_params={"do_remote_decode": true, ...}`` on a prefill instance; a connection
   error or 5xx there is retried once on another prefill instance (nothing reached the client yet).
2. decode: the client's original JSON plus the ``kv_transfer_params`` the prefill answered with.
   Until the first byte reaches the client a failed decode is retried once on another decode
   instance (re-prefilling unless the first decode instance was never reached, in which case its
   KV lease on the prefill instance is untouched).
3. relay: SSE bytes are forwarded as they come, cut only at event boundaries; only events that
   carry ``usage`` are parsed, to put the prefill side's cached-token count in it.

Closing an upstream connection is how vLLM learns a request was aborted, so every exit path that
did not read an answer to its end closes it (a client that leaves cancels this task).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
from aiohttp import web

from pdserve.scheduler.affinity import PrefixPoints, PrefixTracker
from pdserve.scheduler.capture import CaptureRecord
from pdserve.scheduler.config import SchedulerConfig
from pdserve.scheduler.errors import ApiError, ClientStalled, UpstreamClientError
from pdserve.scheduler.first_token import (
    ChatFromCompletion,
    FirstToken,
    SameCreated,
    TokenTap,
    complete_answer,
    eligible,
    from_prefill,
    stream_events,
)
from pdserve.scheduler.lease_release import LeaseReleaser
from pdserve.scheduler.metrics import SchedulerMetrics
from pdserve.scheduler.policies import RouteKey
from pdserve.scheduler.pool import Instance, InstancePool
from pdserve.scheduler.relay import OpenAIRelay, Relay, dumps, loads

log = logging.getLogger("pdserve.scheduler.flow")

TRACE_HEADERS = ("traceparent", "tracestate", "baggage")  # W3C trace context: vLLM's OpenTelemetry reads them

_PREFILL_DROP = ("stream_options", "min_tokens", "best_of", "use_beam_search")
_KV_PREFILL_REQUEST = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


@dataclass(slots=True)
class RequestContext:
    """Everything about one client request that the flow, the metrics and the access log need."""

    request_id: str
    endpoint: str  # "completions" | "chat" | "generate" (metrics label)
    path: str  # upstream path
    body: dict[str, Any]
    raw: bytes  # the JSON sent to decode (the client's bytes for the OpenAI API)
    stream: bool
    key: RouteKey
    t0: float = field(default_factory=time.perf_counter)
    model: str = ""
    instances: list[str] = field(default_factory=list)
    retries: int = 0
    prefill_s: float | None = None
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    chunks: int = 0  # stream events with output relayed (no role chunk, no [DONE])
    error: str | None = None
    model_alias: str | None = None  # the name the answer carries, when it is not the instances' own
    adapter: str | None = None  # the LoRA adapter the request names (its KV and prefixes are its own)
    decode_only: str | None = None  # why no remote prefill ran ("short", "cached", "busy"), else None
    work_tokens: int = 0  # typical estimate of the prompt tokens to compute (prefill backlog accounting)
    points: PrefixPoints | None = None  # the prompt's prefix hashes, for the decode-side tracker
    prefill_done: float | None = None  # perf_counter when the prefill answer arrived
    lease: dict[str, Any] | None = None  # kv_transfer_params no decode instance has got yet
    capture: CaptureRecord | None = None  # set when this request is sampled for capture
    client: asyncio.BaseTransport | None = None  # the client's connection, once its stream is open
    trace: dict[str, str] = field(default_factory=dict)  # the client's trace context, passed on to both calls
    last_chunk: float | None = None  # perf_counter of the last stream chunk relayed (inter-token latency)
    prefills: list[Instance] = field(default_factory=list)  # prefill instances whose answers it used


@dataclass(slots=True)
class PrefillResult:
    inst_name: str
    kv_transfer_params: dict[str, Any] | None
    cached_tokens: int | None
    prompt_tokens: int | None
    first: FirstToken | None = None  # the prefill's token, already sent to the client
    answer: dict[str, Any] | None = None  # the prefill's answer, when it is the whole answer
    created_cache_tokens: int | None = None  # prompt tokens the prefill wrote to its prefix cache


class _CredentialsRefused(ApiError):
    """A configuration error, not an outage: no decode-only fallback hides it."""


def _refused_credentials(status: int, role: str, name: str) -> None:
    """An instance's 401/403 is about the scheduler's key, not the client's: a 502 that says so."""
    if status in (401, 403):
        raise _CredentialsRefused(
            502, f"{role} instance {name} refused the scheduler's credentials (HTTP {status}): give the "
                 "scheduler the instances' --api-key with --instance-api-key (PDSERVE_INSTANCE_API_KEY)")


def _down(tried: list[Instance]) -> list[Instance]:
    """The tried instances that are no longer healthy: the only ones a last-resort retry skips."""
    return [i for i in tried if not i.healthy]


class _PrefillRetry(Exception):
    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


class _DecodeRetry(Exception):
    """Decode failed before the client saw a byte (or, ``generated`` set, mid-stream after the
    client got these tokens); another decode instance may try."""

    def __init__(self, inst: Instance, error: ApiError, reprefill: bool, reason: str,
                 generated: list[int] | None = None) -> None:
        super().__init__(error.message)
        self.inst = inst
        self.error = error
        self.reprefill = reprefill
        self.reason = reason
        self.generated = generated


class _StreamBroke(Exception):
    """The decode stream failed mid-way and can go on elsewhere: the tokens the client has."""

    def __init__(self, error: ApiError, generated: list[int]) -> None:
        super().__init__(error.message)
        self.error = error
        self.generated = generated


def prefill_body(body: dict[str, Any], endpoint: str, token_ids: bool = False) -> bytes:
    """The client's request made into a 1-token, non-streaming prefill call (``token_ids``: ask for
    the prompt's and the token's ids, to continue after the token)."""
    b = {k: v for k, v in body.items() if k not in _PREFILL_DROP}
    if token_ids:
        b["return_token_ids"] = True
    if endpoint == "responses":
        b["max_output_tokens"], b["store"] = 1, False  # (nothing of the 1-token answer is kept)
    else:
        b["max_tokens"] = 1
    if "max_completion_tokens" in b:
        b["max_completion_tokens"] = 1
    b["stream"] = False
    if b.get("n", 1) != 1:
        b["n"] = 1
    b["kv_transfer_params"] = dict(_KV_PREFILL_REQUEST)
    return dumps(b)


def decode_body(raw: bytes, body: dict[str, Any], kvtp: dict[str, Any] | None) -> bytes:
    """The client's JSON plus kv_transfer_params, spliced into the original bytes (no re-encoding
    of the prompt or of parameters the scheduler does not know)."""
    if kvtp is None:
        return raw
    if "kv_transfer_params" not in body:
        stripped = raw.rstrip()
        if stripped.endswith(b"}"):
            return stripped[:-1] + b',"kv_transfer_params":' + dumps(kvtp) + b"}"
    return dumps({**body, "kv_transfer_params": kvtp})


async def _first_bytes(resp: aiohttp.ClientResponse, relay: Relay) -> bytes:
    """The stream's first bytes past its opening (a responses stream announces itself before the
    engine has computed anything, so the opening says nothing about the KV pull or the first
    step); b"" when the stream ended before."""
    buf = b""
    while chunk := await resp.content.readany():
        buf += chunk
        if not relay.opening_only(buf):
            return buf
    return b""


@dataclass(frozen=True, slots=True)
class UsageKeys:
    """Where an endpoint's ``usage`` keeps its counts: prompt and output tokens, and the prompt's
    prefix-cache facts (in a details object, or, with ``details`` None, in ``usage`` itself)."""

    prompt: str = "prompt_tokens"
    completion: str = "completion_tokens"
    details: str | None = "prompt_tokens_details"
    cached: str = "cached_tokens"
    created: str = "created_cache_tokens"

    def facts(self, usage: dict[str, Any]) -> Any:
        return usage.get(self.details) if self.details else usage

    def prompt_total(self, usage: dict[str, Any]) -> Any:
        """All prompt tokens. (Anthropic's ``input_tokens`` leave out the cache reads and writes,
        which it counts beside them.)"""
        n = usage.get(self.prompt)
        if self.details is None and isinstance(n, int):
            n += sum(v for k in (self.cached, self.created) if isinstance(v := usage.get(k), int))
        return n


_USAGE_KEYS = {
    "responses": UsageKeys("input_tokens", "output_tokens", "input_tokens_details", "cached_tokens",
                           "cache_write_tokens"),
    "messages": UsageKeys("input_tokens", "output_tokens", None, "cache_read_input_tokens",
                          "cache_creation_input_tokens"),
}


def usage_keys(endpoint: str) -> UsageKeys:
    return _USAGE_KEYS.get(endpoint) or UsageKeys()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _snippet(payload: bytes) -> str:
    try:
        err = loads(payload)
        if isinstance(err, dict) and isinstance(err.get("error"), dict):
            return str(err["error"].get("message", ""))[:300]
    except ValueError:
        pass
    return payload[:300].decode("utf-8", "replace")


_NO_PREFILL = PrefillResult("", None, None, None)


class PDFlow:
    def __init__(self, cfg: SchedulerConfig, pool: InstancePool, metrics: SchedulerMetrics,
                 session: aiohttp.ClientSession, tracker: PrefixTracker | None = None,
                 releaser: LeaseReleaser | None = None) -> None:
        self.cfg = cfg
        self.pool = pool
        self.metrics = metrics
        self.session = session
        self.tracker = tracker
        self.releaser = releaser

    def _headers(self, ctx: RequestContext) -> dict[str, str]:
        return {"Content-Type": "application/json", "X-Request-Id": ctx.request_id, **ctx.trace}

    # -- prefill ---------------------------------------------------------------------------------
    async def prefill(self, ctx: RequestContext, want_first: bool = False) -> PrefillResult:
        body = prefill_body(ctx.body, ctx.endpoint, want_first)
        tried: list[Instance] = []
        last: ApiError | None = None
        reason = ""
        for attempt in range(1 + self.cfg.retries):
            try:
                inst = await self.pool.prefill.acquire(ctx.key, tried)
            except ApiError as exc:
                if last is None or exc.status != 503:
                    raise
                try:  # nobody else: the same instance again if it is still healthy (a transient failure)
                    inst = await self.pool.prefill.acquire(ctx.key, _down(tried))
                except ApiError:
                    raise last from None  # nobody left to retry on: report the real failure
            if attempt:
                ctx.retries += 1
                self.metrics.retries.labels("prefill", reason).inc()
                log.warning("request %s: %s; retrying on %s", ctx.request_id, last.message if last else "",
                            inst.spec.name)
            tried.append(inst)
            ctx.instances.append(inst.spec.name)
            t = time.perf_counter()
            inst.add_backlog(ctx.work_tokens)
            try:
                status, payload = await self._post_prefill(inst, body, ctx)
            except _PrefillRetry as exc:  # connection-level failure: another instance may do
                last, reason = exc.error, "connect"
                continue
            finally:
                inst.add_backlog(-ctx.work_tokens)
                self.pool.prefill.release(inst, ctx.key.tokens)
            if status >= 500:
                last = ApiError(502, f"prefill instance {inst.spec.name} failed: HTTP {status}: {_snippet(payload)}")
                reason = f"http_{status}"
                continue
            if status >= 400:
                _refused_credentials(status, "prefill", inst.spec.name)
                raise UpstreamClientError(status, payload, "application/json")
            ctx.prefill_done = time.perf_counter()
            inst.users += 1  # its KV lease is this request's until the request ends
            ctx.prefills.append(inst)
            ctx.prefill_s = ctx.prefill_done - t
            self.metrics.child(self.metrics.prefill, inst.spec.name).observe(ctx.prefill_s)
            try:
                data = loads(payload)
            except ValueError:
                raise ApiError(502, f"prefill instance {inst.spec.name} answered invalid JSON") from None
            kvtp = data.get("kv_transfer_params") if isinstance(data, dict) else None
            usage = data.get("usage") if isinstance(data, dict) else None
            cached = prompt = created = None
            if isinstance(usage, dict):
                keys = usage_keys(ctx.endpoint)
                prompt = keys.prompt_total(usage)
                details = keys.facts(usage)
                if isinstance(details, dict):
                    cached, created = details.get(keys.cached), details.get(keys.created)
            if not isinstance(kvtp, dict):
                kvtp = None
                log.debug("request %s: prefill %s returned no kv_transfer_params; decode computes the prompt",
                          ctx.request_id, inst.spec.name)
            answer = first = None
            if self.cfg.prefill_first_token and (want_first or not ctx.stream):  # a stream's events are built
                answer = complete_answer(ctx.endpoint, ctx.body, data)
            if answer is None and want_first:
                first = from_prefill(ctx.endpoint, data, self.cfg.max_model_len)
            return PrefillResult(inst.spec.name, kvtp, cached, prompt, first, answer, created)
        assert last is not None
        raise last

    async def _post_prefill(self, inst: Instance, body: bytes, ctx: RequestContext) -> tuple[int, bytes]:
        name = inst.spec.name
        try:
            async with asyncio.timeout(self.cfg.prefill_timeout):
                async with self.session.post(inst.url + ctx.path, data=body, headers=self._headers(ctx)) as resp:
                    return resp.status, await resp.read()
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            self.pool.mark_down(inst, f"connect failed: {_describe(exc)}")
            raise _PrefillRetry(ApiError(502, f"prefill instance {name} unreachable: {_describe(exc)}")) from None
        except TimeoutError:
            raise ApiError(504, f"prefill instance {name} did not answer within "
                                f"{self.cfg.prefill_timeout:g} s (--prefill-timeout)") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _PrefillRetry(ApiError(502, f"prefill instance {name} failed: {_describe(exc)}")) from None

    # -- whole flow ------------------------------------------------------------------------------
    async def run(self, ctx: RequestContext, request: web.Request, relay: Relay) -> web.StreamResponse:
        # decode-only: the decode instance computes the prompt itself (no kv_transfer_params)
        want_first = (self.cfg.prefill_first_token and not ctx.decode_only and isinstance(relay, OpenAIRelay)
                      and eligible(ctx.endpoint, ctx.body, self.cfg.max_model_len, self.cfg.chat_default_is_context))
        pre = _NO_PREFILL if ctx.decode_only else await self._prefill_or_fallback(ctx, want_first)
        ctx.lease = pre.kv_transfer_params
        try:
            if pre.answer is not None:  # the answer ended with its first token: no decode instance needed
                self.metrics.first_from_prefill.inc()
                if ctx.stream:
                    return await self._stream_answer(ctx, request, pre, relay)
                return self._json_answer(ctx, pre, dumps(pre.answer), relay, None)
            return await self._hand_over(ctx, request, relay, pre)
        finally:
            if ctx.lease is not None:  # no decode instance got it: free the prefill's blocks now
                self._release(ctx)

    async def _prefill_or_fallback(self, ctx: RequestContext, want_first: bool) -> PrefillResult:
        """The prefill; when no prefill instance can do it (none healthy, or each failed after the
        retries), a decode instance computes the prompt itself: slower, but an answer."""
        try:
            return await self.prefill(ctx, want_first)
        except ApiError as exc:
            if exc.status not in (502, 503, 504) or isinstance(exc, _CredentialsRefused) \
                    or not self.cfg.decode_only_fallback or not self.pool.decode.healthy():
                raise
            log.warning("request %s: %s; a decode instance computes the prompt itself", ctx.request_id, exc.message)
            ctx.decode_only = "prefill_failed"
            self.metrics.decode_only.labels(ctx.decode_only).inc()
            return _NO_PREFILL

    def _release(self, ctx: RequestContext) -> None:
        lease, ctx.lease = ctx.lease, None
        if self.releaser is not None and lease is not None and self.releaser.release(lease, ctx.error or "abandoned"):
            self.metrics.leases_released.inc()
            log.debug("request %s: released its prefill KV lease (%s)", ctx.request_id, ctx.error or "abandoned")

    async def _hand_over(self, ctx: RequestContext, request: web.Request, relay: Relay,
                         pre: PrefillResult) -> web.StreamResponse:
        out = None if pre.first is None or not ctx.stream else await self._send_first(ctx, request, pre.first, relay)
        tried: list[Instance] = []
        try:
            for attempt in range(1 + self.cfg.retries):
                if request.transport is None or request.transport.is_closing():
                    ctx.error = "client disconnected before decode"
                    raise asyncio.CancelledError()
                try:
                    return await self._decode(ctx, request, pre, relay, tried, retrying=attempt > 0, out=out,
                                              last=attempt == self.cfg.retries)
                except _DecodeRetry as exc:
                    tried.append(exc.inst)
                    resumed = None
                    if exc.generated is not None and pre.first is not None:
                        resumed = pre.first.resumed(exc.generated, ctx.body)
                        if resumed is None:  # nothing left to generate: end the stream as it failed
                            raise exc.error from None
                    if attempt == self.cfg.retries:
                        raise exc.error from None
                    ctx.retries += 1
                    self.metrics.retries.labels("decode", exc.reason).inc()
                    if resumed is not None:
                        then = f"another decode instance continues after the {resumed.moved} tokens the client has"
                    else:
                        then = "retrying on another decode instance" + (" after a new prefill" if exc.reprefill
                                                                         and pre.first is None else "")
                    log.warning("request %s: %s; %s", ctx.request_id, exc.error.message, then)
                    if resumed is not None or (exc.reprefill and pre.first is not None):
                        # the client has the token(s): the decode instance computes prompt + them itself
                        pre = replace(pre, kv_transfer_params=None, first=resumed or pre.first)
                    elif exc.reprefill and not ctx.decode_only:
                        pre = await self._prefill_or_fallback(ctx, False)
                        ctx.lease = pre.kv_transfer_params
            raise AssertionError("unreachable")
        except (ApiError, UpstreamClientError) as exc:
            if out is None:
                raise
            return await self._end_started_stream(ctx, out, relay, exc)

    async def _end_started_stream(self, ctx: RequestContext, out: web.StreamResponse, relay: Relay,
                                  exc: ApiError | UpstreamClientError) -> web.StreamResponse:
        """The stream already carries the prefill's token: end it the way vLLM ends a failed stream
        (an error event, then [DONE]) instead of answering with an HTTP error."""
        err = exc if isinstance(exc, ApiError) else ApiError(
            502 if exc.status >= 500 else exc.status,
            f"decode instance refused the continuation: {_snippet(exc.body)}")
        ctx.error = err.message
        log.warning("request %s: %s", ctx.request_id, err.message)
        await self._write(ctx, out, relay.error(err))
        await self._write(ctx, out, None)
        return out

    async def _send_first(self, ctx: RequestContext, request: web.Request, first: FirstToken,
                          relay: Relay) -> web.StreamResponse:
        """Open the client's stream with the prefill's token (before the decode instance is asked)."""
        opts = ctx.body.get("stream_options")
        # as vLLM: per-chunk usage only together with include_usage
        events = first.events(isinstance(opts, dict) and opts.get("include_usage") is True
                              and opts.get("continuous_usage_stats") is True)
        self.metrics.first_from_prefill.inc()
        return await self._start_stream(ctx, request, relay, events)

    async def _stream_answer(self, ctx: RequestContext, request: web.Request, pre: PrefillResult,
                             relay: Relay) -> web.StreamResponse:
        """A stream whose first token ended it: the prefill's answer, as vLLM would stream it."""
        assert pre.answer is not None
        usage = pre.answer.get("usage")
        if isinstance(usage, dict):
            self._fix_usage(ctx, pre, usage)
        out = await self._start_stream(ctx, request, relay,
                                       stream_events(ctx.endpoint, pre.answer, ctx.body.get("stream_options")))
        self._observe_tokens(ctx)
        await self._write(ctx, out, None)
        return out

    async def _start_stream(self, ctx: RequestContext, request: web.Request, relay: Relay,
                            events: bytes) -> web.StreamResponse:
        """Open the client's stream with events the scheduler built (its first token is out)."""
        out = await self._open_stream(ctx, request, relay.stream_content_type or "text/event-stream")
        ctx.chunks += relay.tokens(events)
        if ctx.capture is not None:
            ctx.capture.chunks.append(events)
        await self._write(ctx, out, relay.transform(events))
        ctx.ttft_s = time.perf_counter() - ctx.t0
        self.metrics.child(self.metrics.ttft, ctx.endpoint).observe(ctx.ttft_s)
        return out

    @staticmethod
    async def _open_stream(ctx: RequestContext, request: web.Request, content_type: str) -> web.StreamResponse:
        out = web.StreamResponse(headers={"X-Request-Id": ctx.request_id, "Cache-Control": "no-cache"})
        out.content_type = content_type.split(";")[0]
        await out.prepare(request)
        ctx.client = request.transport
        return out

    async def _write(self, ctx: RequestContext, out: web.StreamResponse, data: bytes | None) -> None:
        """Write to the client's stream (``None``: end it), for at most ``--idle-timeout`` seconds.

        aiohttp waits without a limit for a client that stopped reading to drain its buffer; the
        request would keep its admission slot, its decode slot and the instance's generation."""
        try:
            async with asyncio.timeout(self.cfg.idle_timeout):
                await (out.write_eof() if data is None else out.write(data))
        except TimeoutError:
            if ctx.client is not None:
                ctx.client.abort()
            ctx.error = f"the client read nothing for {self.cfg.idle_timeout:g} s (--idle-timeout)"
            raise ClientStalled(ctx.error) from None

    # -- decode ----------------------------------------------------------------------------------
    async def _decode(self, ctx: RequestContext, request: web.Request, pre: PrefillResult, relay: Relay,
                      tried: list[Instance], retrying: bool,
                      out: web.StreamResponse | None = None, last: bool = True) -> web.StreamResponse:
        """One decode attempt. ``out``: the client's stream, already opened with the prefill's token.
        ``last``: no retry follows (a stream that fails mid-way then ends with an error event)."""
        try:
            inst = await self.pool.decode.acquire(ctx.key, tried)
        except ApiError as exc:
            if not (retrying and exc.status == 503):
                raise
            try:  # nobody else: the same instance again if it is still healthy (e.g. its KV pull failed)
                inst = await self.pool.decode.acquire(ctx.key, _down(tried))
            except ApiError:
                raise _DecodeRetry(tried[-1], ApiError(502, "decode failed and no other decode instance is "
                                                       "healthy"), False, "none") from None
        name = inst.spec.name
        ctx.instances.append(name)
        if self.tracker is not None and ctx.points is not None:
            self.tracker.record(name, ctx.points)  # its prefix cache will hold this prompt
        tap: TokenTap | None = None
        if pre.first is None:
            path, body = ctx.path, decode_body(ctx.raw, ctx.body, pre.kv_transfer_params)
        else:
            resumable = ctx.stream and self.cfg.retries > 0  # record the tokens to resume elsewhere
            path, body = "/v1/completions", pre.first.decode_body(ctx.body, pre.kv_transfer_params, resumable)
            if ctx.endpoint == "chat" and ctx.stream:
                relay = ChatFromCompletion(pre.first, relay)
            elif ctx.stream and isinstance(relay, OpenAIRelay):
                relay = SameCreated(pre.first, relay)
            if resumable:
                tap = TokenTap()
        resp: aiohttp.ClientResponse | None = None
        finished = False
        backlog = ctx.work_tokens if pre.kv_transfer_params is None else 0  # it computes the prompt itself
        inst.add_backlog(backlog)
        # from here the decode instance may have the request, and its connector confirms or releases
        # the lease: a release from us (say the client leaves mid-POST) could free blocks it reads
        lease, ctx.lease = ctx.lease, None
        try:
            first = b""
            payload = b""
            try:
                async with asyncio.timeout(self.cfg.first_token_timeout if ctx.stream else self.cfg.decode_timeout):
                    resp = await self.session.post(inst.url + path, data=body, headers=self._headers(ctx))
                    if 400 <= resp.status < 500:  # refused before its engine saw it: still ours
                        ctx.lease = lease
                    if ctx.stream and resp.status == 200:
                        first = await _first_bytes(resp, relay)
                    else:
                        payload = await resp.read()
                        finished = True
                inst.add_backlog(-backlog)  # the prompt is computed once the first byte is here
                backlog = 0
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                ctx.lease = lease  # never reached it: still ours (a retry reuses it)
                self.pool.mark_down(inst, f"connect failed: {_describe(exc)}")
                raise _DecodeRetry(inst, ApiError(502, f"decode instance {name} unreachable: {_describe(exc)}"),
                                   False, "connect") from None
            except TimeoutError:
                ctx.lease = None  # the instance may have it: its connector releases or pulls it
                which = "--first-token-timeout" if ctx.stream else "--decode-timeout"
                limit = self.cfg.first_token_timeout if ctx.stream else self.cfg.decode_timeout
                raise ApiError(504, f"decode instance {name} sent no {'token' if ctx.stream else 'answer'} "
                                    f"within {limit:g} s ({which})") from None
            except (aiohttp.ClientError, OSError) as exc:
                # a 4xx whose body failed to arrive was still refused before the engine saw it
                ctx.lease = lease if resp is not None and 400 <= resp.status < 500 else None
                raise _DecodeRetry(inst, ApiError(502, f"decode instance {name} failed: {_describe(exc)}"),
                                   True, "disconnect") from None
            status = resp.status
            if status >= 500:
                raise _DecodeRetry(inst, ApiError(502, f"decode instance {name} failed: HTTP {status}: "
                                                  f"{_snippet(payload)}"), True, f"http_{status}")
            if status >= 400:
                _refused_credentials(status, "decode", name)
                raise UpstreamClientError(status, payload, resp.headers.get("Content-Type"))
            if not ctx.stream:
                return self._json_answer(ctx, pre, payload, relay, resp.headers.get("Content-Type"))
            if not first:
                finished = True
                raise _DecodeRetry(inst, ApiError(502, f"decode instance {name} closed the stream before the "
                                                  "first token"), True, "empty_stream")
            if out is None:
                out = await self._open_stream(ctx, request, relay.stream_content_type
                                              or resp.headers.get("Content-Type", "text/event-stream"))
            try:
                finished = await self._relay_stream(ctx, pre, resp, first, out, relay, name, tap,
                                                    resumable=not last)
            except _StreamBroke as exc:
                raise _DecodeRetry(inst, exc.error, False, "mid_stream", exc.generated) from None
            return out
        finally:
            inst.add_backlog(-backlog)
            if resp is not None:
                if finished:
                    resp.release()
                else:
                    resp.close()  # vLLM aborts the request when its connection closes
            self.pool.decode.release(inst, ctx.key.tokens)

    def _json_answer(self, ctx: RequestContext, pre: PrefillResult, payload: bytes, relay: Relay,
                     content_type: str | None) -> web.Response:
        try:
            data = loads(payload)
        except ValueError:
            raise ApiError(502, "decode instance answered invalid JSON") from None
        what = {"responses": "output", "messages": "content"}.get(ctx.endpoint, "choices")
        if not isinstance(data, dict) or not isinstance(data.get(what), list):
            raise ApiError(502, f"decode instance answered without {what}: {payload[:200]!r}")
        fixed = False
        if pre.first is not None and pre.first.prefill_answer is not None:
            data, fixed = pre.first.answer(data), True
            self.metrics.first_from_prefill.inc()
        usage = data.get("usage")
        if isinstance(usage, dict):
            fixed = self._fix_usage(ctx, pre, usage) or fixed
        self._observe_tokens(ctx)
        ctx.ttft_s = time.perf_counter() - ctx.t0  # non-stream: the whole answer is the first token
        self.metrics.child(self.metrics.ttft, ctx.endpoint).observe(ctx.ttft_s)
        if ctx.capture is not None:  # what the client gets (not the continuation alone)
            ctx.capture.response = dumps(data) if fixed else payload
        if relay.passthrough and not fixed:
            body = payload
        elif isinstance(relay, OpenAIRelay):
            body = relay.transform(dumps(data) if fixed else payload)
        else:
            body = relay.json_body(data)
        return web.Response(body=body, headers={"X-Request-Id": ctx.request_id}, content_type="application/json")

    def _fix_usage(self, ctx: RequestContext, pre: PrefillResult, usage: dict[str, Any],
                   add_details: bool = True) -> bool:
        """Record the token counts and put the prefill side's cached tokens in (the decode side
        counts the transferred KV as cached, which says nothing about the prefix cache)."""
        changed = pre.first is not None
        if pre.first is not None:
            pre.first.fix_usage(usage)
        keys = usage_keys(ctx.endpoint)
        if keys.details is None:
            return self._fix_anthropic_usage(ctx, pre, usage, keys)
        ctx.prompt_tokens = usage.get(keys.prompt)
        ctx.completion_tokens = usage.get(keys.completion)
        # the prefill computed the client's prompt, also when the decode instance got prompt + the
        # moved tokens to compute itself (a retry or a resume): its cache hits are the prompt's
        if pre.cached_tokens is None or (pre.kv_transfer_params is None and pre.first is None):
            details = keys.facts(usage)
            if isinstance(details, dict):
                ctx.cached_tokens = details.get(keys.cached)
            return changed
        ctx.cached_tokens = pre.cached_tokens
        details = keys.facts(usage)
        if isinstance(details, dict):
            # the prompt's cache facts are the prefill side's: it computed (and cached) the prompt
            wanted = {keys.cached: pre.cached_tokens}
            # vLLM's chat answers report it (a continued chat stream's usage comes from a completion stream)
            if pre.created_cache_tokens is not None and (keys.created in details or ctx.endpoint == "chat"):
                wanted[keys.created] = pre.created_cache_tokens
            if all(details.get(k) == v for k, v in wanted.items()):
                return changed
            details.update(wanted)
        elif add_details and keys.details:
            usage[keys.details] = {keys.cached: pre.cached_tokens}
        else:
            return changed
        return True

    @staticmethod
    def _fix_anthropic_usage(ctx: RequestContext, pre: PrefillResult, usage: dict[str, Any], keys: UsageKeys) -> bool:
        """Anthropic's usage counts cache reads and writes beside ``input_tokens`` (vLLM's
        message_start has only the whole prompt, message_delta the split): where the split is
        given, the prefill side's reads and writes go in and ``input_tokens`` keeps the total."""
        total = keys.prompt_total(usage)
        ctx.prompt_tokens = total if total is not None else ctx.prompt_tokens
        ctx.completion_tokens = usage.get(keys.completion, ctx.completion_tokens)
        if keys.cached not in usage or pre.cached_tokens is None or not isinstance(total, int) \
                or (pre.kv_transfer_params is None and pre.first is None):
            if isinstance(usage.get(keys.cached), int):
                ctx.cached_tokens = usage[keys.cached]
            return False
        read, written = pre.cached_tokens, pre.created_cache_tokens or 0
        ctx.cached_tokens = read
        wanted = {keys.cached: read, keys.prompt: max(0, total - read - written)}
        if keys.created in usage:
            wanted[keys.created] = written
        if all(usage.get(k) == v for k, v in wanted.items()):
            return False
        usage.update(wanted)
        return True

    def _fix_usage_events(self, ctx: RequestContext, pre: PrefillResult, events: bytes) -> bytes:
        parts = events.split(b"\n\n")
        changed = False
        for i, ev in enumerate(parts):
            at = 0 if ev.startswith(b"data: {") else ev.find(b"\ndata: {") + 1  # (after an `event:` line)
            if b'"usage"' not in ev or not ev.startswith(b"data: {", at):
                continue
            try:
                obj = loads(ev[at + 6:])
            except ValueError:
                continue
            if not isinstance(obj, dict):
                continue
            # a responses stream's usage is in its last event's response object, a messages
            # stream's input usage in message_start's message
            holder = obj.get("response") if ctx.endpoint == "responses" else obj.get("message") \
                if ctx.endpoint == "messages" and obj.get("type") == "message_start" else obj
            usage = holder.get("usage") if isinstance(holder, dict) else None
            # per-chunk usage (continuous_usage_stats) has no prompt_tokens_details in vLLM: only
            # the final usage chunk (no choices) gets the prefill side's cached tokens added
            if isinstance(usage, dict) and self._fix_usage(ctx, pre, usage, add_details=not obj.get("choices")):
                parts[i] = ev[:at] + b"data: " + dumps(obj)
                changed = True
        return b"\n\n".join(parts) if changed else events

    def _observe_tokens(self, ctx: RequestContext) -> None:
        if ctx.prompt_tokens:
            self.metrics.prompt_tokens.inc(ctx.prompt_tokens)
        if ctx.cached_tokens:
            self.metrics.cached_tokens.inc(ctx.cached_tokens)
        if ctx.completion_tokens:
            self.metrics.completion_tokens.inc(ctx.completion_tokens)

    async def _relay_stream(self, ctx: RequestContext, pre: PrefillResult, resp: aiohttp.ClientResponse,
                            first: bytes, out: web.StreamResponse, relay: Relay, name: str,
                            tap: TokenTap | None = None, resumable: bool = False) -> bool:
        """Forward SSE events until [DONE]; on upstream failure end the stream with an error event,
        or, ``resumable`` and ``tap`` (it knows the tokens sent so far) and no finish reason sent
        yet, raise ``_StreamBroke`` so that another decode instance continues. Returns True when
        the upstream answer was read to its end."""
        itl = self.metrics.child(self.metrics.itl, ctx.endpoint)
        buf = first
        first_at = 0.0 if ctx.ttft_s is None else ctx.t0 + ctx.ttft_s  # the prefill's token went out
        last = ctx.last_chunk or first_at  # (a resumed stream: the last chunk before the failure)
        handover = ctx.prefill_done is not None and pre.kv_transfer_params is not None
        saw_done = False
        err: ApiError | None = None
        content = resp.content
        idle = self.cfg.idle_timeout
        while True:
            cut = buf.rfind(b"\n\n")
            if cut >= 0:
                events, buf = buf[: cut + 2], buf[cut + 2:]
                if b'"usage"' in events:
                    events = self._fix_usage_events(ctx, pre, events)
                if tap is not None:
                    events = tap.take(events)
                n = relay.tokens(events)
                if relay.ended(events):
                    saw_done = True
                now = time.perf_counter()
                if handover:  # the decode instance's first event
                    self.metrics.kv_handover.observe(now - ctx.prefill_done)  # type: ignore[operator]
                    handover = False
                if ctx.ttft_s is None:
                    ctx.ttft_s = now - ctx.t0
                    self.metrics.child(self.metrics.ttft, ctx.endpoint).observe(ctx.ttft_s)
                    first_at = now
                elif n:
                    itl.observe(now - last)
                last = ctx.last_chunk = now
                ctx.chunks += n
                if ctx.capture is not None:
                    ctx.capture.chunks.append(events)
                data = relay.transform(events)
                if data:
                    await self._write(ctx, out, data)
            try:
                async with asyncio.timeout(idle):
                    chunk = await content.readany()
            except TimeoutError:
                err = ApiError(504, f"decode instance {name} sent nothing for {idle:g} s (--idle-timeout)")
                break
            except (aiohttp.ClientError, OSError) as exc:
                err = ApiError(502, f"decode instance {name} failed mid-stream: {_describe(exc)}")
                break
            if not chunk:
                break
            buf += chunk
        if err is None and not saw_done:
            err = ApiError(502, f"decode instance {name} ended the stream without {relay.last_event}")
        if err is not None and resumable and tap is not None and not tap.finished:
            raise _StreamBroke(err, tap.ids)
        if err is not None:
            ctx.error = err.message
            log.warning("request %s: %s", ctx.request_id, err.message)
            await self._write(ctx, out, relay.error(err))
        self._observe_tokens(ctx)
        if err is None and ctx.ttft_s is not None:
            # (vLLM ignores an n on responses and messages)
            choices = (ctx.body.get("n") or 1) if ctx.endpoint not in ("responses", "messages") else 1
            per_choice = (ctx.completion_tokens or ctx.chunks) / (choices if isinstance(choices, int) else 1)
            if per_choice > 1:
                self.metrics.child(self.metrics.tpot, ctx.endpoint).observe((last - first_at) / (per_choice - 1))
        await self._write(ctx, out, None)
        return err is None
