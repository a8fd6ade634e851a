"""The operator's view of a real cluster started with scripts/start_servers.sh (tests/e2e/conftest.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import jsonschema
import psutil
import pytest
import requests

from pdserve.identity import IDENTITY_PATH

pytestmark = pytest.mark.e2e


def test_ascend_guide_curl(pd_cluster) -> None:
    """The request of the Ascend PD guide, sent with curl, answered through prefill -> decode."""
    body = {"model": pd_cluster.served_model_name,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 32, "top_k": -1, "top_p": 1, "temperature": 0, "ignore_eos": False, "stream": False}
    out = subprocess.run(["curl", "-sS", "--fail-with-body", "-X", "POST",
                          f"{pd_cluster.scheduler_url}/v1/chat/completions",
                          "-H", "Content-Type: application/json", "-d", json.dumps(body)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    answer = json.loads(out.stdout)
    assert "Paris" in answer["choices"][0]["message"]["content"]
    assert answer["model"] == pd_cluster.served_model_name
    assert answer["usage"]["completion_tokens"] >= 1


def test_identity_endpoints(pd_cluster) -> None:
    """Each instance says who it is (the scheduler checked this at start-up too)."""
    for url, role, devices in ((pd_cluster.prefill_url, "prefill", [0]), (pd_cluster.decode_url, "decode", [1])):
        ident = requests.get(url + IDENTITY_PATH, timeout=10).json()
        assert ident["role"] == role and ident["index"] == 0 and ident["device_ids"] == devices
        assert ident["served_model_names"] == [pd_cluster.served_model_name]
        assert ident["kv_side_channel"] == f"127.0.0.1:{int(url.rsplit(':', 1)[1]) + 10000}"


def test_tokenize_detokenize_version_as_an_instance_answers(pd_cluster) -> None:
    """The routes one instance answers for the scheduler give what the instance itself gives."""
    model = pd_cluster.served_model_name
    for body in ({"model": model, "prompt": "The capital of France is"},
                 {"model": model, "messages": [{"role": "user", "content": "Hi there"}]}):
        got = requests.post(f"{pd_cluster.scheduler_url}/tokenize", json=body, timeout=30)
        want = requests.post(f"{pd_cluster.decode_url}/tokenize", json=body, timeout=30)
        assert got.status_code == want.status_code == 200, got.text
        assert got.json() == want.json() and got.json()["count"] > 3
    tokens = got.json()["tokens"]
    text = requests.post(f"{pd_cluster.scheduler_url}/detokenize", json={"model": model, "tokens": tokens},
                         timeout=30)
    assert text.status_code == 200 and "Hi there" in text.json()["prompt"]
    import vllm

    assert requests.get(f"{pd_cluster.scheduler_url}/version", timeout=10).json() == {"version": vllm.__version__}
    assert requests.post(f"{pd_cluster.scheduler_url}/ping", timeout=10).status_code == 200


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40},
                   "country": {"type": "string", "maxLength": 40},
                   "population_millions": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["city", "country", "population_millions"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("style", ["structured_outputs", "response_format"])
def test_structured_json_output(pd_cluster, style: str) -> None:
    """vLLM 0.32's guided decoding (``structured_outputs`` / ``response_format`` json_schema)."""
    body = {"model": pd_cluster.served_model_name, "max_tokens": 96, "temperature": 0,
            "messages": [{"role": "user", "content": "Give the capital of France as JSON with its country "
                                                     "and population in millions."}]}
    if style == "structured_outputs":
        body["structured_outputs"] = {"json": SCHEMA}
    else:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    r = requests.post(f"{pd_cluster.scheduler_url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(text), SCHEMA)


def test_generate_api_with_use_openai_0(pd_cluster) -> None:
    """A second scheduler (USE_OPENAI=0) in front of the same instances serves vLLM's /generate."""
    port = pd_cluster.free_port()
    ports = pd_cluster.ports
    daemon = pd_cluster.start_role("scheduler-generate", "scheduler", port,
                                   NODE_PORTS=f"{ports['prefill']},{ports['decode']}", USE_OPENAI="0")
    url = f"http://127.0.0.1:{port}"
    try:
        pd_cluster.wait_healthy(url, [daemon], 120)
        prompt = "The capital of France is"
        r = requests.post(url + "/generate", json={"prompt": prompt, "max_tokens": 8, "temperature": 0}, timeout=300)
        assert r.status_code == 200, r.text
        text = r.json()["text"]
        assert isinstance(text, list) and len(text) == 1 and text[0].startswith(prompt) and len(text[0]) > len(prompt)
        assert requests.post(url + "/v1/chat/completions", json={}, timeout=10).status_code == 404
    finally:
        daemon.proc.stop(10)
        del pd_cluster.daemons["scheduler-generate"]
    assert daemon.proc.poll() == 0


@pytest.mark.pd_shutdown
def test_sigterm_leaves_no_process(pd_cluster) -> None:
    """SIGTERM to each daemon (as an orchestrator sends it) stops it with exit 0 and leaves no child."""
    watched: dict[str, list[psutil.Process]] = {}
    for name, d in pd_cluster.daemons.items():
        d.proc.remember_descendants()
        root = psutil.Process(d.proc.pid)
        watched[name] = [root, *root.children(recursive=True)]
    # the instances run vLLM (API server + engine core) under the daemon
    assert len(watched["prefill0"]) >= 3 and len(watched["decode0"]) >= 3, watched
    for d in pd_cluster.daemons.values():
        d.proc.proc.send_signal(signal.SIGTERM)  # the daemon itself (start_servers.sh exec'd into it)
    for name, d in pd_cluster.daemons.items():
        rc = d.proc.wait(90)
        assert rc == 0, f"{name} exit {rc}:\n{d.tail()}"
    deadline = time.monotonic() + 15
    alive: list[str] = []
    while time.monotonic() < deadline:
        alive = [f"{n}: pid {p.pid} {p.name()}" for n, procs in watched.items() for p in procs
                 if _alive(p)]
        if not alive:
            break
        time.sleep(0.5)
    pd_cluster.stopped = True
    assert not alive, f"left behind after SIGTERM: {alive}"
    for name in ("prefill0", "decode0"):  # the instance daemons drained their vLLM server
        assert f"{name} stopped (exit" in pd_cluster.daemons[name].log.read_text(), name


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
