"""``pdserve serve``: KV options are checked as the connector will check them (a ConfigError naming
the flag or PDSERVE_KV_EXTRA_CONFIG key before vLLM starts, even with --dry-run), the instances
report cached prompt tokens, and --drain-seconds / PDSERVE_DRAIN_SECONDS are checked."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from pdserve.errors import ConfigError
from pdserve.ranktable import digest, load_global, resolve_role
from pdserve.worker.cli import drain_seconds
from pdserve.worker.command import (
    InstanceContext,
    ServeOptions,
    build_instance_command,
    flag_value,
)

pytestmark = pytest.mark.unit

GEN = Path(__file__).parent / "golden" / "gen_1p1d"
DESIGN = Path(__file__).parent / "golden" / "design_example.json"


def ctx_for(local: str) -> InstanceContext:
    rt = load_global(DESIGN)
    return InstanceContext(role=resolve_role(DESIGN, GEN / local), ranktable=rt, digest=digest(rt),
                           local_source=local, platform="npu")


@pytest.fixture(params=["local_ranktable_10.0.0.18_45.json", "local_ranktable_10.0.0.18_67.json"],
                ids=["prefill", "decode"])
def ctx(request: pytest.FixtureRequest) -> InstanceContext:
    return ctx_for(request.param)


def build(ctx: InstanceContext, *vllm: str, env: dict | None = None, **opts) -> list[str]:
    return build_instance_command(ctx, ServeOptions(vllm_args=list(vllm), python="py", **opts), env or {})[0]


# -- KV options -----------------------------------------------------------------------------------
@pytest.mark.parametrize("lease", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_kv_lease_seconds_names_the_flag(ctx: InstanceContext, lease: float) -> None:
    with pytest.raises(ConfigError) as info:
        build(ctx, "--port", "8001", kv_lease_seconds=lease)
    msg = str(info.value)
    assert msg.startswith("flags: --kv-lease-seconds: ") and str(lease) in msg
    assert "fix: --kv-lease-seconds 30" in msg and "pydantic" not in msg


@pytest.mark.parametrize(("extra", "key"), [
    ({"lease_seconds": "x"}, "lease_seconds"),
    ({"load_timeout_seconds": 0}, "load_timeout_seconds"),
    ({"lease_wait_seconds": -2}, "lease_wait_seconds"),
    ({"pull_threads": 0}, "pull_threads"),
    ({"pull_threads": "many"}, "pull_threads"),
    ({"transport": "udp"}, "transport"),
    ({"allowed_peers": "10.0.0.1"}, "allowed_peers"),
])
def test_bad_extra_config_values_name_the_variable_and_key(ctx: InstanceContext, extra: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(ctx, "--port", "8001", env={"PDSERVE_KV_EXTRA_CONFIG": json.dumps(extra)})
    msg = str(info.value)
    assert msg.startswith(f"environment: PDSERVE_KV_EXTRA_CONFIG: {key}=")
    assert "export PDSERVE_KV_EXTRA_CONFIG=" in msg and "https://" not in msg


def test_unknown_extra_config_key_suggests_the_right_one(ctx: InstanceContext) -> None:
    with pytest.raises(ConfigError, match="(?s)unknown key 'load_timeout_second'.*did you mean load_timeout_seconds"):
        build(ctx, "--port", "8001", env={"PDSERVE_KV_EXTRA_CONFIG": '{"load_timeout_second": 5}'})


def test_good_extra_config_and_lease_pass(ctx: InstanceContext) -> None:
    argv = build(ctx, "--port", "8001", kv_lease_seconds=0.5,
                 env={"PDSERVE_KV_EXTRA_CONFIG": '{"load_timeout_seconds": 7, "pull_threads": 2}'})
    extra = json.loads(flag_value(argv, "--kv-transfer-config") or "{}")["kv_connector_extra_config"]
    assert extra["lease_seconds"] == 0.5 and extra["load_timeout_seconds"] == 7 and extra["pull_threads"] == 2


def test_extra_config_overriding_a_bad_lease_flag_is_what_counts(ctx: InstanceContext) -> None:
    with pytest.raises(ConfigError, match="PDSERVE_KV_EXTRA_CONFIG: lease_seconds=0"):
        build(ctx, "--port", "8001", env={"PDSERVE_KV_EXTRA_CONFIG": '{"lease_seconds": 0}'})


@pytest.mark.parametrize("key", ["side_channel_port", "side_channel_host"])
def test_extra_config_cannot_move_the_side_channel(ctx: InstanceContext, key: str) -> None:
    """The identity and the peers' ranktable name the address the daemon derives: an override
    would make every pull go to a port nobody listens on."""
    with pytest.raises(ConfigError, match=f"PDSERVE_KV_EXTRA_CONFIG: '{key}' cannot be set here"):
        build(ctx, "--port", "8001", env={"PDSERVE_KV_EXTRA_CONFIG": json.dumps({key: 1})})


@pytest.mark.parametrize(("name", "value", "want"), [
    ("PDSERVE_KV_TCP_STREAM", "maybe", "is not a boolean"),
    ("PDSERVE_KV_SHM_SHARE", "2", "is not a boolean"),
    ("PDSERVE_KV_TCP_ZERO_COPY_MIN", "256k", "is not a byte count"),
    ("PDSERVE_KV_CMA_SPLIT_MIN", "-1", "is not a byte count"),
])
def test_kv_tuning_variables_are_checked_before_vllm_starts(ctx: InstanceContext, name: str, value: str,
                                                            want: str) -> None:
    with pytest.raises(ConfigError, match=f"environment: {name}: '{value}' {want}"):
        build(ctx, "--port", "8001", env={name: value})
    build(ctx, "--port", "8001", env={name: "0"})  # a valid value passes


def test_kv_switches_read_every_spelling_of_off() -> None:
    from pdserve.kv import tuning

    for off in ("0", "off", "false", "No"):
        assert tuning.switch("PDSERVE_KV_TCP_STREAM", {"PDSERVE_KV_TCP_STREAM": off}) is False
    assert tuning.switch("PDSERVE_KV_SHM_DIRECT", {}) is True
    assert tuning.size("PDSERVE_KV_CMA_SPLIT_MIN", {}) == 8 << 20
    assert tuning.size("PDSERVE_KV_CMA_SPLIT_MIN", {"PDSERVE_KV_CMA_SPLIT_MIN": " 4096 "}) == 4096


def test_other_connectors_and_own_config_are_not_checked(ctx: InstanceContext) -> None:
    build(ctx, "--port", "8001", kv_connector="NixlConnector", kv_lease_seconds=0.0)
    build(ctx, "--port", "8001", "--kv-transfer-config", "{}", kv_lease_seconds=0.0)
    build(ctx, "--port", "8001", kv_connector="none", env={"PDSERVE_KV_EXTRA_CONFIG": '{"lease_seconds": "x"}'})


# -- cached prompt tokens -------------------------------------------------------------------------
def test_prompt_tokens_details_enabled_for_both_roles(ctx: InstanceContext) -> None:
    argv = build(ctx, "--port", "8001")
    assert argv.count("--enable-prompt-tokens-details") == 1


@pytest.mark.parametrize("given", [["--enable-prompt-tokens-details"], ["--no-enable-prompt-tokens-details"],
                                   ["--enable-prompt-tokens-details=false"]])
def test_prompt_tokens_details_respects_the_operator(ctx: InstanceContext, given: list[str]) -> None:
    argv = build(ctx, "--port", "8001", *given)
    assert [a for a in argv if "prompt-tokens-details" in a] == given


# -- hybrid KV cache manager ----------------------------------------------------------------------
def test_hybrid_kv_cache_manager_off_with_pdserves_connector(ctx: InstanceContext) -> None:
    """pdserve's connector moves one KV cache group: sliding-window models must get one group."""
    assert build(ctx, "--port", "8001").count("--disable-hybrid-kv-cache-manager") == 1
    assert "--disable-hybrid-kv-cache-manager" not in build(ctx, "--port", "8001", kv_connector="NixlConnector")
    given = ["--no-disable-hybrid-kv-cache-manager"]
    assert [a for a in build(ctx, "--port", "8001", *given) if "hybrid" in a] == given


# -- drain ----------------------------------------------------------------------------------------
def test_drain_seconds_sources_and_checks() -> None:
    assert drain_seconds(None, {}) == 30.0
    assert drain_seconds(None, {"PDSERVE_DRAIN_SECONDS": " 5 "}) == 5.0
    assert drain_seconds(0.0, {"PDSERVE_DRAIN_SECONDS": "x"}) == 0.0  # the flag wins
    with pytest.raises(ConfigError, match="environment: PDSERVE_DRAIN_SECONDS: 'x' is not a number"):
        drain_seconds(None, {"PDSERVE_DRAIN_SECONDS": "x"})
    with pytest.raises(ConfigError, match="environment: PDSERVE_DRAIN_SECONDS: -1 is negative"):
        drain_seconds(None, {"PDSERVE_DRAIN_SECONDS": "-1"})
    with pytest.raises(ConfigError, match="flags: --drain-seconds: nan is not a finite number"):
        drain_seconds(float("nan"), {})


def test_serve_dry_run_bad_lease_is_one_message(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from pdserve.cli import main

    monkeypatch.setenv("GLOBAL_RANK_TABLE_FILE_PATH", str(DESIGN))
    monkeypatch.setenv("RANK_TABLE_FILE_PATH", str(GEN / "local_ranktable_10.0.0.18_45.json"))
    monkeypatch.setenv("PDSERVE_PLATFORM", "npu")
    assert main(["serve", "--dry-run", "--kv-lease-seconds", "0", "--model", "/m", "--port", "8001"]) == 2
    err = capsys.readouterr().err
    assert "--kv-lease-seconds: 0.0: Input should be greater than 0" in err and "Traceback" not in err


def test_serve_checks_the_shutdown_noise_switch_before_starting(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from pdserve.cli import main

    monkeypatch.setenv("GLOBAL_RANK_TABLE_FILE_PATH", str(DESIGN))
    monkeypatch.setenv("RANK_TABLE_FILE_PATH", str(GEN / "local_ranktable_10.0.0.18_45.json"))
    monkeypatch.setenv("PDSERVE_PLATFORM", "npu")
    monkeypatch.setenv("PDSERVE_SHOW_SHUTDOWN_NOISE", "maybe")
    assert main(["serve", "--dry-run", "--model", "/m", "--port", "8001"]) == 2
    err = capsys.readouterr().err
    assert "environment: PDSERVE_SHOW_SHUTDOWN_NOISE: 'maybe' is not a boolean" in err and "Traceback" not in err


@pytest.mark.parametrize("model, ok", [("/nonexistent/model", False), ("./no-such-dir", False),
                                       ("HuggingFaceTB/SmolLM2", True), ("MODEL_DIR", True)])
def test_serve_model_path_must_be_a_model_folder(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path, model: str, ok: bool) -> None:
    """A --model that is a path must be a local model folder (one message, no vLLM traceback);
    a hub id is left to vLLM and its local Hugging Face cache."""
    from pdserve.cli import main

    if model == "MODEL_DIR":
        (tmp_path / "config.json").write_text("{}")
        model = str(tmp_path)
    monkeypatch.setenv("GLOBAL_RANK_TABLE_FILE_PATH", str(DESIGN))
    monkeypatch.setenv("RANK_TABLE_FILE_PATH", str(GEN / "local_ranktable_10.0.0.18_45.json"))
    monkeypatch.setenv("PDSERVE_PLATFORM", "npu")
    code = main(["serve", "--dry-run", "--model", model, "--port", "8001"])
    err = capsys.readouterr().err
    assert (code == 0) is ok, err
    if not ok:
        assert "--model" in err and "is not an existing folder" in err and "Traceback" not in err


# -- the scheduler role ---------------------------------------------------------------------------
def _scheduler_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLOBAL_RANK_TABLE_FILE_PATH", str(GEN / "global_ranktable_10.0.0.18.json"))
    monkeypatch.setenv("RANK_TABLE_FILE_PATH", str(GEN / "local_ranktable_10.0.0.18_host.json"))
    monkeypatch.setenv("NODE_PORTS", "8001,8002")


def test_scheduler_dry_run_prints_the_plain_command(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from pdserve.cli import main

    _scheduler_env(monkeypatch)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["serve", "--dry-run", "--host", "127.0.0.1", "--port", str(port)]) == 0
    out = capsys.readouterr()
    assert out.out.strip().endswith(f"-m pdserve scheduler --host 127.0.0.1 --port {port} --drain-seconds 30.0")
    assert "prefill[0]@10.0.0.18:8001" in out.err


def test_scheduler_dry_run_refuses_an_instance_port(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from pdserve.cli import main

    _scheduler_env(monkeypatch)
    assert main(["serve", "--dry-run", "--host", "10.0.0.18", "--port", "8002"]) == 2  # the instances' host
    err = capsys.readouterr().err
    assert "NODE_PORTS: entry 2: port 8002 is decode instance 0's" in err and "Traceback" not in err


def test_kv_load_failure_policy_from_the_environment_is_checked(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """argparse checks --kv-load-failure-policy against its choices, but not a default from the env."""
    from pdserve.cli import main

    monkeypatch.setenv("GLOBAL_RANK_TABLE_FILE_PATH", str(GEN / "global_ranktable_10.0.0.18.json"))
    monkeypatch.setenv("RANK_TABLE_FILE_PATH", str(GEN / "local_ranktable_10.0.0.18_45.json"))
    monkeypatch.setenv("PDSERVE_KV_LOAD_FAILURE_POLICY", "retry")
    assert main(["serve", "--dry-run", "--port", "8001"]) == 2
    err = capsys.readouterr().err
    assert "environment: PDSERVE_KV_LOAD_FAILURE_POLICY: 'retry' is not a policy" in err


# -- the instance's own address -------------------------------------------------------------------
def test_a_local_ranktable_for_another_host(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    """10.0.0.18 is not an address of this machine: a dry run warns, a real start refuses before
    vLLM loads the model (it would fail at bind afterwards)."""
    from pdserve.cli import main

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("GLOBAL_RANK_TABLE_FILE_PATH", str(DESIGN))
    monkeypatch.setenv("RANK_TABLE_FILE_PATH", str(GEN / "local_ranktable_10.0.0.18_45.json"))
    monkeypatch.setenv("PDSERVE_PLATFORM", "npu")
    assert main(["serve", "--dry-run", "--model", str(tmp_path), "--port", "8001"]) == 0
    err = capsys.readouterr().err
    assert "warning: on this host the server would not start" in err and "10.0.0.18 is not an address" in err
    assert main(["serve", "--model", str(tmp_path), "--port", "8001"]) == 2
    err = capsys.readouterr().err
    assert "local_ranktable_10.0.0.18_45.json: server_list[0].server_ip: 10.0.0.18 is not an address" in err
    assert main(["serve", "--dry-run", "--model", str(tmp_path), "--port", "8001", "--host", "127.0.0.1"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_kv_port_range_must_not_hold_the_http_port(ctx: InstanceContext) -> None:
    with pytest.raises(ConfigError) as info:
        build(ctx, "--port", "18001", kv_port=18000)  # TP 2: 18000..18001
    assert "include the HTTP --port 18001" in str(info.value) and str(info.value).startswith("flags: --kv-port")
