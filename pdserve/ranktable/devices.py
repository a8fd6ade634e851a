"""Where addresses in a generated ranktable come from: the host and its devices' NICs.

On Ascend hosts each NPU has its own RoCE NIC, reported by ``hccn_tool -i <id> -ip -g``
(line ``ipaddr:10.0.1.22``). CPU/CUDA hosts have no such tool: the device address is then the
host address, which is what the KV side channel uses anyway.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import socket
import subprocess

from pdserve.errors import ConfigError

HCCN_TOOL = "hccn_tool"
_IPADDR = re.compile(r"^\s*ipaddr\s*:\s*(\S+)\s*$", re.MULTILINE)


def host_address() -> str:
    """The primary non-loopback IPv4 of this host, else 127.0.0.1.

    A UDP ``connect`` only selects the outgoing interface; no packet is sent.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("10.255.255.255", 1))
            addr = sock.getsockname()[0]
        if addr and not ipaddress.ip_address(addr).is_loopback and addr != "0.0.0.0":
            return addr
    except OSError:
        pass
    try:
        addr = socket.gethostbyname(socket.gethostname())
        if not ipaddress.ip_address(addr).is_loopback:
            return addr
    except (OSError, ValueError):
        pass
    return "127.0.0.1"


def have_hccn_tool() -> bool:
    return shutil.which(HCCN_TOOL) is not None


def parse_hccn_output(text: str) -> str | None:
    """The address of the ``ipaddr:`` line of ``hccn_tool -i N -ip -g``, if valid."""
    match = _IPADDR.search(text)
    if not match:
        return None
    try:
        ipaddress.ip_address(match.group(1))
    except ValueError:
        return None
    return match.group(1)


def hccn_device_ip(device_id: int, timeout: float = 10.0) -> str:
    """Ask hccn_tool for one device's NIC address; failures name the flag that avoids it."""
    tool = shutil.which(HCCN_TOOL) or HCCN_TOOL
    cmd = [tool, "-i", str(device_id), "-ip", "-g"]
    fix = (f"check that device {device_id} exists and has an address (`hccn_tool -i {device_id} -ip -g`), "
           f"or pass --device-ip {device_id}=<ip>")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(HCCN_TOOL, f"device {device_id}", f"cannot run `{' '.join(cmd[1:])}`: {exc}",
                          fix) from None
    addr = parse_hccn_output(proc.stdout)
    if proc.returncode != 0 or addr is None:
        out = (proc.stdout + proc.stderr).strip().replace("\n", " | ")[:200]
        raise ConfigError(HCCN_TOOL, f"device {device_id}",
                          f"exit code {proc.returncode}, no valid 'ipaddr:' line in output {out!r}", fix)
    return addr
