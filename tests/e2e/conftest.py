"""One real 1P1D cluster per test session, started the way an operator starts one.

``pdserve ranktable gen`` writes the ranktables for 127.0.0.1 (prefill on core 0, decode on core
1, scheduler host file); then the three roles are started through ``scripts/start_servers.sh``
with GLOBAL_RANK_TABLE_FILE_PATH / RANK_TABLE_FILE_PATH (+ NODE_PORTS for the scheduler). The
fixture ``pd_cluster`` is shared by every e2e test (KV parity included); tests marked
``pd_shutdown`` run last because they stop it.

Env: PDSERVE_E2E_KV_CONNECTOR (e.g. ``none`` to debug without the connector; default: pdserve's),
PDSERVE_E2E_TIMEOUT (start-up seconds, default 600), PDSERVE_E2E_LOG_DIR (keep logs there).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pdserve.worker.process import ManagedProcess

REPO = Path(__file__).resolve().parents[2]
START = REPO / "scripts" / "start_servers.sh"
HOST = "127.0.0.1"
SIDE_OFFSET = 10000
LEASE_SECONDS = 20
LOAD_TIMEOUT_SECONDS = 10
KV_EXTRA_CONFIG = f'{{"lease_seconds": {LEASE_SECONDS}, "load_timeout_seconds": {LOAD_TIMEOUT_SECONDS}}}'


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(taken: set[int], with_side_port: bool = False) -> int:
    """A free loopback port (and its KV side-channel port + 10000 when asked)."""
    for _ in range(500):
        port = random.randint(20000, 29999)
        if port in taken or (port + SIDE_OFFSET) in taken:
            continue
        if _free(port) and (not with_side_port or _free(port + SIDE_OFFSET)):
            taken.update({port, port + SIDE_OFFSET})
            return port
    raise RuntimeError("no free port on 127.0.0.1")


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


@dataclass
class Daemon:
    name: str
    proc: ManagedProcess
    log: Path

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.proc.tail(n))


@dataclass
class PDCluster:
    """A running cluster: URLs, model, ranktables and the role daemons (start_servers.sh)."""

    scheduler_url: str
    prefill_url: str
    decode_url: str
    model: str
    served_model_name: str
    run_dir: Path
    global_ranktable: Path
    local_ranktables: dict[str, Path]
    ports: dict[str, int]
    daemons: dict[str, Daemon] = field(default_factory=dict)
    taken: set[int] = field(default_factory=set)
    stopped: bool = False

    def free_port(self) -> int:
        return free_port(self.taken)

    def env(self, role: str, **extra: str) -> dict[str, str]:
        env = dict(os.environ, GLOBAL_RANK_TABLE_FILE_PATH=str(self.global_ranktable),
                   RANK_TABLE_FILE_PATH=str(self.local_ranktables[role]), VLLM_CPU_KVCACHE_SPACE="1",
                   PYTHONUNBUFFERED="1", PDSERVE_LOG_PREFIX="")  # the log file is per daemon already
        # short KV lease/pull timeouts so the fault tests see expiries and failures quickly
        env.setdefault("PDSERVE_KV_EXTRA_CONFIG", KV_EXTRA_CONFIG)
        connector = os.environ.get("PDSERVE_E2E_KV_CONNECTOR", "").strip()
        if connector:
            env["PDSERVE_KV_CONNECTOR"] = connector
        env.update(extra)
        return env

    def start_role(self, name: str, role: str, port: int, **env: str) -> Daemon:
        """``scripts/start_servers.sh`` with the vLLM flags of the Ascend guide."""
        argv = [str(START), "--model", self.model, "--served-model-name", self.served_model_name,
                "--max-model-len", "2048", "--max-num-seqs", "16", "--port", str(port)]
        if role == "scheduler":
            argv += ["--host", HOST]
        log = self.run_dir / f"{name}.log"
        sink = open(log, "w", buffering=1)  # noqa: SIM115 - closed with the session
        proc = ManagedProcess(name, argv, self.env(role, **env), out=sink, ring=80).start()
        daemon = Daemon(name, proc, log)
        self.daemons[name] = daemon
        return daemon

    def wait_healthy(self, url: str, daemons: list[Daemon], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for d in daemons:
                if d.proc.poll() is not None:
                    d.proc.join_tee(2)
                    raise RuntimeError(f"{d.name} exited with {d.proc.poll()} during start-up "
                                       f"(log {d.log}):\n{d.tail()}")
            if http_ok(url + "/health"):
                for d in daemons:
                    d.proc.remember_descendants()
                return
            time.sleep(1.0)
        raise TimeoutError(f"{url} not healthy after {timeout:g}s; logs in {self.run_dir}")

    def stop_all(self, drain: float = 30.0) -> None:
        for d in self.daemons.values():
            d.proc.remember_descendants()
            d.proc.signal_group(signal.SIGTERM)
        for d in self.daemons.values():
            d.proc.stop(drain)
        self.stopped = True


def _gen_ranktables(run_dir: Path) -> tuple[Path, dict[str, Path]]:
    subprocess.run([sys.executable, "-m", "pdserve", "ranktable", "gen", "--prefill-server-list", "0",
                    "--decode-server-list", "1", "--api-server", "--server-ip", HOST, "--save-dir", str(run_dir)],
                   check=True, capture_output=True, text=True)
    return run_dir / f"global_ranktable_{HOST}.json", {
        "prefill": run_dir / f"local_ranktable_{HOST}_0.json",
        "decode": run_dir / f"local_ranktable_{HOST}_1.json",
        "scheduler": run_dir / f"local_ranktable_{HOST}_host.json",
    }


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that stop the shared cluster go last."""
    items.sort(key=lambda item: item.get_closest_marker("pd_shutdown") is not None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "pd_shutdown: stops the shared e2e cluster (runs last)")


@pytest.fixture(scope="session")
def pd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PDCluster]:
    from pdserve.model.demo import build_demo_model

    if (os.cpu_count() or 1) < 2:
        pytest.skip("the e2e cluster binds prefill to core 0 and decode to core 1: needs 2 cores")
    keep = os.environ.get("PDSERVE_E2E_LOG_DIR")
    run_dir = Path(keep) if keep else tmp_path_factory.mktemp("pd_cluster")
    run_dir.mkdir(parents=True, exist_ok=True)
    model = str(build_demo_model(progress=False))
    global_rt, locals_ = _gen_ranktables(run_dir)
    taken: set[int] = set()
    ports = {"prefill": free_port(taken, True), "decode": free_port(taken, True), "scheduler": free_port(taken)}
    cluster = PDCluster(
        scheduler_url=f"http://{HOST}:{ports['scheduler']}", prefill_url=f"http://{HOST}:{ports['prefill']}",
        decode_url=f"http://{HOST}:{ports['decode']}", model=model, served_model_name="demo", run_dir=run_dir,
        global_ranktable=global_rt, local_ranktables=locals_, ports=ports, taken=taken)
    timeout = float(os.environ.get("PDSERVE_E2E_TIMEOUT", "600"))
    try:
        p = cluster.start_role("prefill0", "prefill", ports["prefill"])
        d = cluster.start_role("decode0", "decode", ports["decode"])
        s = cluster.start_role("scheduler", "scheduler", ports["scheduler"],
                               NODE_PORTS=f"{ports['prefill']},{ports['decode']}", USE_OPENAI="1")
        cluster.wait_healthy(cluster.scheduler_url, [p, d, s], timeout)
        yield cluster
    finally:
        cluster.stop_all()
