"""What ``pdserve up`` will start: devices, ports and ranktables of a one-host cluster (pure).

Devices: each instance gets its own ranktable device ids (role resolution needs every instance
to be unique). On a CPU host they are core ids of the cores this process may use (its affinity
set). With at least one core per TP rank the usable cores are split into one contiguous block
per rank, prefill ranks first and taking the remainder (prefill is compute-bound); the device
id is the block's first core and, when a block has several cores, the instance is bound to it
explicitly (``PDSERVE_CPU_BIND``). 1P1D on 2 cores: prefill core 0, decode core 1; on 8 cores:
prefill 0-3, decode 4-6, and core 7 is left to the API servers, engine cores and scheduler
(one core is kept back whenever every rank still gets two). With more ranks than cores the ids
become logical and each instance is bound to cores reused round-robin. GPUs and NPUs cannot be
shared that way, so too few of them is a ConfigError.

Ports: instance i (NODE_PORTS order: prefill first) listens on base + i, its KV side channel
(TP rank 0) on base + 10000 + i * TP, rank r on that + r; the scheduler on ``--port``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from pdserve.errors import ConfigError
from pdserve.platform import Platform, core_ranges
from pdserve.worker.command import SIDE_PORT_OFFSET, default_side_port

HOST = "127.0.0.1"


@dataclass(frozen=True)
class InstancePlan:
    role: str  # "prefill" | "decode"
    index: int
    global_index: int
    devices: tuple[int, ...]  # ranktable device ids
    port: int
    cpu_bind: str | None = None  # explicit VLLM_CPU_OMP_THREADS_BIND (logical ids, or several cores a rank)
    side_port: int = 0  # KV side channel of TP rank 0; rank r listens on side_port + r

    @property
    def name(self) -> str:
        return f"{self.role}{self.index}"


@dataclass(frozen=True)
class ClusterPlan:
    platform: Platform
    tp: int
    scheduler_port: int
    instances: list[InstancePlan] = field(default_factory=list)
    host: str = HOST

    @property
    def prefill(self) -> list[InstancePlan]:
        return [i for i in self.instances if i.role == "prefill"]

    @property
    def decode(self) -> list[InstancePlan]:
        return [i for i in self.instances if i.role == "decode"]

    @property
    def node_ports(self) -> str:
        return ",".join(str(i.port) for i in self.instances)

    def ports(self) -> list[int]:
        """Every TCP port the cluster will listen on (for the free-port check)."""
        out = [self.scheduler_port]
        for inst in self.instances:
            out += [inst.port, *(inst.side_port + r for r in range(self.tp))]
        return out


def split_cores(cores: Sequence[int], ranks: int) -> list[list[int]]:
    """One contiguous block of ``cores`` per rank, the first ranks taking the remainder; one core
    is kept back for the frontends when every rank still gets two (pure; needs ranks <= cores)."""
    reserve = 1 if len(cores) - 1 >= 2 * ranks else 0
    usable = list(cores)[:len(cores) - reserve]
    size, extra = divmod(len(usable), ranks)
    out, start = [], 0
    for r in range(ranks):
        n = size + (1 if r < extra else 0)
        out.append(usable[start:start + n])
        start += n
    return out


def plan_cluster(prefill: int, decode: int, platform: Platform, devices_available: int,
                 scheduler_port: int = 9000, base_port: int = 8100, tp: int = 1,
                 cores: Sequence[int] | None = None) -> ClusterPlan:
    """Device ids and ports of N prefill + M decode instances of TP ``tp`` on this host.

    ``cores``: the CPU core ids this process may use (default ``0..devices_available-1``)."""
    if prefill < 1 or decode < 1:
        raise ConfigError("flags", "--prefill/--decode", f"{prefill} prefill and {decode} decode instances",
                          "a PD cluster needs at least one of each (--prefill 1 --decode 1)")
    if tp < 1:
        raise ConfigError("flags", "--tensor-parallel-size", f"{tp}", "use 1 or more")
    count = prefill + decode
    slots = count * tp
    have = max(1, devices_available)
    if platform != "cpu" and slots > have:
        raise ConfigError("flags", "--prefill/--decode",
                          f"{count} instances x TP {tp} need {slots} {platform.upper()} devices, this host has {have}",
                          "start fewer instances or a smaller --tensor-parallel-size (devices are not shared)")
    core_ids = list(cores) if cores else list(range(have))
    have = len(core_ids)
    logical = platform == "cpu" and slots > have
    blocks = split_cores(core_ids, slots) if platform == "cpu" and not logical else []
    roles = [("prefill", i) for i in range(prefill)] + [("decode", j) for j in range(decode)]
    out: list[InstancePlan] = []
    for g, (role, index) in enumerate(roles):
        ids = tuple(range(g * tp, (g + 1) * tp))
        bind = "|".join(str(core_ids[d % have]) for d in ids) if logical else None
        if blocks:
            mine = blocks[g * tp:(g + 1) * tp]
            ids = tuple(b[0] for b in mine)
            if any(len(b) > 1 for b in mine):
                bind = "|".join(core_ranges(b) for b in mine)
        # the daemon's own default: rank r of instance g never takes instance g+1's port
        out.append(InstancePlan(role, index, g, ids, base_port + g, bind,
                                side_port=default_side_port(base_port + g, tp, g)))
    plan = ClusterPlan(platform=platform, tp=tp, scheduler_port=scheduler_port, instances=out)
    _check_ports(plan, base_port)
    return plan


def with_cpu_binds(plan: ClusterPlan, binds: Mapping[str, str]) -> ClusterPlan:
    """The plan with every instance of a role in ``binds`` bound to those cores instead (pure).

    The ranktable keeps the planned device ids; only the workers' binding changes."""
    if not binds:
        return plan
    out = [replace(i, cpu_bind=binds[i.role]) if i.role in binds else i for i in plan.instances]
    return replace(plan, instances=out)


def _check_ports(plan: ClusterPlan, base_port: int) -> None:
    ports = plan.ports()
    bad = [p for p in ports if not 1024 <= p <= 65535]
    if bad:
        raise ConfigError("flags", "--port/--base-port", f"port(s) {', '.join(map(str, bad))} out of range",
                          "use ports between 1024 and 65535 (instances use base+i and base+i+10000)")
    if plan.scheduler_port in ports[1:]:
        raise ConfigError("flags", "--port", f"scheduler port {plan.scheduler_port} is also an instance or KV "
                          f"side-channel port (instances use {base_port}.., side channels {base_port + SIDE_PORT_OFFSET}..)",
                          "choose another --port or --base-port")


def ranktable_paths(paths: list[Path], plan: ClusterPlan) -> tuple[Path, dict[str, Path], Path]:
    """Split ``ranktable.generate``'s output (global, instances in order, host) by instance name."""
    global_path, *rest = paths
    host_path = rest[-1]
    locals_ = {inst.name: p for inst, p in zip(plan.instances, rest[:-1], strict=True)}
    return global_path, locals_, host_path
