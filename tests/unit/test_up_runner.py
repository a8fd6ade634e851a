"""``pdserve up``'s runner without real daemons: the health wait, the watch loop, the free-port
check, the question through the scheduler, and output to a closed pipe."""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pdserve.errors import ConfigError
from pdserve.up.plan import ClusterPlan, InstancePlan
from pdserve.up.runner import COMMANDS_FILE, SCHEDULER, Cluster, UpError, ask, check_ports_free

pytestmark = pytest.mark.unit

HOST = "127.0.0.1"


def plan(prefill_port: int = 8100, decode_port: int = 8101, scheduler_port: int = 9000,
         side_ports: tuple[int, int] = (18100, 18101)) -> ClusterPlan:
    return ClusterPlan("cpu", 1, scheduler_port, [
        InstancePlan("prefill", 0, 0, (0,), prefill_port, side_port=side_ports[0]),
        InstancePlan("decode", 0, 1, (1,), decode_port, side_port=side_ports[1]),
    ], host=HOST)


class FastEvent(threading.Event):
    """The runner's stop event, with its 1 s pauses between checks cut to 10 ms."""

    def wait(self, timeout: float | None = None) -> bool:
        return super().wait(0.01 if timeout is None else min(timeout, 0.01))


def fake_proc(name: str, dies_after: int | None = None, code: int = 3) -> SimpleNamespace:
    """A ManagedProcess stand-in: ``poll()`` answers None, then ``code`` from its ``dies_after``-th call."""
    calls = {"poll": 0}

    def poll() -> int | None:
        calls["poll"] += 1
        return code if dies_after is not None and calls["poll"] > dies_after else None

    p = SimpleNamespace(name=name, poll=poll, joined=[], tail_asked=[], calls=calls)
    p.remember_descendants = lambda: None
    p.join_tee = p.joined.append
    p.tail = lambda n=None: p.tail_asked.append(n) or [f"{name}: loading model", f"{name}: Killed"]
    return p


def cluster(tmp_path: Path, procs: list, timeout: float = 30.0) -> Cluster:
    c = Cluster(plan(), SimpleNamespace(timeout=timeout, run_dir=tmp_path), out=_Out())  # type: ignore[arg-type]
    c.procs = procs
    c.stop_event = FastEvent()
    return c


class _Out:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


def lines(c: Cluster) -> list[str]:
    return c.out.text.splitlines()


def health(port: int) -> str:
    return f"http://{HOST}:{port}/health"


# ------------------------------------------------------------------ wait_ready


def test_wait_ready_returns_once_every_daemon_answers(tmp_path: Path) -> None:
    asked: list[str] = []
    up_after = {health(8100): 1, health(8101): 3, health(9000): 2}

    def get_ok(url: str) -> bool:
        asked.append(url)
        return asked.count(url) >= up_after[url]

    c = cluster(tmp_path, [fake_proc("prefill0"), fake_proc("decode0"), fake_proc(SCHEDULER)])
    waited = c.wait_ready(get_ok=get_ok)
    assert 0 <= waited < 5
    assert set(asked) == set(up_after)
    assert asked.count(health(8100)) == 1  # a ready daemon is not asked again
    said = [line for line in lines(c) if line.endswith("s)")]
    assert [s.split()[1] for s in said] == ["prefill0", SCHEDULER, "decode0"]
    assert all(s.startswith("[up] ") and " ready (" in s for s in said)


def test_wait_ready_timeout_names_the_daemons_still_starting(tmp_path: Path) -> None:
    c = cluster(tmp_path, [fake_proc("prefill0"), fake_proc("decode0"), fake_proc(SCHEDULER)], timeout=0.3)
    start = time.monotonic()
    with pytest.raises(UpError) as exc:
        c.wait_ready(progress_every=0.05, get_ok=lambda url: url == health(8100))
    assert 0.3 <= time.monotonic() - start < 5
    msg = str(exc.value)
    assert msg.startswith("not ready after 0.3s (--timeout): still waiting for decode0, scheduler;")
    assert str(tmp_path) in msg and "prefill0" not in msg
    progress = [line for line in lines(c) if line.startswith("[up] waiting ")]
    assert progress, lines(c)
    assert all(line.endswith("s of 0.3s: prefill0 ready, decode0 starting, scheduler starting")
               for line in progress)


def test_a_daemon_that_dies_while_starting_fails_with_its_log_tail(tmp_path: Path) -> None:
    decode = fake_proc("decode0", dies_after=2, code=137)
    c = cluster(tmp_path, [fake_proc("prefill0"), decode, fake_proc(SCHEDULER)])
    with pytest.raises(UpError) as exc:
        c.wait_ready(get_ok=lambda url: False)
    msg = str(exc.value)
    assert msg.startswith("decode0 exited with code 137; last log lines:\n"
                          "  | decode0: loading model\n  | decode0: Killed\n")
    assert f"(ranktables and commands: {tmp_path}, see {COMMANDS_FILE})" in msg
    assert decode.joined == [2.0] and decode.tail_asked == [40]  # the tee finished, 40 lines asked


def test_stop_event_while_waiting_is_a_keyboard_interrupt(tmp_path: Path) -> None:
    c = cluster(tmp_path, [fake_proc("prefill0"), fake_proc("decode0"), fake_proc(SCHEDULER)])
    asked: list[str] = []

    def get_ok(url: str) -> bool:  # Ctrl-C arrives during the first round of health checks
        asked.append(url)
        c.stop_event.set()
        return False

    with pytest.raises(KeyboardInterrupt):
        c.wait_ready(get_ok=get_ok)
    assert len(asked) == 3  # one round, then it stopped waiting


# ------------------------------------------------------------------ serve_forever


def test_serve_forever_raises_when_a_daemon_dies(tmp_path: Path) -> None:
    sched = fake_proc(SCHEDULER, dies_after=5, code=1)
    c = cluster(tmp_path, [fake_proc("prefill0"), fake_proc("decode0"), sched])
    with pytest.raises(UpError, match=r"^scheduler exited with code 1; last log lines:\n  \| scheduler: loading"):
        c.serve_forever()
    assert sched.calls["poll"] >= 6 and sched.joined == [2.0]


def test_serve_forever_returns_on_stop(tmp_path: Path) -> None:
    procs = [fake_proc("prefill0"), fake_proc(SCHEDULER)]
    c = cluster(tmp_path, procs)
    timer = threading.Timer(0.1, c.stop_event.set)
    timer.start()
    c.serve_forever()  # returns, no error
    timer.join()
    assert all(p.calls["poll"] >= 1 for p in procs)


# ------------------------------------------------------------------ check_ports_free


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def test_check_ports_free_lists_every_busy_port() -> None:
    held = []
    try:
        for _ in range(3):  # an HTTP port, a side-channel port and the scheduler's
            s = socket.socket()
            s.bind((HOST, 0))
            s.listen()
            held.append(s)
        busy_http, busy_side, busy_sched = (s.getsockname()[1] for s in held)
        free_http, free_side = _free_port(), _free_port()
        with pytest.raises(ConfigError) as exc:
            check_ports_free(plan(prefill_port=busy_http, decode_port=free_http, scheduler_port=busy_sched,
                                  side_ports=(free_side, busy_side)))
        msg = str(exc.value)
        assert msg.startswith("flags: --port/--base-port: port(s) ")
        listed = msg.split("port(s) ", 1)[1].split(f" on {HOST} are already in use", 1)[0]
        assert listed.split(", ") == [str(busy_sched), str(busy_http), str(busy_side)]  # only the busy ones
        assert msg.endswith("fix: stop what listens there, or pass another --port / --base-port")
    finally:
        for s in held:
            s.close()


def test_check_ports_free_accepts_free_ports() -> None:
    ports = [_free_port() for _ in range(5)]
    check_ports_free(plan(*ports[:3], side_ports=(ports[3], ports[4])))  # no error


# ------------------------------------------------------------------ ask


class _Scheduler(http.server.BaseHTTPRequestHandler):
    status = 200
    body = b""
    seen: list = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers["Content-Length"])
        type(self).seen.append((self.path, json.loads(self.rfile.read(length))))
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def scheduler():
    handler = type("Handler", (_Scheduler,), {"seen": []})
    server = http.server.ThreadingHTTPServer((HOST, 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield handler, plan(scheduler_port=server.server_address[1])
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_ask_returns_the_answer(scheduler) -> None:
    handler, p = scheduler
    handler.body = json.dumps({"choices": [{"message": {"content": "Paris."}}]}).encode()
    assert ask(p, "demo", "Capital of France?", max_tokens=8, timeout=5) == "Paris."
    path, body = handler.seen[0]
    assert path == "/v1/chat/completions"
    assert body == {"model": "demo", "messages": [{"role": "user", "content": "Capital of France?"}],
                    "max_tokens": 8, "temperature": 0}


def test_ask_http_error_is_an_up_error_with_the_body(scheduler) -> None:
    handler, p = scheduler
    handler.status, handler.body = 503, b"no decode instance " + b"x" * 1000
    with pytest.raises(UpError) as exc:
        ask(p, "demo", "hi", timeout=5)
    msg = str(exc.value)
    assert msg.startswith("the question failed: HTTP 503: no decode instance xxx")
    assert len(msg) == len("the question failed: HTTP 503: ") + 500  # the body is cut at 500 bytes
    assert exc.value.exit_code == 1 and exc.value.__cause__ is None


def test_ask_connection_refused_is_an_up_error() -> None:
    port = _free_port()  # nothing listens there
    with pytest.raises(UpError, match=r"^the question failed: <urlopen error \[Errno 111\] Connection refused>$"):
        ask(plan(scheduler_port=port), "demo", "hi", timeout=5)


# ------------------------------------------------------------------ say


def test_say_on_a_closed_pipe_goes_on_quietly(tmp_path: Path) -> None:
    class ClosedPipe:
        writes = 0

        def write(self, s: str) -> int:
            ClosedPipe.writes += 1
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    c = Cluster(plan(), SimpleNamespace(), out=ClosedPipe())  # type: ignore[arg-type]
    c.say("ranktables in /tmp/x")  # no error
    try:
        assert ClosedPipe.writes == 1 and c.out.name == os.devnull
        c.say("stopping ...")  # later messages go nowhere, without an error
        assert ClosedPipe.writes == 1
    finally:
        c.out.close()
