"""``run_scheduler(config)``: the library entry used by ``pdserve scheduler`` and by the role
daemon ``pdserve serve`` when the local ranktable says this host is the scheduler."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from pdserve.scheduler.app import STATE, Scheduler, build_app, make_session
from pdserve.scheduler.config import SchedulerConfig
from pdserve.scheduler.listen import bind_error, check_listen_address
from pdserve.scheduler.startup import prepare

log = logging.getLogger("pdserve.scheduler")


async def serve(cfg: SchedulerConfig, stop: asyncio.Event | None = None) -> None:
    """Check the instances, then serve until ``stop`` is set or SIGINT/SIGTERM arrives; then drain:
    refuse new requests with 503, give in-flight ones up to ``--drain-seconds``, and return."""
    check_listen_address(cfg)
    stop = stop or asyncio.Event()
    force = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signame: str) -> None:
        if stop.is_set():
            log.warning("%s again: stopping without waiting for in-flight requests", signame)
            force.set()
        else:
            log.info("%s received", signame)
            stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):  # also while the instances are waited for
        try:
            loop.add_signal_handler(sig, on_signal, sig.name)
        except (NotImplementedError, RuntimeError):
            pass
    session = make_session(cfg)
    runner: web.AppRunner | None = None
    try:
        if not await _until_stopped(prepare(session, cfg), stop):  # ConfigError: nothing listens yet
            log.info("stopped while waiting for the instances")
            return
        app = build_app(cfg, session)
        state: Scheduler = app[STATE]  # type: ignore[assignment]
        # the drain below already waited for in-flight requests: cleanup then cancels what is left
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, cfg.host, cfg.port, backlog=2048)
        try:
            await site.start()
        except OSError as exc:  # taken while we waited for the instances
            raise bind_error(cfg.host, cfg.port, exc) from None
        log.info("scheduler listening on http://%s:%d (%s API; policies prefill=%s decode=%s; models %s%s)",
                 cfg.host, cfg.port, "OpenAI" if cfg.use_openai else "/generate", cfg.prefill_policy,
                 cfg.decode_policy, ", ".join(cfg.served_model_names) or "any",
                 f"; {len(cfg.api_keys)} API key(s)" if cfg.api_keys else "")
        await stop.wait()
        state.drain.begin()
        inflight = state.drain.active
        log.info("scheduler draining: refusing new requests; %d in flight, waiting up to %g s (--drain-seconds)",
                 inflight, cfg.drain_seconds)
        if await state.drain.wait_idle(cfg.drain_seconds, force):
            log.info("drained: every in-flight request finished; shutting down")
        else:
            log.warning("drain ended with %d request(s) still in flight; they are cut", state.drain.active)
    finally:
        if runner is not None:
            await runner.cleanup()
        await session.close()


async def _until_stopped(work: Coroutine[Any, Any, Any], stop: asyncio.Event) -> bool:
    """Run ``work`` unless ``stop`` is set first (then cancel it): True when it finished."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False
    task.result()  # its error, if any
    return True


def run_scheduler(cfg: SchedulerConfig) -> int:
    """Blocking: run the scheduler on uvloop until a signal; ConfigError propagates (exit 2)."""
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        runner = asyncio.run
    runner(serve(cfg))
    return 0
