"""Start-up: NODE_PORTS/ranktable pairing, identity checks, waiting for health — readable errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from pdserve.errors import ConfigError, PdserveError
from pdserve.scheduler.config import SchedulerConfig, config_from_argv
from pdserve.scheduler.startup import prepare
from pdserve.testing.fake_instance import FakeInstance
from tests.integration.conftest import specs_for, start_fakes

pytestmark = pytest.mark.integration

RANKTABLE = {"version": "1.0", "status": "completed", "server_group_list": [
    {"group_id": "0", "server_count": "1", "server_list": [{"server_id": "127.0.0.1", "server_ip": "127.0.0.1"}]},
    {"group_id": "1", "server_count": "1", "server_list": [{"server_id": "127.0.0.1", "server_ip": "127.0.0.1",
                                                            "device": [{"device_id": "0", "device_ip": "127.0.0.1",
                                                                        "rank_id": "0"}]}]},
    {"group_id": "2", "server_count": "1", "server_list": [{"server_id": "127.0.0.1", "server_ip": "127.0.0.1",
                                                            "device": [{"device_id": "1", "device_ip": "127.0.0.1",
                                                                        "rank_id": "0"}]}]}]}


def cfg_for(prefill: list[FakeInstance], decode: list[FakeInstance], **kw: object) -> SchedulerConfig:
    kw.setdefault("startup_timeout", 2.0)
    kw.setdefault("startup_poll_interval", 0.02)
    return SchedulerConfig(instances=specs_for(prefill, decode), **kw)  # type: ignore[arg-type]


async def run_prepare(cfg: SchedulerConfig) -> None:
    async with aiohttp.ClientSession() as s:
        await prepare(s, cfg)


@pytest.fixture
async def fakes():  # type: ignore[no-untyped-def]
    prefill, decode = await start_fakes(1, 1, )
    yield prefill, decode
    for f in prefill + decode:
        await f.stop()


async def test_swapped_node_ports_named_in_error(fakes) -> None:  # type: ignore[no-untyped-def]
    prefill, decode = fakes
    cfg = cfg_for(prefill, decode)
    # NODE_PORTS lists the decode port first: pair the specs with the wrong ports
    a, b = cfg.instances
    cfg.instances = [type(a)(a.role, a.index, a.global_index, a.host, b.port),
                     type(b)(b.role, b.index, b.global_index, b.host, a.port)]
    with pytest.raises(ConfigError) as exc:
        await run_prepare(cfg)
    msg = str(exc.value)
    assert f"port {decode[0].port}" in msg
    assert "expected prefill instance 0 (global index 0)" in msg
    assert "decode instance 0 (global index 1)" in msg and "answered" in msg


async def test_wrong_index_detected(fakes) -> None:  # type: ignore[no-untyped-def]
    prefill, decode = fakes
    decode[0].config.identity = {"index": 3, "global_index": 4}
    with pytest.raises(ConfigError, match="expected decode instance 0 .* but decode instance 3"):
        await run_prepare(cfg_for(prefill, decode))


async def test_digest_mismatch(fakes) -> None:  # type: ignore[no-untyped-def]
    prefill, decode = fakes
    for f in prefill + decode:
        f.digest = "aaaa"
    with pytest.raises(ConfigError, match="another global ranktable"):
        await run_prepare(cfg_for(prefill, decode, ranktable_digest="bbbb"))
    await run_prepare(cfg_for(prefill, decode, ranktable_digest="aaaa"))


async def test_no_identity_endpoint(fakes) -> None:  # type: ignore[no-untyped-def]
    prefill, decode = fakes
    prefill[0].config.identity = {"role": "weird"}  # not a valid identity
    with pytest.raises(ConfigError, match="--no-identity-check"):
        await run_prepare(cfg_for(prefill, decode))
    await run_prepare(cfg_for(prefill, decode, identity_check=False))


async def test_served_name_unknown_to_instances_is_an_alias(fakes) -> None:  # type: ignore[no-untyped-def]
    prefill, decode = fakes
    cfg = cfg_for(prefill, decode, served_model_names=["other"])
    await run_prepare(cfg)
    assert cfg.served_model_names == ["other"] and cfg.upstream_model == "fake-model"


async def test_instances_serving_different_models_rejected(fakes) -> None:  # type: ignore[no-untyped-def]
    prefill, decode = fakes
    decode[0].config.identity = {"served_model_names": ["another-model"]}
    with pytest.raises(ConfigError, match=r"(?s)serves \['another-model'\].*--served-model-name"):
        await run_prepare(cfg_for(prefill, decode))


async def test_upstream_name_from_v1_models_without_identity(fakes) -> None:  # type: ignore[no-untyped-def]
    prefill, decode = fakes
    cfg = cfg_for(prefill, decode, identity_check=False, served_model_names=["alias"])
    await run_prepare(cfg)
    assert cfg.upstream_model == "fake-model" and cfg.max_model_len == 4096


async def test_wait_healthy_times_out_naming_instances(fakes) -> None:  # type: ignore[no-untyped-def]
    prefill, decode = fakes
    decode[0].config.healthy = False
    t = time.monotonic()
    with pytest.raises(ConfigError, match=r"1 instance\(s\) not healthy after 0.3 s: decode\[0\]"):
        await run_prepare(cfg_for(prefill, decode, startup_timeout=0.3))
    assert time.monotonic() - t < 2


async def test_wait_healthy_waits_for_late_instance(fakes) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    prefill, decode = fakes
    decode[0].config.healthy = False
    loop = asyncio.get_running_loop()
    t = loop.time()
    loop.call_later(0.2, lambda: setattr(decode[0].config, "healthy", True))
    await run_prepare(cfg_for(prefill, decode))
    assert loop.time() - t >= 0.2  # it waited for the late instance (not done before it was healthy)
    assert decode[0].config.healthy


def _env(tmp_path: Path, ports: str) -> dict[str, str]:
    path = tmp_path / "global_ranktable_merge.json"
    path.write_text(json.dumps(RANKTABLE))
    return {"GLOBAL_RANK_TABLE_FILE_PATH": str(path), "NODE_PORTS": ports}


def test_config_from_ranktable_and_node_ports(tmp_path: Path) -> None:
    env = _env(tmp_path, "9101, 9102")
    cfg = config_from_argv(["--port", "9000", "--served-model-name", "m", "--tensor-parallel-size", "2",
                            "--enforce-eager", "--max-num-seqs", "8"], env)
    assert [(s.role, s.index, s.host, s.port) for s in cfg.instances] == [
        ("prefill", 0, "127.0.0.1", 9101), ("decode", 0, "127.0.0.1", 9102)]
    assert cfg.port == 9000 and cfg.served_model_names == ["m"] and cfg.use_openai
    assert cfg.ranktable_digest
    env["USE_OPENAI"] = "0"
    assert not config_from_argv([], env).use_openai


def test_node_ports_count_mismatch(tmp_path: Path) -> None:
    with pytest.raises(PdserveError, match=r"1 port \(.* for 2 instances"):
        config_from_argv([], _env(tmp_path, "9101"))


def test_missing_env_is_readable() -> None:
    with pytest.raises(ConfigError, match="GLOBAL_RANK_TABLE_FILE_PATH"):
        config_from_argv([], {})


def test_local_ranktable_of_another_role_rejected(tmp_path: Path) -> None:
    env = _env(tmp_path, "9101,9102")
    local = tmp_path / "local.json"
    local.write_text(json.dumps({"version": "1.0", "status": "completed", "group_id": "0", "server_count": "1",
                                 "server_list": [RANKTABLE["server_group_list"][1]["server_list"][0]]}))
    env["RANK_TABLE_FILE_PATH"] = str(local)
    with pytest.raises(ConfigError, match="not the scheduler"):
        config_from_argv([], env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_wrong_node_ports_exits_with_message(tmp_path: Path) -> None:
    """`pdserve scheduler` against subprocess fake instances listed in the wrong order."""
    p_port, d_port = _free_port(), _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "pdserve.testing.fake_instance", "--port", str(port),
                               "--role", role, "--index", "0", "--global-index", str(gi)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for port, role, gi in ((p_port, "prefill", 0), (d_port, "decode", 1))]
    try:
        env = {**os.environ, **_env(tmp_path, f"{d_port},{p_port}"), "PDSERVE_STARTUP_TIMEOUT": "20"}
        # pdserve.cli.main limited to the scheduler command (other commands are built in parallel)
        driver = ("import sys, pdserve.cli as c; c._COMMAND_MODULES = ('pdserve.scheduler.cli',); "
                  "sys.argv[0] = 'pdserve'; raise SystemExit(c.main())")
        out = subprocess.run([sys.executable, "-c", driver, "scheduler", "--port", str(_free_port()),
                              "--trust-remote-code", "--gpu-memory-utilization", "0.9"],
                             env=env, capture_output=True, text=True, timeout=60)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert f"port {d_port}" in out.stderr and "expected prefill instance 0" in out.stderr


def test_sigterm_while_waiting_for_the_instances_stops_cleanly() -> None:
    """Before the instances answer there is nothing to drain: SIGTERM ends the wait with a log
    line and exit 0 (it used to kill the process with 143 and no word)."""
    import queue
    import signal
    import threading

    def free() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    proc = subprocess.Popen([sys.executable, "-m", "pdserve", "scheduler", "--host", "127.0.0.1",
                             "--port", str(free()), "--prefill-url", f"127.0.0.1:{free()}",
                             "--decode-url", f"127.0.0.1:{free()}", "--startup-timeout", "600"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        # its signal handlers are in place before it logs the instances it starts waiting for
        deadline = time.monotonic() + 30
        while not any("scheduler: 1 prefill + 1 decode instance(s)" in x for x in seen):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
            try:
                seen.append(lines.get(timeout=0.1))
            except queue.Empty:
                pass
        assert proc.poll() is None  # waiting for instances that never come
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    while not lines.empty():
        seen.append(lines.get())
    out = "".join(seen)
    assert proc.returncode == 0, out
    assert "stopped while waiting for the instances" in out and "Traceback" not in out
