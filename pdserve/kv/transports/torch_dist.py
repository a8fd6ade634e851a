"""``torch_dist``: payload over a torch.distributed point-to-point pair group.

Each (prefill worker, decode worker) pair gets its own two-rank process group — gloo on CPU,
nccl on CUDA, hccl on Ascend — created on first use through a TCPStore that the prefill worker
hosts at side-channel port + offset. The process group is built directly (not through
``init_process_group``) so it does not disturb vLLM's own distributed state. Rank 0 is the
prefill side, rank 1 the decode side; each transfer uses its own tag. On CPU the send and
receive buffers are pooled (fresh ones page-fault on every transfer).
"""

from __future__ import annotations

import logging
import queue
import threading
import zlib
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch

from pdserve.kv.layout import BlockLayout
from pdserve.kv.transports.base import BufferPool, Outgoing, Transfer, TransferState, Transport

log = logging.getLogger(__name__)


def backend_for(device: torch.device) -> str:
    return {"cuda": "nccl", "npu": "hccl"}.get(device.type, "gloo")


def _make_group(store, rank: int, backend: str, timeout: float):
    import torch.distributed as dist

    opts_timeout = timedelta(seconds=timeout)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, 2, opts_timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = opts_timeout
        return dist.ProcessGroupNCCL(store, rank, 2, opts)
    if backend == "hccl":  # provided by torch_npu
        import torch_npu  # noqa: F401

        return torch.distributed.ProcessGroupHCCL(store, rank, 2)  # type: ignore[attr-defined]
    raise ValueError(f"unknown torch.distributed backend {backend}")


def tag_for(xfer_id: str) -> int:
    return zlib.crc32(xfer_id.encode()) & 0x7FFFFFFF


class TorchDistTransport(Transport):
    name = "torch_dist"

    def __init__(self, store_host: str = "127.0.0.1", store_port: int | None = None,
                 timeout: float = 60.0) -> None:
        self.store_host = store_host
        self.store_port = store_port
        self.timeout = timeout
        self._store = None  # prefill side: the TCPStore server
        self._groups: dict[str, Any] = {}
        self._creating: dict[str, threading.Lock] = {}  # one group creation per pair at a time
        self._lock = threading.Lock()
        self._sendq: queue.Queue = queue.Queue()
        self._sender: threading.Thread | None = None
        self._pool = BufferPool()  # host buffers (gloo); device memory has its own caching
        self._handoff = threading.Lock()  # finish() and the sender thread: one recycles a buffer

    # ---- pairing
    def _server_store(self):
        import torch.distributed as dist

        with self._lock:
            if self._store is None:
                if self.store_port is None:
                    raise RuntimeError("torch_dist transport needs a store port on the prefill side")
                self._store = dist.TCPStore(self.store_host, self.store_port, is_master=True,
                                            wait_for_workers=False,
                                            timeout=timedelta(seconds=self.timeout))
            return self._store

    def _group(self, peer: str, rank: int, device: torch.device, host: str, port: int):
        """The pair group with ``peer`` (the decode worker "engine/rank"); on the decode side it
        is also keyed by the prefill store address, as one decode worker pulls from many."""
        import torch.distributed as dist

        key = peer if rank == 0 else f"{host}:{port}/{peer}"
        with self._lock:
            group = self._groups.get(key)
            if group is not None:
                return group
            # one creation per pair: two pull threads making the same group at once would
            # rendezvous twice on one store prefix and hang until the timeout
            creating = self._creating.setdefault(key, threading.Lock())
        with creating:
            with self._lock:
                group = self._groups.get(key)
            if group is not None:
                return group
            if rank == 0:
                store = self._server_store()
            else:
                store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=self.timeout))
            group = _make_group(dist.PrefixStore(f"pdserve/{peer}", store), rank, backend_for(device),
                                self.timeout)
            with self._lock:
                self._groups[key] = group
        log.info("torch_dist pair group %s ready (rank %d, %s)", key, rank, backend_for(device))
        return group

    def _buffer(self, nbytes: int, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return self._pool.take(nbytes)[:nbytes]
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def _release(self, buf: torch.Tensor) -> None:
        if buf.device.type == "cpu":
            self._pool.give_back(buf._base if buf._base is not None else buf)

    # ---- prefill side
    def send(self, xfer: Transfer, layout: BlockLayout, block_ids: Sequence[int]) -> Outgoing:
        nbytes = layout.nbytes(len(block_ids))
        buf = self._buffer(nbytes, layout.device)
        layout.gather_into(block_ids, buf)
        xfer.handle = (buf, layout.device)
        return Outgoing(extra={"tag": tag_for(xfer.xfer_id), "nbytes": nbytes}, frames=[],
                        nbytes=nbytes)

    def after_reply(self, xfer: Transfer) -> None:
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_loop, name="pdserve-torch-dist-send",
                                            daemon=True)
            self._sender.start()
        # the buffer travels with the job: finish() may clear xfer.handle before the sender gets to it
        self._sendq.put((xfer, xfer.handle))

    def _send_loop(self) -> None:
        while True:
            job = self._sendq.get()
            if job is None:
                return
            xfer, (buf, device) = job
            try:
                self._send_one(xfer, buf, device)
            except Exception:  # never let one transfer end the thread every later pull depends on
                log.exception("torch_dist sender: unexpected error on %s", xfer.req_id)

    def _send_one(self, xfer: Transfer, buf: torch.Tensor, device: torch.device) -> None:
        with self._handoff:
            abandoned = xfer.handle is None
        state, error = TransferState.DONE, ""
        if abandoned:  # its lease ended or the decode side gave up while it waited in the queue
            state, error = TransferState.FAILED, "abandoned before it was sent"
        else:
            try:
                group = self._group(xfer.peer, 0, device, self.store_host, self.store_port or 0)
                if buf.numel():
                    group.send([buf], 1, tag_for(xfer.xfer_id)).wait()
            except Exception as exc:  # the decode side reports the failure to its engine
                log.warning("torch_dist send of %s to %s failed: %s", xfer.req_id, xfer.peer, exc)
                state, error = TransferState.FAILED, str(exc)
        with self._handoff:
            xfer.mark(state, error)
            finished = xfer.handle is None
        if finished:  # finish() came first: the buffer is ours to recycle
            self._release(buf)

    def finish(self, xfer: Transfer) -> None:
        with self._handoff:
            held, xfer.handle = xfer.handle, None
            sent = xfer.state in (TransferState.DONE, TransferState.FAILED)
        if held is not None and sent:
            self._release(held[0])  # the send is over (else the sender thread recycles it)

    # ---- decode side
    def before_reply(self, xfer: Transfer, layout: BlockLayout, store_addr: tuple[str, int]) -> None:
        host, port = store_addr
        xfer.handle = (host, port)
        self._group(xfer.peer, 1, layout.device, host, port)

    def receive(self, xfer, layout, block_ids, extra: dict[str, Any], frames) -> None:
        nbytes = int(extra["nbytes"])
        host, port = xfer.handle if xfer.handle else ("", 0)
        with self._lock:
            group = self._groups.get(f"{host}:{port}/{xfer.peer}")
        if group is None:
            raise RuntimeError("torch_dist pair group was not set up before the reply")
        if not nbytes:
            return
        buf = self._buffer(nbytes, layout.device)
        try:
            group.recv([buf], 0, int(extra["tag"])).wait()
            layout.scatter_from(block_ids, buf)
        finally:
            self._release(buf)

    def close(self) -> None:
        if self._sender is not None:
            self._sendq.put(None)
