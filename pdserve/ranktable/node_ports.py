"""NODE_PORTS: the ``--port`` of each instance, in global-ranktable order.

The scheduler pairs entry i with instance i (prefill first, then decode) at that instance's
server_ip. Commas and/or whitespace separate the entries, so both ``8001,8002`` and
``"8001 8002"`` work.
"""

from __future__ import annotations

import re


from pdserve.errors import ConfigError, ConfigErrors, plural
from pdserve.ranktable.schema import GlobalRanktable
from pdserve.ranktable.topology import InstanceRef, instances

ENV_NODE_PORTS = "NODE_PORTS"


def split_ports(text: str, source: str = ENV_NODE_PORTS) -> tuple[list[int], list[ConfigError]]:
    """Parse the entries alone (integers in 1..65535); the count is checked by parse_node_ports."""
    ports: list[int] = []
    errors: list[ConfigError] = []
    tokens = re.split(r"\s*,\s*|\s+", text.strip()) if text.strip() else []  # commas and/or spaces
    if len(tokens) > 1 and tokens[-1] == "":
        tokens.pop()  # one trailing comma is harmless
    for i, token in enumerate(tokens):
        if not token:
            errors.append(ConfigError(source, f"entry {i}", "is empty (two commas in a row?)",
                                      "write ports as integers separated by commas, e.g. NODE_PORTS=8001,8002"))
            continue
        if not (token.isascii() and token.isdigit()):
            errors.append(ConfigError(source, f"entry {i} ({token!r})", "not an integer",
                                      "write ports as integers separated by commas, e.g. NODE_PORTS=8001,8002"))
            continue
        port = int(token)
        if not 1 <= port <= 65535:
            errors.append(ConfigError(source, f"entry {i} ({token!r})", f"port {port} is out of range",
                                      "use a TCP port between 1 and 65535 (above 1024 for non-root daemons)"))
            continue
        ports.append(port)
    return ports, errors


def expected_order(insts: list[InstanceRef]) -> str:
    return "; ".join(f"{i.global_index}: {i.describe()}" for i in insts) or "no instances"


def parse_node_ports(text: str, rt: GlobalRanktable, source: str = ENV_NODE_PORTS) -> list[int]:
    """One port per instance, prefill first then decode; all problems raised at once."""
    insts = instances(rt)
    ports, errors = split_ports(text, source)
    if not errors:
        if len(ports) != len(insts):
            errors.append(ConfigError(source, None,
                                      f"{plural(len(ports), 'port')} ({text.strip()!r}) for {plural(len(insts), 'instance')}",
                                      f"give one port per instance in this order: {expected_order(insts)}"))
        else:
            seen: dict[tuple[str, int], InstanceRef] = {}
            for inst, port in zip(insts, ports):
                # the same port on two different hosts is fine; on one host it cannot work
                first = seen.setdefault((inst.server_ip, port), inst)
                if first is not inst:
                    errors.append(ConfigError(source, f"entry {inst.global_index} ({port})",
                                              f"port {port} on {inst.server_ip} is given to both "
                                              f"{first.name} and {inst.name}",
                                              "give every instance on one host its own port"))
    if errors:
        raise ConfigErrors(errors)
    return ports
