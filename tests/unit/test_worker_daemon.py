"""The daemon's supervision with a fake child (a tiny Python script, not vLLM)."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from pdserve.worker.daemon import serving

pytestmark = pytest.mark.unit

CHILD = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    mode = sys.argv[1]
    # a grandchild, like vLLM's engine core, in the same process group
    sub = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(f"grandchild {sub.pid}", flush=True)
    for i in range(60):
        print(f"line {i}", flush=True)
    if mode == "die":
        print("fatal: out of cheese", flush=True)
        sys.exit(3)
    NOISE = [  # what vLLM 0.32 prints on every stop
        "(APIServer pid=7) ERROR 11-25 03:00:53 [async_llm.py:480] AsyncLLM output_handler failed.",
        "(APIServer pid=7) ERROR 11-25 03:00:53 [async_llm.py:480] Traceback (most recent call last):",
        '(APIServer pid=7) ERROR 11-25 03:00:53 [async_llm.py:480]   File "/v/async_llm.py", line 440, in h',
        "(APIServer pid=7) ERROR 11-25 03:00:53 [async_llm.py:480]     outputs = await engine_core.get()",
        "(APIServer pid=7) ERROR 11-25 03:00:53 [async_llm.py:480] vllm.v1.engine.exceptions.EngineDeadError: "
        "EngineCore encountered an issue. See stack trace (above) for the root cause.",
        "nanobind: leaked 4 instances!",
        ' - leaked instance 0x7fe76d948dc8 of type "triton._C.libtriton.ir.attribute"',
        " - ... skipped remainder",
        "nanobind: this is likely caused by a reference counting issue in the binding code.",
        "See https://nanobind.readthedocs.io/en/latest/refleaks.html/usr/lib/python3.11/multiprocessing/"
        "resource_tracker.py:254: UserWarning: resource_tracker: There appear to be 2 leaked shared_memory "
        "objects to clean up at shutdown",
        "  warnings.warn('resource_tracker: There appear to be %d '",
    ]
    REAL = ["a real line", "Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
            "ValueError: a real failure"]
    if mode == "noisy":
        print("nanobind: before the stop", flush=True)
        def noisy(*a):
            print("draining", flush=True)
            print(chr(10).join(NOISE[:5] + REAL + NOISE[5:]), flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, noisy)
    elif mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *a: (print("draining", flush=True), sys.exit(0)))
    print("ready", flush=True)
    time.sleep(600)
""")

DAEMON = textwrap.dedent("""
    import sys
    from pdserve.worker.daemon import supervise
    sys.exit(supervise("prefill0", [sys.executable, sys.argv[1], sys.argv[2]], None, float(sys.argv[3]),
                       prefix="[prefill0] ", health_url=sys.argv[4] if len(sys.argv) > 4 else None))
""")


def start(tmp_path: Path, mode: str, drain: float = 5.0, health_url: str | None = None,
          **env_vars: str) -> subprocess.Popen[str]:
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_vars)
    extra = [health_url] if health_url else []
    return subprocess.Popen([sys.executable, "-c", DAEMON, str(child), mode, str(drain), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen[str], word: str, timeout: float = 30) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if word in line:
            return lines
    raise AssertionError(f"{word!r} not seen in {lines}")


def grandchild(lines: list[str]) -> int:
    return int(next(line for line in lines if "grandchild" in line).split()[-1])


def gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_sigterm_forwarded_then_exit_0(tmp_path: Path) -> None:
    d = start(tmp_path, "ok")
    lines = wait_for(d, "ready")
    assert all(line.startswith("[prefill0] ") for line in lines)
    gc = grandchild(lines)
    d.send_signal(signal.SIGTERM)
    out, err = d.communicate(timeout=30)
    assert d.returncode == 0, err
    assert "[prefill0] draining" in out and "SIGTERM: stopping prefill0" in err
    assert gone(gc)


def test_vllms_shutdown_noise_is_left_out_once_stopping(tmp_path: Path) -> None:
    d = start(tmp_path, "noisy")
    lines = wait_for(d, "ready")
    assert "[prefill0] nanobind: before the stop" in lines  # nothing is hidden before the stop
    d.send_signal(signal.SIGTERM)
    out, err = d.communicate(timeout=30)
    assert d.returncode == 0, err
    shown = [line.removeprefix("[prefill0] ") for line in out.splitlines()]
    assert shown == ["draining", "a real line", "Traceback (most recent call last):",
                     '  File "x.py", line 1, in <module>', "ValueError: a real failure"]
    assert ("prefill0: left out 11 lines of vLLM's usual shutdown noise (an EngineDeadError traceback after "
            "the engine stopped, nanobind leak reports, resource_tracker warnings)") in err
    assert "PDSERVE_SHOW_SHUTDOWN_NOISE=1" in err


def test_shutdown_noise_shown_on_request(tmp_path: Path) -> None:
    d = start(tmp_path, "noisy", PDSERVE_SHOW_SHUTDOWN_NOISE="1")
    wait_for(d, "ready")
    d.send_signal(signal.SIGTERM)
    out, err = d.communicate(timeout=30)
    assert "EngineDeadError" in out and "nanobind: leaked 4 instances!" in out and "left out" not in err


def test_sigint_also_stops(tmp_path: Path) -> None:
    d = start(tmp_path, "ok")
    wait_for(d, "ready")
    d.send_signal(signal.SIGINT)
    d.communicate(timeout=30)
    assert d.returncode == 0


def test_stubborn_child_is_killed_after_the_drain_deadline(tmp_path: Path) -> None:
    d = start(tmp_path, "stubborn", drain=1.0)
    lines = wait_for(d, "ready")
    gc = grandchild(lines)
    t0 = time.monotonic()
    d.send_signal(signal.SIGTERM)
    d.communicate(timeout=30)
    assert d.returncode == 0 and time.monotonic() - t0 < 15
    assert gone(gc)


def test_child_death_is_non_zero_with_log_tail(tmp_path: Path) -> None:
    d = start(tmp_path, "die")
    out, err = d.communicate(timeout=30)
    assert d.returncode == 3
    assert "exited on its own with code 3" in err and "fatal: out of cheese" in err
    tail = [line for line in err.splitlines() if line.startswith("  | ")]
    assert len(tail) == 40 and tail[-1] == "  | fatal: out of cheese"
    assert gone(grandchild(out.splitlines()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_not_serving_yet_is_not_drained(tmp_path: Path) -> None:
    """Ctrl-C while vLLM still starts (it ignores SIGTERM then): a short grace, not the drain."""
    d = start(tmp_path, "stubborn", drain=60.0, health_url=f"http://127.0.0.1:{free_port()}/health")
    gc = grandchild(wait_for(d, "ready"))
    t0 = time.monotonic()
    d.send_signal(signal.SIGTERM)
    _, err = d.communicate(timeout=30)
    assert d.returncode == 0 and time.monotonic() - t0 < 15
    assert "not serving yet (nothing to drain)" in err
    assert gone(gc)


def test_serving_reads_the_health_status() -> None:
    class Health(http.server.BaseHTTPRequestHandler):
        status = 200

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(Health.status)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/health"
    try:
        assert serving(url) and serving(None)
        Health.status = 503
        assert not serving(url)
        assert not serving(f"http://127.0.0.1:{free_port()}/health")
    finally:
        server.shutdown()


def test_health_url_from_the_server_command_line() -> None:
    from pdserve.worker.cli import _health_url

    assert _health_url(["--host", "0.0.0.0", "--port", "8001"]) == "http://127.0.0.1:8001/health"
    assert _health_url(["--port=9", "--host", "::1"]) == "http://[::1]:9/health"
    assert _health_url(["--model", "m"]) is None
