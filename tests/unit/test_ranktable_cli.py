"""The CLI (`pdserve ranktable ...`) and the drop-in scripts/pd_ranktable_tools.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.cli import main

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
GLOBAL = GOLDEN / "design_example.json"
SCRIPT = ROOT / "scripts" / "pd_ranktable_tools.py"


@pytest.fixture(autouse=True)
def _clean(no_hccn: None) -> None:
    """Every test here: no hccn_tool, no deployment variables."""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_ranktable_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["ranktable", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("gen", "merge", "validate", "show", "全量", "增量", "服务入口"):
        assert word in out


def test_ranktable_without_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "ranktable")
    assert code == 2 and "SUBCOMMAND" in out


def test_gen_help_documents_device_ip(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["ranktable", "gen", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--device-ip 4=10.0.1.22 5=10.0.1.23" in out and "hccn_tool" in out and "--server-ip" in out


def test_gen_writes_files_and_notice(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "ranktable", "gen", "--prefill-server-list", "0", "--decode-server-list", "1",
                         "--api-server", "--server-ip", "127.0.0.1", "--save-dir", str(tmp_path / "o"))
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == sorted(
        p.name for p in (ROOT / "configs" / "local-cpu").glob("*.json"))
    assert out.count("wrote ") == 4
    assert "notice: hccn_tool not found" in err and err.count("\n") == 1


def test_gen_device_ip_comma_and_space_forms(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "ranktable", "gen", "--prefill-server-list", "4,5", "--decode-server-list", "6,7",
                       "--api-server", "--server-ip", "10.0.0.18", "--save-dir", str(tmp_path),
                       "--device-ip", "4=10.0.1.22", "5=10.0.1.23,6=10.0.1.56", "7=10.0.1.72")
    assert code == 0 and "notice" not in err
    for p in (GOLDEN / "gen_1p1d").iterdir():
        assert (tmp_path / p.name).read_text() == p.read_text()


def test_gen_bad_server_list(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "ranktable", "gen", "--prefill-server-list", "4,x", "--save-dir", str(tmp_path))
    assert code == 2
    assert "--prefill-server-list: instance 0 ('4,x'): 'x' is not a device id" in err and "fix:" in err


def test_gen_bad_device_ip_syntax(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "ranktable", "gen", "--prefill-server-list", "0", "--api-server",
                       "--device-ip", "0:10.0.0.1", "--save-dir", str(tmp_path))
    assert code == 2 and "not of the form ID=IP" in err


def test_merge(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    two = ROOT / "configs" / "two-host"
    code, out, _ = run(capsys, "ranktable", "merge", "--global-ranktable-list",
                       str(two / "host-a" / "global_ranktable_10.0.0.18.json"),
                       str(two / "host-b" / "global_ranktable_10.0.0.19.json"), "--save-dir", str(tmp_path))
    assert code == 0 and "global_ranktable_merge.json" in out
    assert (tmp_path / "global_ranktable_merge.json").read_text() == (two / "global_ranktable_merge.json").read_text()


def test_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "ranktable", "validate", "--global", str(GLOBAL),
                       "--local", str(GOLDEN / "gen_1p1d" / "local_ranktable_10.0.0.18_45.json"),
                       "--node-ports", "8001,8002")
    assert code == 0
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("INSTANCE"))
    for col in ("ROLE", "HOST", "DEVICES", "RANK IDS", "PORT"):
        assert col in header
    assert any(line.startswith("0 ") and "prefill[0]" in line and "4,5" in line and "8001" in line
               and "<- local" in line for line in lines)
    assert any("decode[0]" in line and "6,7" in line and "8002" in line for line in lines)
    assert lines[-1].startswith("ok: global ranktable, local ranktable, NODE_PORTS valid (2 instances")


def test_validate_from_env(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLOBAL_RANK_TABLE_FILE_PATH", str(GLOBAL))
    monkeypatch.setenv("RANK_TABLE_FILE_PATH", str(GOLDEN / "gen_1p1d" / "local_ranktable_10.0.0.18_host.json"))
    monkeypatch.setenv("NODE_PORTS", "8001 8002")
    code, out, _ = run(capsys, "ranktable", "validate")
    assert code == 0 and "scheduler" in out and "<- local" in out


def test_validate_env_node_ports_error_names_env(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_PORTS", "8001")
    code, _, err = run(capsys, "ranktable", "validate", "--global", str(GLOBAL))
    assert code == 2 and "error: NODE_PORTS: 1 port (" in err and "0: prefill[0]" in err


def test_validate_no_global_given(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "ranktable", "validate")
    assert code == 2 and "GLOBAL_RANK_TABLE_FILE_PATH" in err and "--global" in err


def test_validate_reports_all_errors_without_traceback(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = json.loads(GLOBAL.read_text())
    data["server_group_list"][0]["server_list"].append({"server_id": "10.0.0.19", "server_ip": "10.0.0.19"})
    data["server_group_list"][1]["server_list"][0]["device"][0]["rank_id"] = 0
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    code, out, err = run(capsys, "ranktable", "validate", "--global", str(path))
    assert code == 2 and out == ""
    assert f"error: {path}: server_group_list[1].server_list[0].device[0].rank_id: number 0" in err
    assert 'fix: write it as a string, e.g. "0"' in err
    # the number written without quotes does not hide the rule errors of the same file
    assert "server_group_list[0].server_list[1]: a second scheduler" in err
    assert "server_group_list[0].server_count: '1' but server_list has 2 entries" in err
    assert "pdserve: ranktable validate: 3 errors" in err


def test_validate_truncated_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "cut.json"
    path.write_text(GLOBAL.read_text()[:100])
    code, _, err = run(capsys, "ranktable", "validate", "--global", str(path))
    assert code == 2 and f"{path}: line " in err and "invalid JSON" in err


def test_validate_p_d_tp_warning(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = json.loads(GLOBAL.read_text())
    data["server_group_list"][2]["server_list"][0]["device"].pop()
    path = tmp_path / "tp.json"
    path.write_text(json.dumps(data))
    code, out, _ = run(capsys, "ranktable", "validate", "--global", str(path))
    assert code == 0 and "warning:" in out and "prefill TP is 2 but decode TP is 1" in out


def test_show_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    merged = ROOT / "configs" / "two-host" / "global_ranktable_merge.json"
    code, out, _ = run(capsys, "ranktable", "show", "--global", str(merged), "--node-ports", "8001,8002,8001,8002")
    assert code == 0 and "decode[1]" in out and "10.0.0.19" in out
    code, out, _ = run(capsys, "ranktable", "show", "--global", str(merged), "--json")
    data = json.loads(out)
    assert [i["role"] for i in data["instances"]] == ["prefill", "prefill", "decode", "decode"]
    assert data["scheduler"] == ["10.0.0.18"] and len(data["digest"]) == 16


def test_validate_partial(capsys: pytest.CaptureFixture[str]) -> None:
    b = ROOT / "configs" / "two-host" / "host-b" / "global_ranktable_10.0.0.19.json"
    assert run(capsys, "ranktable", "validate", "--global", str(b))[0] == 2
    assert run(capsys, "ranktable", "validate", "--partial", "--global", str(b))[0] == 0


# ---- the drop-in script ---------------------------------------------------------------------


def script(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, cwd=cwd,
                          timeout=60, env={"PATH": str(cwd)})


def test_script_gen_and_merge(tmp_path: Path) -> None:
    a = script("--mode", "gen", "--prefill-server-list", "0,1", "2,3", "--api-server", "--server-ip", "10.0.0.18",
               "--device-ip", *[f"{d}=10.0.1.{20 + d}" for d in range(4)], "--save-dir", "a", cwd=tmp_path)
    assert a.returncode == 0, a.stderr
    b = script("--mode", "gen", "--decode-server-list", "0,1 2,3", "--server-ip", "10.0.0.19",
               "--device-ip", ",".join(f"{d}=10.0.2.{20 + d}" for d in range(4)), "--save-dir", "b", cwd=tmp_path)
    assert b.returncode == 0, b.stderr
    m = script("--mode", "merge", "--global-ranktable-list", "a/global_ranktable_10.0.0.18.json",
               "b/global_ranktable_10.0.0.19.json", "--save-dir", ".", cwd=tmp_path)
    assert m.returncode == 0, m.stderr
    two = ROOT / "configs" / "two-host"
    assert (tmp_path / "global_ranktable_merge.json").read_text() == (two / "global_ranktable_merge.json").read_text()
    for sub, host in (("a", "host-a"), ("b", "host-b")):
        for p in (two / host).glob("*.json"):
            assert (tmp_path / sub / p.name).read_text() == p.read_text()


def test_script_error_has_no_traceback(tmp_path: Path) -> None:
    r = script("--mode", "merge", "--global-ranktable-list", "missing.json", cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "missing.json: file not found" in r.stderr and "fix:" in r.stderr
    r = script("--mode", "merge", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--global-ranktable-list" in r.stderr
