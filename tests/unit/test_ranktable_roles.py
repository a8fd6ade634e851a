"""Role resolution from the (global, local) ranktable pair every daemon gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.errors import ConfigError
from pdserve.ranktable import (
    GlobalRanktable,
    InstanceRef,
    LocalRanktable,
    instances,
    load_global,
    match_role,
    resolve_role,
    resolve_role_from_env,
    scheduler_server,
)

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent / "golden"
GEN = GOLDEN / "gen_1p1d"
GLOBAL = GOLDEN / "design_example.json"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_scheduler() -> None:
    role = resolve_role(GLOBAL, GEN / "local_ranktable_10.0.0.18_host.json")
    assert role.kind == "scheduler" and role.instance is None and role.server_ip == "10.0.0.18"


def test_prefill() -> None:
    role = resolve_role(GLOBAL, GEN / "local_ranktable_10.0.0.18_45.json")
    assert role.kind == "prefill"
    assert role.instance == InstanceRef("prefill", 0, 0, "10.0.0.18", "10.0.0.18", (4, 5),
                                        ("10.0.1.22", "10.0.1.23"), (0, 1))
    assert role.instance.tp_size == 2


def test_decode() -> None:
    role = resolve_role(GLOBAL, GEN / "local_ranktable_10.0.0.18_67.json")
    assert role.kind == "decode" and role.instance is not None
    assert (role.instance.index, role.instance.global_index, role.instance.device_ips) == (
        0, 1, ("10.0.1.56", "10.0.1.72"))


def test_merged_two_host_roles() -> None:
    merged = CONFIGS / "two-host" / "global_ranktable_merge.json"
    role = resolve_role(merged, CONFIGS / "two-host" / "host-b" / "local_ranktable_10.0.0.19_23.json")
    assert role.kind == "decode" and role.instance.index == 1 and role.instance.global_index == 3
    assert resolve_role(merged, CONFIGS / "two-host" / "host-a" / "local_ranktable_10.0.0.18_host.json").kind \
        == "scheduler"


def test_no_match_lists_what_was_compared(tmp_path: Path) -> None:
    data = json.loads((GEN / "local_ranktable_10.0.0.18_45.json").read_text())
    data["server_list"][0]["server_ip"] = data["server_list"][0]["server_id"] = "10.0.0.99"
    path = tmp_path / "local.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as exc:
        resolve_role(GLOBAL, path)
    err = exc.value
    assert err.source == str(path) and err.field == "server_list[0]"
    assert "server_ip 10.0.0.99" in err.found and "devices 4,5" in err.found
    assert "prefill[0] (server_ip 10.0.0.18 server_id 10.0.0.18 devices 4,5)" in err.found
    assert "decode[0]" in err.found and "RANK_TABLE_FILE_PATH" in err.fix


def test_scheduler_no_match(tmp_path: Path) -> None:
    path = tmp_path / "host.json"
    path.write_text(json.dumps({"version": "1.0", "status": "completed", "group_id": "0", "server_count": "1",
                                "server_list": [{"server_id": "10.0.0.19", "server_ip": "10.0.0.19"}]}))
    with pytest.raises(ConfigError) as exc:
        resolve_role(GLOBAL, path)
    assert "no devices (a scheduler)" in exc.value.found and "scheduler server_group_list[0]" in exc.value.found


def test_ambiguous_match_is_an_error() -> None:
    # load_global would reject this global (device used twice); match_role must still not guess
    data = json.loads(GLOBAL.read_text())
    data["server_group_list"][2]["server_list"][0]["device"] = data["server_group_list"][1]["server_list"][0]["device"]
    rt = GlobalRanktable.model_validate(data)
    local = LocalRanktable.model_validate(json.loads((GEN / "local_ranktable_10.0.0.18_45.json").read_text()))
    with pytest.raises(ConfigError) as exc:
        match_role(rt, local, "g.json", "l.json")
    assert exc.value.source == "l.json"
    assert "matches 2 entries of g.json" in exc.value.found
    assert "prefill[0]" in exc.value.found and "decode[0]" in exc.value.found


def test_from_env() -> None:
    env = {"GLOBAL_RANK_TABLE_FILE_PATH": str(GLOBAL),
           "RANK_TABLE_FILE_PATH": str(GEN / "local_ranktable_10.0.0.18_67.json")}
    assert resolve_role_from_env(env).kind == "decode"


@pytest.mark.parametrize("missing", ["GLOBAL_RANK_TABLE_FILE_PATH", "RANK_TABLE_FILE_PATH"])
def test_from_env_missing_variable(missing: str) -> None:
    env = {"GLOBAL_RANK_TABLE_FILE_PATH": str(GLOBAL), "RANK_TABLE_FILE_PATH": str(GEN / "local_ranktable_10.0.0.18_45.json")}
    del env[missing]
    with pytest.raises(ConfigError) as exc:
        resolve_role_from_env(env)
    assert exc.value.field == missing and exc.value.found == "not set"
    assert f"export {missing}=" in exc.value.fix


@pytest.mark.parametrize("var", ["GLOBAL_RANK_TABLE_FILE_PATH", "RANK_TABLE_FILE_PATH"])
def test_from_env_wrong_path_names_the_variable(var: str, tmp_path: Path) -> None:
    env = {"GLOBAL_RANK_TABLE_FILE_PATH": str(GLOBAL), "RANK_TABLE_FILE_PATH": str(GEN / "local_ranktable_10.0.0.18_45.json")}
    for bad, found in ((str(tmp_path / "nope.json"), "file not found"), (str(tmp_path), "is a directory")):
        env[var] = bad
        with pytest.raises(ConfigError) as exc:
            resolve_role_from_env(env)
        assert exc.value.source == "environment" and exc.value.field == var
        assert exc.value.found.startswith(bad) and found in exc.value.found


def test_from_env_swapped_files_say_so() -> None:
    local = str(GEN / "local_ranktable_10.0.0.18_45.json")
    with pytest.raises(ConfigError) as exc:
        resolve_role_from_env({"GLOBAL_RANK_TABLE_FILE_PATH": local, "RANK_TABLE_FILE_PATH": str(GLOBAL)})
    assert exc.value.field == "GLOBAL_RANK_TABLE_FILE_PATH" and "is a local ranktable" in exc.value.found
    assert "swapped" in exc.value.found
    with pytest.raises(ConfigError) as exc:  # the global file twice
        resolve_role_from_env({"GLOBAL_RANK_TABLE_FILE_PATH": str(GLOBAL), "RANK_TABLE_FILE_PATH": str(GLOBAL)})
    assert exc.value.field == "RANK_TABLE_FILE_PATH" and "is a global ranktable" in exc.value.found


def test_instances_order_prefill_then_decode() -> None:
    rt = load_global(CONFIGS / "2p2d-tp2" / "global_ranktable_10.0.0.18.json")
    assert [(i.name, i.global_index, i.device_ids) for i in instances(rt)] == [
        ("prefill[0]", 0, (0, 1)), ("prefill[1]", 1, (2, 3)), ("decode[0]", 2, (4, 5)), ("decode[1]", 3, (6, 7))]
    assert scheduler_server(rt).server_ip == "10.0.0.18"


def test_scheduler_server_requires_exactly_one() -> None:
    data = json.loads(GLOBAL.read_text())
    data["server_group_list"][0]["server_list"] = []
    with pytest.raises(ConfigError, match="0 scheduler entries"):
        scheduler_server(GlobalRanktable.model_validate(data))
