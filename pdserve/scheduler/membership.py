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
import time
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
from pydantic import BaseModel, Field, ValidationError

from pdserve.errors import ConfigError
from pdserve.identity import IDENTITY_PATH, Identity
from pdserve.scheduler.config import InstanceSpec, parse_host_port
from pdserve.scheduler.errors import ApiError, bad_request
from pdserve.scheduler.relay import loads

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


def _find(state: Scheduler, host: str, port: int) -> Instance | None:
    return next((i for i in state.pool.all if (i.spec.host, i.spec.port) == (host, port)), None)


async def _get(session: aiohttp.ClientSession, url: str, timeout: float) -> tuple[int, bytes]:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            return resp.status, await resp.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise ApiError(400, f"{url} cannot be reached: {type(exc).__name__} {exc}".strip(), param="url") from None


async def _check(state: Scheduler, spec: InstanceSpec) -> None:
    """The start-up checks for one instance: healthy, the role it is added as, the same model."""
    cfg, session = state.cfg, state.session
    assert session is not None
    status, _ = await _get(session, spec.url + "/health", cfg.health_timeout)
    if status != 200:
        raise ApiError(400, f"{spec.url} is not healthy (GET /health answered {status}); add it once it is",
                       param="url")
    names: list[str] = []
    if cfg.identity_check:
        status, body = await _get(session, spec.url + IDENTITY_PATH, cfg.health_timeout)
        try:
            ident = Identity.model_validate_json(body) if status == 200 else None
        except ValidationError:
            ident = None
        if ident is None:
            raise ApiError(400, f"{spec.url} gave no pdserve identity (GET {IDENTITY_PATH} answered {status}): start "
                                "it with `pdserve serve`, or run the scheduler with --no-identity-check", param="url")
        if ident.role != spec.role:
            raise ApiError(400, f"{spec.url} is a {ident.role} instance, not a {spec.role} one", param="role")
        names = ident.served_model_names
    if not names:
        status, body = await _get(session, spec.url + "/v1/models", cfg.health_timeout)
        try:
            data = loads(body) if status == 200 else {}
            names = [m["id"] for m in data.get("data", ()) if m.get("parent") is None]
        except (ValueError, TypeError, KeyError, AttributeError):
            names = []
    if cfg.upstream_model and cfg.upstream_model not in names:
        raise ApiError(400, f"{spec.url} serves {names or 'no model it names'}, not {cfg.upstream_model!r}: every "
                            "instance must serve the same model", param="url")


async def add(state: Scheduler, raw: Any) -> dict[str, Any]:
    try:
        req = AddRequest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise bad_request(f"{param}: {err['msg']}" if param else err["msg"], param=param) from None
    host, port = _host_port(req.url)
    async with state.membership_lock:  # two adds of one URL: the second sees the first
        if (known := _find(state, host, port)) is not None:
            raise ApiError(409, f"{known.spec.name} is already in the pool", param="url")
        role = state.pool.prefill if req.role == "prefill" else state.pool.decode
        spec = InstanceSpec(req.role, 1 + max((i.spec.index for i in role.instances), default=-1),
                            1 + max((i.spec.global_index for i in state.pool.all), default=-1), host, port)
        await _check(state, spec)
        inst = state.pool.instance_for(spec)
        for hook in state.pool.on_recover:  # e.g. the LoRA adapters loaded through the scheduler
            await hook(inst)
        state.pool.add(inst)
    log.info("instance %s added to the %s pool (%d now)", spec.name, req.role, len(role.instances))
    return {"name": spec.name, "role": spec.role, "url": spec.url}


async def remove(state: Scheduler, url: str | None, wait: str | None) -> tuple[int, dict[str, Any]]:
    """Out of routing at once; then wait up to ``wait`` seconds [30] for its requests in flight.
    200 when none is left, 202 when some still run (the instance is out of the pool either way)."""
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
        inst = _find(state, host, port)
        if inst is None:
            raise ApiError(404, f"no instance at {host}:{port} in the pool", param="url")
        role = state.pool.prefill if inst.spec.role == "prefill" else state.pool.decode
        if len(role.instances) == 1:
            raise ApiError(409, f"{inst.spec.name} is the last {inst.spec.role} instance; add another first",
                           param="url")
        state.pool.remove(inst)
    log.info("instance %s removed from the %s pool; %d request(s) still in flight there", inst.spec.name,
             inst.spec.role, inst.inflight)
    deadline = time.monotonic() + limit
    while inst.inflight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    drained = inst.inflight == 0
    return (200 if drained else 202), {"name": inst.spec.name, "removed": True, "inflight": inst.inflight,
                                       "drained": drained}
