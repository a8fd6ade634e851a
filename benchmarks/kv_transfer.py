#!/usr/bin/env python
"""KV transfer: bytes/s and per-request latency of each pdserve.kv transport.

A "prefill" process (spawned) holds the demo model's KV tensors and serves them through a real
``SideChannelServer``; this process is the "decode" side and pulls blocks with a real
``Puller``, set up as the connector sets them up (the prefill KV shared with same-host decode
workers, the lease board, the tcp stream). A pull is timed until its blocks are in place (what
the decode engine waits for; the ``done`` confirmation to the prefill side follows): after the
first pull from a peer, ``shm`` copies without a round trip; ``tcp`` does pull request, reply
and the stream. For
the same byte counts, in the same run and interleaved with the transports, it also measures
  memcpy   torch ``copy_`` of a flat buffer of that size in this process, with torch's thread
           count (``torch.get_num_threads()``, printed; what ``shm`` is compared to).
  zmq      a raw pyzmq loopback round trip between the two processes: a small request, the
           bytes as one zero-copy reply frame (what ``tcp`` is compared to)
Each size is measured --reps times per method, round-robin, after a warm-up; medians are
reported. By default every timed operation starts with cold caches (``--cache cold``: a 64 MB
buffer is written first), so no method gains or loses from what the one before it left in the
caches; ``--cache warm`` runs them back to back. Default KV shape: SmolLM2-135M on vLLM CPU,
30 layers of bf16
``[2, num_blocks, 3 kv heads, 128 block, 64 head dim]`` = 2.95 MB per 128-token block.

    python benchmarks/kv_transfer.py [--tokens 128,512,2048,8192] [--reps 5]
        [--transports tcp,shm,torch_dist] [--fragmented] [--shm-segment | --shm-readv]
        [--tcp-frames] [--cache cold|warm]
        [--json out.json] [--plot out.png]

The machine is shared: numbers are noisy; compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
DEFAULT_TOKENS = "128,256,512,1024,2048,4096,8192"


def free_port(span: int = 1) -> int:
    """A port p with p..p+span-1 likely free (side channel + torch_dist store offset)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port + span < 65000:
            return port
    raise RuntimeError("no free port")


def make_kv(layers: int, num_blocks: int, heads: int, block: int, dim: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    buf = torch.empty(layers, 2, num_blocks, heads, block, dim, dtype=torch.bfloat16)
    for i in range(layers):  # like vLLM: one backing buffer, a view of it per layer
        buf[i] = torch.randn(2, num_blocks, heads, block, dim, generator=g)
    return {f"model.layers.{i}.self_attn.attn": buf[i] for i in range(layers)}


# ---------------------------------------------------------------------------- prefill process
def prefill_main(conn, args: dict[str, Any], port: int, zmq_port: int) -> None:
    import threading

    import torch
    import zmq

    from pdserve.kv.layout import BlockLayout
    from pdserve.kv.lease_board import LeaseBoard
    from pdserve.kv.leases import LeaseTable
    from pdserve.kv.side_channel import SideChannelServer
    from pdserve.kv.transports import make_transports

    kv = make_kv(args["layers"], args["num_blocks"], args["heads"], args["block"], args["dim"], 1)
    layout = BlockLayout(kv, args["num_blocks"])
    leases = LeaseTable(board=LeaseBoard(layout.num_blocks, shared=True))
    transports = make_transports(store_host=HOST, store_port=port + 100)
    transports["shm"].share(layout)  # as the connector's prefill worker does
    server = SideChannelServer(HOST, port, layout, leases, transports, lease_wait_seconds=5)
    server.start()

    # raw pyzmq baseline: reply to b"<nbytes>" with that many bytes in one zero-copy frame
    payload = torch.randint(0, 255, (layout.nbytes(args["max_blocks"]),), dtype=torch.uint8)
    payload_mv = memoryview(payload.numpy())
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.ROUTER)
    raw.bind(f"tcp://{HOST}:{zmq_port}")

    def raw_loop() -> None:
        while True:
            ident, req = raw.recv_multipart()
            if req == b"stop":
                return
            raw.send_multipart([ident, payload_mv[: int(req)]], copy=False)

    threading.Thread(target=raw_loop, daemon=True).start()
    conn.send(("ready", layout.fingerprint))
    while True:
        cmd = conn.recv()
        if cmd[0] == "lease":
            _, req_id, block_ids = cmd
            leases.add(req_id, block_ids, time.time() + 60)
            server.wake()
            conn.send("ok")
        elif cmd[0] == "blocks":  # for the bit-exact check
            conn.send(layout.gather(cmd[1]).numpy().tobytes())
        elif cmd[0] == "stop":
            server.stop()
            for t in transports.values():
                t.close()
            conn.send("bye")
            return


# ---------------------------------------------------------------------------- decode side
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        import zmq

        from pdserve.kv.layout import BlockLayout
        from pdserve.kv.puller import Puller
        from pdserve.kv.transports import make_transports

        self.args = args
        self.max_blocks = max(self.blocks_for(t) for t in args.tokens)
        # both sides hold room for the largest pull twice over, like a real cache
        self.num_blocks = 2 * self.max_blocks + 8
        shape = dict(layers=args.layers, num_blocks=self.num_blocks, heads=args.heads,
                     block=args.block_size, dim=args.head_dim, max_blocks=self.max_blocks)
        self.port, self.zmq_port = free_port(101), free_port()
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=prefill_main, args=(child, shape, self.port, self.zmq_port),
                                daemon=True)
        self.proc.start()
        status, fingerprint = self.conn.recv()
        kv = make_kv(args.layers, self.num_blocks, args.heads, args.block_size, args.head_dim, 2)
        self.layout = BlockLayout(kv, self.num_blocks)
        assert fingerprint == self.layout.fingerprint, "layouts differ"
        self.transports = make_transports()
        if args.shm_segment:
            self.transports["shm"].direct = False
        self.puller = Puller(self.layout, self.transports, 0, "bench-decode", timeout=60)
        self.zsock = zmq.Context.instance().socket(zmq.DEALER)
        self.zsock.connect(f"tcp://{HOST}:{self.zmq_port}")
        nbytes = self.layout.nbytes(self.max_blocks)
        self.src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)  # fault the pages in
        self.seq = 0

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.args.block_size)

    def ids(self, n: int) -> tuple[list[int], list[int]]:
        """(prefill block ids, decode block ids): different ids on each side."""
        if self.args.fragmented:  # every other block, reversed on the decode side
            return list(range(1, 2 * n, 2)), list(range(2 * n, 0, -2))
        return list(range(3, 3 + n)), list(range(self.num_blocks - n - 2, self.num_blocks - 2))

    def run_memcpy(self, n: int) -> float:
        nbytes = self.layout.nbytes(n)
        t0 = time.perf_counter()
        self.dst[:nbytes].copy_(self.src[:nbytes])
        return time.perf_counter() - t0

    def run_zmq(self, n: int) -> float:
        nbytes = self.layout.nbytes(n)
        t0 = time.perf_counter()
        self.zsock.send(str(nbytes).encode())
        frame = self.zsock.recv(copy=False)
        took = time.perf_counter() - t0
        assert len(frame.buffer) == nbytes
        return took

    def run_transport(self, name: str, n: int, check: bool = False) -> float:
        from pdserve.kv.puller import PullTask

        self.seq += 1
        req_id = f"bench-{self.seq}"
        remote, local = self.ids(n)
        self.conn.send(("lease", req_id, remote))
        assert self.conn.recv() == "ok"
        task = PullTask(req_id, req_id, HOST, self.port, remote, local, name)
        copied: list[float] = []
        t0 = time.perf_counter()
        self.puller.pull(task, on_copied=lambda _x: copied.append(time.perf_counter()))
        took = copied[0] - t0
        if check:
            self.conn.send(("blocks", remote))
            expected = self.conn.recv()
            got = self.layout.gather(local).numpy().tobytes()
            if got != expected:
                raise SystemExit(f"{name}: pulled blocks differ from the prefill side's")
        return took

    def close(self) -> None:
        self.zsock.send(b"stop")
        self.conn.send(("stop",))
        self.conn.recv()
        self.proc.join(10)
        for t in self.transports.values():
            t.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default=DEFAULT_TOKENS, help="comma-separated prompt sizes")
    ap.add_argument("--transports", default="tcp,shm,torch_dist")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per size and method (>=3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--heads", type=int, default=3, help="KV heads")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--fragmented", action="store_true",
                    help="non-consecutive block ids (worst case for the copies)")
    ap.add_argument("--shm-segment", action="store_true",
                    help="shm through a shared-memory segment (not the direct read)")
    ap.add_argument("--shm-readv", action="store_true",
                    help="shm direct reads with process_vm_readv (no shared mapping of the KV)")
    ap.add_argument("--tcp-frames", action="store_true",
                    help="tcp payload in ZMQ frames (not the plain TCP stream)")
    ap.add_argument("--cache", choices=("cold", "warm"), default="cold",
                    help="cold: evict the caches before every timed operation (default); "
                         "warm: back to back")
    ap.add_argument("--evict-mb", type=int, default=64, help="eviction buffer for --cache cold")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    transports = [t for t in args.transports.split(",") if t]
    reps = max(3, args.reps)

    import numpy as np
    import torch

    if args.shm_readv:  # read by the spawned prefill process when it registers its KV
        os.environ["PDSERVE_KV_SHM_SHARE"] = "0"
    bench = Bench(args)
    if args.tcp_frames:
        bench.transports["tcp"].stream = False
    shm_mode = ("segment" if not bench.transports["shm"].direct else
                "direct process_vm_readv" if args.shm_readv else "shared mapping, memcpy")
    tcp_mode = "ZMQ frames" if args.tcp_frames else "TCP stream, sendmsg -> recvmsg_into"
    methods = ["memcpy", "zmq", *transports]
    # Cold: before each timed operation, write a buffer twice the last-level cache, as a prefill
    # forward pass streaming the weights does before a real pull (numpy, one thread: an OpenMP
    # team would go on spinning on the other core into the timed operation). Warm: back to
    # back, each method after the previous one (what a method left in the caches and TLBs then
    # favours or hurts the next; measured 232 vs 576 us for one shm pull after another pull or
    # after a zmq receive).
    evict = np.zeros(args.evict_mb << 20, dtype=np.uint8) if args.cache == "cold" else None
    rows: list[dict[str, Any]] = []
    try:
        for name in transports:  # pair up / attach / verify once, outside the timings
            bench.run_transport(name, bench.blocks_for(args.tokens[0]), check=True)
        for tokens in args.tokens:
            n = bench.blocks_for(tokens)
            times: dict[str, list[float]] = {m: [] for m in methods}

            def once(method: str) -> float:
                if evict is not None:  # every method starts from the same (cold) caches
                    np.add(evict, 1, out=evict)
                if method == "memcpy":
                    return bench.run_memcpy(n)
                if method == "zmq":
                    return bench.run_zmq(n)
                return bench.run_transport(method, n)

            for _ in range(args.warmup):
                for method in methods:
                    once(method)
            for _ in range(reps):
                for method in methods:  # round-robin: load changes hit every method alike
                    times[method].append(once(method))
            for name in transports:  # the transfer must be exact at every size
                bench.run_transport(name, n, check=True)
            nbytes = bench.layout.nbytes(n)
            med = {m: statistics.median(v) for m, v in times.items()}
            for method in methods:
                rows.append({
                    "method": method, "tokens": tokens, "blocks": n, "bytes": nbytes,
                    "median_ms": med[method] * 1e3, "min_ms": min(times[method]) * 1e3,
                    "gb_per_s": nbytes / med[method] / 1e9,
                    "pct_memcpy": 100 * med["memcpy"] / med[method],
                    "pct_zmq": 100 * med["zmq"] / med[method],
                    "samples_ms": [t * 1e3 for t in times[method]],
                })
            print(f"  {tokens} tokens done", file=sys.stderr, flush=True)
    finally:
        bench.close()

    print(f"KV transfer, {args.layers} layers x bf16 [2, blocks, {args.heads}, {args.block_size}, "
          f"{args.head_dim}] ({bench.layout.bytes_per_block / 1e6:.2f} MB/block), "
          f"{'fragmented' if args.fragmented else 'consecutive'} block ids, "
          f"median of {reps} (after {args.warmup} warm-up), {args.cache} caches")
    print(f"memcpy: torch copy_ with {torch.get_num_threads()} threads; shm: {shm_mode}; "
          f"tcp: {tcp_mode}")
    print(f"{'method':<11} {'tokens':>6} {'MB':>7} {'median ms':>10} {'min ms':>8} {'GB/s':>6} "
          f"{'% memcpy':>9} {'% zmq':>7}")
    for r in rows:
        print(f"{r['method']:<11} {r['tokens']:>6} {r['bytes'] / 1e6:>7.1f} {r['median_ms']:>10.2f} "
              f"{r['min_ms']:>8.2f} {r['gb_per_s']:>6.2f} {r['pct_memcpy']:>8.0f}% {r['pct_zmq']:>6.0f}%")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                   for k, v in vars(args).items()},
                                         "rows": rows}, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method in methods:
            pts = [r for r in rows if r["method"] == method]
            ax.plot([r["tokens"] for r in pts], [r["gb_per_s"] for r in pts], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("GB/s (median)")
        ax.set_title("pdserve KV pull bandwidth (demo model KV shape)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
