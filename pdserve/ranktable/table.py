"""The human view of a global ranktable (``pdserve ranktable show`` / ``validate``)."""

from __future__ import annotations

from pdserve.ranktable.roles import Role
from pdserve.ranktable.schema import GROUP_SCHEDULER, GlobalRanktable
from pdserve.ranktable.topology import instances

HEADER = ("INSTANCE", "ROLE", "HOST", "DEVICES", "RANK IDS", "DEVICE IPS", "PORT")


def _ids(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values)) or "-"


def table_rows(rt: GlobalRanktable, ports: list[int] | None = None, role: Role | None = None) -> list[list[str]]:
    """Scheduler first, then instances in NODE_PORTS order; INSTANCE is that position."""
    rows: list[list[str]] = []
    for group in rt.server_group_list:
        if group.group_id != GROUP_SCHEDULER:
            continue
        for server in group.server_list:
            mark = "<- local" if role is not None and role.kind == "scheduler" else ""
            rows.append(["-", "scheduler", server.server_ip, "-", "-", "-", "-", mark])
    for inst in instances(rt):
        port = str(ports[inst.global_index]) if ports and inst.global_index < len(ports) else "-"
        mark = "<- local" if role is not None and role.instance == inst else ""
        rows.append([str(inst.global_index), f"{inst.role}[{inst.index}]", inst.server_ip, _ids(inst.device_ids),
                     _ids(inst.rank_ids), ",".join(dict.fromkeys(inst.device_ips)) or "-", port, mark])
    return rows


def format_table(rt: GlobalRanktable, ports: list[int] | None = None, role: Role | None = None) -> str:
    """Aligned plain-text table; the row the local ranktable matched is marked ``<- local``."""
    rows = [list(HEADER) + [""]] + table_rows(rt, ports, role)
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)
