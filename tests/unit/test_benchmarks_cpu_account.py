"""benchmarks/_cpu_account.py: per-process CPU seconds during a workload (real child processes)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _cpu_account as acc  # noqa: E402

pytestmark = pytest.mark.unit

PREFILL = ('python -m vllm.entrypoints.openai.api_server --port 8100 --kv-transfer-config '
           '{"kv_role":"kv_producer"}')


def test_labels_name_the_kind_role_and_server_port() -> None:
    assert acc.label("VLLM::Worker", "VLLM::Worker", PREFILL) == "prefill worker :8100"
    assert acc.label("VLLM::EngineCor", "VLLM::EngineCore", PREFILL.replace("producer", "consumer")) \
        == "decode engine core :8100"
    assert acc.label("python", "python -m vllm.entrypoints.openai.api_server --port=9", "x --port=9") \
        == "API server :9"
    assert acc.label("python", "python -m pdserve serve --port 9000", None) == "pdserve daemon"


def test_busy_child_counted_idle_child_not() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<0.6: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.6)"])
    try:
        time.sleep(0.15)  # both interpreters started
        before = acc.snapshot([busy.pid, idle.pid])
        time.sleep(0.35)
        usage = acc.used(before, acc.snapshot([busy.pid, idle.pid]))
    finally:
        busy.wait(), idle.wait()
    assert set(before) == {busy.pid, idle.pid}
    # both are labelled "python": summed; the busy one alone accounts for most of the 0.35 s
    assert 0.15 < usage["python"] < 0.7
    text = acc.format_usage({"prefill worker :1": 30.0, "idle": 0.01}, wall_s=40.0, cores=2)
    assert text.splitlines()[0].startswith("CPU during the workload: 30.0 s of 80.0 s available")
    assert "prefill worker :1" in text and "idle" not in text
