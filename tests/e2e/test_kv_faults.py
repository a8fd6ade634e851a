"""Faults around the KV hand-over with real vLLM instances: nothing hangs, nothing is stranded.

The shared cluster runs with a short lease and pull timeout (conftest: LEASE_SECONDS,
LOAD_TIMEOUT_SECONDS) so expiries and failed pulls show up within seconds.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import requests

from tests.e2e._vllm import metric
from tests.e2e.conftest import LEASE_SECONDS, LOAD_TIMEOUT_SECONDS

pytestmark = pytest.mark.e2e

PROMPT = "Tell me a long story about a lighthouse keeper and the sea. " * 20


def _wait_for(pred, timeout: float, step: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def _usage(url: str) -> float:
    return metric(url, "vllm:kv_cache_usage_perc")


def test_unpulled_lease_expires_and_frees_prefill_kv(pd_cluster):
    """A prefill whose decode never comes (lost request, dead decode) frees its blocks by itself."""
    before = metric(pd_cluster.prefill_url, "pdserve:kv_lease_expiries_total")
    r = requests.post(f"{pd_cluster.prefill_url}/v1/completions", timeout=120, json={
        "model": pd_cluster.served_model_name, "prompt": PROMPT, "max_tokens": 1,
        "kv_transfer_params": {"do_remote_decode": True}})
    assert r.status_code == 200 and r.json()["kv_transfer_params"]["remote_block_ids"]
    assert _usage(pd_cluster.prefill_url) > 0  # held under the lease
    assert _wait_for(lambda: metric(pd_cluster.prefill_url, "pdserve:kv_lease_expiries_total") > before,
                     LEASE_SECONDS + 20)
    assert _wait_for(lambda: _usage(pd_cluster.prefill_url) == 0.0, 10)


def test_pull_from_unreachable_prefill_fails_fast_and_frees_decode_kv(pd_cluster):
    """Decode with params pointing at a dead prefill: a clear error after the pull timeout."""
    failures = metric(pd_cluster.decode_url, "pdserve:kv_pull_failures_total")
    dead_port = pd_cluster.free_port()
    t0 = time.monotonic()
    r = requests.post(f"{pd_cluster.decode_url}/v1/completions", timeout=LOAD_TIMEOUT_SECONDS + 60, json={
        "model": pd_cluster.served_model_name, "prompt": PROMPT, "max_tokens": 8,
        "kv_transfer_params": {"do_remote_prefill": True, "remote_engine_id": "gone",
                               "remote_host": "127.0.0.1", "remote_port": dead_port,
                               "remote_request_id": "never-existed", "remote_block_ids": [1, 2, 3],
                               "remote_num_tokens": 300}})
    took = time.monotonic() - t0
    assert r.status_code >= 500, r.text
    assert "error" in r.json()
    assert took < LOAD_TIMEOUT_SECONDS + 30
    assert metric(pd_cluster.decode_url, "pdserve:kv_pull_failures_total") == failures + 1
    assert _wait_for(lambda: _usage(pd_cluster.decode_url) == 0.0, 10)


def test_client_disconnect_mid_stream_aborts_decode_and_frees_kv(pd_cluster):
    body = {"model": pd_cluster.served_model_name, "prompt": PROMPT, "max_tokens": 1500,
            "ignore_eos": True, "stream": True}
    with requests.post(f"{pd_cluster.scheduler_url}/v1/completions", json=body, stream=True,
                       timeout=120) as r:
        assert r.status_code == 200
        chunks = 0
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                chunks += 1
            if chunks >= 5:
                break  # the client walks away mid-stream
    assert _wait_for(lambda: metric(pd_cluster.decode_url, "vllm:num_requests_running") == 0, 20)
    assert _wait_for(lambda: _usage(pd_cluster.decode_url) == 0.0
                     and _usage(pd_cluster.prefill_url) == 0.0, 20)


def test_decode_dying_before_first_token_gives_clear_error_and_frees_prefill_kv(pd_cluster, tmp_path):
    """Real prefill, a decode that drops every connection: 502 after the retry, no hang, and the
    prefill-side KV of both attempts is freed when their leases expire."""
    port, fake_port = pd_cluster.free_port(), pd_cluster.free_port()
    log = open(tmp_path / "procs.log", "w")
    fake = subprocess.Popen([sys.executable, "-m", "pdserve.testing.fake_instance", "--port", str(fake_port),
                             "--role", "decode", "--model", pd_cluster.served_model_name],
                            stdout=log, stderr=subprocess.STDOUT)
    sched = None
    try:
        assert _wait_for(lambda: _listening(f"http://127.0.0.1:{fake_port}"), 30)
        requests.post(f"http://127.0.0.1:{fake_port}/_fake/config", json={"die_after_tokens": 0},
                      timeout=5).raise_for_status()
        sched = subprocess.Popen(
            [sys.executable, "-m", "pdserve", "scheduler", "--host", "127.0.0.1", "--port", str(port),
             "--prefill-url", f"127.0.0.1:{pd_cluster.ports['prefill']}", "--decode-url",
             f"127.0.0.1:{fake_port}", "--no-identity-check",
             "--served-model-name", pd_cluster.served_model_name],
            stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        assert _wait_for(lambda: _listening(url), 60), (tmp_path / "procs.log").read_text()
        expiries = metric(pd_cluster.prefill_url, "pdserve:kv_lease_expiries_total")
        t0 = time.monotonic()
        r = requests.post(f"{url}/v1/completions", timeout=120, json={
            "model": pd_cluster.served_model_name, "prompt": PROMPT, "max_tokens": 8})
        assert r.status_code in (502, 503), r.text
        assert r.json()["error"]["message"]
        assert time.monotonic() - t0 < 60
        # nobody pulled: every lease the prefill instance granted expires and frees its blocks
        assert _wait_for(lambda: metric(pd_cluster.prefill_url, "pdserve:kv_lease_expiries_total")
                         > expiries, LEASE_SECONDS + 20)
        assert _wait_for(lambda: _usage(pd_cluster.prefill_url) == 0.0, LEASE_SECONDS + 20)
    finally:
        for proc in (sched, fake):
            if proc is not None:
                proc.terminate()
                proc.wait(30)
        log.close()


def _listening(url: str) -> bool:
    try:
        requests.get(f"{url}/health", timeout=2)
        return True
    except requests.RequestException:
        return False
