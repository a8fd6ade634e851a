"""The instance command line/env builder (pure: nothing is started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve import identity as ident
from pdserve.errors import ConfigError
from pdserve.ranktable import digest, generate, load_global, resolve_role
from pdserve.worker.command import (
    MIDDLEWARE,
    InstanceContext,
    ServeOptions,
    build_instance_command,
    flag_value,
    has_flag,
)

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent / "golden"
DESIGN = GOLDEN / "design_example.json"  # prefill 4,5 / decode 6,7 on 10.0.0.18
GEN = GOLDEN / "gen_1p1d"


def ctx_for(local: Path, global_: Path = DESIGN, platform: str = "npu", cpu_count: int | None = None) -> InstanceContext:
    rt = load_global(global_)
    return InstanceContext(role=resolve_role(global_, local), ranktable=rt, digest=digest(rt),
                           local_source=str(local), platform=platform, cpu_count=cpu_count)  # type: ignore[arg-type]


@pytest.fixture()
def prefill() -> InstanceContext:
    return ctx_for(GEN / "local_ranktable_10.0.0.18_45.json")


@pytest.fixture()
def decode() -> InstanceContext:
    return ctx_for(GEN / "local_ranktable_10.0.0.18_67.json")


@pytest.fixture()
def cpu_1p1d(tmp_path: Path) -> tuple[Path, Path, Path]:
    paths = generate([[0]], [[1]], True, tmp_path, server_ip="127.0.0.1", notify=lambda _m: None)
    return paths[0], paths[1], paths[2]


def kv_config(argv: list[str]) -> dict:
    return json.loads(flag_value(argv, "--kv-transfer-config") or "null")


def build(ctx: InstanceContext, *vllm: str, env: dict | None = None, **opts) -> tuple[list[str], dict[str, str]]:
    return build_instance_command(ctx, ServeOptions(vllm_args=list(vllm), python="py", **opts), env or {})


def test_vllm_flags_pass_through_unchanged_and_first(prefill: InstanceContext) -> None:
    user = ["--model", "/m", "--tensor-parallel-size", "2", "--max-model-len", "4096", "--max-num-seqs", "8",
            "--max-num-batched-tokens", "4096", "--host", "0.0.0.0", "--port", "8001",
            "--served-model-name", "qwen", "--quantization", "w8a8", "--gpu-memory-utilization", "0.9"]
    argv, _ = build(prefill, *user)
    assert argv[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[3:3 + len(user)] == user
    assert argv.count("--host") == 1 and argv.count("--tensor-parallel-size") == 1


def test_kv_transfer_config_prefill(prefill: InstanceContext) -> None:
    argv, env = build(prefill, "--model", "/m", "--port", "8001")
    kvc = kv_config(argv)
    assert kvc == {
        "kv_connector": "PdserveConnector",
        "kv_connector_module_path": "pdserve.kv.connector",
        "kv_role": "kv_producer",
        "engine_id": f"prefill0-{prefill.digest}",
        "kv_port": 18001,
        "kv_connector_extra_config": {
            "side_channel_host": "10.0.0.18", "side_channel_port": 18001,
            "allowed_peers": ["10.0.0.18", "127.0.0.1"], "transport": "auto", "lease_seconds": 30.0},
        "kv_load_failure_policy": "fail",
    }
    assert env[ident.ENV_SIDE_CHANNEL] == "10.0.0.18:18001"


def test_kv_config_decode_and_options(decode: InstanceContext) -> None:
    argv, _ = build(decode, "--port", "8002", kv_port=20000, kv_transport="tcp", kv_lease_seconds=5)
    kvc = kv_config(argv)
    assert kvc["kv_role"] == "kv_consumer" and kvc["engine_id"].startswith("decode0-")
    assert kvc["kv_port"] == 20000 and kvc["kv_connector_extra_config"]["side_channel_port"] == 20000
    assert kvc["kv_connector_extra_config"]["transport"] == "tcp"
    assert kvc["kv_connector_extra_config"]["lease_seconds"] == 5


@pytest.mark.parametrize("raw", ["²", "18x", "-1"])
def test_kv_port_from_env_must_be_a_number(decode: InstanceContext, raw: str) -> None:
    with pytest.raises(ConfigError, match="is not a port"):
        build(decode, "--port", "8002", env={"PDSERVE_KV_PORT": raw})


def test_kv_port_and_transport_from_env(decode: InstanceContext) -> None:
    argv, _ = build(decode, "--port", "8002", env={"PDSERVE_KV_PORT": "21000", "PDSERVE_KV_TRANSPORT": "shm"})
    extra = kv_config(argv)["kv_connector_extra_config"]
    assert extra["side_channel_port"] == 21000 and extra["transport"] == "shm"


def test_default_port_is_vllms(decode: InstanceContext) -> None:
    # vLLM's port 8000 + 10000, + 1 for the decode instance (second in the ranktable, TP 2)
    assert kv_config(build(decode)[0])["kv_port"] == 18001


def test_default_side_ports_of_tp_instances_on_consecutive_ports_do_not_overlap() -> None:
    """2P2D with TP 2 on one host, NODE_PORTS=8001,8002,8003,8004: rank r of instance i listens
    on its base + r, and no two ranks share a port (HTTP port + 10000 alone would)."""
    from pdserve.worker.command import ServeOptions, side_port

    bases = [side_port(ServeOptions(), 8001 + i, {}, 2, position=i) for i in range(4)]
    assert bases == [18001, 18003, 18005, 18007]
    ranks = [b + r for b in bases for r in range(2)]
    assert len(set(ranks)) == len(ranks)
    assert side_port(ServeOptions(), 8001, {}, 1, position=3) == 18001  # TP 1: as before
    assert side_port(ServeOptions(kv_port=20000), 8004, {}, 2, position=3) == 20000  # explicit wins


def test_bad_transport_and_port(decode: InstanceContext) -> None:
    with pytest.raises(ConfigError, match="transport"):
        build(decode, env={"PDSERVE_KV_TRANSPORT": "pigeon"})
    with pytest.raises(ConfigError, match="out of range"):
        build(decode, "--port", "60000")


def test_allowed_peers_lists_every_host(tmp_path: Path) -> None:
    data = json.loads(DESIGN.read_text())
    data["server_group_list"][2]["server_list"][0].update(server_id="10.0.0.19", server_ip="10.0.0.19")
    g = tmp_path / "g.json"
    g.write_text(json.dumps(data))
    local = tmp_path / "l.json"
    local.write_text(json.dumps({"version": "1.0", "status": "completed", "group_id": "0", "server_count": "1",
                                 "server_list": [data["server_group_list"][2]["server_list"][0]]}))
    kvc = kv_config(build(ctx_for(local, g))[0])
    assert kvc["kv_connector_extra_config"]["allowed_peers"] == ["10.0.0.18", "10.0.0.19", "127.0.0.1"]
    assert kvc["kv_connector_extra_config"]["side_channel_host"] == "10.0.0.19" and "kv_ip" not in kvc


def test_other_connector_and_none(prefill: InstanceContext) -> None:
    argv, env = build(prefill, "--port", "8001", kv_connector="NixlConnector")
    kvc = kv_config(argv)
    assert kvc["kv_connector"] == "NixlConnector" and kvc["kv_role"] == "kv_both"
    assert "kv_connector_module_path" not in kvc and "kv_connector_extra_config" not in kvc
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "18001"
    argv, env = build(prefill, "--port", "8001", kv_connector="none")
    assert not has_flag(argv, "--kv-transfer-config") and ident.ENV_SIDE_CHANNEL not in env


def test_user_kv_transfer_config_wins(prefill: InstanceContext) -> None:
    mine = '{"kv_connector":"X","kv_role":"kv_both"}'
    argv, _ = build(prefill, "--kv-transfer-config", mine)
    assert argv.count("--kv-transfer-config") == 1 and flag_value(argv, "--kv-transfer-config") == mine


def test_middleware_flag(prefill: InstanceContext) -> None:
    argv, _ = build(prefill, "--middleware", "my.Other")
    i = [k for k, t in enumerate(argv) if t == "--middleware"]
    assert [argv[k + 1] for k in i] == ["my.Other", MIDDLEWARE]


def test_tp_added_when_absent(prefill: InstanceContext) -> None:
    assert flag_value(build(prefill)[0], "--tensor-parallel-size") == "2"


@pytest.mark.parametrize("flag", [["--tensor-parallel-size", "1"], ["--tensor-parallel-size=4"], ["-tp", "1"]])
def test_tp_mismatch_names_both_numbers(prefill: InstanceContext, flag: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        build(prefill, *flag)
    msg = str(exc.value)
    assert "local_ranktable_10.0.0.18_45.json" in msg and "2 device(s)" in msg
    assert f"--tensor-parallel-size {flag[-1].split('=')[-1]}" in msg


def test_tp_not_an_integer(prefill: InstanceContext) -> None:
    with pytest.raises(ConfigError, match="not an integer"):
        build(prefill, "--tensor-parallel-size", "two")


def test_host_default_is_server_ip(prefill: InstanceContext) -> None:
    assert flag_value(build(prefill)[0], "--host") == "10.0.0.18"
    assert flag_value(build(prefill, "--host", "0.0.0.0")[0], "--host") == "0.0.0.0"


def test_npu_and_cuda_visibility(prefill: InstanceContext) -> None:
    _, env = build(prefill)
    assert env["ASCEND_RT_VISIBLE_DEVICES"] == "4,5"
    cuda = ctx_for(GEN / "local_ranktable_10.0.0.18_45.json", platform="cuda")
    assert build(cuda)[1]["CUDA_VISIBLE_DEVICES"] == "4,5"
    assert "--enforce-eager" not in build(cuda)[0]


def test_cpu_binding_eager_and_identity(cpu_1p1d: tuple[Path, Path, Path]) -> None:
    g, p, d = cpu_1p1d
    ctx = ctx_for(d, g, platform="cpu", cpu_count=2)
    argv, env = build(ctx, "--model", "/models/demo", "--port", "8200", "--served-model-name", "a", "b")
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert argv.count("--enforce-eager") == 1
    assert env[ident.ENV_ROLE] == "decode" and env[ident.ENV_INDEX] == "0" and env[ident.ENV_GLOBAL_INDEX] == "1"
    assert env[ident.ENV_DEVICES] == "1" and env[ident.ENV_SERVER_IP] == "127.0.0.1"
    assert env[ident.ENV_DIGEST] == ctx.digest and env[ident.ENV_MODEL] == "a,b"
    identity = ident.identity_from_env(env)
    assert identity.role == "decode" and identity.kv_side_channel == "127.0.0.1:18200"
    assert build(ctx, "--model", "/models/demo")[1][ident.ENV_MODEL] == "/models/demo"


@pytest.mark.parametrize("given", [["--enforce-eager"], ["--no-enforce-eager"]])
def test_cpu_eager_respects_user(cpu_1p1d: tuple[Path, Path, Path], given: list[str]) -> None:
    g, p, _ = cpu_1p1d
    argv, _ = build(ctx_for(p, g, platform="cpu", cpu_count=2), *given)
    assert "--enforce-eager" not in argv[3 + len(given):]


def test_cpu_eager_env_opt_out(cpu_1p1d: tuple[Path, Path, Path]) -> None:
    g, p, _ = cpu_1p1d
    argv, _ = build(ctx_for(p, g, platform="cpu", cpu_count=2), env={"PDSERVE_NO_EAGER": "1"})
    assert "--enforce-eager" not in argv


def test_cpu_missing_core(cpu_1p1d: tuple[Path, Path, Path]) -> None:
    g, _, d = cpu_1p1d
    with pytest.raises(ConfigError) as exc:
        build(ctx_for(d, g, platform="cpu", cpu_count=1))
    msg = str(exc.value)
    assert str(d) in msg and "server_list[0].device" in msg and "missing device" in msg and "fix:" in msg


def test_cpu_explicit_bind_override(cpu_1p1d: tuple[Path, Path, Path]) -> None:
    g, _, d = cpu_1p1d
    _, env = build(ctx_for(d, g, platform="cpu", cpu_count=1), env={"PDSERVE_CPU_BIND": "0"})
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0"


@pytest.mark.parametrize(("bind", "says"), [
    ("x", "'x' is not a core or a range"), ("0|1", "2 core lists for 1 TP rank"),
    ("0,9999", "core(s) 9999 not usable here"), ("", None), ("0", None),
])
def test_cpu_explicit_bind_is_checked(cpu_1p1d: tuple[Path, Path, Path], bind: str, says: str | None) -> None:
    g, _, d = cpu_1p1d
    ctx = ctx_for(d, g, platform="cpu", cpu_count=2)
    if says is None:
        build(ctx, env={"PDSERVE_CPU_BIND": bind})
        return
    with pytest.raises(ConfigError) as exc:
        build(ctx, env={"PDSERVE_CPU_BIND": bind})
    msg = str(exc.value)
    assert msg.startswith("environment: PDSERVE_CPU_BIND: ") and says in msg and "fix:" in msg


@pytest.mark.parametrize(("name", "value"), [("PDSERVE_NO_EAGER", "maybe"), ("PDSERVE_SHARED_CORES", "2")])
def test_cpu_boolean_env_is_checked(cpu_1p1d: tuple[Path, Path, Path], name: str, value: str) -> None:
    g, p, _ = cpu_1p1d
    with pytest.raises(ConfigError, match=f"environment: {name}: '{value}' is not a boolean"):
        build(ctx_for(p, g, platform="cpu", cpu_count=2), env={name: value})


def test_flag_helpers() -> None:
    argv = ["--port", "1", "--port=2", "--portx", "3"]
    assert flag_value(argv, "--port") == "2"
    assert has_flag(argv, "--port") and not has_flag(argv, "--host")


def test_kv_extra_config_env_is_merged_and_checked():
    from pdserve.errors import ConfigError
    from pdserve.worker.command import _extra_config

    assert _extra_config({}) == {}
    assert _extra_config({"PDSERVE_KV_EXTRA_CONFIG": '{"load_timeout_seconds": 5}'}) == {
        "load_timeout_seconds": 5}
    with pytest.raises(ConfigError, match="not valid JSON"):
        _extra_config({"PDSERVE_KV_EXTRA_CONFIG": "{oops"})
    with pytest.raises(ConfigError, match="not a JSON object"):
        _extra_config({"PDSERVE_KV_EXTRA_CONFIG": "[1]"})



def test_kv_load_failure_policy_and_extra_config_reach_vllm(decode: InstanceContext) -> None:
    argv, _ = build(decode, "--port", "8002", kv_load_failure_policy="recompute",
                    env={"PDSERVE_KV_EXTRA_CONFIG": '{"load_timeout_seconds": 7}'})
    kvc = kv_config(argv)
    assert kvc["kv_load_failure_policy"] == "recompute"
    assert kvc["kv_connector_extra_config"]["load_timeout_seconds"] == 7


def test_cpu_token_budget_default_and_override(cpu_1p1d: tuple[Path, Path, Path]) -> None:
    g, p, d = cpu_1p1d
    ctx = ctx_for(p, g, platform="cpu", cpu_count=2)
    argv, _ = build(ctx)
    assert argv[argv.index("--max-num-batched-tokens") + 1] == "512"  # prefill: one prompt per step
    dargv, _ = build(ctx_for(d, g, platform="cpu", cpu_count=2))
    assert dargv[dargv.index("--max-num-batched-tokens") + 1] == "128"  # decode: prompt work in slices
    argv, _ = build(ctx, "--max-num-batched-tokens=4096")
    assert [a for a in argv if a.startswith("--max-num-batched-tokens")] == ["--max-num-batched-tokens=4096"]
    cuda = ctx_for(GEN / "local_ranktable_10.0.0.18_45.json", platform="cuda")
    assert "--max-num-batched-tokens" not in build(cuda)[0]  # accelerators keep vLLM's default


def test_cpu_instances_do_not_busy_wait_by_default(cpu_1p1d: tuple[Path, Path, Path]) -> None:
    """CPU: vLLM's engine core floats on the instances' compute cores, so its spin is turned off
    (PDSERVE_SHARED_CORES=1) unless the operator says 0; accelerators keep vLLM's behaviour."""
    g, p, _ = cpu_1p1d
    ctx = ctx_for(p, g, platform="cpu", cpu_count=2)
    assert build(ctx)[1]["PDSERVE_SHARED_CORES"] == "1"
    assert build(ctx, env={"PDSERVE_SHARED_CORES": "0"})[1]["PDSERVE_SHARED_CORES"] == "0"
    assert build(ctx, env={"PDSERVE_SHARED_CORES": "true"})[1]["PDSERVE_SHARED_CORES"] == "1"  # as vLLM reads it
    cuda = ctx_for(GEN / "local_ranktable_10.0.0.18_45.json", platform="cuda")
    assert "PDSERVE_SHARED_CORES" not in build(cuda)[1]


def test_chat_default_is_context(tmp_path: Path) -> None:
    """vLLM turns a generation_config.json max_new_tokens into the chat default max_tokens; only
    without one (and without generation-config flags) is the default the rest of the context."""
    from pdserve.worker.command import chat_default_is_context

    plain, capped = tmp_path / "plain", tmp_path / "capped"
    for d in (plain, capped):
        d.mkdir()
    (plain / "generation_config.json").write_text('{"eos_token_id": 2}')
    (capped / "generation_config.json").write_text('{"max_new_tokens": 512}')
    assert chat_default_is_context(["--model", str(plain)])
    assert chat_default_is_context(["--model", str(tmp_path)])  # no generation_config.json at all
    assert not chat_default_is_context(["--model", str(capped)])
    assert chat_default_is_context(["--model", str(capped), "--generation-config", "vllm"])
    assert not chat_default_is_context(["--model", str(plain), "--override-generation-config", "{}"])
    assert not chat_default_is_context(["--model", "org/hub-model"])  # not known here
