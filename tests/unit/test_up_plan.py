"""``pdserve up`` planning: devices, ports, ranktables and daemon commands (nothing started)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pdserve import ranktable
from pdserve.errors import ConfigError
from pdserve.up import register
from pdserve.up.plan import plan_cluster, split_cores
from pdserve.up.runner import UpSettings, curl_line, daemon_commands, write_ranktables

pytestmark = pytest.mark.unit


def test_1p1d_on_two_cores() -> None:
    plan = plan_cluster(1, 1, "cpu", 2)
    p, d = plan.instances
    assert (p.name, p.devices, p.port, p.cpu_bind) == ("prefill0", (0,), 8100, None)
    assert (d.name, d.devices, d.port, d.cpu_bind) == ("decode0", (1,), 8101, None)
    assert plan.node_ports == "8100,8101" and plan.scheduler_port == 9000
    assert p.side_port == 18100


def test_more_instances_than_cores_reuse_round_robin() -> None:
    plan = plan_cluster(2, 3, "cpu", 2, base_port=8200)
    assert [i.devices for i in plan.instances] == [(0,), (1,), (2,), (3,), (4,)]  # unique for role resolution
    assert [i.cpu_bind for i in plan.instances] == ["0", "1", "0", "1", "0"]
    assert [i.name for i in plan.instances] == ["prefill0", "prefill1", "decode0", "decode1", "decode2"]
    assert plan.node_ports == "8200,8201,8202,8203,8204"


def test_tp2_on_cpu() -> None:
    plan = plan_cluster(1, 1, "cpu", 2, tp=2)
    assert [i.devices for i in plan.instances] == [(0, 1), (2, 3)]
    assert [i.cpu_bind for i in plan.instances] == ["0|1", "0|1"]
    assert plan_cluster(1, 1, "cpu", 4, tp=2).instances[1].cpu_bind is None


def test_spare_cores_are_split_into_one_block_per_rank() -> None:
    four = plan_cluster(1, 1, "cpu", 4)  # no core kept back: that would leave a rank with one
    assert [(i.devices, i.cpu_bind) for i in four.instances] == [((0,), "0-1"), ((2,), "2-3")]
    eight = plan_cluster(1, 1, "cpu", 8)  # prefill takes the remainder, core 7 is the frontends'
    assert [(i.devices, i.cpu_bind) for i in eight.instances] == [((0,), "0-3"), ((4,), "4-6")]
    three = plan_cluster(1, 1, "cpu", 3)
    assert [i.cpu_bind for i in three.instances] == ["0-1", None]  # decode's one core is its device id
    tp2 = plan_cluster(1, 1, "cpu", 9, tp=2)
    assert [(i.devices, i.cpu_bind) for i in tp2.instances] == [((0, 2), "0-1|2-3"), ((4, 6), "4-5|6-7")]


def test_cores_follow_the_affinity_set() -> None:
    """In a container or under taskset the usable cores need not start at 0."""
    plan = plan_cluster(1, 1, "cpu", 2, cores=[4, 5])
    assert [(i.devices, i.cpu_bind) for i in plan.instances] == [((4,), None), ((5,), None)]
    plan = plan_cluster(1, 1, "cpu", 6, cores=[2, 3, 4, 5, 8, 9])
    assert [(i.devices, i.cpu_bind) for i in plan.instances] == [((2,), "2-4"), ((5,), "5,8")]
    crowded = plan_cluster(2, 1, "cpu", 2, cores=[6, 7])  # more ranks than cores: round-robin on those
    assert [i.cpu_bind for i in crowded.instances] == ["6", "7", "6"]


def test_split_cores() -> None:
    assert split_cores([0, 1], 2) == [[0], [1]]
    assert split_cores(list(range(5)), 2) == [[0, 1], [2, 3]]  # 4 is kept back
    assert split_cores(list(range(4)), 3) == [[0, 1], [2], [3]]
    assert split_cores(list(range(16)), 3) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]


def test_tp_side_channel_ports_do_not_overlap() -> None:
    """Rank r of an instance listens on its side port + r: instances are TP ports apart, and
    every listening port of the cluster is distinct."""
    plan = plan_cluster(2, 2, "cpu", 8, tp=3)
    assert [i.side_port for i in plan.instances] == [18100, 18103, 18106, 18109]
    assert len(set(plan.ports())) == len(plan.ports())


def test_gpus_are_not_shared() -> None:
    assert [i.devices for i in plan_cluster(1, 1, "cuda", 2).instances] == [(0,), (1,)]
    with pytest.raises(ConfigError, match="need 3 CUDA devices, this host has 2"):
        plan_cluster(2, 1, "cuda", 2)


@pytest.mark.parametrize(("p", "d"), [(0, 1), (1, 0)])
def test_needs_both_roles(p: int, d: int) -> None:
    with pytest.raises(ConfigError, match="at least one of each"):
        plan_cluster(p, d, "cpu", 2)


def test_port_collisions() -> None:
    with pytest.raises(ConfigError, match="scheduler port 8101"):
        plan_cluster(1, 1, "cpu", 2, scheduler_port=8101)
    with pytest.raises(ConfigError, match="scheduler port 18100"):
        plan_cluster(1, 1, "cpu", 2, scheduler_port=18100)
    with pytest.raises(ConfigError, match="out of range"):
        plan_cluster(1, 1, "cpu", 2, base_port=60000)


def test_ranktables_resolve_to_the_planned_instances(tmp_path: Path) -> None:
    plan = plan_cluster(2, 2, "cpu", 2)
    g, locals_, host = write_ranktables(plan, tmp_path)
    for inst in plan.instances:
        role = ranktable.resolve_role(g, locals_[inst.name])
        assert role.instance is not None and (role.kind, role.instance.index) == (inst.role, inst.index)
        assert role.instance.global_index == inst.global_index
    assert ranktable.resolve_role(g, host).kind == "scheduler"


def test_daemon_commands_are_the_operator_path(tmp_path: Path) -> None:
    plan = plan_cluster(2, 1, "cpu", 2)
    g, locals_, host = write_ranktables(plan, tmp_path)
    s = UpSettings(model="/m/demo", served_name="demo", run_dir=tmp_path, max_model_len=2048,
                   kv_connector="none", vllm_args=["--max-num-seqs", "4"], env={"PATH": "/bin"},
                   scheduler_args=["--decode-only-when-queued=512"])
    cmds = daemon_commands(plan, s, g, locals_, host, python="py")
    names = [c[0] for c in cmds]
    assert names == ["prefill0", "prefill1", "decode0", "scheduler"]
    name, argv, env = cmds[0]
    assert argv[:4] == ["py", "-m", "pdserve", "serve"]
    assert argv[argv.index("--port") + 1] == "8100" and argv[argv.index("--max-model-len") + 1] == "2048"
    assert argv[-2:] == ["--max-num-seqs", "4"] and "--kv-connector" in argv
    assert [c[1][c[1].index("--kv-port") + 1] for c in cmds[:-1]] == ["18100", "18101", "18102"]
    assert env["GLOBAL_RANK_TABLE_FILE_PATH"] == str(g) and env["RANK_TABLE_FILE_PATH"] == str(locals_["prefill0"])
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["PDSERVE_PLATFORM"] == "cpu"
    # 3 instances on 2 cores: logical device ids, explicit round-robin binding
    assert [c[2].get("PDSERVE_CPU_BIND") for c in cmds] == ["0", "1", "0", None]
    one_each = daemon_commands(plan_cluster(1, 1, "cpu", 2), s, g, locals_, host, python="py")
    assert all("PDSERVE_CPU_BIND" not in c[2] for c in one_each)
    _, sargv, senv = cmds[-1]
    assert senv["NODE_PORTS"] == "8100,8101,8102" and senv["RANK_TABLE_FILE_PATH"] == str(host)
    assert senv["USE_OPENAI"] == "1" and sargv[sargv.index("--port") + 1] == "9000"
    assert senv["PDSERVE_DECODE_ONLY_WHEN_QUEUED"] == "1024"  # load-aware decode-only on by default
    # scheduler-only flags reach the scheduler, not vLLM (which would refuse them)
    assert sargv[-1] == "--decode-only-when-queued=512" and "--max-num-seqs" not in sargv
    assert all("--decode-only-when-queued=512" not in c[1] for c in cmds[:-1])


def test_curl_line_targets_the_scheduler() -> None:
    line = curl_line(plan_cluster(1, 1, "cpu", 2, scheduler_port=9100), "demo")
    assert line.startswith("curl http://127.0.0.1:9100/v1/chat/completions") and '"model": "demo"' in line


def test_cli_flags() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args, extra = parser.parse_known_args(["up", "--demo", "--prefill", "2", "--ask", "q", "--once",
                                           "--max-num-seqs", "4", "--scheduler-arg=--retries=2"])
    assert args.scheduler_arg == ["--retries=2"]
    assert (args.demo, args.prefill, args.decode, args.port, args.timeout) == (True, 2, 1, 9000, 300.0)
    assert args.ask == "q" and args.once and extra == ["--max-num-seqs", "4"]


def test_shared_cores_setting_passes_through(tmp_path: Path) -> None:
    """pdserve up leaves PDSERVE_SHARED_CORES to the daemons (on by default for CPU instances):
    an operator's explicit value reaches every instance, reused cores or not."""
    for env, want in (({"PATH": "/bin"}, None), ({"PATH": "/bin", "PDSERVE_SHARED_CORES": "0"}, "0")):
        s = UpSettings(model="/m/demo", served_name="demo", run_dir=tmp_path, env=env)
        for tp in (1, 2):
            plan = plan_cluster(1, 1, "cpu", 2, tp=tp)
            g, locals_, host = write_ranktables(plan, tmp_path / f"{tp}{want}")
            cmds = daemon_commands(plan, s, g, locals_, host, python="py")
            assert [c[2].get("PDSERVE_SHARED_CORES") for c in cmds[:2]] == [want, want]


def test_cores_flag_picks_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from pdserve import platform as plat
    from pdserve.up import _cores

    monkeypatch.setattr(plat.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert _cores(None, "cpu") == list(range(8))
    assert _cores("4-5,7", "cpu") == [4, 5, 7]
    with pytest.raises(ConfigError) as exc:
        _cores("6-9", "cpu")
    assert exc.value.field == "--cores" and "8-9 not usable" in exc.value.found and "0-7" in exc.value.fix
    with pytest.raises(ConfigError, match="not a core or a range"):
        _cores("3-1", "cpu")
    with pytest.raises(ConfigError, match="leave --cores out"):
        _cores("0", "cuda")
    assert _cores(None, "npu") is None
