"""Schema models: round trips keep the files as they are; bad shapes become ConfigErrors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.errors import ConfigError, ConfigErrors
from pdserve.ranktable import (
    Device,
    GlobalRanktable,
    LocalRanktable,
    Server,
    digest,
    dumps,
    load_global,
    load_local,
    read_global,
)

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent / "golden"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def design() -> dict:
    return json.loads((GOLDEN / "design_example.json").read_text())


def write(tmp_path: Path, data: object, name: str = "g.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def only_error(exc: pytest.ExceptionInfo) -> ConfigError:
    errs = exc.value.errors if isinstance(exc.value, ConfigErrors) else [exc.value]
    assert len(errs) == 1, [e.render() for e in errs]
    return errs[0]


@pytest.mark.parametrize("path", sorted(GOLDEN.rglob("*.json")) + sorted(CONFIGS.rglob("*.json")),
                         ids=lambda p: p.name)
def test_round_trip_keeps_file_content(path: Path) -> None:
    data = json.loads(path.read_text())
    model = GlobalRanktable if "server_group_list" in data else LocalRanktable
    dumped = json.loads(dumps(model.model_validate(data)))
    assert dumped == data
    # numbers stay strings everywhere
    assert '": 4' not in dumps(model.model_validate(data))


def test_generated_files_are_byte_identical_after_round_trip() -> None:
    for path in (GOLDEN / "gen_1p1d").glob("*.json"):
        data = json.loads(path.read_text())
        model = GlobalRanktable if "server_group_list" in data else LocalRanktable
        assert dumps(model.model_validate(data)) == path.read_text()


def test_scheduler_server_dump_omits_device_key() -> None:
    server = Server(server_id="10.0.0.18", server_ip="10.0.0.18")
    assert server.model_dump() == {"server_id": "10.0.0.18", "server_ip": "10.0.0.18"}
    assert "device" not in server.model_dump_json()
    with_dev = Server(server_id="h", server_ip="1.2.3.4", device=[Device(device_id="0", device_ip="1.2.3.4", rank_id="0")])
    assert with_dev.model_dump()["device"][0]["rank_id"] == "0"


def test_load_global_design_example() -> None:
    rt = load_global(GOLDEN / "design_example.json")
    assert rt.server_group_list[1].server_list[0].device[1].device_ip == "10.0.1.23"


def test_digest_is_stable_and_content_sensitive(tmp_path: Path) -> None:
    a = load_global(GOLDEN / "design_example.json")
    b = load_global(GOLDEN / "gen_1p1d" / "global_ranktable_10.0.0.18.json")  # same content, other layout
    assert digest(a) == digest(b)
    assert len(digest(a)) == 16 and int(digest(a), 16) >= 0
    data = design()
    data["server_group_list"][2]["server_list"][0]["device"][1]["device_ip"] = "10.0.1.73"
    assert digest(load_global(write(tmp_path, data))) != digest(a)


# ---- invalid inputs -------------------------------------------------------------------------


def test_truncated_json_reports_line_and_column(tmp_path: Path) -> None:
    text = (GOLDEN / "gen_1p1d" / "global_ranktable_10.0.0.18.json").read_text()
    path = write(tmp_path, text[: len(text) // 2])
    with pytest.raises(ConfigError) as exc:
        load_global(path)
    err = exc.value
    assert err.source == str(path)
    assert err.field and err.field.startswith("line ") and "column" in err.field
    assert "invalid JSON" in err.found and "regenerate" in err.fix


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="empty"):
        load_global(write(tmp_path, ""))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_global(tmp_path / "nope.json")
    assert "not found" in exc.value.found and "gen" in exc.value.fix


def test_top_level_array(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_global(write(tmp_path, [1, 2]))
    assert "expected an object" in exc.value.found


def test_number_instead_of_string(tmp_path: Path) -> None:
    data = design()
    data["server_group_list"][1]["server_list"][0]["device"][1]["rank_id"] = 1
    path = write(tmp_path, data)
    with pytest.raises(ConfigErrors) as exc:
        load_global(path)
    err = only_error(exc)
    assert err.source == str(path)
    assert err.field == "server_group_list[1].server_list[0].device[1].rank_id"
    assert "number 1" in err.found
    assert 'write it as a string, e.g. "1"' in err.fix
    assert "validation error" not in str(exc.value)  # no raw pydantic dump


def test_number_instead_of_string_in_local(tmp_path: Path) -> None:
    data = json.loads((GOLDEN / "gen_1p1d" / "local_ranktable_10.0.0.18_45.json").read_text())
    data["server_list"][0]["device"][0]["device_id"] = 4
    with pytest.raises(ConfigErrors) as exc:
        load_local(write(tmp_path, data, "l.json"))
    err = only_error(exc)
    assert err.field == "server_list[0].device[0].device_id" and 'e.g. "4"' in err.fix


def test_missing_key(tmp_path: Path) -> None:
    data = design()
    del data["server_group_list"][2]["server_list"][0]["device"][0]["device_ip"]
    with pytest.raises(ConfigErrors) as exc:
        load_global(write(tmp_path, data))
    err = only_error(exc)
    assert err.field == "server_group_list[2].server_list[0].device[0].device_ip"
    assert "missing" in err.found and 'add "device_ip"' in err.fix


def test_unknown_key_suggests_known_keys(tmp_path: Path) -> None:
    data = design()
    server = data["server_group_list"][1]["server_list"][0]
    server["devices"] = server.pop("device")
    with pytest.raises(ConfigErrors) as exc:
        load_global(write(tmp_path, data))
    fields = {e.field: e for e in exc.value.errors}
    err = fields["server_group_list[1].server_list[0].devices"]
    assert "unknown key" in err.found and "device" in err.fix and "server_ip" in err.fix


def test_object_instead_of_list(tmp_path: Path) -> None:
    data = design()
    data["server_group_list"][0]["server_list"] = {"server_id": "x", "server_ip": "1.2.3.4"}
    with pytest.raises(ConfigErrors) as exc:
        load_global(write(tmp_path, data))
    err = only_error(exc)
    assert err.field == "server_group_list[0].server_list" and "array" in err.fix


def test_several_schema_errors_reported_together(tmp_path: Path) -> None:
    data = design()
    data["server_group_list"][1]["server_count"] = 1
    data["server_group_list"][2]["server_list"][0]["device"][0]["device_id"] = 6
    with pytest.raises(ConfigErrors) as exc:
        read_global(write(tmp_path, data))
    assert {e.field for e in exc.value.errors} == {
        "server_group_list[1].server_count", "server_group_list[2].server_list[0].device[0].device_id"}
