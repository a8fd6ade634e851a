"""merge: groups concatenated in file order, exactly one scheduler, errors point at inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.errors import ConfigErrors
from pdserve.ranktable import generate, instances, load_global, merge

pytestmark = pytest.mark.unit

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def quiet(_m: str) -> None:
    pass


def host(tmp_path: Path, ip: str, prefill: list, decode: list, api: bool) -> Path:
    ips = {d: ip for inst in prefill + decode for d in inst}
    return generate(prefill, decode, api, tmp_path / ip, server_ip=ip, device_ips=ips, notify=quiet)[0]


def test_merge_order_follows_file_order(tmp_path: Path) -> None:
    a = host(tmp_path, "10.0.0.1", [[0, 1]], [[2, 3]], True)
    b = host(tmp_path, "10.0.0.2", [[0, 1]], [[2, 3]], False)
    c = host(tmp_path, "10.0.0.3", [], [[0, 1], [4, 5]], False)
    out = merge([b, a, c], tmp_path / "m", notify=quiet)
    assert out == tmp_path / "m" / "global_ranktable_merge.json"
    rt = load_global(out)
    assert [(i.name, i.server_ip, i.device_ids) for i in instances(rt)] == [
        ("prefill[0]", "10.0.0.2", (0, 1)),
        ("prefill[1]", "10.0.0.1", (0, 1)),
        ("decode[0]", "10.0.0.2", (2, 3)),
        ("decode[1]", "10.0.0.1", (2, 3)),
        ("decode[2]", "10.0.0.3", (0, 1)),
        ("decode[3]", "10.0.0.3", (4, 5)),
    ]
    data = json.loads(out.read_text())
    assert [g["server_count"] for g in data["server_group_list"]] == ["1", "2", "4"]
    assert data["server_group_list"][0]["server_list"] == [{"server_id": "10.0.0.1", "server_ip": "10.0.0.1"}]


def test_merge_matches_two_host_example(tmp_path: Path) -> None:
    two = CONFIGS / "two-host"
    out = merge([two / "host-a" / "global_ranktable_10.0.0.18.json",
                 two / "host-b" / "global_ranktable_10.0.0.19.json"], tmp_path)
    assert out.read_text() == (two / "global_ranktable_merge.json").read_text()


def test_merge_two_schedulers_names_both_files(tmp_path: Path) -> None:
    a = host(tmp_path, "10.0.0.1", [[0]], [], True)
    b = host(tmp_path, "10.0.0.2", [], [[0]], True)
    with pytest.raises(ConfigErrors) as exc:
        merge([a, b], tmp_path, notify=quiet)
    (err,) = exc.value.errors
    assert err.source == str(b) and err.field == "server_group_list[0].server_list[0]"
    assert "second scheduler" in err.found and str(a) in err.found and "--api-server" in err.fix
    assert not (tmp_path / "global_ranktable_merge.json").exists()


def test_merge_without_scheduler(tmp_path: Path) -> None:
    a = host(tmp_path, "10.0.0.1", [[0]], [], False)
    b = host(tmp_path, "10.0.0.2", [], [[0]], False)
    with pytest.raises(ConfigErrors) as exc:
        merge([a, b], tmp_path, notify=quiet)
    (err,) = exc.value.errors
    assert "no scheduler" in err.found and "--api-server" in err.fix


def test_merge_same_file_twice(tmp_path: Path) -> None:
    a = host(tmp_path, "10.0.0.1", [[0]], [[1]], True)
    with pytest.raises(ConfigErrors) as exc:
        merge([a, a], tmp_path, notify=quiet)
    assert "same file" in exc.value.errors[0].found


def test_merge_device_clash_points_at_input(tmp_path: Path) -> None:
    a = host(tmp_path, "10.0.0.1", [[0, 1]], [], True)
    b = tmp_path / "copy.json"
    data = json.loads(a.read_text())
    data["server_group_list"][0] = {"group_id": "0", "server_count": "0", "server_list": []}
    data["server_group_list"][2] = {**data["server_group_list"][1], "group_id": "2"}
    data["server_group_list"][1] = {"group_id": "1", "server_count": "0", "server_list": []}
    b.write_text(json.dumps(data))
    with pytest.raises(ConfigErrors) as exc:
        merge([a, b], tmp_path, notify=quiet)
    errs = exc.value.errors
    assert [(e.source, e.field) for e in errs] == [
        (str(b), "server_group_list[2].server_list[0].device[0].device_id"),
        (str(b), "server_group_list[2].server_list[0].device[1].device_id")]
    assert str(a) in errs[0].found
    assert "two files name host 10.0.0.1" in errs[0].fix and "--server-ip" in errs[0].fix


def test_merge_bad_input_file(tmp_path: Path) -> None:
    a = host(tmp_path, "10.0.0.1", [[0]], [[1]], True)
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.0", "server_group_list": [')
    with pytest.raises(ConfigErrors) as exc:
        merge([a, bad, tmp_path / "missing.json"], tmp_path, notify=quiet)
    assert [e.source for e in exc.value.errors] == [str(bad), str(tmp_path / "missing.json")]


def test_merge_unequal_tp_across_hosts(tmp_path: Path) -> None:
    a = host(tmp_path, "10.0.0.1", [[0, 1]], [[2, 3]], True)
    b = host(tmp_path, "10.0.0.2", [[0]], [], False)
    with pytest.raises(ConfigErrors) as exc:
        merge([a, b], tmp_path, notify=quiet)
    (err,) = exc.value.errors
    assert err.source == str(b) and err.field == "server_group_list[1].server_list[0].device"
    assert "equal TP" in err.fix


def test_merge_no_files(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no files given"):
        merge([], tmp_path)
