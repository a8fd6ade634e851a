"""Adding and removing instances while the scheduler runs (scaling out and in).

The ranktable and NODE_PORTS fix the instances a scheduler starts with. ``POST
/pdserve/v1/instances`` adds one more, after the checks start-up makes: it is healthy, it says it
has the role it is added as (``/pdserve/v1/identity``) and it serves the model. ``DELETE
/pdserve/v1/instances?url=HOST:PORT`` takes one out of routing at once and waits (bounded) for its
requests in flight, so the operator knows when it can be stopped without cutting anyone off.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
from pydantic import BaseModel, Field, ValidationError

from pdserve.errors import ConfigError
from pdserve.identity import IDENTITY_PATH, Identity
from pdserve.scheduler.adapters import adapters_in_models
from pdserve.scheduler.config import InstanceSpec, parse_host_port
from pdserve.scheduler.errors import ApiError, bad_request
from pdserve.scheduler.probe import models_of

if TYPE_CHECKING:
    from pdserve.scheduler.app import Scheduler
    from pdserve.scheduler.pool import Instance

log = logging.getLogger("pdserve.scheduler.membership")


class AddRequest(BaseModel):
    role: Literal["prefill", "decode"]
    url: str = Field(min_length=1)  # HOST:PORT, or http://HOST:PORT


def _host_port(url: str, param: str = "url") -> tuple[str, int]:
    try:
        return parse_host_port(url, param)
    except ConfigError as exc:
        raise bad_request(f"{exc.found}; e.g. 127.0.0.1:8101", param=param) from None


async def _addresses(host: str, port: int) -> set[tuple[str, int]]:
    """What ``host`` resolves to: ``localhost:P`` and ``127.0.0.1:P`` are one instance."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        infos = []
    return {(str(i[4][0]), port) for i in infos} or {(host, port)}


async def _find(state: Scheduler, host: str, port: int, among: list[Instance] | None = None) -> Instance | None:
    where = await _addresses(host, port)
    for inst in state.pool.all if among is None else among:
        if where & await _addresses(inst.spec.host, inst.spec.port):
            return inst
    return None


async def _get(session: aiohttp.ClientSession, url: str, timeout: float) -> tuple[int, bytes]:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            return resp.status, await resp.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise ApiError(502, f"{url} cannot be reached: {type(exc).__name__} {exc}".strip()) from None


def _refuse(spec: InstanceSpec, why: str) -> ApiError:
    return ApiError(400, f"{spec.url} {why}", param="url")


async def _check(state: Scheduler, spec: InstanceSpec) -> bool:
    """What start-up checks, for one instance: healthy, the role it is added as, the same model,
    room for the context the scheduler admits, the start-up LoRA adapters. Returns whether its chat
    default is "the rest of the context" (set on the scheduler only once it is added). (The
    ranktable digest is not compared: a new host comes with a merged ranktable.)"""
    cfg, session = state.cfg, state.session
    assert session is not None
    status, _ = await _get(session, spec.url + "/health", cfg.health_timeout)
    if status != 200:
        raise _refuse(spec, f"is not healthy (GET /health answered {status}); add it once it is")
    names: list[str] = []
    if cfg.identity_check:
        status, body = await _get(session, spec.url + IDENTITY_PATH, cfg.health_timeout)
        try:
            ident = Identity.model_validate_json(body) if status == 200 else None
        except ValidationError:
            ident = None
        if ident is None:
            raise _refuse(spec, f"gave no pdserve identity (GET {IDENTITY_PATH} answered {status}): start it with "
                                "`pdserve serve`, or run the scheduler with --no-identity-check")
        if ident.role != spec.role:
            raise ApiError(400, f"{spec.url} is a {ident.role} instance, not a {spec.role} one", param="role")
        names = ident.served_model_names
        context_default = ident.chat_default_max_tokens == "context"
    else:
        context_default = False
    data = await models_of(session, spec.url, cfg.health_timeout)
    cards = [m for m in data.get("data") or () if isinstance(m, dict)] if isinstance(data, dict) else []
    base = [m for m in cards if m.get("parent") is None]
    names = names or [m.get("id") for m in base]
    if cfg.upstream_model and cfg.upstream_model not in names:
        raise _refuse(spec, f"serves {names or 'no model it names'}, not {cfg.upstream_model!r}: every instance "
                            "must serve the same model")
    mml = next((m.get("max_model_len") for m in base if m.get("id") in names), None)
    if cfg.max_model_len and isinstance(mml, int) and mml < cfg.max_model_len:
        raise _refuse(spec, f"has max_model_len {mml}, less than the {cfg.max_model_len} the scheduler admits: "
                            "start it with the same --max-model-len")
    has = {a.name: a.path for a in adapters_in_models(data)}
    missing = [n for n, a in state.adapters.served.items()
               if n not in state.adapters.loaded_here and has.get(n) != a.path]
    if missing:
        raise _refuse(spec, f"lacks the LoRA adapter(s) {', '.join(missing)} every other instance serves: start it "
                            "with the same --lora-modules")
    return context_default


async def add(state: Scheduler, raw: Any) -> dict[str, Any]:
    try:
        req = AddRequest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise bad_request(f"{param}: {err['msg']}" if param else err["msg"], param=param) from None
    host, port = _host_port(req.url)
    async with state.membership_lock:  # two adds of one URL: the second sees the first
        if (known := await _find(state, host, port)) is not None:
            raise ApiError(409, f"{known.spec.name} is already in the pool", param="url")
        role = state.pool.prefill if req.role == "prefill" else state.pool.decode
        spec = InstanceSpec(req.role, 1 + max((i.spec.index for i in role.instances), default=-1),
                            1 + max((i.spec.global_index for i in state.pool.all), default=-1), host, port)
        context_default = await _check(state, spec)
        inst = state.pool.instance_for(spec)
        failed = await state.adapters.load_missing(inst)  # those loaded through the scheduler
        if failed:
            state.metrics.forget_instance(spec.role, spec.name)
            raise ApiError(502, f"{spec.url} could not load the LoRA adapter(s) loaded through the scheduler: "
                                f"{'; '.join(failed)}; it was not added", param="url")
        state.pool.add(inst)
        if state.cfg.chat_default_is_context and not context_default:
            state.cfg.chat_default_is_context = False  # as start-up decides when any instance differs
            log.info("%s has another chat default max_tokens: chat answers without max_tokens no longer "
                     "continue from the prefill's token", spec.url)
    log.info("instance %s added to the %s pool (%d now)", spec.name, req.role, len(role.instances))
    return {"name": spec.name, "role": spec.role, "url": spec.url}


async def remove(state: Scheduler, url: str | None, wait: str | None,
                 force: bool = False) -> tuple[int, dict[str, Any]]:
    """Out of routing at once; then wait up to ``wait`` seconds [30] for its requests in flight.
    200 when none is left, 202 when some still run (the instance is out of the pool either way:
    the same DELETE, or ``GET /pdserve/v1/instances``, tells later whether it has drained)."""
    if not url:
        raise bad_request("give the instance as ?url=HOST:PORT", param="url")
    host, port = _host_port(url)
    try:
        limit = 30.0 if wait is None else float(wait)
    except ValueError:
        raise bad_request(f"wait: {wait!r} is not a number of seconds", param="wait") from None
    if not 0 <= limit <= 3600:
        raise bad_request("wait: give 0 to 3600 seconds", param="wait")
    async with state.membership_lock:
        inst = await _find(state, host, port)
        if inst is None:  # removed before, and maybe still draining: the same DELETE asks again
            inst = await _find(state, host, port, state.leaving)
            if inst is None:
                raise ApiError(404, f"no instance at {host}:{port} in the pool", param="url")
        else:
            role = state.pool.prefill if inst.spec.role == "prefill" else state.pool.decode
            if not force and not any(i.healthy for i in role.instances if i is not inst):
                raise ApiError(409, f"{inst.spec.name} is the last healthy {inst.spec.role} instance: add another "
                                    "first (or pass force=1)", param="url")
            state.pool.remove(inst)
            state.leaving.append(inst)
            log.info("instance %s removed from the %s pool; %d request(s) still use it", inst.spec.name,
                     inst.spec.role, _busy(inst))
    deadline = time.monotonic() + limit
    while _busy(inst) > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    drained = _busy(inst) == 0
    if drained and inst in state.leaving:
        state.leaving.remove(inst)
        log.info("instance %s drained: it may be stopped", inst.spec.name)
    return (200 if drained else 202), {"name": inst.spec.name, "removed": True, "inflight": _busy(inst),
                                       "drained": drained}


def leaving(state: Scheduler) -> list[Instance]:
    """Removed instances that some request still needs (drained ones are dropped here)."""
    state.leaving[:] = [i for i in state.leaving if _busy(i) > 0]
    return state.leaving


def _busy(inst: Instance) -> int:
    """Requests that still need the instance: its slots, and for a prefill instance the requests
    whose KV lease it holds until they end (the decode side pulls it after the prefill's answer)."""
    return inst.inflight + inst.users
