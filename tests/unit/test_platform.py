"""Platform detection with faked boundaries, and the device-visibility variables."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pdserve import platform as plat
from pdserve.errors import ConfigError

pytestmark = pytest.mark.unit


def fake_tool(bin_dir: Path, name: str, rc: int = 0, out: str = "") -> None:
    tool = bin_dir / name
    tool.write_text(f"#!/bin/sh\nprintf '%s' '{out}'\nexit {rc}\n")
    tool.chmod(0o755)


@pytest.fixture()
def bare(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A PATH with only our fakes, no torch_npu, no CUDA torch, no davinci devices."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("PDSERVE_PLATFORM", raising=False)
    monkeypatch.setattr(plat, "_module_available", lambda name: False)
    monkeypatch.setattr(plat, "_torch_cuda", lambda: False)
    monkeypatch.setattr(plat.glob, "glob", lambda pattern: [])
    return bin_dir


def detect() -> str:
    return plat.detect_platform(os.environ, torch_cuda=plat._torch_cuda)


def test_cpu_when_nothing(bare: Path) -> None:
    assert detect() == "cpu"


def test_cuda_from_nvidia_smi(bare: Path) -> None:
    fake_tool(bare, "nvidia-smi", 0, "GPU 0: A100\nGPU 1: A100\n")
    assert detect() == "cuda"
    assert plat.device_count("cuda") == 2


def test_broken_nvidia_smi_is_not_cuda(bare: Path) -> None:
    fake_tool(bare, "nvidia-smi", 9)
    assert detect() == "cpu"


def test_cuda_from_torch(bare: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plat, "_torch_cuda", lambda: True)
    assert detect() == "cuda"


def test_npu_needs_device_nodes_and_npu_smi(bare: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_tool(bare, "npu-smi")
    assert detect() == "cpu"  # the tool alone is not a device
    monkeypatch.setattr(plat.glob, "glob", lambda pattern: ["/dev/davinci0", "/dev/davinci1"])
    assert detect() == "npu"
    assert plat.device_count("npu") == 2


def test_npu_from_torch_npu(bare: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plat, "_module_available", lambda name: name == "torch_npu")
    fake_tool(bare, "nvidia-smi", 0)
    assert detect() == "npu"


@pytest.mark.parametrize("value", ["npu", "cuda", "cpu", "CUDA"])
def test_env_override(bare: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PDSERVE_PLATFORM", value)
    assert detect() == value.lower()


def test_env_override_typo(bare: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_PLATFORM", "gpu")
    with pytest.raises(ConfigError, match="PDSERVE_PLATFORM"):
        detect()


def test_visible_devices() -> None:
    assert plat.visible_devices_env("npu", [4, 5], "l.json") == {"ASCEND_RT_VISIBLE_DEVICES": "4,5"}
    assert plat.visible_devices_env("cuda", [1], "l.json") == {"CUDA_VISIBLE_DEVICES": "1"}
    assert plat.visible_devices_env("cpu", [0, 1], "l.json", cpu_count=2) == {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def test_cpu_core_missing() -> None:
    with pytest.raises(ConfigError) as exc:
        plat.visible_devices_env("cpu", [1, 5], "local_ranktable_x_15.json", cpu_count=2)
    e = exc.value
    assert e.source == "local_ranktable_x_15.json" and e.field == "server_list[0].device"
    assert "5" in e.found and "missing device" in e.found and "2 core" in e.found and e.fix


def test_cpu_core_outside_the_affinity_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a container limited to cores 4-7, core 0 exists on the host but cannot be used."""
    monkeypatch.setattr(plat.os, "sched_getaffinity", lambda pid: {4, 5, 6, 7})
    assert plat.usable_cores() == [4, 5, 6, 7]
    assert plat.device_count("cpu") == 4
    assert plat.visible_devices_env("cpu", [5], "l.json") == {"VLLM_CPU_OMP_THREADS_BIND": "5"}
    with pytest.raises(ConfigError) as exc:
        plat.visible_devices_env("cpu", [0], "l.json")
    e = exc.value
    assert "only use cores 4-7 (its CPU affinity)" in e.found and "missing device" in e.found
    assert "--prefill-server-list 4 --decode-server-list 5" in e.fix and "PDSERVE_CPU_BIND" in e.fix


def test_core_ranges() -> None:
    assert plat.core_ranges([0, 1, 2, 3]) == "0-3"
    assert plat.core_ranges([5, 0, 1, 2, 9, 8]) == "0-2,5,8-9"
    assert plat.core_ranges([3]) == "3"


def test_no_devices() -> None:
    with pytest.raises(ConfigError, match="no devices"):
        plat.visible_devices_env("npu", [], "l.json")


def test_accelerator_device_ids_are_checked_against_the_host():
    assert plat.visible_devices_env("npu", [4, 5], "l.json", device_total=8) == {
        "ASCEND_RT_VISIBLE_DEVICES": "4,5"}
    with pytest.raises(ConfigError) as err:
        plat.visible_devices_env("npu", [8, 9], "local_ranktable_h_89.json", device_total=8)
    msg = str(err.value)
    assert "local_ranktable_h_89.json" in msg and "missing device" in msg and "8 NPU" in msg
    with pytest.raises(ConfigError, match="GPU"):
        plat.visible_devices_env("cuda", [2], "l.json", device_total=2)
    # a host whose device count cannot be read is not refused (vLLM reports it then)
    assert plat.visible_devices_env("cuda", [7], "l.json", device_total=0) == {"CUDA_VISIBLE_DEVICES": "7"}


def test_cuda_device_count_from_a_fake_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: Fake (UUID: a)'\necho 'GPU 1: Fake (UUID: b)'\n")
    smi.chmod(0o755)
    assert plat.device_count("cuda", which=lambda name: str(smi) if name == "nvidia-smi" else None) == 2
