"""Every validation rule: each error names the file, the JSON path, what was found and the fix."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pdserve.errors import ConfigError, ConfigErrors
from pdserve.ranktable import load_global, validate

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent / "golden"
DESIGN = json.loads((GOLDEN / "design_example.json").read_text())
LOCAL_67 = json.loads((GOLDEN / "gen_1p1d" / "local_ranktable_10.0.0.18_67.json").read_text())


def design() -> dict:
    return copy.deepcopy(DESIGN)


def write(tmp_path: Path, data: object, name: str = "global.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=2))
    return path


def errors_of(path: Path, **kw: object) -> list[ConfigError]:
    with pytest.raises(ConfigErrors) as exc:
        validate(path, **kw)  # type: ignore[arg-type]
    return exc.value.errors


def one_error(path: Path, field: str, *, found: str, fix: str, **kw: object) -> ConfigError:
    """Exactly one error, at ``field`` of ``path``; found and fix contain the given words."""
    errs = errors_of(path, **kw)
    assert len(errs) == 1, [e.render() for e in errs]
    err = errs[0]
    assert err.source == str(path)
    assert err.field == field
    assert found in err.found, err.found
    assert fix in err.fix, err.fix
    rendered = err.render()
    assert str(path) in rendered and field in rendered and "fix:" in rendered
    return err


def add_prefill(data: dict, devices: list[str], host: str = "10.0.0.18") -> None:
    group = data["server_group_list"][1]
    group["server_list"].append({"server_id": host, "server_ip": host, "device": [
        {"device_id": d, "device_ip": "10.0.1.99", "rank_id": str(r)} for r, d in enumerate(devices)]})
    group["server_count"] = str(len(group["server_list"]))


def test_valid_design_example_passes() -> None:
    report = validate(GOLDEN / "design_example.json")
    assert report.warnings == []
    assert [(i.role, i.global_index, i.device_ids) for i in report.instances] == [
        ("prefill", 0, (4, 5)), ("decode", 1, (6, 7))]


def test_not_three_groups(tmp_path: Path) -> None:
    data = design()
    data["server_group_list"].pop()
    one_error(write(tmp_path, data), "server_group_list", found="2 groups", fix="exactly three groups")


def test_group_ids_out_of_order(tmp_path: Path) -> None:
    data = design()
    data["server_group_list"][1]["group_id"] = "2"
    data["server_group_list"][2]["group_id"] = "1"
    errs = errors_of(write(tmp_path, data))
    assert [e.field for e in errs] == ["server_group_list[1].group_id", "server_group_list[2].group_id"]
    assert 'write "1"' in errs[0].fix and "scheduler" in errs[0].fix


def test_server_count_mismatch(tmp_path: Path) -> None:
    data = design()
    data["server_group_list"][2]["server_count"] = "2"
    one_error(write(tmp_path, data), "server_group_list[2].server_count",
              found="'2' but server_list has 1 entry", fix='write "1"')


def test_no_scheduler(tmp_path: Path) -> None:
    data = design()
    data["server_group_list"][0].update(server_count="0", server_list=[])
    one_error(write(tmp_path, data), "server_group_list[0].server_list", found="no scheduler",
              fix="--api-server")


def test_no_scheduler_is_fine_for_a_partial_host_file(tmp_path: Path) -> None:
    data = design()
    data["server_group_list"][0].update(server_count="0", server_list=[])
    assert validate(write(tmp_path, data), partial=True).instances


def test_two_schedulers(tmp_path: Path) -> None:
    data = design()
    data["server_group_list"][0]["server_list"].append({"server_id": "10.0.0.19", "server_ip": "10.0.0.19"})
    data["server_group_list"][0]["server_count"] = "2"
    err = one_error(write(tmp_path, data), "server_group_list[0].server_list[1]", found="second scheduler",
                    fix="exactly one scheduler")
    assert "server_group_list[0].server_list[0]" in err.found


def test_scheduler_with_devices(tmp_path: Path) -> None:
    data = design()
    data["server_group_list"][0]["server_list"][0]["device"] = [
        {"device_id": "0", "device_ip": "10.0.1.1", "rank_id": "0"}]
    one_error(write(tmp_path, data), "server_group_list[0].server_list[0].device",
              found="scheduler entry has 1 device", fix='remove the "device" key')


def test_instance_without_device_key(tmp_path: Path) -> None:
    data = design()
    del data["server_group_list"][1]["server_list"][0]["device"]
    one_error(write(tmp_path, data), "server_group_list[1].server_list[0].device",
              found='prefill instance has no "device" key', fix="list the devices")


def test_empty_device_list(tmp_path: Path) -> None:
    data = design()
    data["server_group_list"][2]["server_list"][0]["device"] = []
    one_error(write(tmp_path, data), "server_group_list[2].server_list[0].device", found="empty device list",
              fix="list the instance's devices")


def test_no_decode_instance(tmp_path: Path) -> None:
    data = design()
    data["server_group_list"][2].update(server_count="0", server_list=[])
    one_error(write(tmp_path, data), "server_group_list[2].server_list", found="no decode instance",
              fix="--decode-server-list")


def test_device_id_not_an_integer(tmp_path: Path) -> None:
    data = design()
    data["server_group_list"][1]["server_list"][0]["device"][1]["device_id"] = "npu5"
    one_error(write(tmp_path, data), "server_group_list[1].server_list[0].device[1].device_id",
              found="'npu5'", fix="non-negative integer string")


def test_rank_ids_not_from_zero(tmp_path: Path) -> None:
    data = design()
    devs = data["server_group_list"][1]["server_list"][0]["device"]
    devs[0]["rank_id"], devs[1]["rank_id"] = "1", "2"
    errs = errors_of(write(tmp_path, data))
    assert [e.field for e in errs] == ["server_group_list[1].server_list[0].device[0].rank_id",
                                       "server_group_list[1].server_list[0].device[1].rank_id"]
    assert 'write "0"' in errs[0].fix and "from 0" in errs[0].fix


def test_rank_id_duplicate(tmp_path: Path) -> None:
    data = design()
    data["server_group_list"][2]["server_list"][0]["device"][1]["rank_id"] = "0"
    one_error(write(tmp_path, data), "server_group_list[2].server_list[0].device[1].rank_id",
              found="rank_id '0' at position 1", fix='write "1"')


def test_device_listed_twice_in_one_instance(tmp_path: Path) -> None:
    data = design()
    data["server_group_list"][1]["server_list"][0]["device"][1]["device_id"] = "4"
    one_error(write(tmp_path, data), "server_group_list[1].server_list[0].device[1].device_id",
              found="listed twice", fix="once")


def test_device_used_twice_on_one_host(tmp_path: Path) -> None:
    data = design()
    data["server_group_list"][2]["server_list"][0]["device"][0]["device_id"] = "5"
    err = one_error(write(tmp_path, data), "server_group_list[2].server_list[0].device[0].device_id",
                    found='device "5" of host 10.0.0.18 is already used by', fix="its own devices")
    assert "server_group_list[1].server_list[0].device[1]" in err.found


def test_same_device_on_two_hosts_is_fine(tmp_path: Path) -> None:
    data = design()
    add_prefill(data, ["4", "5"], host="10.0.0.19")
    assert len(validate(write(tmp_path, data)).instances) == 3


def test_unequal_tp_inside_prefill_group(tmp_path: Path) -> None:
    data = design()
    add_prefill(data, ["0", "1", "2", "3"])
    err = one_error(write(tmp_path, data), "server_group_list[1].server_list[1].device",
                    found="4 devices, but the first prefill instance", fix="same number of devices")
    assert "server_group_list[1].server_list[0]" in err.found


def test_prefill_and_decode_tp_differ_is_a_warning(tmp_path: Path) -> None:
    data = design()
    data["server_group_list"][2]["server_list"][0]["device"].pop()
    report = validate(write(tmp_path, data))
    assert len(report.warnings) == 1
    assert "prefill TP is 2 but decode TP is 1" in report.warnings[0]


def test_bad_server_ip(tmp_path: Path) -> None:
    data = design()
    data["server_group_list"][2]["server_list"][0]["server_ip"] = "node-b"
    errs = errors_of(write(tmp_path, data))
    assert errs[0].field == "server_group_list[2].server_list[0].server_ip"
    assert "not an IP address" in errs[0].found and "IPv4" in errs[0].fix


def test_ipv6_server_ip_is_refused(tmp_path: Path) -> None:
    """server_ip:port URLs (NODE_PORTS, the side channel) are built unbracketed: IPv4 only."""
    data = design()
    data["server_group_list"][1]["server_list"][0]["server_ip"] = "::1"
    errs = errors_of(write(tmp_path, data))
    assert [e.field for e in errs] == ["server_group_list[1].server_list[0].server_ip"]
    assert "IPv6" in errs[0].found and "127.0.0.1" in errs[0].fix


def test_bad_device_ip(tmp_path: Path) -> None:
    data = design()
    data["server_group_list"][1]["server_list"][0]["device"][0]["device_ip"] = "10.0.1"
    one_error(write(tmp_path, data), "server_group_list[1].server_list[0].device[0].device_ip",
              found="not an IP address", fix="hccn_tool")


def test_status_not_completed(tmp_path: Path) -> None:
    data = design()
    data["status"] = "initializing"
    one_error(write(tmp_path, data), "status", found="'initializing'", fix='"completed"')


def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    data = design()
    data["server_group_list"][0]["server_list"][0]["device"] = [
        {"device_id": "0", "device_ip": "10.0.1.1", "rank_id": "0"}]
    data["server_group_list"][1]["server_count"] = "3"
    data["server_group_list"][2]["server_list"][0]["device"][1]["rank_id"] = "5"
    local = write(tmp_path, {**LOCAL_67, "group_id": "1"}, "local.json")
    errs = errors_of(write(tmp_path, data), local_path=local, node_ports="8001,http")
    fields = {(Path(e.source).name if e.source else None, e.field) for e in errs}
    assert fields == {
        ("global.json", "server_group_list[0].server_list[0].device"),
        ("global.json", "server_group_list[1].server_count"),
        ("global.json", "server_group_list[2].server_list[0].device[1].rank_id"),
        ("local.json", "group_id"),
        ("NODE_PORTS", "entry 1 ('http')"),
    }


def test_schema_error_and_node_ports_error_together(tmp_path: Path) -> None:
    data = design()
    data["server_group_list"][1]["server_list"][0]["device"][0]["device_id"] = 4
    errs = errors_of(write(tmp_path, data), node_ports="0")
    assert [e.field for e in errs] == ["server_group_list[1].server_list[0].device[0].device_id", "entry 0 ('0')"]


# ---- local ranktables and NODE_PORTS inside validate -------------------------------------------


def test_local_matches_one_instance(tmp_path: Path) -> None:
    report = validate(GOLDEN / "design_example.json", GOLDEN / "gen_1p1d" / "local_ranktable_10.0.0.18_67.json",
                      "8001 8002")
    assert report.role is not None and report.role.kind == "decode"
    assert report.ports == [8001, 8002]


def test_local_group_id_not_zero(tmp_path: Path) -> None:
    path = write(tmp_path, {**LOCAL_67, "group_id": "2"}, "local.json")
    errs = errors_of(GOLDEN / "design_example.json", local_path=path)  # type: ignore[arg-type]
    assert len(errs) == 1 and errs[0].source == str(path) and errs[0].field == "group_id"
    assert 'write "0"' in errs[0].fix


def test_local_with_two_servers(tmp_path: Path) -> None:
    data = copy.deepcopy(LOCAL_67)
    data["server_list"].append(copy.deepcopy(data["server_list"][0]))
    path = write(tmp_path, data, "local.json")
    errs = errors_of(GOLDEN / "design_example.json", local_path=path)  # type: ignore[arg-type]
    assert {e.field for e in errs} == {"server_list", "server_count"}
    assert any("exactly one instance" in e.fix for e in errs)


def test_local_matching_no_instance(tmp_path: Path) -> None:
    data = copy.deepcopy(LOCAL_67)
    data["server_list"][0]["device"][1]["device_id"] = "3"
    path = write(tmp_path, data, "local.json")
    errs = errors_of(GOLDEN / "design_example.json", local_path=path)  # type: ignore[arg-type]
    assert len(errs) == 1 and errs[0].source == str(path) and errs[0].field == "server_list[0]"
    assert "matches no entry" in errs[0].found and "prefill[0]" in errs[0].found and "devices 6,7" in errs[0].found


def test_load_global_runs_the_checks(tmp_path: Path) -> None:
    data = design()
    data["server_group_list"][0].update(server_count="0", server_list=[])
    with pytest.raises(ConfigErrors, match="no scheduler"):
        load_global(write(tmp_path, data))
