"""Worker half of the connector (runs in each vLLM worker process, one per TP rank).

Producer: serves leased blocks on the side channel and reports a request as finished sending
once the decode side confirmed or its lease expired. Consumer: pulls blocks in a thread pool
(never on the engine's step path) and reports finished/failed receives to the scheduler.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from pdserve.kv.config import ConnectorSettings
from pdserve.kv.layout import BlockLayout
from pdserve.kv.lease_board import LeaseBoard
from pdserve.kv.leases import LeaseTable
from pdserve.kv.metadata import LoadSpec, PdserveMetadata
from pdserve.kv.puller import SILENT_PEER_SECONDS, Puller, PullError
from pdserve.kv.side_channel import SideChannelServer
from pdserve.kv.stats import PdserveKVStats
from pdserve.kv.transports import make_transports

log = logging.getLogger("pdserve.kv")


class WorkerSide:
    def __init__(self, settings: ConnectorSettings, *, is_producer: bool, engine_id: str,
                 host: str, port: int, tp_rank: int, num_blocks: int | None) -> None:
        self.settings = settings
        self.is_producer = is_producer
        self.engine_id = engine_id
        self.host, self.port, self.tp_rank = host, port, tp_rank
        self.num_blocks = num_blocks
        self.layout: BlockLayout | None = None
        self.leases = LeaseTable()
        self.server: SideChannelServer | None = None
        self.puller: Puller | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._recv_done: set[str] = set()
        self._recv_failed: set[str] = set()
        self.stats = PdserveKVStats()
        self.transports = make_transports(
            store_host=host, store_port=port + tp_rank + settings.torch_dist_port_offset)

    def register_kv_caches(self, kv_caches) -> None:
        self.layout = BlockLayout(kv_caches, self.num_blocks)
        log.info("pdserve KV connector (%s, tp_rank %d): %d KV planes, %d bytes per block, "
                 "layout %s", "producer" if self.is_producer else "consumer", self.tp_rank,
                 len(self.layout.planes), self.layout.bytes_per_block, self.layout.fingerprint)
        if self.is_producer:
            if self.leases.board is not None:  # re-registered: nobody may trust the old tags
                self.leases.board.reset()
            self.leases.board = LeaseBoard(self.layout.num_blocks, shared=True)
            if self.settings.transport in ("auto", "shm"):  # same-host decode workers may map it
                self.transports["shm"].share(self.layout)  # before any forward pass writes it
            self.server = SideChannelServer(
                self.host, self.port + self.tp_rank, self.layout, self.leases, self.transports,
                lease_wait_seconds=self.settings.lease_wait_seconds,
                allowed_peers=self.settings.allowed_peers,
                on_bytes=lambda n: self._count("served_bytes", n))
            self.server.start()
        else:
            self.puller = Puller(self.layout, self.transports, self.tp_rank, self.engine_id,
                                 self.settings.load_timeout_seconds,
                                 self.settings.torch_dist_port_offset,
                                 silent_peer_seconds=SILENT_PEER_SECONDS,
                                 silent_after=self.settings.lease_wait_seconds)
            self._pool = ThreadPoolExecutor(self.settings.pull_threads,
                                            thread_name_prefix="pdserve-kv-pull")

    def _count(self, key: str, value: float = 1) -> None:
        with self._lock:
            self.stats.add(key, value)

    # ------------------------------------------------------------------ per step
    def start_load_kv(self, meta: PdserveMetadata) -> None:
        if meta.leases:
            for lease in meta.leases:
                self.leases.add(lease.req_id, lease.block_ids, lease.expires_at)
            self._count("leases_granted", len(meta.leases))
            if self.server is not None:
                self.server.wake()
        if self.puller is None or self._pool is None:
            return
        for load in meta.loads:  # the load timeout counts from now, queueing for a thread included
            self._pool.submit(self._load, load, time.monotonic() + self.settings.load_timeout_seconds)
        for rel in meta.releases:
            self._pool.submit(self.puller.release, rel.remote_host, rel.remote_port,
                              rel.remote_req_id, rel.reason)
            self._count("releases")

    def _load(self, load: LoadSpec, deadline: float) -> None:
        task = load.task
        t0 = time.monotonic()
        try:
            if load.error:
                self.puller.release(task.remote_host, task.remote_port, task.remote_req_id,
                                    "incompatible")  # type: ignore[union-attr]
                raise PullError(load.error)
            self.puller.pull(  # type: ignore[union-attr]
                task, on_copied=lambda xfer: self._loaded(task.req_id, xfer, t0), deadline=deadline)
        except Exception as exc:
            log.error("request %s: KV load failed: %s", task.req_id, exc)
            self._count("pull_failures")
            with self._lock:
                self._recv_failed.add(task.req_id)
                self._recv_done.add(task.req_id)

    def _loaded(self, req_id: str, xfer, t0: float) -> None:
        """The blocks are in place: the engine may schedule the request (the confirmation to
        the prefill side follows)."""
        took = time.monotonic() - t0
        log.debug("request %s: pulled %d blocks (%d bytes) in %.1f ms", req_id, xfer.n_blocks,
                  xfer.nbytes, took * 1e3)
        with self._lock:
            self.stats.add("pulls")
            self.stats.add("direct_pulls", int(xfer.direct))
            self.stats.add("pull_bytes", xfer.nbytes)
            self.stats.add("pull_seconds", took)
            self._recv_done.add(req_id)

    def get_transfer_results(self) -> tuple[set[str], set[str], set[str]]:
        """(finished sending, finished receiving, failed receiving) since the last call."""
        sending: set[str] = set()
        if self.is_producer:
            expired = self.leases.reap_expired()
            if expired:
                self._count("lease_expiries", len(expired))
                if self.server is not None:
                    self.server.forget(set(expired))
            sending = self.leases.take_finished()
            self._count("leases_completed", max(0, len(sending) - len(expired)))
        with self._lock:
            done, failed = self._recv_done, self._recv_failed
            self._recv_done, self._recv_failed = set(), set()
        return sending, done, failed

    def take_stats(self) -> PdserveKVStats | None:
        with self._lock:
            if self.stats.is_empty():
                return None
            out, self.stats = self.stats, PdserveKVStats()
            return out

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        for t in self.transports.values():
            t.close()
