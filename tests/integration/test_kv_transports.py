"""Each KV transport across two processes: a spawned prefill process serves random KV through a
real SideChannelServer, this process pulls it with a real Puller and checks it bit for bit.

Both sides build their tensors from seeds, so the expected bytes are recomputed here without
shipping them back. One prefill process serves every test of the module (a spawn costs a
torch import, ~2 s).
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import time

import pytest
import torch

from pdserve.kv.layout import BlockLayout
from pdserve.kv.puller import Puller, PullError, PullTask
from pdserve.kv.transports import make_transports, shared_kv

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
NB = 24
STORE_OFFSET = 100


def free_port() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        with socket.socket() as s:  # the torch_dist store port must be free too
            try:
                s.bind((HOST, port + STORE_OFFSET))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair")


def make_kv(seed: int, dtype=torch.bfloat16):
    """Like vLLM: one backing buffer, a view of it per layer."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, NB, 3, 16, 64)
    buf = torch.randn(4, *shape, generator=g).to(dtype)
    return {f"model.layers.{i}.attn": buf[i] for i in range(4)}


def prefill_main(conn, port: int) -> None:
    from pdserve.kv.lease_board import LeaseBoard
    from pdserve.kv.leases import LeaseTable
    from pdserve.kv.side_channel import SideChannelServer

    layout = BlockLayout(make_kv(1), NB)
    leases = LeaseTable(board=LeaseBoard(NB, shared=True))
    transports = make_transports(store_host=HOST, store_port=port + STORE_OFFSET, timeout=20)
    transports["shm"].share(layout)  # as the connector's prefill worker does
    server = SideChannelServer(HOST, port, layout, leases, transports, lease_wait_seconds=5)
    server.start()
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd[0] == "lease":
            leases.add(cmd[1], cmd[2], time.time() + 60)
            server.wake()
            conn.send("ok")
        elif cmd[0] == "lease_wait":  # how long a pull for a lease not granted yet is parked
            server.lease_wait_seconds = cmd[1]
            conn.send("ok")
        elif cmd[0] == "tcp_zero_copy_min":  # force the zero-copy frames (or the gather)
            transports["tcp"].zero_copy_min_region = cmd[1]
            conn.send("ok")
        elif cmd[0] == "finished":  # leases confirmed by the decode side
            conn.send(sorted(leases.take_finished()))
        elif cmd[0] == "stop":
            server.stop()
            for t in transports.values():
                t.close()
            conn.send("bye")
            return


class Prefill:
    def __init__(self) -> None:
        self.port = free_port()
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=prefill_main, args=(child, self.port), daemon=True)
        self.proc.start()
        assert self.conn.poll(60), "prefill process did not start"
        assert self.conn.recv() == "ready"

    def lease(self, req_id: str, block_ids: list[int]) -> None:
        self.conn.send(("lease", req_id, block_ids))
        assert self.conn.recv() == "ok"

    def lease_wait(self, seconds: float) -> None:
        self.conn.send(("lease_wait", seconds))
        assert self.conn.recv() == "ok"

    def finished(self) -> list[str]:
        self.conn.send(("finished",))
        return self.conn.recv()

    def stop(self) -> None:
        try:
            self.conn.send(("stop",))
            self.conn.poll(10) and self.conn.recv()
        finally:
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()


@pytest.fixture(scope="module")
def prefill():
    p = Prefill()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def decode():
    kv = make_kv(2)
    layout = BlockLayout(kv, NB)
    transports = make_transports(timeout=20)
    puller = Puller(layout, transports, tp_rank=0, engine_id="decode-test", timeout=20,
                    torch_dist_port_offset=STORE_OFFSET)
    yield kv, puller
    for t in transports.values():
        t.close()


SRC = make_kv(1)

CASES = [  # (prefill block ids, decode block ids)
    ([0, 1, 2, 3], [10, 11, 12, 13]),
    ([5, 9, 6, 20], [0, 23, 7, 8]),
    ([17], [4]),
    (list(range(24)), list(range(23, -1, -1))),
]


VARIANTS = ["tcp", "tcp-zero-copy", "tcp-stream", "shm", "shm-segment", "torch_dist"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_transport_is_bit_exact_across_processes(prefill: Prefill, decode, variant: str,
                                                 monkeypatch) -> None:
    """tcp: gathered into one frame / zero-copy frames straight from the KV cache / a plain TCP
    stream, sendmsg to recvmsg_into; shm: direct read of the prefill process's memory / through a
    shared-memory segment."""
    kv, puller = decode
    transport = variant.split("-")[0]
    prefill.conn.send(("tcp_zero_copy_min", 0 if variant == "tcp-zero-copy" else 1 << 40))
    assert prefill.conn.recv() == "ok"
    shm, tcp = puller.transports["shm"], puller.transports["tcp"]
    monkeypatch.setattr(shm, "direct", shm.direct and variant != "shm-segment")
    monkeypatch.setattr(tcp, "stream", variant == "tcp-stream")
    streamed = []
    real_receive = tcp._client.receive
    monkeypatch.setattr(tcp._client, "receive", lambda *a: streamed.append(1) or real_receive(*a))
    _pull_cases(prefill, kv, puller, transport, variant)
    if variant == "tcp-stream":  # the first reply names the stream port; the rest use it
        assert len(streamed) >= len(CASES) - 1
    else:
        assert not streamed


def _pull_cases(prefill: Prefill, kv, puller: Puller, transport: str, variant: str) -> None:
    for i, (remote, local) in enumerate(CASES):
        req = f"{variant}-{i}"
        prefill.lease(req, remote)
        xfer = puller.pull(PullTask(f"d-{req}", req, HOST, prefill.port, remote, local, transport))
        assert xfer.nbytes == puller.layout.nbytes(len(remote))
        for name, src in SRC.items():
            assert torch.equal(src[:, remote].view(torch.uint8), kv[name][:, local].view(torch.uint8)), \
                f"{transport}: {name} differs for blocks {remote} -> {local}"
    deadline, done = time.monotonic() + 10, set()
    while time.monotonic() < deadline:  # every lease was confirmed by a done message
        done |= set(prefill.finished())
        if all(f"{variant}-{i}" in done for i in range(len(CASES))):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"{variant}: leases not confirmed: {done}")


def test_missing_lease_is_refused_across_processes(prefill: Prefill, decode) -> None:
    """The prefill side parks the pull for its lease wait (0.3 s), then refuses it; the puller's
    own timeout (10 s) is far longer, so the error is that refusal, not a timeout."""
    _, puller = decode
    puller_timeout, puller.timeout = puller.timeout, 10.0
    prefill.lease_wait(0.3)
    try:
        start = time.monotonic()
        with pytest.raises(PullError, match=r"refused: no KV lease for request never-leased "
                                            r"\(expired or never granted\)"):
            puller.pull(PullTask("d-x", "never-leased", HOST, prefill.port, [1], [1], "shm"))
        assert time.monotonic() - start < 5  # answered after the lease wait, not the puller timeout
    finally:
        puller.timeout = puller_timeout
        prefill.lease_wait(5)


def test_torch_dist_one_decode_worker_two_prefill_instances(prefill: Prefill, decode) -> None:
    """The decode side keeps one pair group per prefill instance (not one per decode worker)."""
    kv, puller = decode
    other = Prefill()
    try:
        for i, p in enumerate([prefill, other, prefill, other]):
            req = f"two-{i}"
            remote, local = [i, i + 1], [20 - i, 21 - i]
            p.lease(req, remote)
            puller.pull(PullTask(f"d-{req}", req, HOST, p.port, remote, local, "torch_dist"))
            for name, src in SRC.items():
                assert torch.equal(src[:, remote].view(torch.uint8),
                                   kv[name][:, local].view(torch.uint8))
    finally:
        other.stop()


def _expect(prefill: Prefill, kv, remote: list[int], local: list[int]) -> None:
    for name, src in SRC.items():
        assert torch.equal(src[:, remote].view(torch.uint8), kv[name][:, local].view(torch.uint8))


def _confirmed(prefill: Prefill, req: str) -> None:
    deadline, done = time.monotonic() + 10, set()
    while req not in done:
        assert time.monotonic() < deadline, f"lease {req} not confirmed"
        done |= set(prefill.finished())
        time.sleep(0.02)


def test_shm_direct_read_skips_the_round_trip_only_while_the_lease_holds(prefill: Prefill, decode,
                                                                         monkeypatch) -> None:
    """After one ordinary direct pull, shm copies without asking (no reply awaited); a lease
    that is not granted yet or already ended sends it down the ordinary pull instead."""
    kv, puller = decode
    shm = puller.transports["shm"]
    if not shm.direct:
        pytest.skip("process_vm_readv is not usable here")
    prefill.lease("board-0", [0, 1])
    puller.pull(PullTask("d-board-0", "board-0", HOST, prefill.port, [0, 1], [4, 5], "shm"))
    assert (HOST, prefill.port) in shm._peers  # learned from the reply
    _confirmed(prefill, "board-0")

    asked = []
    real_await = puller._await_reply
    monkeypatch.setattr(puller, "_await_reply", lambda *a: asked.append(a) or real_await(*a))
    prefill.lease("board-1", [7, 3, 8])
    xfer = puller.pull(PullTask("d-board-1", "board-1", HOST, prefill.port, [7, 3, 8], [9, 10, 2],
                                "shm"))
    assert asked == [] and xfer.nbytes == puller.layout.nbytes(3) and xfer.direct
    _expect(prefill, kv, [7, 3, 8], [9, 10, 2])
    _confirmed(prefill, "board-1")  # the fire-and-forget done freed the lease
    peer = shm._peers[(HOST, prefill.port)]
    if shared_kv.enabled():  # the prefill KV buffer is mapped here: memcpy, not process_vm_readv
        assert peer.memory is not None

    # blocks in the buffer's first and last (unshared, partial) pages: process_vm_readv for them
    prefill.lease("board-3", [0, NB - 1])
    xfer = puller.pull(PullTask("d-board-3", "board-3", HOST, prefill.port, [0, NB - 1], [6, 1],
                                "shm"))
    assert asked == [] and xfer.direct
    _expect(prefill, kv, [0, NB - 1], [6, 1])

    # the same request again: its lease ended, so the board no longer vouches for the blocks
    puller_timeout, puller.timeout = puller.timeout, 2
    try:
        with pytest.raises(PullError, match="no KV lease"):
            puller.pull(PullTask("d-board-1b", "board-1", HOST, prefill.port, [7, 3, 8],
                                 [9, 10, 2], "shm"))
    finally:
        puller.timeout = puller_timeout
    assert len(asked) == 1  # it asked, and was refused

    # a lease granted only after the pull started: the ordinary pull waits for it
    import threading

    timer = threading.Timer(0.2, prefill.lease, args=("board-2", [11, 12]))
    timer.start()
    try:
        puller.pull(PullTask("d-board-2", "board-2", HOST, prefill.port, [11, 12], [13, 14], "shm"))
    finally:
        timer.join()
    assert len(asked) == 2
    _expect(prefill, kv, [11, 12], [13, 14])


def test_tcp_falls_back_to_zmq_frames_when_the_stream_is_unreachable(prefill: Prefill, decode,
                                                                      monkeypatch) -> None:
    kv, puller = decode
    tcp = puller.transports["tcp"]
    monkeypatch.setattr(tcp, "stream", True)
    monkeypatch.setattr(tcp, "_stream_ports", {(HOST, prefill.port): free_port()})  # nobody there
    monkeypatch.setattr(tcp, "_no_stream", set())
    monkeypatch.setattr(tcp, "_client", type(tcp._client)())
    streamed = []
    real_receive = tcp._client.receive
    monkeypatch.setattr(tcp._client, "receive", lambda *a: streamed.append(1) or real_receive(*a))
    prefill.lease("nostream", [2, 3])
    puller.pull(PullTask("d-nostream", "nostream", HOST, prefill.port, [2, 3], [15, 16], "tcp"))
    _expect(prefill, kv, [2, 3], [15, 16])
    assert not streamed  # ZMQ frames carried it
    # the reply named the real stream port: that one is tried again, and used
    assert (HOST, prefill.port) not in tcp._no_stream
    prefill.lease("stream-again", [4, 5])
    puller.pull(PullTask("d-again", "stream-again", HOST, prefill.port, [4, 5], [17, 18], "tcp"))
    _expect(prefill, kv, [4, 5], [17, 18])
    assert streamed


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_blocks_are_reported_in_place_before_the_confirmation(prefill: Prefill, decode, transport,
                                                               monkeypatch) -> None:
    """The engine learns that the blocks are loaded (``on_copied``, with the bytes already in
    place) before ``done`` goes to the prefill side, which then frees the lease."""
    from pdserve.kv import puller as puller_module

    kv, puller = decode
    events: list[str] = []
    real_encode = puller_module.m.encode
    monkeypatch.setattr(puller_module.m, "encode",
                        lambda msg: events.append(type(msg).__name__) or real_encode(msg))
    req = f"order-{transport}"
    prefill.lease(req, [14, 15])

    def copied(xfer) -> None:
        _expect(prefill, kv, [14, 15], [16, 17])  # already in place when reported
        events.append("copied")

    xfer = puller.pull(PullTask(f"d-{req}", req, HOST, prefill.port, [14, 15], [16, 17],
                                transport), on_copied=copied)
    assert xfer.nbytes == puller.layout.nbytes(2)
    assert events[-2:] == ["copied", "Done"]
    _confirmed(prefill, req)
