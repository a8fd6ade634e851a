"""PDFlow pieces without a network: the decode body splice, a prefill answering invalid JSON, and
a client that left between the prefill's answer and the decode call."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from pdserve.scheduler.config import InstanceSpec, SchedulerConfig
from pdserve.scheduler.errors import ApiError
from pdserve.scheduler.metrics import SchedulerMetrics
from pdserve.scheduler.pd_flow import PDFlow, PrefillResult, RequestContext, decode_body
from pdserve.scheduler.policies import RouteKey
from pdserve.scheduler.pool import Instance
from pdserve.scheduler.relay import OpenAIRelay

pytestmark = pytest.mark.unit

KVTP = {"do_remote_prefill": True, "remote_engine_id": "p0", "remote_block_ids": [0, 1], "remote_port": 20000}
KVTP_BYTES = b'{"do_remote_prefill":true,"remote_engine_id":"p0","remote_block_ids":[0,1],"remote_port":20000}'


# -- decode_body -------------------------------------------------------------------------------------
def test_decode_body_without_kv_params_is_the_client_bytes() -> None:
    raw = b'{"prompt": "a",   "temperature": 1.0e0}'
    assert decode_body(raw, json.loads(raw), None) is raw


def test_decode_body_splices_kv_params_into_the_client_bytes() -> None:
    raw = b'{"prompt": "a \\u00e9",   "temperature": 1.0e0, "x": {"y": [1, 2]}}  \n'
    out = decode_body(raw, json.loads(raw), KVTP)
    # nothing re-encoded: the escapes, spacing and number spelling stay; trailing whitespace goes
    assert out == b'{"prompt": "a \\u00e9",   "temperature": 1.0e0, "x": {"y": [1, 2]},"kv_transfer_params":' \
        + KVTP_BYTES + b"}"
    assert json.loads(out) == {**json.loads(raw), "kv_transfer_params": KVTP}


def test_decode_body_replaces_the_clients_own_kv_params() -> None:
    """A client that sent kv_transfer_params itself: spliced, the key would appear twice (and the
    first would win in some parsers); the body is re-encoded with the prefill's params instead."""
    raw = b'{"prompt": "a", "kv_transfer_params": {"do_remote_decode": true}, "n": 1}'
    out = decode_body(raw, json.loads(raw), KVTP)
    assert out.count(b'"kv_transfer_params"') == 1
    assert json.loads(out) == {"prompt": "a", "kv_transfer_params": KVTP, "n": 1}


def test_decode_body_raw_not_ending_in_a_brace_is_re_encoded() -> None:
    body = {"prompt": "a", "max_tokens": 2}
    for raw in (b"", b'{"prompt": "a", "max_tokens": 2} // trailing'):
        out = decode_body(raw, body, KVTP)
        assert json.loads(out) == {**body, "kv_transfer_params": KVTP}


# -- a client gone after the prefill ---------------------------------------------------------------------
class _Transport:
    def is_closing(self) -> bool:
        return True


class _Request:
    transport = _Transport()


class _Session:
    def __init__(self) -> None:
        self.posts: list[str] = []

    def post(self, url: str, **kw: Any) -> Any:
        self.posts.append(url)
        raise AssertionError("no upstream call expected")


class _RolePool:
    def __init__(self, instances: list[Instance] | None = None) -> None:
        self.instances = instances or []
        self.acquired = 0
        self.released = 0

    async def acquire(self, key: RouteKey, exclude: Any = ()) -> Instance:
        self.acquired += 1
        left = [i for i in self.instances if i not in set(exclude)]
        if not left:
            raise AssertionError("no instance of this role should be acquired")
        return left[0]

    def release(self, inst: Instance, tokens: int) -> None:
        self.released += 1


class _Pool:
    def __init__(self, prefill: list[Instance] | None = None) -> None:
        self.prefill = _RolePool(prefill)
        self.decode = _RolePool()


class _Releaser:
    def __init__(self) -> None:
        self.released: list[tuple[dict[str, Any], str]] = []

    def release(self, kvtp: dict[str, Any], reason: str) -> int:
        self.released.append((kvtp, reason))
        return 1


def _ctx() -> RequestContext:
    raw = b'{"prompt": "x", "max_tokens": 3}'
    return RequestContext(request_id="r1", endpoint="completions", path="/v1/completions", body=json.loads(raw),
                          raw=raw, stream=False, key=RouteKey(None, 4))


def _flow(releaser: _Releaser | None = None, n_prefill: int = 0) -> tuple[PDFlow, _Session, _Pool]:
    metrics = SchedulerMetrics()
    prefill = [Instance(InstanceSpec("prefill", i, i, "127.0.0.1", 9000 + i), metrics) for i in range(n_prefill)]
    session, pool = _Session(), _Pool(prefill)
    flow = PDFlow(SchedulerConfig(instances=[]), pool, metrics, session,  # type: ignore[arg-type]
                  releaser=releaser)  # type: ignore[arg-type]
    return flow, session, pool


# -- a prefill answering 200 with invalid JSON -----------------------------------------------------------
async def test_prefill_200_with_invalid_json_is_a_502_not_retried() -> None:
    flow, _, pool = _flow(n_prefill=2)
    calls: list[str] = []

    async def post_prefill(inst: Instance, body: bytes, ctx: RequestContext) -> tuple[int, bytes]:
        calls.append(inst.spec.name)
        return 200, b"this is not JSON"

    flow._post_prefill = post_prefill  # type: ignore[method-assign]
    ctx = _ctx()
    with pytest.raises(ApiError) as exc:
        await flow.prefill(ctx)
    assert exc.value.status == 502
    assert exc.value.message == f"prefill instance {pool.prefill.instances[0].spec.name} answered invalid JSON"
    assert calls == [pool.prefill.instances[0].spec.name] and ctx.retries == 0  # computed: no retry elsewhere
    assert pool.prefill.acquired == pool.prefill.released == 1


async def test_hand_over_after_the_client_left_cancels_without_a_decode_call() -> None:
    flow, session, pool = _flow()
    ctx = _ctx()
    pre = PrefillResult("prefill[0]", dict(KVTP), 0, 2)
    with pytest.raises(asyncio.CancelledError):
        await flow._hand_over(ctx, _Request(), OpenAIRelay(), pre)  # type: ignore[arg-type]
    assert ctx.error == "client disconnected before decode"
    assert pool.decode.acquired == 0 and session.posts == []
    assert ctx.instances == [] and ctx.retries == 0


async def test_run_releases_the_lease_of_a_client_that_left_after_the_prefill() -> None:
    releaser = _Releaser()
    flow, session, pool = _flow(releaser)
    ctx = _ctx()

    async def prefill(ctx: RequestContext, want_first: bool = False) -> PrefillResult:
        return PrefillResult("prefill[0]", dict(KVTP), 0, 2)

    flow.prefill = prefill  # type: ignore[method-assign]
    with pytest.raises(asyncio.CancelledError):
        await flow.run(ctx, _Request(), OpenAIRelay())  # type: ignore[arg-type]
    assert releaser.released == [(KVTP, "client disconnected before decode")]
    assert ctx.lease is None and pool.decode.acquired == 0 and session.posts == []
    assert flow.metrics.leases_released._value.get() == 1
