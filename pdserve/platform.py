"""Which accelerator this host has (npu / cuda / cpu) and how to make an instance see its devices.

The ranktable's ``device_id`` means an NPU on Ascend hosts, a GPU index on CUDA hosts and a CPU
core id on CPU hosts; this module turns those ids into the one environment variable that the
platform's vLLM reads, so the same ranktable files work everywhere. Detection only looks at
cheap, local signals (an importable module, a device node, a CLI on PATH) and can always be
overridden with ``PDSERVE_PLATFORM`` -- a wrong guess must never block an operator.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from pdserve.errors import ConfigError

Platform = Literal["npu", "cuda", "cpu"]
PLATFORMS: tuple[Platform, ...] = ("npu", "cuda", "cpu")

ENV_PLATFORM = "PDSERVE_PLATFORM"
# the variable each platform's runtime reads to restrict the visible devices
VISIBLE_VAR: dict[Platform, str] = {
    "npu": "ASCEND_RT_VISIBLE_DEVICES",
    "cuda": "CUDA_VISIBLE_DEVICES",
    "cpu": "VLLM_CPU_OMP_THREADS_BIND",
}

Which = Callable[[str], str | None]


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _runs(cmd: Sequence[str], timeout: float = 10.0) -> bool:
    """True when the tool exists and exits 0 (nvidia-smi exits non-zero without a driver)."""
    try:
        return subprocess.run(list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=timeout, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _torch_cuda() -> bool:
    # importing torch costs seconds: only when no cheaper signal decided, and never fatal
    if not _module_available("torch"):
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken torch install just means "no CUDA"
        return False


def detect_platform(environ: Mapping[str, str] = os.environ, which: Which = shutil.which,
                    torch_cuda: Callable[[], bool] = _torch_cuda) -> Platform:
    """``PDSERVE_PLATFORM`` if set; else npu, cuda, cpu in that order of evidence."""
    forced = environ.get(ENV_PLATFORM, "").strip().lower()
    if forced:
        if forced not in PLATFORMS:
            raise ConfigError("environment", ENV_PLATFORM, f"{forced!r} is not a platform",
                              f"export {ENV_PLATFORM}=npu, cuda or cpu (or unset it to detect)")
        return forced  # type: ignore[return-value]
    if _module_available("torch_npu") or (glob.glob("/dev/davinci[0-9]*") and which("npu-smi")):
        return "npu"
    smi = which("nvidia-smi")
    if smi and _runs([smi, "-L"]):
        return "cuda"
    if torch_cuda():
        return "cuda"
    return "cpu"


def usable_cores() -> list[int]:
    """The CPU cores this process may run on, in order: its affinity set (a container's or
    ``taskset``'s cpuset), which need not start at core 0, else every core of the host."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def core_ranges(cores: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``: vLLM's VLLM_CPU_OMP_THREADS_BIND syntax for one rank."""
    parts: list[str] = []
    ordered = sorted(set(cores))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def parse_core_list(text: str, source: str, field: str) -> list[int]:
    """``"0-3,8"`` -> ``[0, 1, 2, 3, 8]`` (the syntax of taskset and VLLM_CPU_OMP_THREADS_BIND)."""
    out: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        lo, dash, hi = part.partition("-")
        ok = lo.isascii() and lo.isdigit() and (not dash or (hi.isascii() and hi.isdigit() and int(hi) >= int(lo)))
        if not ok:
            raise ConfigError(source, field, f"{text!r}: {part!r} is not a core or a range",
                              "write core ids and ranges separated by commas, e.g. 0-3,8")
        out.update(range(int(lo), int(hi if dash else lo) + 1))
    return sorted(out)


def device_count(platform: Platform, which: Which = shutil.which) -> int:
    """How many devices of the platform this host has (CPU: usable cores), for planning."""
    if platform == "cpu":
        return len(usable_cores())
    if platform == "cuda":
        smi = which("nvidia-smi")
        if smi:
            try:
                out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
                n = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
                if n:
                    return n
            except (OSError, subprocess.SubprocessError):
                pass
        try:
            import torch

            return int(torch.cuda.device_count())
        except Exception:  # noqa: BLE001
            return 0
    return len(glob.glob("/dev/davinci[0-9]*"))


def visible_devices_env(platform: Platform, device_ids: Sequence[int], source: str,
                        field: str = "server_list[0].device",
                        cpu_count: int | None = None,
                        device_total: int | None = None) -> dict[str, str]:
    """The environment an instance needs to use exactly ``device_ids`` (rank order).

    On CPU each device id is a core id; vLLM wants one core list per TP rank separated by ``|``.
    A core this host does not have is a configuration mistake (a ranktable from another host),
    reported against the local ranktable rather than left to crash deep inside vLLM.
    """
    if not device_ids:
        raise ConfigError(source, field, "no devices",
                          "an instance's local ranktable needs at least one device (missing device)")
    ids = list(device_ids)
    if platform == "cpu":
        allowed = list(range(cpu_count)) if cpu_count is not None else usable_cores()
        bad = [d for d in ids if d not in allowed]
        if bad:
            if allowed == list(range(len(allowed))):
                where = f"this host has {len(allowed)} core(s) ({core_ranges(allowed)})"
            else:
                where = f"this process may only use cores {core_ranges(allowed)} (its CPU affinity)"
            raise ConfigError(
                source, field,
                f"device id(s) {','.join(map(str, bad))} are CPU core ids, but {where}: missing device",
                f"regenerate the ranktables on this host with core ids from {core_ranges(allowed)} "
                f"(pdserve ranktable gen --prefill-server-list {allowed[0]} --decode-server-list "
                f"{allowed[min(1, len(allowed) - 1)]} ...), or export PDSERVE_CPU_BIND to bind explicitly")
        return {VISIBLE_VAR["cpu"]: "|".join(str(d) for d in ids)}
    total = device_count(platform) if device_total is None else device_total
    kind = {"npu": "NPU", "cuda": "GPU"}[platform]
    bad = [d for d in ids if not 0 <= d < total] if total else []  # 0: cannot tell, let vLLM decide
    if bad:
        raise ConfigError(
            source, field,
            f"device id(s) {','.join(map(str, bad))} but this host has {total} {kind}(s) "
            f"(0..{total - 1}): missing device",
            f"regenerate the ranktables on this host with {kind} ids below {total}, or check the "
            f"driver ({'npu-smi info' if platform == 'npu' else 'nvidia-smi -L'})")
    return {VISIBLE_VAR[platform]: ",".join(str(d) for d in ids)}
