"""Tensor parallelism through the PD path, with real vLLM: 1P1D at TP 2 against one TP-2 server.

The demo model's 9 heads do not split in 2, so the test serves a TP-2-able cut of it: 2 of its 3
KV-head groups (6 query heads, 2 KV heads) and its first 8 layers, with their real weights. The
text is not good, but greedy decoding is deterministic and far from ties, which is all parity
needs. Each decode rank r pulls its half of the KV heads from prefill rank r (side-channel port
base + r). The greedy completions must equal the reference server's, token for token.

On a 2-core host the four ranks share the cores (``pdserve up`` binds them round-robin and sets
``PDSERVE_SHARED_CORES=1``, see ``pdserve.kv.shared_cores``): without that, the decode ranks'
busy wait starved the prefill ranks' side channels and every pull timed out. Generous KV
timeouts, because a 7-token prefill takes seconds there. ``PDSERVE_E2E_TP=0`` skips the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.e2e._vllm import metric, stop, wait_healthy

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(os.environ.get("PDSERVE_E2E_TP") == "0",
                                 reason="PDSERVE_E2E_TP=0")]

HOST = "127.0.0.1"
PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea. " * 12,
    "List the planets of the solar system in order, with one fact about each. " * 30,
]
MAX_TOKENS = 16


def tp2_model(out: Path) -> Path:
    """The demo model cut to 6 query heads, 2 KV heads and 8 layers (real weights)."""
    from safetensors.torch import load_file, save_file

    from pdserve.model.demo import build_demo_model

    src = build_demo_model(progress=False)
    cfg = json.loads((src / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    q_rows = 6 * head_dim
    kv_rows = 2 * head_dim
    layers = 8
    weights: dict = {}
    for f in src.glob("*.safetensors"):
        weights.update(load_file(f))
    cut = {}
    for name, w in weights.items():
        if name.startswith("model.layers."):
            if int(name.split(".")[2]) >= layers:
                continue
            if name.endswith("q_proj.weight"):
                w = w[:q_rows]
            elif name.endswith(("k_proj.weight", "v_proj.weight")):
                w = w[:kv_rows]
            elif name.endswith("o_proj.weight"):
                w = w[:, :q_rows]
        cut[name] = w.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(cut, out / "model.safetensors")
    cfg.update(num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=layers,
               head_dim=head_dim)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in src.iterdir():
        if f.is_file() and f.suffix in (".json", ".jinja") and f.name not in ("config.json",
                                                                              "pdserve-demo.json"):
            shutil.copy(f, out / f.name)
    return out


def complete(base: str, prompt: str) -> str:
    r = requests.post(f"{base}/v1/completions", timeout=600, json={
        "model": "tp2", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_tp2_pd_matches_one_tp2_server(tmp_path: Path) -> None:
    from tests.e2e.conftest import free_port

    model = tp2_model(tmp_path / "tp2-model")
    taken: set[int] = set()
    port, base = free_port(taken), free_port(taken)
    env = dict(os.environ, PDSERVE_KV_EXTRA_CONFIG=json.dumps(
        {"load_timeout_seconds": 300, "lease_seconds": 400}))
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "pdserve", "up", "--model", str(model), "--served-model-name", "tp2",
         "--tp", "2", "--port", str(port), "--base-port", str(base), "--max-model-len", "2048",
         "--timeout", "900", "--run-dir", str(tmp_path / "run"),
         "--scheduler-arg=--health-timeout=300", "--scheduler-arg=--decode-only-when-queued=0"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        wait_healthy(url, up, timeout=900)
        got = [complete(url, p) for p in PROMPTS]
        decode_url = f"http://{HOST}:{base + 1}"
        # the decode instance loaded the prompts (vLLM goes on only once every rank has pulled)
        assert metric(decode_url, "vllm:prompt_tokens_by_source_total",
                      source="external_kv_transfer") > 0
        assert metric(decode_url, "pdserve:kv_pulls_total") >= len(PROMPTS)
    finally:
        stop(up)
        log.close()

    ref_port = free_port(taken)
    ref_env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_CPU_KVCACHE_SPACE="1")
    ref_log = open(tmp_path / "reference.log", "wb")
    ref = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--served-model-name", "tp2", "--host", HOST, "--port", str(ref_port), "--enforce-eager",
         "--max-model-len", "2048", "--max-num-batched-tokens", "512",
         "--tensor-parallel-size", "2"],
        env=ref_env, stdout=ref_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"http://{HOST}:{ref_port}", ref, timeout=900)
        want = [complete(f"http://{HOST}:{ref_port}", p) for p in PROMPTS]
    finally:
        stop(ref)
        ref_log.close()
    assert got == want
