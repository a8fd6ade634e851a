"""LoRA adapters through the PD path, with real vLLM: greedy text equals one vLLM server's with
the same adapter, for an adapter given at start-up (``--lora-modules``) and one loaded at run time
through the scheduler (``POST /v1/load_lora_adapter``, sent to both instances).

The adapters are made here with random weights (nothing is downloaded): large enough to change
the demo model's text, so equal text means the decode instance really continued with the
adapter the prefill instance used. ``PDSERVE_E2E_LORA=0`` skips the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.e2e._vllm import metric, start_reference, stop, wait_healthy

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(os.environ.get("PDSERVE_E2E_LORA") == "0", reason="PDSERVE_E2E_LORA=0")]

HOST = "127.0.0.1"
NAME = "demo"
PROMPTS = ["The capital of France is a city where", "Write one sentence about the sea. " * 20]
LORA_ARGS = ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "2"]
RUNTIME = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}  # the instances' and the scheduler's switch


def make_adapter(out: Path, seed: int) -> Path:
    """A rank-8 LoRA adapter on q_proj and v_proj of every layer of the demo model, random weights."""
    import torch
    from safetensors.torch import save_file

    from pdserve.model.demo import build_demo_model

    cfg = json.loads((build_demo_model(progress=False) / "config.json").read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    kv_rows = cfg["num_key_value_heads"] * hidden // cfg["num_attention_heads"]
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for i in range(layers):
        for proj, rows in (("q_proj", hidden), ("v_proj", kv_rows)):
            name = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            weights[f"{name}.lora_A.weight"] = (torch.randn(8, hidden, generator=g) * 0.05).to(torch.bfloat16)
            weights[f"{name}.lora_B.weight"] = (torch.randn(rows, 8, generator=g) * 0.05).to(torch.bfloat16)
    out.mkdir(parents=True)
    save_file(weights, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "fan_in_fan_out": False}))
    return out


def complete(base: str, model: str, prompt: str) -> str:
    r = requests.post(f"{base}/v1/completions", timeout=300, json={
        "model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def answers(base: str) -> dict[str, list[str]]:
    return {model: [complete(base, model, p) for p in PROMPTS] for model in (NAME, "a1", "a2")}


def test_lora_through_pd_matches_one_server(tmp_path: Path) -> None:
    from pdserve.model.demo import build_demo_model
    from tests.e2e.conftest import free_port

    a1, a2 = make_adapter(tmp_path / "a1", 1), make_adapter(tmp_path / "a2", 2)
    taken: set[int] = set()
    port, base = free_port(taken), free_port(taken)
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "pdserve", "up", "--demo", "--served-model-name", NAME, "--port", str(port),
         "--base-port", str(base), "--timeout", "600", "--run-dir", str(tmp_path / "run"),
         "--scheduler-arg=--decode-only-when-queued=0", *LORA_ARGS, "--lora-modules", f"a1={a1}"],
        env=dict(os.environ, **RUNTIME), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        wait_healthy(url, up, timeout=600)
        models = {m["id"]: m for m in requests.get(f"{url}/v1/models", timeout=10).json()["data"]}
        assert models["a1"]["parent"] == NAME and models["a1"]["root"] == str(a1)
        assert requests.post(f"{url}/v1/completions", timeout=10, json={
            "model": "a2", "prompt": "x"}).status_code == 404
        r = requests.post(f"{url}/v1/load_lora_adapter", timeout=120,
                          json={"lora_name": "a2", "lora_path": str(a2)})
        assert r.status_code == 200, r.text
        for inst in (base, base + 1):  # both instances have it now
            assert "a2" in [m["id"] for m in requests.get(f"http://{HOST}:{inst}/v1/models", timeout=10).json()["data"]]
        decode_url = f"http://{HOST}:{base + 1}"
        computed_before = metric(decode_url, "vllm:prompt_tokens_by_source_total", source="local_compute")
        got = answers(url)
        # the decode instance computed no prompt (at most the token it continues from, and a last
        # prompt token): every request's KV came from the prefill instance
        computed = metric(decode_url, "vllm:prompt_tokens_by_source_total", source="local_compute") - computed_before
        assert computed <= 2 * 3 * len(PROMPTS), computed
        assert metric(decode_url, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer") > 300
    finally:
        stop(up)
        log.close()
    # the adapters change the text, so equal text below is the adapters' doing on both sides
    assert got["a1"] != got[NAME] and got["a2"] != got[NAME] and got["a1"] != got["a2"]

    ref_port = free_port(taken)
    ref = start_reference(str(build_demo_model(progress=False)), ref_port, "0", tmp_path / "reference.log", NAME,
                          [*LORA_ARGS, "--lora-modules", f"a1={a1}", f"a2={a2}"])
    try:
        wait_healthy(f"http://{HOST}:{ref_port}", ref)
        want = answers(f"http://{HOST}:{ref_port}")
    finally:
        stop(ref)
    assert got == want
