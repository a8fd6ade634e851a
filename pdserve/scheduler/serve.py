"""``run_scheduler(config)``: the library entry used by ``pdserve scheduler`` and by the role
daemon ``pdserve serve`` when the local ranktable says this host is the scheduler."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from pdserve.scheduler.app import build_app, make_session
from pdserve.scheduler.config import SchedulerConfig
from pdserve.scheduler.startup import prepare

log = logging.getLogger("pdserve.scheduler")


async def serve(cfg: SchedulerConfig, stop: asyncio.Event | None = None) -> None:
    """Check the instances, then serve until ``stop`` is set (or SIGINT/SIGTERM)."""
    session = make_session(cfg)
    runner: web.AppRunner | None = None
    try:
        await prepare(session, cfg)  # raises ConfigError: nothing is listening yet
        app = build_app(cfg, session)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, cfg.host, cfg.port, backlog=2048)
        await site.start()
        log.info("scheduler listening on http://%s:%d (%s API; policies prefill=%s decode=%s; models %s)",
                 cfg.host, cfg.port, "OpenAI" if cfg.use_openai else "/generate", cfg.prefill_policy,
                 cfg.decode_policy, ", ".join(cfg.served_model_names) or "any")
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        await stop.wait()
        log.info("scheduler shutting down")
    finally:
        if runner is not None:
            await runner.cleanup()
        await session.close()


def run_scheduler(cfg: SchedulerConfig) -> int:
    """Blocking: run the scheduler on uvloop until a signal; ConfigError propagates (exit 2)."""
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        runner = asyncio.run
    runner(serve(cfg))
    return 0
