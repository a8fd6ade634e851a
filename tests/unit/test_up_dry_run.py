"""`pdserve up --model` must be a local model folder, and `--dry-run` starts, builds and overwrites
nothing while printing commands that reproduce the cluster (with the environment up sets)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from pdserve.cli import main
from pdserve.errors import ConfigError
from pdserve.model.local import check_local_model
from pdserve.up.plan import plan_cluster
from pdserve.up.runner import UpSettings, daemon_commands, write_commands, write_ranktables
from pdserve.worker.command import env_changes, shell_line

pytestmark = pytest.mark.unit


@pytest.fixture
def model(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "tiny"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("PDSERVE_CACHE", str(root))
    monkeypatch.delenv("PDSERVE_PLATFORM", raising=False)
    monkeypatch.setattr("pdserve.platform.detect_platform", lambda *_a, **_k: "cpu")
    monkeypatch.setattr("pdserve.platform.usable_cores", lambda: [0, 1])
    return root


def test_local_model_folder(model: Path) -> None:
    assert check_local_model(str(model)) == model


@pytest.mark.parametrize("given, found", [
    ("/nonexistent/model", "'/nonexistent/model' is not an existing folder"),
    ("Qwen/Qwen3-0.6B", "looks like a model hub id"),
    ("", "no model given"),
])
def test_not_a_local_model(given: str, found: str) -> None:
    with pytest.raises(ConfigError) as exc:
        check_local_model(given)
    err = exc.value
    assert err.field == "--model" and found in err.found
    assert "pdserve model demo" in err.fix and "never downloads" in err.fix


def test_folder_without_config_and_a_file(model: Path) -> None:
    (model / "config.json").unlink()
    with pytest.raises(ConfigError, match="has no config.json"):
        check_local_model(str(model))
    (model / "weights.gguf").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a model folder"):
        check_local_model(str(model / "weights.gguf"), flag="--model", source="flags")


@pytest.mark.parametrize("dry", [True, False])
def test_up_refuses_a_missing_model(capsys: pytest.CaptureFixture[str], cache: Path, dry: bool,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def no_start(_self: object) -> None:
        raise AssertionError("the model check must come before anything starts")

    monkeypatch.setattr("pdserve.up.runner.Cluster.start", no_start)
    code = main(["up", "--model", "/nonexistent/model", *(["--dry-run"] if dry else [])])
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    assert "flags: --model: '/nonexistent/model' is not an existing folder" in err and "pdserve model demo" in err
    assert not (cache / "up").exists()  # nothing written before the check


def test_dry_run_leaves_the_run_folder_alone(capsys: pytest.CaptureFixture[str], cache: Path, model: Path) -> None:
    live = cache / "up" / "port-9000"
    live.mkdir(parents=True)
    (live / "global_ranktable_127.0.0.1.json").write_text("a running cluster's file")
    assert main(["up", "--dry-run", "--model", str(model)]) == 0
    out = capsys.readouterr().out
    assert (live / "global_ranktable_127.0.0.1.json").read_text() == "a running cluster's file"
    line = next(x for x in out.splitlines() if x.startswith("ranktables: written to "))
    scratch = Path(line.split()[3])
    assert scratch == cache / "up" / "port-9000-dry-run" and f"a real run writes them to {live}" in line
    assert (scratch / "global_ranktable_127.0.0.1.json").is_file()


def test_repeated_dry_runs_reuse_one_folder_and_replace_its_ranktables(
        capsys: pytest.CaptureFixture[str], cache: Path, model: Path) -> None:
    assert main(["up", "--dry-run", "--model", str(model), "--tp", "2"]) == 0
    capsys.readouterr()
    assert main(["up", "--dry-run", "--model", str(model)]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (cache / "up").iterdir()) == ["port-9000-dry-run"]  # the run folder untouched
    locals_ = sorted(p.name for p in (cache / "up" / "port-9000-dry-run").glob("local_ranktable_*.json"))
    assert locals_ == ["local_ranktable_127.0.0.1_0.json", "local_ranktable_127.0.0.1_1.json",
                       "local_ranktable_127.0.0.1_host.json"]  # the TP 2 run's files are gone
    assert f"{cache}/up/port-9000-dry-run/local_ranktable_127.0.0.1_1.json" in out  # what the commands name


def test_dry_run_folder_of_any_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pdserve.up import dry_run_dir

    monkeypatch.chdir(tmp_path)
    assert dry_run_dir(Path("runs/a")) == tmp_path / "runs" / "a-dry-run"
    assert dry_run_dir(Path(".")) == tmp_path.parent / f"{tmp_path.name}-dry-run"
    assert dry_run_dir(Path("/")) == Path("/pdserve-dry-run")


def test_dry_run_does_not_build_the_demo_model(capsys: pytest.CaptureFixture[str], cache: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def no_build(*_a: object, **_k: object) -> Path:
        raise AssertionError("a dry run must not build the demo model")

    monkeypatch.setattr("pdserve.model.demo.build_demo_model", no_build)
    assert main(["up", "--dry-run", "--demo"]) == 0
    out = capsys.readouterr().out
    folder = cache / "models" / "SmolLM2-135M-Instruct"
    assert f"demo model: {folder} is not built yet" in out and "`pdserve model demo` builds it" in out
    assert f"--model {folder}" in out and not folder.exists()


def test_dry_run_prints_the_environment_up_sets(capsys: pytest.CaptureFixture[str], cache: Path,
                                                model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("VLLM_CPU_KVCACHE_SPACE", "PDSERVE_DECODE_ONLY_WHEN_QUEUED", "PDSERVE_LOG_PREFIX"):
        monkeypatch.delenv(var, raising=False)
    assert main(["up", "--dry-run", "--model", str(model), "--prefill", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    cmds = {name[2:]: shlex.split(cmd) for name, cmd in zip(lines, lines[1:]) if name.startswith("# ")}
    assert list(cmds) == ["prefill0", "prefill1", "decode0", "scheduler"]
    prefill = dict(w.split("=", 1) for w in cmds["prefill0"] if "=" in w and not w.startswith("-"))
    assert prefill["VLLM_CPU_KVCACHE_SPACE"] == "1" and prefill["PDSERVE_PLATFORM"] == "cpu"
    assert prefill["PDSERVE_LOG_PREFIX"] == "" and prefill["PDSERVE_CPU_BIND"] == "0"  # 3 instances, 2 cores
    assert prefill["RANK_TABLE_FILE_PATH"].endswith("local_ranktable_127.0.0.1_0.json")
    sched = dict(w.split("=", 1) for w in cmds["scheduler"] if "=" in w and not w.startswith("-"))
    assert sched["PDSERVE_DECODE_ONLY_WHEN_QUEUED"] == "1024" and sched["NODE_PORTS"] == "8100,8101,8102"
    assert cmds["scheduler"][-4:] == ["--port", "9000", "--drain-seconds", "30.0"]  # up's drain, not the default


def test_shell_line_sets_and_unsets_only_the_differences() -> None:
    base = {"PATH": "/bin", "PDSERVE_CPU_BIND": "0-3", "KEEP": "same"}
    env = {"PATH": "/bin", "KEEP": "same", "PDSERVE_LOG_PREFIX": "", "PDSERVE_CPU_BIND_X": "0|1"}
    assert env_changes(env, base) == ({"PDSERVE_LOG_PREFIX": "", "PDSERVE_CPU_BIND_X": "0|1"}, ["PDSERVE_CPU_BIND"])
    line = shell_line(["py", "-m", "pdserve", "serve", "--model", "/m y"], env, base)
    assert line == "env -u PDSERVE_CPU_BIND PDSERVE_LOG_PREFIX='' PDSERVE_CPU_BIND_X='0|1' py -m pdserve serve --model '/m y'"
    assert shell_line(["py"], {"A": "1"}, {}) == "A=1 py"


def test_commands_file_next_to_the_ranktables(tmp_path: Path) -> None:
    plan = plan_cluster(1, 1, "cpu", 2)
    s = UpSettings(model="/m/demo", served_name="demo", run_dir=tmp_path, env={"PATH": "/bin"})
    cmds = daemon_commands(plan, s, *write_ranktables(plan, tmp_path), python="py")
    write_commands(tmp_path / "commands.sh", cmds, s.env)
    text = (tmp_path / "commands.sh").read_text()
    assert "# prefill0\n" in text and "# scheduler\n" in text and "VLLM_CPU_KVCACHE_SPACE=1" in text


@pytest.mark.parametrize(("flags", "named"), [
    (["--drain-seconds", "-1"], "--drain-seconds"), (["--timeout", "-5"], "--timeout"),
    (["--timeout", "nan"], "--timeout"), (["--max-model-len", "0"], "--max-model-len"),
    (["--served-model-name", " "], "--served-model-name"),
])
def test_dry_run_refuses_what_the_daemons_would_refuse(capsys: pytest.CaptureFixture[str], cache: Path,
                                                       model: Path, flags: list[str], named: str) -> None:
    assert main(["up", "--dry-run", "--model", str(model), *flags]) == 2
    err = capsys.readouterr().err
    assert f"flags: {named}: " in err and "fix:" in err and "Traceback" not in err


def test_cpu_bind_binds_every_instance_of_a_role(capsys: pytest.CaptureFixture[str], cache: Path,
                                                model: Path) -> None:
    assert main(["up", "--dry-run", "--model", str(model), "--decode", "2", "--cpu-bind", "decode=0-1"]) == 0
    out = capsys.readouterr().out
    assert "prefill0: devices 0 bound to cores 0, port" in out  # as planned (3 instances, 2 cores)
    assert "decode0: devices 1 bound to cores 0-1" in out and "decode1: devices 2 bound to cores 0-1" in out
    lines = {block.split("\n")[0]: block for block in out.split("# ")[1:]}
    assert "PDSERVE_CPU_BIND=0-1" in lines["decode1"] and "PDSERVE_CPU_BIND" not in lines["scheduler"]


@pytest.mark.parametrize(("flags", "found"), [
    (["--cpu-bind", "prefil=0"], "'prefil=0'"),
    (["--cpu-bind", "prefill"], "'prefill'"),
    (["--cpu-bind", "prefill=0", "--cpu-bind", "prefill=1"], "prefill is given twice"),
    (["--cpu-bind", "decode=7"], "core(s) 7 not usable here"),
    (["--cpu-bind", "decode=0|1"], "'0|1' has 2 core lists for 1 TP rank"),
    (["--cpu-bind", "decode=0-x"], "is not a core or a range"),
])
def test_a_bad_cpu_bind_is_one_message(capsys: pytest.CaptureFixture[str], cache: Path, model: Path,
                                       flags: list[str], found: str) -> None:
    assert main(["up", "--dry-run", "--model", str(model), *flags]) == 2
    err = capsys.readouterr().err
    assert "flags: --cpu-bind: " in err and found in err and "fix:" in err and "Traceback" not in err
    assert not (cache / "up").exists()


def test_a_misspelt_scheduler_arg_is_an_error(capsys: pytest.CaptureFixture[str], cache: Path, model: Path) -> None:
    assert main(["up", "--dry-run", "--model", str(model), "--scheduler-arg=--decode-only-when-qeued=0"]) == 2
    assert "--scheduler-arg: --decode-only-when-qeued=0 is not a scheduler flag" in capsys.readouterr().err
    assert main(["up", "--dry-run", "--model", str(model), "--scheduler-arg=--decode-only-when-queued=64"]) == 0


def test_a_bad_scheduler_value_is_one_line_not_the_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["scheduler", "--decode-only-when-queued", "abc"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "invalid int value: 'abc'" in err and len(err.splitlines()) == 2
