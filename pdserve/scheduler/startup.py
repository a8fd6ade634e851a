"""Start-up checks: wait until every instance is healthy, then make sure each port in NODE_PORTS
is the instance the global ranktable says it is (``GET /pdserve/v1/identity``).

A wrong NODE_PORTS (ports swapped, a decode port listed among the prefill ones, an instance from
another deployment) would otherwise route prompts to the wrong role and fail in obscure ways; here
it stops start-up with one message that names the port, what was expected and what answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from pydantic import ValidationError

from pdserve.errors import ConfigError
from pdserve.identity import IDENTITY_PATH, Identity
from pdserve.scheduler.adapters import adapters_in_models, common_adapters
from pdserve.scheduler.config import InstanceSpec, SchedulerConfig
from pdserve.scheduler.probe import models_of

log = logging.getLogger("pdserve.scheduler.startup")


async def _healthy(session: aiohttp.ClientSession, spec: InstanceSpec, timeout: float) -> str | None:
    """None when healthy, else why not."""
    try:
        async with session.get(spec.url + "/health", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            await resp.read()
            return None if resp.status == 200 else f"GET /health answered {resp.status}"
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def wait_healthy(session: aiohttp.ClientSession, cfg: SchedulerConfig, progress_every: float = 10.0) -> None:
    """Poll /health of all instances until all answer 200 or --startup-timeout passes."""
    start = time.monotonic()
    pending = {s: "not checked yet" for s in cfg.instances}
    last_log = start
    while True:
        results = await asyncio.gather(*(_healthy(session, s, cfg.health_timeout) for s in pending))
        for spec, why in zip(list(pending), results, strict=True):
            if why is None:
                log.info("instance %s is healthy", spec.name)
                del pending[spec]
            else:
                pending[spec] = why
        if not pending:
            return
        now = time.monotonic()
        if now - start >= cfg.startup_timeout:
            lines = "; ".join(f"{s.name} (NODE_PORTS[{s.global_index}]): {why}" for s, why in pending.items())
            raise ConfigError("start-up", None,
                              f"{len(pending)} instance(s) not healthy after {cfg.startup_timeout:g} s: {lines}",
                              "start the instances (pdserve serve / start_servers.sh), check their logs, "
                              "or raise --startup-timeout")
        if now - last_log >= progress_every:
            last_log = now
            log.info("waiting for %d/%d instance(s) to become healthy (%.0f s of %g s): %s", len(pending),
                     len(cfg.instances), now - start, cfg.startup_timeout,
                     ", ".join(s.name for s in pending))
        await asyncio.sleep(cfg.startup_poll_interval)


def _describe(ident: Identity) -> str:
    return f"{ident.role} instance {ident.index} (global index {ident.global_index}) on {ident.server_ip}"


async def fetch_identity(session: aiohttp.ClientSession, spec: InstanceSpec, timeout: float) -> Identity:
    where = f"NODE_PORTS[{spec.global_index}] (port {spec.port} on {spec.host})"
    fix_skip = "start the instance with `pdserve serve`, or pass --no-identity-check for stock vLLM instances"
    try:
        async with session.get(spec.url + IDENTITY_PATH, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise ConfigError("NODE_PORTS", where,
                                  f"expected {spec.role} instance {spec.index}, but GET {IDENTITY_PATH} answered "
                                  f"HTTP {resp.status} (not a pdserve instance?)", fix_skip)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise ConfigError("NODE_PORTS", where, f"identity check failed: {type(exc).__name__}: {exc}",
                          fix_skip) from None
    try:
        return Identity.model_validate_json(body)
    except ValidationError:
        raise ConfigError("NODE_PORTS", where,
                          f"expected {spec.role} instance {spec.index}, but {IDENTITY_PATH} answered "
                          f"{body[:200]!r}", fix_skip) from None


async def check_identities(session: aiohttp.ClientSession, cfg: SchedulerConfig) -> list[Identity]:
    idents = await asyncio.gather(*(fetch_identity(session, s, cfg.health_timeout) for s in cfg.instances))
    for spec, ident in zip(cfg.instances, idents, strict=True):
        where = f"NODE_PORTS[{spec.global_index}] (port {spec.port} on {spec.host})"
        expected = f"{spec.role} instance {spec.index} (global index {spec.global_index})"
        if (ident.role, ident.index, ident.global_index) != (spec.role, spec.index, spec.global_index):
            raise ConfigError("NODE_PORTS", where, f"expected {expected}, but {_describe(ident)} answered",
                              "list the ports in global-ranktable order: every prefill instance first, then every "
                              "decode instance (`pdserve ranktable show` prints the order)")
        if cfg.ranktable_digest and ident.ranktable_digest and ident.ranktable_digest != cfg.ranktable_digest:
            raise ConfigError("NODE_PORTS", where,
                              f"{expected} answered, but it was started from another global ranktable "
                              f"(digest {ident.ranktable_digest}, the scheduler's is {cfg.ranktable_digest})",
                              "start every daemon with the same GLOBAL_RANK_TABLE_FILE_PATH")
    # every instance must serve the same model: the scheduler forwards one name to all of them
    named = [(spec, ident) for spec, ident in zip(cfg.instances, idents, strict=True) if ident.served_model_names]
    if named:
        first_spec, first = named[0]
        for spec, ident in named[1:]:
            if first.served_model_names[0] not in ident.served_model_names:
                raise ConfigError("NODE_PORTS", f"NODE_PORTS[{spec.global_index}] (port {spec.port} on {spec.host})",
                                  f"{spec.role} instance {spec.index} serves {ident.served_model_names}, but "
                                  f"{first_spec.name} serves {first.served_model_names}",
                                  "start every instance with the same model and --served-model-name")
    return list(idents)


@dataclass
class ModelFacts:
    """What the instances' own ``/v1/models`` says about the model (vLLM's model card)."""

    max_model_len: int | None = None
    name: str | None = None
    root: str | None = None  # the model path the instances loaded
    owned_by: str | None = None


async def models_answers(session: aiohttp.ClientSession, cfg: SchedulerConfig) -> list[tuple[str, Any]]:
    """Every instance's ``/v1/models`` answer (None where it gave none), decode instances first."""
    specs = cfg.decode + cfg.prefill
    answers = await asyncio.gather(*(models_of(session, s.url, cfg.health_timeout) for s in specs))
    return list(zip([s.name for s in specs], answers, strict=True))


def model_facts(answers: list[tuple[str, Any]]) -> ModelFacts:
    """The base model's card in the first answer of vLLM's /v1/models: the scheduler rejects
    too-long prompts early with ``max_model_len``, calls the instances by ``name`` and lists the
    model as vLLM would."""
    for _, data in answers:
        cards = data.get("data") if isinstance(data, dict) else None
        for m in cards or ():
            if isinstance(m, dict) and isinstance(m.get("id"), str) and m.get("parent") is None:
                mml, root, owner = m.get("max_model_len"), m.get("root"), m.get("owned_by")
                return ModelFacts(mml if isinstance(mml, int) else None, m["id"],
                                  root if isinstance(root, str) else None,
                                  owner if isinstance(owner, str) else None)
    return ModelFacts()


def learn_adapters(cfg: SchedulerConfig, answers: list[tuple[str, Any]]) -> None:
    """The LoRA adapters every instance serves (from the same path) become model names clients may
    use; an instance whose /v1/models failed counts as serving none."""
    common, warnings = common_adapters([(name, adapters_in_models(data)) for name, data in answers])
    for warning in warnings:
        log.warning("%s", warning)
    cfg.lora_adapters = list(common.values())
    if cfg.lora_adapters:
        log.info("LoRA adapter(s) on every instance: %s", ", ".join(a.name for a in cfg.lora_adapters))


async def prepare(session: aiohttp.ClientSession, cfg: SchedulerConfig) -> None:
    """Everything between "config parsed" and "serve": health, identities, model facts.

    ``cfg.upstream_model`` becomes the instances' own served name; ``cfg.served_model_names`` (the
    names clients may use) defaults to the instances' names. Names the instances do not know are
    aliases: requests are forwarded with the instances' name (see :mod:`features`)."""
    log.info("scheduler: %d prefill + %d decode instance(s): %s", len(cfg.prefill), len(cfg.decode),
             ", ".join(s.name for s in cfg.instances))
    await wait_healthy(session, cfg)
    instance_names: list[str] = []
    if cfg.identity_check:
        idents = await check_identities(session, cfg)
        # chat without max_tokens may continue after the prefill's token only if every instance
        # defaults to the rest of the context (a generation-config max_new_tokens would be lost)
        cfg.chat_default_is_context = bool(idents) and all(i.chat_default_max_tokens == "context" for i in idents)
        for ident in idents:
            if ident.served_model_names:
                instance_names = list(ident.served_model_names)
                break
        if cfg.ranktable_digest:
            log.info("all %d instance identities match the ranktable", len(idents))
        else:
            log.info("all %d instances answer with the role and index of their --prefill-url/--decode-url "
                     "(no ranktable: digests not compared)", len(idents))
    answers = await models_answers(session, cfg)
    facts = model_facts(answers)
    learn_adapters(cfg, answers)
    if cfg.max_model_len is None and facts.max_model_len:
        cfg.max_model_len = facts.max_model_len
        log.info("max model length %d (from the instances)", cfg.max_model_len)
    if not instance_names and facts.name and cfg.upstream_model is None:
        instance_names = [facts.name]
    cfg.model_root = cfg.model_root or facts.root
    cfg.model_owned_by = cfg.model_owned_by or facts.owned_by
    if cfg.upstream_model is None and instance_names:
        cfg.upstream_model = instance_names[0]
    if not cfg.served_model_names:
        cfg.served_model_names = list(instance_names)
    aliases = [n for n in cfg.served_model_names if n not in instance_names]
    if aliases and cfg.upstream_model:
        log.info("model name(s) %s are aliases: forwarded to the instances as %r", ", ".join(aliases),
                 cfg.upstream_model)
