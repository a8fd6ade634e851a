"""LoRA adapters: which ones clients may name, and loading them on every instance at once.

A request may name a LoRA adapter instead of the base model (vLLM's ``--enable-lora
--lora-modules NAME=PATH``). The KV a prefill instance computes with an adapter is only valid with
that same adapter on the decode side, and a request may land on any prefill and any decode
instance, so the scheduler accepts an adapter's name only when *every* instance serves it. It
learns them from the instances' ``/v1/models`` at start-up (vLLM lists an adapter as a card whose
``parent`` is the base model) and keeps the set current when adapters are loaded or unloaded
through the scheduler (``POST /v1/load_lora_adapter``, ``/v1/unload_lora_adapter``), which sends
the call to every instance and undoes a load that some instance refused. An instance that comes
back after a restart gets the adapters loaded through the scheduler again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from pydantic import BaseModel, ConfigDict, Field

from pdserve.scheduler.errors import ApiError

log = logging.getLogger("pdserve.scheduler.adapters")

LOAD_PATH = "/v1/load_lora_adapter"
UNLOAD_PATH = "/v1/unload_lora_adapter"


@dataclass(frozen=True, slots=True)
class Adapter:
    name: str
    path: str  # what the instances loaded it from (their card's "root")
    parent: str | None = None  # the base model's name on the instances


def adapters_in_models(data: Any) -> list[Adapter]:
    """The LoRA adapters in one answer of vLLM's ``/v1/models`` (cards with a ``parent``)."""
    cards = data.get("data") if isinstance(data, dict) else None
    found = []
    for card in cards or ():
        if isinstance(card, dict) and isinstance(card.get("id"), str) and isinstance(card.get("parent"), str):
            root = card.get("root")
            found.append(Adapter(card["id"], root if isinstance(root, str) else card["id"], card["parent"]))
    return found


class LoadRequest(BaseModel):
    """vLLM's ``LoadLoRAAdapterRequest``; unknown keys are passed on to the instances as they are."""

    model_config = ConfigDict(extra="allow")
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: str = Field(min_length=1)


@dataclass(slots=True)
class InstanceAnswer:
    instance: str  # e.g. "decode0"
    status: int  # 0: not reached
    body: bytes
    content_type: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def route_missing(self) -> bool:
        """vLLM serves the load/unload routes only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True;
        without, FastAPI answers its own 404 (``{"detail": "Not Found"}``, not vLLM's error shape)."""
        return self.status == 404 and b'"detail"' in self.body


class AdapterRegistry:
    """The adapters every instance serves, and the loads made through the scheduler."""

    def __init__(self) -> None:
        self.served: dict[str, Adapter] = {}
        self.loaded_here: dict[str, dict[str, Any]] = {}  # name -> the load body, to load again on recovery

    def __contains__(self, name: object) -> bool:
        return name in self.served

    def names(self) -> list[str]:
        return list(self.served)

    def set_from_instances(self, per_instance: Sequence[tuple[str, Iterable[Adapter]]]) -> list[str]:
        """Keep the adapters every instance listed; returns one warning per adapter some lack."""
        if not per_instance:
            return []
        listed = [(name, {a.name: a for a in adapters}) for name, adapters in per_instance]
        everywhere = set.intersection(*(set(by_name) for _, by_name in listed))
        self.served = {n: a for n, a in listed[0][1].items() if n in everywhere}
        warnings = []
        for adapter in sorted({n for _, by_name in listed for n in by_name} - everywhere):
            has = [inst for inst, by_name in listed if adapter in by_name]
            lacks = [inst for inst, by_name in listed if adapter not in by_name]
            warnings.append(f"LoRA adapter {adapter!r} is served by {', '.join(has)} but not by {', '.join(lacks)}: "
                            "requests naming it are refused (404). Start every instance with the same "
                            "--lora-modules, or load it through the scheduler's POST " + LOAD_PATH)
        return warnings

    def loaded(self, body: LoadRequest, parent: str | None) -> None:
        self.served[body.lora_name] = Adapter(body.lora_name, body.lora_path, parent)
        self.loaded_here[body.lora_name] = body.model_dump()

    def unloaded(self, name: str) -> None:
        self.served.pop(name, None)
        self.loaded_here.pop(name, None)


async def post_to(session: aiohttp.ClientSession, name: str, url: str, body: dict[str, Any],
                  timeout: float) -> InstanceAnswer:
    """One POST to one instance; a connection failure is an answer with status 0."""
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            return InstanceAnswer(name, resp.status, await resp.read(), resp.headers.get("Content-Type"))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return InstanceAnswer(name, 0, f"{type(exc).__name__}: {exc}".encode())


async def post_to_all(session: aiohttp.ClientSession, targets: Sequence[tuple[str, str]], path: str,
                      body: dict[str, Any], timeout: float) -> list[InstanceAnswer]:
    """The same call on every instance at once (``targets``: (name, base url) pairs)."""
    return list(await asyncio.gather(*(post_to(session, name, url + path, body, timeout)
                                       for name, url in targets)))


def describe_failures(answers: Iterable[InstanceAnswer]) -> str:
    """``decode0 answered 400: ...; prefill1 was not reached: ...`` for an error message."""
    parts = []
    for a in answers:
        text = a.body.decode("utf-8", "replace").strip()[:300]
        parts.append(f"{a.instance} was not reached ({text})" if a.status == 0 else f"{a.instance} answered "
                     f"{a.status}: {text}")
    return "; ".join(parts)


def _refused(answers: Sequence[InstanceAnswer]) -> int:
    """The status for a call some instance refused: theirs when they all agree it is the client's
    fault (a 4xx), else 502."""
    statuses = {a.status for a in answers}
    return statuses.pop() if len(statuses) == 1 and 400 <= next(iter(statuses)) < 500 else 502


_RUNTIME_HINT = (" Start every instance with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True to load adapters at run time, "
                 "or with --enable-lora --lora-modules NAME=PATH to load them at start-up.")


class AdapterAdmin:
    """``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` on every instance at once."""

    def __init__(self, registry: AdapterRegistry, session: aiohttp.ClientSession,
                 targets: Sequence[tuple[str, str]], base_names: Iterable[str], parent: str | None,
                 timeout: float) -> None:
        self.registry = registry
        self.session = session
        self.targets = list(targets)  # (instance name, base url)
        self.base_names = frozenset(base_names)
        self.parent = parent
        self.timeout = timeout

    async def load(self, req: LoadRequest) -> str:
        name = req.lora_name
        if name in self.base_names:
            raise ApiError(400, f"{name!r} is the base model's name; give the adapter another name", param="lora_name")
        if name in self.registry and not req.load_inplace:
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded. If you want to load the "
                                "adapter in place, set 'load_inplace' to True.", param="lora_name")
        body = req.model_dump()
        answers = await post_to_all(self.session, self.targets, LOAD_PATH, body, self.timeout)
        failed = [a for a in answers if not a.ok]
        if not failed:
            self.registry.loaded(req, self.parent)
            log.info("LoRA adapter %r loaded from %s on all %d instances", name, req.lora_path, len(answers))
            return f"Success: LoRA adapter '{name}' added successfully."
        undone = ""
        done = [(a.instance, url) for a, (_, url) in zip(answers, self.targets, strict=True) if a.ok]
        if done and not req.load_inplace:  # all or nothing: an adapter on some instances only is unusable
            await post_to_all(self.session, done, UNLOAD_PATH, {"lora_name": name}, self.timeout)
            undone = f" It was unloaded again from {', '.join(n for n, _ in done)}."
        elif done:  # an in-place load cannot be undone
            undone = (f" {', '.join(n for n, _ in done)} now serve the new weights and the others the old ones: "
                      "load it again.")
        hint = _RUNTIME_HINT if all(a.route_missing for a in failed) else ""
        raise ApiError(_refused(failed), f"loading LoRA adapter {name!r} failed: {describe_failures(failed)}."
                                         f"{undone}{hint}", param="lora_name")

    async def unload(self, req: UnloadRequest) -> str:
        name = req.lora_name
        answers = await post_to_all(self.session, self.targets, UNLOAD_PATH, req.model_dump(), self.timeout)
        # vLLM's own 404 (not FastAPI's) means this instance did not have it: that is gone too
        failed = [a for a in answers if not a.ok and not (a.status == 404 and not a.route_missing)]
        if any(a.ok for a in answers) or not failed:
            self.registry.unloaded(name)  # no longer on every instance: refused from now on
        if not failed:
            if not any(a.ok for a in answers):
                raise ApiError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name")
            log.info("LoRA adapter %r unloaded from every instance", name)
            return f"Success: LoRA adapter '{name}' removed successfully."
        hint = _RUNTIME_HINT if all(a.route_missing for a in failed) else ""
        raise ApiError(_refused(failed), f"unloading LoRA adapter {name!r} failed: {describe_failures(failed)}."
                                         f"{hint}", param="lora_name")

    async def reload(self, name: str, url: str) -> None:
        """An instance is back (perhaps restarted, without what was loaded at run time): load again
        the adapters loaded through the scheduler."""
        for adapter, body in list(self.registry.loaded_here.items()):
            answer = await post_to(self.session, name, url + LOAD_PATH, {**body, "load_inplace": True}, self.timeout)
            if answer.ok:
                log.info("LoRA adapter %r loaded again on %s", adapter, name)
            else:
                log.warning("LoRA adapter %r could not be loaded again on %s (%s): requests naming it may fail "
                            "there", adapter, name, describe_failures([answer]))
