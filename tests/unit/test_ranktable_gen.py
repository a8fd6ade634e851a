"""gen: golden files with a fake hccn_tool, the host-address fallback, names, bad requests."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from pdserve.errors import ConfigError, ConfigErrors
from pdserve.ranktable import devices, generate, load_global, validate
from pdserve.ranktable.devices import parse_hccn_output

pytestmark = pytest.mark.unit

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"


@pytest.fixture
def fake_hccn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put tests/unit/fakes/hccn_tool (executable) first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "hccn_tool"
    shutil.copy(HERE / "fakes" / "hccn_tool", tool)
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return tool


def same_tree(out: Path, golden: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in golden.iterdir())
    for p in golden.iterdir():
        assert (out / p.name).read_text() == p.read_text(), p.name


def test_gen_1p1d_with_hccn_tool_matches_golden(fake_hccn: Path, tmp_path: Path) -> None:
    notices: list[str] = []
    paths = generate([[4, 5]], [[6, 7]], True, tmp_path / "out", server_ip="10.0.0.18", notify=notices.append)
    assert [p.name for p in paths] == ["global_ranktable_10.0.0.18.json", "local_ranktable_10.0.0.18_45.json",
                                       "local_ranktable_10.0.0.18_67.json", "local_ranktable_10.0.0.18_host.json"]
    same_tree(tmp_path / "out", GOLDEN / "gen_1p1d")
    assert notices == []
    # and it is exactly the DESIGN.md example
    assert json.loads(paths[0].read_text()) == json.loads((GOLDEN / "design_example.json").read_text())


def test_gen_without_hccn_tool_uses_host_address_with_notice(no_hccn: None, tmp_path: Path) -> None:
    notices: list[str] = []
    generate([], [[0, 1]], False, tmp_path / "out", server_ip="10.0.0.19", notify=notices.append)
    same_tree(tmp_path / "out", GOLDEN / "gen_decode_only_no_hccn")
    assert len(notices) == 1
    assert "hccn_tool not found" in notices[0] and "10.0.0.19" in notices[0] and "--device-ip" in notices[0]


def test_gen_without_api_server_has_empty_group_0(no_hccn: None, tmp_path: Path) -> None:
    paths = generate([[0]], [[1]], False, tmp_path, server_ip="10.0.0.19", notify=lambda _m: None)
    data = json.loads(paths[0].read_text())
    assert data["server_group_list"][0] == {"group_id": "0", "server_count": "0", "server_list": []}
    assert not list(tmp_path.glob("*_host.json"))
    assert validate(paths[0], partial=True).instances
    with pytest.raises(ConfigErrors, match="no scheduler"):
        validate(paths[0])


def test_files_left_from_an_earlier_gen_are_pointed_out(no_hccn: None, tmp_path: Path) -> None:
    generate([[0]], [[1]], True, tmp_path, server_ip="10.0.0.19", notify=lambda _m: None)
    said: list[str] = []
    generate([[0]], [[1]], False, tmp_path, server_ip="10.0.0.19", notify=said.append)  # no scheduler now
    stale = [m for m in said if "not part of this set" in m]
    assert len(stale) == 1 and "local_ranktable_10.0.0.19_host.json" in stale[0]


def test_device_ids_of_10_or_more_use_dashes(tmp_path: Path) -> None:
    generate([[10, 11]], [[2, 3]], False, tmp_path, server_ip="10.0.0.20",
             device_ips={10: "10.0.3.10", 11: "10.0.3.11", 2: "10.0.3.2", 3: "10.0.3.3"})
    same_tree(tmp_path, GOLDEN / "gen_ids_ge_10")


def test_device_ids_1_2_and_12_do_not_collide(fake_hccn: Path, tmp_path: Path) -> None:
    paths = generate([[1, 2]], [[12]], False, tmp_path, server_ip="10.0.0.20")
    assert sorted(p.name for p in paths[1:]) == ["local_ranktable_10.0.0.20_1-2.json",
                                                 "local_ranktable_10.0.0.20_12.json"]


def test_device_ip_override_wins_over_hccn_tool(fake_hccn: Path, tmp_path: Path) -> None:
    paths = generate([[4, 5]], [[6, 7]], True, tmp_path, server_ip="10.0.0.18", device_ips={5: "10.9.9.9"})
    rt = load_global(paths[0])
    assert [d.device_ip for d in rt.server_group_list[1].server_list[0].device] == ["10.0.1.22", "10.9.9.9"]


def test_hccn_tool_failure_names_device_and_override(fake_hccn: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigErrors) as exc:
        generate([[98, 99]], [], True, tmp_path / "out", server_ip="10.0.0.18")
    assert [e.field for e in exc.value.errors] == ["device 98", "device 99"]
    assert all("--device-ip" in e.fix for e in exc.value.errors)
    assert "does not exist" in exc.value.errors[1].found
    assert not (tmp_path / "out").exists()  # nothing written


def test_hccn_tool_is_asked_for_every_device_at_once(fake_hccn: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "calls.log"
    monkeypatch.setenv("FAKE_HCCN_LOG", str(log))
    monkeypatch.setenv("FAKE_HCCN_WAIT_FOR", "4")
    paths = generate([[0, 1]], [[2, 3]], False, tmp_path / "out", server_ip="10.0.0.18")
    calls = log.read_text().split()[::2]
    assert calls.index("end") == 4  # all four calls started before the first one ended
    ips = [d["device_ip"] for s in json.loads(paths[0].read_text())["server_group_list"][1:]
           for d in s["server_list"][0]["device"]]
    assert ips == ["10.0.9.0", "10.0.9.1", "10.0.9.2", "10.0.9.3"]  # each device its own answer


def test_parse_hccn_output() -> None:
    assert parse_hccn_output("ipaddr:10.0.1.22\nnetmask:255.255.255.0\n") == "10.0.1.22"
    assert parse_hccn_output("ipaddr : 10.0.1.22\n") == "10.0.1.22"
    assert parse_hccn_output("netmask:255.255.255.0\n") is None
    assert parse_hccn_output("ipaddr:garbage\n") is None


def test_host_address_default_is_an_ipv4(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    addr = devices.host_address()
    socket.inet_aton(addr)
    monkeypatch.setattr(devices, "host_address", lambda: "10.1.2.3")
    paths = generate([[0]], [[1]], True, tmp_path, device_ips={0: "10.1.2.3", 1: "10.1.2.3"})
    assert paths[0].name == "global_ranktable_10.1.2.3.json"


def test_host_address_falls_back_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoNet:
        def __init__(self, *a: object) -> None:
            raise OSError("network unreachable")

    monkeypatch.setattr(devices.socket, "socket", NoNet)
    monkeypatch.setattr(devices.socket, "gethostbyname", lambda _h: "127.0.1.1")
    assert devices.host_address() == "127.0.0.1"


@pytest.mark.parametrize(
    ("prefill", "decode", "api", "ips", "source", "found"),
    [
        ([], [], False, {}, "gen", "nothing to generate"),
        ([[0, 1]], [[1, 2]], True, {}, "--decode-server-list", "device 1 already used by --prefill-server-list"),
        ([[0, 1], [2]], [], True, {}, "--prefill-server-list", "1 device but instance 0 has 2"),
        ([[0]], [[1]], True, {5: "10.0.0.5"}, "--device-ip", "device 5 is in no instance"),
        ([[0]], [[1]], True, {0: "ten"}, "--device-ip", "'ten' is not an IP address"),
    ],
)
def test_bad_requests(prefill: list, decode: list, api: bool, ips: dict, source: str, found: str,
                      tmp_path: Path) -> None:
    with pytest.raises(ConfigErrors) as exc:
        generate(prefill, decode, api, tmp_path, server_ip="10.0.0.18", device_ips=ips)
    (err,) = exc.value.errors
    assert err.source == source and found in err.found and err.fix


def test_bad_server_ip(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="not an IP address"):
        generate([[0]], [[1]], True, tmp_path, server_ip="myhost", device_ips={0: "1.2.3.4", 1: "1.2.3.4"})


def test_ipv6_server_ip_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="IPv6") as info:
        generate([[0]], [[1]], True, tmp_path / "out", server_ip="::1", device_ips={0: "1.2.3.4", 1: "1.2.3.4"})
    assert info.value.source == "--server-ip" and "IPv4" in info.value.fix
    assert not (tmp_path / "out").exists()


def test_p_d_tp_differ_gives_notice(tmp_path: Path) -> None:
    notices: list[str] = []
    generate([[0, 1]], [[2]], True, tmp_path, server_ip="10.0.0.18",
             device_ips={0: "10.0.1.1", 1: "10.0.1.2", 2: "10.0.1.3"}, notify=notices.append)
    assert any("prefill TP is 2 but decode TP is 1" in n for n in notices)
