"""The instances a global ranktable describes, in the order every component agrees on.

Prefill instances first, then decode instances, each in file order: this is the order of
NODE_PORTS and of ``PDSERVE_GLOBAL_INDEX``, so the scheduler, the daemons and ``show`` all
number instances the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pdserve.errors import ConfigError, plural
from pdserve.ranktable.schema import GROUP_DECODE, GROUP_PREFILL, GROUP_SCHEDULER, GlobalRanktable, Server


@dataclass(frozen=True)
class InstanceRef:
    """One prefill or decode instance of a global ranktable."""

    role: Literal["prefill", "decode"]
    index: int  # within its group
    global_index: int  # NODE_PORTS order
    server_ip: str
    server_id: str
    device_ids: tuple[int, ...]
    device_ips: tuple[str, ...]
    rank_ids: tuple[int, ...]

    @property
    def tp_size(self) -> int:
        return len(self.device_ids)

    @property
    def name(self) -> str:
        """``prefill[0]``: how errors and tables refer to the instance."""
        return f"{self.role}[{self.index}]"

    def describe(self) -> str:
        return f"{self.name} on {self.server_ip} devices {','.join(map(str, self.device_ids))}"


def _group(rt: GlobalRanktable, group_id: str) -> list[Server]:
    for group in rt.server_group_list:
        if group.group_id == group_id:
            return group.server_list
    return []


def _to_int(text: str) -> int:
    # loaded ranktables have been checked; a raw model may not, so do not crash on it
    return int(text) if text.isascii() and text.isdigit() else -1


def instances(rt: GlobalRanktable) -> list[InstanceRef]:
    """All instances: prefill first then decode, in file order."""
    out: list[InstanceRef] = []
    for role, gid in (("prefill", GROUP_PREFILL), ("decode", GROUP_DECODE)):
        for index, server in enumerate(_group(rt, gid)):
            devices = server.device or []
            out.append(InstanceRef(
                role=role,  # type: ignore[arg-type]
                index=index,
                global_index=len(out),
                server_ip=server.server_ip,
                server_id=server.server_id,
                device_ids=tuple(_to_int(d.device_id) for d in devices),
                device_ips=tuple(d.device_ip for d in devices),
                rank_ids=tuple(_to_int(d.rank_id) for d in devices),
            ))
    return out


def scheduler_server(rt: GlobalRanktable) -> Server:
    """The one server of group "0" (the scheduler, the service entry)."""
    servers = _group(rt, GROUP_SCHEDULER)
    if len(servers) != 1:
        raise ConfigError(None, "server_group_list[0].server_list", f"{plural(len(servers), 'scheduler entry', 'scheduler entries')}",
                          "keep exactly one scheduler (pass --api-server to `gen` on one host only)")
    return servers[0]
