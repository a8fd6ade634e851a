"""User trial findings on the ranktable tools: --save-dir problems are one message (gen, merge and
the drop-in script), fix texts point at README.md, validate reports the rule errors of a file
with unknown keys too, and counts read right for one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.cli import main
from pdserve.errors import ConfigError, ConfigErrors, plural
from pdserve.ranktable.io import ensure_dir, read_global_all, write
from pdserve.ranktable.schema import LocalRanktable, Server
from tests.unit.test_ranktable_cli import run

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
GLOBAL = Path(__file__).parent / "golden" / "design_example.json"
SCRIPT = ROOT / "scripts" / "pd_ranktable_tools.py"
GEN = ["ranktable", "gen", "--prefill-server-list", "0", "--decode-server-list", "1", "--api-server",
       "--server-ip", "127.0.0.1"]


@pytest.fixture(autouse=True)
def _clean(no_hccn: None) -> None:
    """Every test here: no hccn_tool, no deployment variables."""


def test_save_dir_that_is_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    existing = tmp_path / "g.json"
    existing.write_text("{}")
    code, _, err = run(capsys, *GEN, "--save-dir", str(existing))
    assert code == 2
    assert f"--save-dir: {existing}: is an existing file, not a directory" in err
    assert "fix: give a directory" in err and "--save-dir ./save_dir" in err
    code, _, err = run(capsys, "ranktable", "merge", "--global-ranktable-list", str(GLOBAL),
                       "--save-dir", str(existing))
    assert code == 2 and "--save-dir" in err and "not a directory" in err


def test_save_dir_that_cannot_be_created(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(capsys, *GEN, "--save-dir", str(blocker / "sub"))
    assert code == 2 and f"--save-dir: {blocker / 'sub'}: cannot create this directory" in err
    assert "fix: give a directory you can write to" in err


def test_save_dir_is_created(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, _ = run(capsys, *GEN, "--save-dir", str(tmp_path / "a" / "b"))
    assert code == 0 and (tmp_path / "a" / "b" / "global_ranktable_127.0.0.1.json").is_file()


def test_run_dir_flag_is_named(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="--run-dir") as exc:
        ensure_dir(tmp_path / "f", "--run-dir")
    assert "--save-dir" not in str(exc.value)


def test_unwritable_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "local.json").mkdir()  # os.replace onto a directory fails, even for root
    rt = LocalRanktable(server_list=[Server(server_id="127.0.0.1", server_ip="127.0.0.1")])
    with pytest.raises(ConfigError, match="cannot write the file"):
        write(rt, tmp_path / "local.json")
    assert not (tmp_path / "local.json.tmp").exists()


@pytest.mark.parametrize("mode", [["--mode", "gen", "--prefill-server-list", "0", "--server-ip", "127.0.0.1"],
                                  ["--mode", "merge", "--global-ranktable-list", str(GLOBAL)]])
def test_drop_in_script_save_dir(tmp_path: Path, mode: list[str]) -> None:
    existing = tmp_path / "g.json"
    existing.write_text("{}")
    proc = subprocess.run([sys.executable, str(SCRIPT), *mode, "--save-dir", str(existing)],
                          capture_output=True, text=True, timeout=60, env={"PATH": str(tmp_path)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "pd_ranktable_tools: error: --save-dir" in proc.stderr and "not a directory" in proc.stderr


def test_fix_texts_point_at_the_readme(tmp_path: Path) -> None:
    data = json.loads(GLOBAL.read_text())
    del data["server_group_list"][1]["server_list"][0]["server_ip"]
    path = tmp_path / "missing.json"
    path.write_text(json.dumps(data))
    rt, errors = read_global_all(path)
    assert rt is None and len(errors) == 1
    assert "README.md, section 'Ranktables'" in errors[0].fix and "DESIGN.md" not in errors[0].fix
    readme = (ROOT / "README.md").read_text()
    assert "\n## Ranktables\n" in readme


def test_validate_reports_unknown_keys_and_rule_errors_together(capsys: pytest.CaptureFixture[str],
                                                                tmp_path: Path) -> None:
    data = json.loads(GLOBAL.read_text())
    server = data["server_group_list"][1]["server_list"][0]
    server["foo"] = "x"
    server["device"][0]["device_id"] = "abc"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    code, out, err = run(capsys, "ranktable", "validate", "--global", str(path))
    assert code == 2 and out == ""
    assert "server_group_list[1].server_list[0].foo: unknown key 'foo'" in err
    assert "server_group_list[1].server_list[0].device[0].device_id: 'abc'" in err
    assert "pdserve: ranktable validate: 2 errors" in err


def test_broken_structure_still_stops_at_the_shape(tmp_path: Path) -> None:
    """The rules need the structure: a missing key is reported alone, and the help says so."""
    data = json.loads(GLOBAL.read_text())
    del data["server_group_list"][2]["group_id"]
    data["server_group_list"][1]["server_list"][0]["device"][0]["device_id"] = "abc"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    rt, errors = read_global_all(path)
    assert rt is None and [e.field for e in errors] == ["server_group_list[2].group_id"]


def test_load_global_reports_everything_for_the_daemons(tmp_path: Path) -> None:
    from pdserve.ranktable import load_global

    data = json.loads(GLOBAL.read_text())
    data["server_group_list"][1]["server_list"][0]["device"][1]["rank_id"] = 0
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigErrors) as exc:
        load_global(path)
    found = [e.found for e in exc.value.errors]
    assert found[0] == "number 0, expected a string" and "rank_id '0' at position 1" in found[1]


def test_plural() -> None:
    assert plural(1, "port") == "1 port" and plural(2, "port") == "2 ports" and plural(0, "port") == "0 ports"
    assert plural(1, "entry", "entries") == "1 entry" and plural(3, "entry", "entries") == "3 entries"


def test_counts_read_right_for_one(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "ranktable", "validate", "--global", str(GLOBAL), "--node-ports", "8001")
    assert code == 2 and "1 port ('8001') for 2 instances" in err and "1 ports" not in err
    assert err.rstrip().endswith("pdserve: ranktable validate: 1 error")


def test_a_bom_is_harmless_and_a_duplicate_key_is_an_error(tmp_path: Path) -> None:
    from pdserve.ranktable.io import read_json

    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"version": "1.0"}')
    assert read_json(bom) == {"version": "1.0"}
    dup = tmp_path / "dup.json"
    dup.write_text('{"server_list": [], "server_list": [{"server_id": "x"}]}')
    with pytest.raises(ConfigError) as exc:
        read_json(dup)
    assert exc.value.source == str(dup) and "'server_list' appears twice" in exc.value.found


def test_a_server_list_given_twice_is_an_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["ranktable", "gen", "--prefill-server-list", "0", "--prefill-server-list", "1",
              "--decode-server-list", "2", "--save-dir", str(tmp_path / "out")])
    assert exc.value.code == 2 and "--prefill-server-list given twice" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
