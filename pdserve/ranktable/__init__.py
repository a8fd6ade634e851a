"""Ranktables: the AscendCloud-compatible files that describe a PD deployment.

Group "0" is the scheduler (服务入口), group "1" the prefill (全量) instances, group "2" the
decode (增量) instances. Everything other components need is re-exported here.
"""

from pdserve.ranktable.checks import check_global, check_local
from pdserve.ranktable.gen import generate
from pdserve.ranktable.io import digest, dumps, load_global, load_local, read_global, read_local
from pdserve.ranktable.merge import merge
from pdserve.ranktable.node_ports import parse_node_ports
from pdserve.ranktable.roles import Role, match_role, resolve_role, resolve_role_from_env
from pdserve.ranktable.schema import Device, GlobalRanktable, LocalRanktable, Server, ServerGroup
from pdserve.ranktable.table import format_table
from pdserve.ranktable.topology import InstanceRef, instances, scheduler_server
from pdserve.ranktable.validate import Report, validate

__all__ = [
    "Device", "Server", "ServerGroup", "GlobalRanktable", "LocalRanktable",
    "load_global", "load_local", "read_global", "read_local", "dumps", "digest",
    "InstanceRef", "instances", "scheduler_server",
    "parse_node_ports",
    "Role", "resolve_role", "resolve_role_from_env", "match_role",
    "generate", "merge", "validate", "Report", "format_table",
    "check_global", "check_local",
]
