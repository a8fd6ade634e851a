"""LoRA adapters: which ones clients may name, and loading them on every instance at once.

A request may name a LoRA adapter instead of the base model (vLLM's ``--enable-lora
--lora-modules NAME=PATH``). The KV a prefill instance computes with an adapter is only valid with
that same adapter on the decode side, and a request may land on any prefill and any decode
instance, so the scheduler accepts an adapter's name only when *every* healthy instance serves it
from the same path. It reads the instances' ``/v1/models`` (vLLM lists an adapter as a card whose
``parent`` is the base model) at start-up and again every health interval, so adapters loaded by
another scheduler replica or on the instances directly are seen too.

With ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` (vLLM's own switch, in the scheduler's environment
as in the instances'), ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` go to every
healthy instance, one call at a time per scheduler, all or nothing. An instance that comes back
after failing its health check gets the adapters loaded through the scheduler before it takes
requests again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from pydantic import BaseModel, ConfigDict, Field

from pdserve.scheduler.errors import ApiError
from pdserve.scheduler.probe import models_of

if TYPE_CHECKING:
    from pdserve.scheduler.pool import Instance

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


def common_adapters(per_instance: Sequence[tuple[str, Iterable[Adapter]]]) -> tuple[dict[str, Adapter], list[str]]:
    """The adapters every instance lists from the same path, and one warning per other adapter
    (a request naming it could meet an instance without it, or with other weights)."""
    if not per_instance:
        return {}, []
    listed = [(inst, {a.name: a for a in adapters}) for inst, adapters in per_instance]
    first = listed[0][1]
    common = {n: a for n, a in first.items() if all(by.get(n, Adapter("", "")).path == a.path for _, by in listed)}
    warnings = []
    for name in sorted({n for _, by in listed for n in by} - set(common)):
        has = [f"{inst} ({by[name].path})" for inst, by in listed if name in by]
        lacks = [inst for inst, by in listed if name not in by]
        why = f"not by {', '.join(lacks)}" if lacks else "from different paths"
        warnings.append(f"LoRA adapter {name!r} is served by {', '.join(has)} but {why}: requests naming it are "
                        "refused (404). Start every instance with the same --lora-modules, or load it through "
                        f"the scheduler's POST {LOAD_PATH} (with --allow-runtime-lora-updating)")
    return common, warnings


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
    instance: str  # e.g. "decode[0]@127.0.0.1:8101"
    status: int  # 0: not reached, or no answer in time
    body: bytes

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def route_missing(self) -> bool:
        """vLLM serves the load/unload routes only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True;
        without, FastAPI answers its own 404 (``{"detail": "Not Found"}``, not vLLM's error shape)."""
        return self.status == 404 and b'"detail"' in self.body

    @property
    def already_loaded(self) -> bool:
        return self.status == 400 and b"already been loaded" in self.body

    @property
    def not_loaded(self) -> bool:
        """vLLM's own 404 to an unload: the instance does not have the adapter."""
        return self.status == 404 and not self.route_missing


async def post_to(session: aiohttp.ClientSession, name: str, url: str, body: dict[str, Any],
                  timeout: float) -> InstanceAnswer:
    """One POST to one instance; a connection failure or a timeout is an answer with status 0."""
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            return InstanceAnswer(name, resp.status, await resp.read())
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return InstanceAnswer(name, 0, f"{type(exc).__name__}: {exc}".encode())


def describe(answers: Iterable[InstanceAnswer]) -> str:
    """``decode[0]@... answered 400: ...; prefill[1]@... gave no answer (...)`` for an error message."""
    parts = []
    for a in answers:
        text = a.body.decode("utf-8", "replace").strip()[:300]
        parts.append(f"{a.instance} gave no answer ({text})" if a.status == 0 else
                     f"{a.instance} answered {a.status}: {text}")
    return "; ".join(parts)


def _status(failed: Sequence[InstanceAnswer]) -> int:
    """The instances' own status when they all agree, else 502."""
    statuses = {a.status for a in failed}
    return statuses.pop() if len(statuses) == 1 and 0 not in statuses else 502


_RUNTIME_HINT = (" Start every instance with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True to load adapters at run time, "
                 "or with --enable-lora --lora-modules NAME=PATH to load them at start-up.")


class AdapterAdmin:
    """The adapters clients may name, kept in step with the instances, and the load/unload calls.

    One lock orders loads, unloads, reloads and refreshes, so none of them sees another half done.
    A call runs as its own task: a client that hangs up does not stop it half-way (vLLM goes on
    loading), and the scheduler's view stays right."""

    def __init__(self, instances: Sequence[Instance], base_names: Iterable[str], parent: str | None,
                 timeout: float, list_timeout: float, served: Iterable[Adapter] = ()) -> None:
        self.session: aiohttp.ClientSession | None = None  # set when the scheduler starts
        self.instances = instances
        self.base_names = frozenset(base_names)
        self.parent = parent
        self.timeout = timeout  # a load may read a large adapter from disk
        self.list_timeout = list_timeout
        self.served: dict[str, Adapter] = {a.name: a for a in served}
        self.loaded_here: dict[str, dict[str, Any]] = {}  # name -> load body: loaded again on recovery
        self.on_unload: list[Callable[[str], None]] = []  # e.g. drop the name's metric series
        self._lock = asyncio.Lock()
        self._warned: frozenset[str] = frozenset()
        self._tasks: set[asyncio.Task[Any]] = set()

    def __contains__(self, name: object) -> bool:
        return name in self.served

    def _targets(self) -> list[Instance]:
        return [i for i in self.instances if i.healthy]

    async def _post(self, inst: Instance, path: str, body: dict[str, Any]) -> InstanceAnswer:
        assert self.session is not None
        return await post_to(self.session, inst.spec.name, inst.url + path, body, self.timeout)

    async def _all(self, targets: Sequence[Instance], path: str, body: dict[str, Any]) -> list[InstanceAnswer]:
        return list(await asyncio.gather(*(self._post(i, path, body) for i in targets)))

    async def _detached(self, work: Awaitable[str]) -> str:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    def load(self, req: LoadRequest) -> Awaitable[str]:
        return self._detached(self._load(req))

    def unload(self, req: UnloadRequest) -> Awaitable[str]:
        return self._detached(self._unload(req))

    async def _load(self, req: LoadRequest) -> str:
        name = req.lora_name
        if name in self.base_names:
            raise ApiError(400, f"{name!r} is the base model's name; give the adapter another name", param="lora_name")
        async with self._lock:
            if name in self.served and not req.load_inplace:
                raise ApiError(400, f"The lora adapter '{name}' has already been loaded. If you want to load the "
                                    "adapter in place, set 'load_inplace' to True.", param="lora_name")
            targets = self._targets()
            if not targets:
                raise ApiError(503, "no healthy instance to load the adapter on")
            body = req.model_dump()
            answers = await self._all(targets, LOAD_PATH, body)
            # an instance that has the name already (left from an earlier, partly failed load, or
            # given at its start) is not what the scheduler serves: it gets the asked-for weights
            again = [k for k, a in enumerate(answers) if a.already_loaded]
            for k, a in zip(again, await self._all([targets[k] for k in again], LOAD_PATH,
                                                   {**body, "load_inplace": True}), strict=True):
                answers[k] = a
            failed = [a for a in answers if not a.ok]
            if not failed:
                self.served[name] = Adapter(name, req.lora_path, self.parent)
                self.loaded_here[name] = {**req.model_dump(), "load_inplace": False}  # reloads: only if missing
                log.info("LoRA adapter %r loaded from %s on %d instance(s)", name, req.lora_path, len(answers))
                return f"Success: LoRA adapter '{name}' added successfully."
            note = await self._undo_load(req, targets, answers)
        hint = _RUNTIME_HINT if all(a.route_missing for a in failed) else ""
        raise ApiError(_status(failed), f"loading LoRA adapter {name!r} failed: {describe(failed)}.{note}{hint}",
                       param="lora_name")

    async def _undo_load(self, req: LoadRequest, targets: Sequence[Instance], answers: Sequence[InstanceAnswer]) -> str:
        """All or nothing: unload again wherever the load may have happened (it answered 200, or
        gave no answer in time and may finish later). An in-place load cannot be undone."""
        maybe = [i for i, a in zip(targets, answers, strict=True) if a.ok or a.status == 0 or a.status >= 500]
        if req.load_inplace:
            took = [a.instance for a in answers if a.ok]
            self.served.pop(req.lora_name, None)  # the instances may now disagree on its weights
            return (f" {', '.join(took)} now serve the new weights and the others may not: requests naming it are "
                    "refused until a load succeeds everywhere." if took else "")
        if not maybe:
            return ""
        undo = await self._all(maybe, UNLOAD_PATH, {"lora_name": req.lora_name})
        undone = [a.instance for a in undo if a.ok]
        stuck = [a for a in undo if not (a.ok or a.not_loaded)]
        note = f" It was unloaded again from {', '.join(undone)}." if undone else ""
        if stuck:
            note += f" Unloading it again failed on: {describe(stuck)}; unload it there by hand."
        return note

    async def _unload(self, req: UnloadRequest) -> str:
        name = req.lora_name
        async with self._lock:
            targets = self._targets()
            answers = await self._all(targets, UNLOAD_PATH, req.model_dump())
            failed = [a for a in answers if not (a.ok or a.not_loaded)]
            if any(a.ok for a in answers) or name in self.served:
                self._forget(name)  # no longer on every instance: refused from now on
        if not failed:
            if not any(a.ok for a in answers):
                raise ApiError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name")
            log.info("LoRA adapter %r unloaded from %d instance(s)", name, len(answers))
            return f"Success: LoRA adapter '{name}' removed successfully."
        hint = _RUNTIME_HINT if all(a.route_missing for a in failed) else ""
        raise ApiError(_status(failed), f"unloading LoRA adapter {name!r} failed: {describe(failed)}.{hint}",
                       param="lora_name")

    def _forget(self, name: str) -> None:
        self.served.pop(name, None)
        self.loaded_here.pop(name, None)
        for cb in self.on_unload:
            cb(name)

    async def reload(self, inst: Instance) -> None:
        """``inst`` is back (perhaps restarted, without what was loaded at run time): load again
        what was loaded through the scheduler, before it takes requests."""
        for failure in await self.load_missing(inst):
            log.warning("LoRA adapter %s", failure)

    async def load_missing(self, inst: Instance) -> list[str]:
        """Load on ``inst`` what was loaded through the scheduler; one line per failure."""
        failures = []
        async with self._lock:
            for name, body in self.loaded_here.items():
                answer = await self._post(inst, LOAD_PATH, body)
                if answer.ok:
                    log.info("LoRA adapter %r loaded on %s", name, inst.spec.name)
                elif not answer.already_loaded:  # (it kept it: nothing lost)
                    failures.append(f"{name!r} on {describe([answer])}")
        return failures

    async def refresh(self) -> None:
        """Re-read which adapters every healthy instance serves. An adapter loaded through this
        scheduler that some instances lost (a restart the health check did not see) is loaded
        there again; one that all of them lost was unloaded elsewhere (another scheduler replica,
        an operator) and is forgotten. An instance whose ``/v1/models`` fails is left out."""
        async with self._lock:
            listed = await self._listings()
            repaired = False
            for name, body in list(self.loaded_here.items()):
                lacking = [i for i, adapters in listed if name not in {a.name for a in adapters}]
                if listed and len(lacking) == len(listed):
                    self._forget(name)
                for inst in lacking if len(lacking) < len(listed) else ():
                    answer = await self._post(inst, LOAD_PATH, body)
                    repaired = True
                    log.warning("LoRA adapter %r was missing on %s: loaded again (%s)", name, inst.spec.name,
                                "ok" if answer.ok else describe([answer]))
            if repaired:
                listed = await self._listings()
            if not listed:
                return
            common, warnings = common_adapters([(i.spec.name, adapters) for i, adapters in listed])
            for name in set(self.served) - set(common) - set(self.loaded_here):
                for cb in self.on_unload:  # gone (a start-up adapter unloaded elsewhere): its series too
                    cb(name)
            self.served = {n: self.served.get(n) or Adapter(n, a.path, self.parent) for n, a in common.items()}
        if frozenset(warnings) != self._warned:  # once per change, not every round
            for w in warnings:
                log.warning("%s", w)
            self._warned = frozenset(warnings)

    async def _listings(self) -> list[tuple[Instance, list[Adapter]]]:
        targets = self._targets()
        listed = await asyncio.gather(*(self._adapters_of(i) for i in targets))
        return [(i, adapters) for i, adapters in zip(targets, listed, strict=True) if adapters is not None]

    async def refresh_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:  # never let the loop die; the next round tries again
                log.exception("reading the instances' LoRA adapters failed")

    async def _adapters_of(self, inst: Instance) -> list[Adapter] | None:
        assert self.session is not None
        data = await models_of(self.session, inst.url, self.list_timeout)
        return None if data is None else adapters_in_models(data)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
