"""Reading an instance's own ``/v1/models`` (vLLM's model cards), for start-up, the LoRA
adapter refresh and instances added while running: one place for the call and its failures."""

from __future__ import annotations

from typing import Any

import aiohttp


async def models_of(session: aiohttp.ClientSession, base_url: str, timeout: float) -> Any:
    """The instance's ``/v1/models`` answer as JSON, or None when it gave none (not reached, not
    200, not JSON)."""
    try:
        async with session.get(base_url + "/v1/models", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            return await resp.json(content_type=None) if resp.status == 200 else None
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
        return None
