"""benchmarks/compare.py, _servers.py, pd_proxy.py: table, targets, system plans, proxy (no engines)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import pd_proxy

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _servers  # noqa: E402
import compare  # noqa: E402

pytestmark = pytest.mark.unit


def row(ttft: float, tpot: float, tok: float, good: float = 0.5, **kw: float) -> dict:
    r = {"median_ttft_ms": ttft, "p99_ttft_ms": ttft * 2, "median_tpot_ms": tpot, "p99_tpot_ms": tpot * 1.5,
         "median_itl_ms": tpot, "median_e2el_ms": ttft + 63 * tpot, "request_throughput": tok / 64,
         "output_throughput": tok, "request_goodput": good, "good_requests": good * 40, "completed": 40,
         "failed": 0, "slo_ms": {"ttft": 2000.0, "tpot": 70.0}}
    r.update(kw)
    return r


def test_format_table_ratios_against_pdserve() -> None:
    rows = {"pdserve": row(500, 50, 60), "colocated": row(1000, 60, 55), "vllm-nixl": None}
    text = compare.format_table(rows, errors={"vllm-nixl": "NIXL is not importable\nmore"})
    lines = text.splitlines()
    assert lines[0].startswith("system") and "TTFT p50 ms" in lines[0] and "goodput req/s" in lines[0]
    pd_line = next(line for line in lines if line.startswith("pdserve"))
    assert "500" in pd_line and "x)" not in pd_line  # the baseline has no ratio
    col_line = next(line for line in lines if line.startswith("colocated"))
    assert "1000 (2.00x)" in col_line and "60.0 (1.20x)" in col_line and "55.0 (0.92x)" in col_line
    nixl_line = next(line for line in lines if line.startswith("vllm-nixl"))
    assert "-- NIXL is not importable" in nixl_line and "more" not in nixl_line


def test_format_table_without_baseline() -> None:
    text = compare.format_table({"colocated": row(900, 63, 60)})
    assert "900" in text and "x)" not in text


def test_ratio_edge_cases() -> None:
    assert compare.ratio(1.0, 2.0) == 0.5
    assert compare.ratio(1.0, 0.0) is None and compare.ratio(None, 1.0) is None
    assert compare.ratio(float("nan"), 1.0) is None


def test_targets_all_pass() -> None:
    main = {"pdserve": row(800, 50, 65), "vllm-example": row(5000, 55, 50), "vllm-nixl": row(49000, 490, 8),
            "colocated": row(900, 63, 60)}
    long = {"pdserve": row(1500, 40, 60, good=0.4), "colocated": row(2500, 80, 50, good=0.1)}
    ts = compare.evaluate_targets(main, long)
    assert [t.passed for t in ts] == [True, True, True, True, True]
    assert "vllm-example" in ts[0].detail and "0.160x" in ts[0].detail  # best recipe = lowest TTFT
    assert ts[0].line().startswith("[PASS] TTFT p50 <= 0.25x")


def test_targets_fail_and_missing() -> None:
    main = {"pdserve": row(2000, 60, 50), "vllm-example": row(5000, 55, 50), "colocated": row(900, 63, 60)}
    ts = {t.name: t for t in compare.evaluate_targets(main, None)}
    assert ts["TTFT p50 <= 0.25x the best vLLM PD recipe's"].passed is False  # 0.4x
    assert ts["TTFT p50 <= 1.5x colocated"].passed is False  # 2.2x
    assert ts["TPOT p50 <= 0.9x colocated"].passed is False  # 0.95x
    assert ts["output throughput >= colocated"].passed is False
    assert ts["long prompts: goodput > colocated"].passed is None
    assert ts["long prompts: goodput > colocated"].line().startswith("[n/a ]")
    # a failed (0 completed) recipe is not "the best"
    main["vllm-example"] = row(10, 1, 1, completed=0)
    ts = {t.name: t for t in compare.evaluate_targets(main, None)}
    assert ts["TTFT p50 <= 0.25x the best vLLM PD recipe's"].passed is None
    equal_goodput = compare.evaluate_targets(main, {"pdserve": row(1, 1, 1, good=0.2),
                                                    "colocated": row(1, 1, 1, good=0.2)})
    assert equal_goodput[-1].passed is False  # "more goodput" is strict


def test_primary_and_quick() -> None:
    assert compare.primary(None) is None
    assert compare.primary([{"rate": 1.0, "median": {"a": 1}}, {"rate": 2.0, "median": {"a": 2}}]) == {"a": 1}
    w = compare.default_workloads()
    assert w["main"].spec.input_len == 512 and w["main"].spec.output_len == 64
    assert w["main"].spec.num_prompts == 40 and w["main"].rates == (1.0,) and w["main"].max_concurrency == 8
    assert w["long"].spec.input_len == 1536
    assert compare.quick(w["main"]).spec.num_prompts == 6
    assert "512 in / 64 out, 40 prompts @ 1 req/s, concurrency 8" in w["main"].describe()


def test_plot_bars(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    out = compare.plot_bars({"pdserve": row(500, 50, 60), "colocated": row(900, 63, 60), "x": None},
                            tmp_path / "b.png", "t")
    assert out.read_bytes()[:4] == b"\x89PNG"


COMMON = _servers.Common(model="/m", vllm_args=("--max-num-seqs", "16"), python="py")


def _env_bind(spec: _servers.ProcSpec) -> str | None:
    return spec.env.get("VLLM_CPU_OMP_THREADS_BIND")


def test_plan_pdserve_uses_up_on_loopback() -> None:
    plan = _servers.plan_system("pdserve", COMMON, [9000, 8100], Path("/tmp/x"))
    (up,) = plan.procs
    assert plan.url == "http://127.0.0.1:9000" and up.health_url == "http://127.0.0.1:9000/health"
    assert up.argv[:4] == ["py", "-m", "pdserve", "up"]
    for pair in (["--port", "9000"], ["--base-port", "8100"], ["--max-model-len", "2048"], ["--prefill", "1"],
                 ["--cores", "0-1"]):
        i = up.argv.index(pair[0])
        assert up.argv[i:i + 2] == pair
    assert "--enforce-eager" in up.argv and up.argv[-2:] == ["--max-num-seqs", "16"]
    assert up.env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert plan.scratch == [Path("/tmp/x")]


def test_plan_pdserve_shared_binds_both_workers_to_both_cores() -> None:
    plan = _servers.plan_system("pdserve-shared", COMMON, [9000, 8100], Path("/tmp/x"))
    argv = plan.procs[0].argv
    assert argv[:4] == ["py", "-m", "pdserve", "up"] and argv[-2:] == ["--max-num-seqs", "16"]
    binds = [argv[i + 1] for i, a in enumerate(argv) if a == "--cpu-bind"]
    assert binds == ["prefill=0-1", "decode=0-1"] and plan.url == "http://127.0.0.1:9000"
    assert _servers.ports_needed("pdserve-shared") == 2


def test_plan_vllm_recipes_bind_p_core0_d_core1() -> None:
    ex = _servers.plan_system("vllm-example", COMMON, [8000, 8001, 8002], Path("/dev/shm/s"))
    p, d, proxy = ex.procs
    assert (_env_bind(p), _env_bind(d)) == ("0", "1")
    kvp = json.loads(p.argv[p.argv.index("--kv-transfer-config") + 1])
    kvd = json.loads(d.argv[d.argv.index("--kv-transfer-config") + 1])
    assert kvp["kv_connector"] == "ExampleConnector" and kvp["kv_role"] == "kv_producer"
    assert kvd["kv_role"] == "kv_consumer"
    assert kvp["kv_connector_extra_config"]["shared_storage_path"] == "/dev/shm/s"
    assert proxy.argv[-6:] == ["--mode", "pd", "--prefill", "127.0.0.1:8001", "--decode", "127.0.0.1:8002"]
    assert ex.url == "http://127.0.0.1:8000"
    for s in (p, d):
        assert "--enforce-eager" in s.argv and s.argv[s.argv.index("--host") + 1] == "127.0.0.1"
        assert s.env["VLLM_CPU_KVCACHE_SPACE"] == "2"

    nx = _servers.plan_system("vllm-nixl", COMMON, [8000, 8001, 8002, 8003, 8004])
    p, d, _ = nx.procs
    kv = json.loads(p.argv[p.argv.index("--kv-transfer-config") + 1])
    assert kv == {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}
    assert (p.env["VLLM_NIXL_SIDE_CHANNEL_PORT"], d.env["VLLM_NIXL_SIDE_CHANNEL_PORT"]) == ("8003", "8004")
    assert p.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1"


def test_plan_colocated() -> None:
    one = _servers.plan_system("colocated", COMMON, [8000])
    assert len(one.procs) == 1 and _env_bind(one.procs[0]) == "0-1"
    assert "--kv-transfer-config" not in one.procs[0].argv
    rr = _servers.plan_system("colocated-rr", COMMON, [8000, 8001, 8002])
    a, b, proxy = rr.procs
    assert (_env_bind(a), _env_bind(b)) == ("0", "1")
    assert "--mode" in proxy.argv and proxy.argv[proxy.argv.index("--mode") + 1] == "rr"
    assert proxy.argv.count("--backend") == 2
    assert "server0=cores 0" in rr.bindings()
    with pytest.raises(ValueError, match="unknown system"):
        _servers.plan_system("sglang", COMMON, [1])


def test_free_ports_are_free_and_distinct() -> None:
    for name in _servers.SYSTEMS:
        ports = _servers.free_ports(name)
        assert len(ports) == _servers.ports_needed(name) == len(set(ports))
        assert all(21000 <= p < 29000 for p in ports)


def test_proxy_bodies() -> None:
    body = {"model": "m", "prompt": [1, 2], "max_tokens": 64, "stream": True,
            "stream_options": {"include_usage": True}}
    p = pd_proxy.prefill_body(body)
    assert p["max_tokens"] == 1 and p["stream"] is False and "stream_options" not in p
    assert p["kv_transfer_params"]["do_remote_decode"] is True
    assert body["max_tokens"] == 64 and "kv_transfer_params" not in body  # the original is untouched
    d = pd_proxy.decode_body(body, {"kv_transfer_params": {"remote_block_ids": [1]}})
    assert d["kv_transfer_params"] == {"remote_block_ids": [1]} and d["stream"] is True
    assert "kv_transfer_params" not in pd_proxy.decode_body(body, {})


async def test_proxy_pd_and_rr_flow() -> None:
    """The proxy against two in-process fake backends: prefill first, then decode with its params."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    seen: list[tuple[str, dict]] = []

    def backend(name: str) -> web.Application:
        app = web.Application()

        async def comp(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            seen.append((name, body))
            if not body.get("stream"):
                return web.json_response({"choices": [{"text": "x"}], "kv_transfer_params": {"from": name}})
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for t in ("a", "b"):
                await resp.write(f"data: {json.dumps({'choices': [{'text': t}]})}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            return resp

        app.router.add_post("/v1/completions", comp)
        return app

    p_srv, d_srv = TestServer(backend("P"), host="127.0.0.1"), TestServer(backend("D"), host="127.0.0.1")
    await p_srv.start_server()
    await d_srv.start_server()
    try:
        for mode in ("pd", "rr"):
            seen.clear()
            pa, da = f"127.0.0.1:{p_srv.port}", f"127.0.0.1:{d_srv.port}"
            app = pd_proxy.build_app(mode, [pa], [da], [pa, da])
            proxy = TestServer(app, host="127.0.0.1")
            await proxy.start_server()
            import aiohttp

            async with aiohttp.ClientSession() as s:
                for _ in range(2):
                    async with s.post(str(proxy.make_url("/v1/completions")),
                                      json={"model": "m", "prompt": "hi", "max_tokens": 5, "stream": True}) as r:
                        text = await r.text()
                        assert r.status == 200 and "data: [DONE]" in text and '"a"' in text
            await proxy.close()
            if mode == "pd":
                assert [n for n, _ in seen] == ["P", "D", "P", "D"]
                assert seen[0][1]["max_tokens"] == 1 and seen[1][1]["kv_transfer_params"] == {"from": "P"}
            else:
                assert [n for n, _ in seen] == ["P", "D"]  # round-robin, whole requests
                assert all("kv_transfer_params" not in b for _, b in seen)
    finally:
        await p_srv.close()
        await d_srv.close()


def test_parse_overrides() -> None:
    assert compare.parse_overrides(["vllm-nixl=1", "pdserve=main+long"]) == {"vllm-nixl": "1",
                                                                              "pdserve": "main+long"}
    assert compare.parse_overrides(None) == {}
    for bad in (["vllm-nixl"], ["=1"], ["sglang=1"], ["pdserve="]):
        with pytest.raises(ValueError):
            compare.parse_overrides(bad)


def test_write_report_from_saved_json(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    per_rate = lambda r: [{"rate": 1.0, "median": r, "runs": [r]}]  # noqa: E731
    doc = {"machine": {"cpu_count": 2, "affinity": [0, 1], "loadavg_at_start": [1.0, 1.0, 1.0]},
           "slo_ms": {"ttft": 2000.0, "tpot": 70.0}, "repeats": 3, "warmup": 4, "kvcache_gib": 2,
           "workloads": {"main": {"describe": "random 512 in / 64 out", "rates": [1.0]},
                         "long": {"describe": "random 1536 in / 64 out", "rates": [0.5]}},
           "systems": {"pdserve": {"bindings": "up=P core 0, D core 1"},
                       "colocated": {"bindings": "server=cores 0-1"},
                       "vllm-example": {"bindings": "prefill=cores 0", "repeats": 1}},
           "errors": {"vllm-nixl": "NIXL is not importable", "vllm-example/long": "",
                      "vllm-example": "vllm-example: a process died"},
           "results": {"pdserve": {"main": per_rate(row(800, 50, 65)), "long": per_rate(row(1500, 40, 60, good=0.4))},
                       "colocated": {"main": per_rate(row(900, 63, 60)), "long": per_rate(row(2500, 80, 50, good=0.1))},
                       "vllm-example": {"main": per_rate(row(5000, 55, 50))}}}
    text = compare.write_report(json.loads(json.dumps(doc)), tmp_path)
    assert "2 cores (affinity [0, 1])" in text and "median of 3 repeat(s)" in text
    assert "vllm-example: prefill=cores 0 (1 repeat(s) only)" in text
    assert "-- NIXL is not importable" in text and "-- vllm-example: a process died" in text
    assert "notes:" in text and text.count("[PASS]") == 5
    assert (tmp_path / "table.txt").read_text().strip() == text.strip()
    assert (tmp_path / "main-bars.png").exists() and (tmp_path / "long-bars.png").exists()
    (tmp_path / "compare.json").write_text(json.dumps(doc))
    assert compare.main(["--report", str(tmp_path / "compare.json")]) == 0


def test_merge_rounds_pools_repetitions() -> None:
    def entry(rate: float, *ttfts: float) -> dict:
        runs = [{"median_ttft_ms": t, "completed": 40, "errors": []} for t in ttfts]
        return {"rate": rate, "median": {}, "runs": runs}

    merged = compare.merge_rounds([entry(1.0, 100, 900, 300)], [entry(1.0, 200, 250, 260), entry(2.0, 5)])
    one, two = merged
    assert one["rate"] == 1.0 and len(one["runs"]) == 6 and one["median"]["median_ttft_ms"] == 255.0
    assert one["median"]["repeats"] == 6 and one["median"]["rate"] == 1.0
    assert two["rate"] == 2.0 and two["median"]["median_ttft_ms"] == 5
    assert compare.merge_rounds(None, [entry(1.0, 7)])[0]["median"]["median_ttft_ms"] == 7


def test_format_table_failed_rows_do_not_widen_columns() -> None:
    rows = {"pdserve": row(500, 50, 60), "vllm-example": row(0, 0, 0, completed=0, failed=24),
            "vllm-nixl": None}
    text = compare.format_table(rows, errors={"vllm-nixl": "not run (--workloads-for vllm-nixl=main) " * 3})
    lines = text.splitlines()
    assert lines[0].index("TTFT p50 ms") < 20  # the long reason did not stretch the first columns
    assert "-- no request completed (24 failed)" in text


def test_targets_show_the_ratio_of_each_repetition_pair() -> None:
    main = {"pdserve": row(1000, 46, 59), "vllm-example": row(3500, 50, 53), "colocated": row(470, 55, 60)}
    runs = {"pdserve": [row(1000, 46, 59), row(980, 45, 58), row(1150, 47, 59)],
            "vllm-example": [row(5000, 50, 53), row(2700, 49, 51), row(3500, 50, 54)],
            "colocated": [row(440, 55, 60), row(470, 54, 59), row(575, 50, 60)]}
    ts = {t.name: t for t in compare.evaluate_targets(main, None, runs)}
    assert ts["TTFT p50 <= 0.25x the best vLLM PD recipe's"].detail.endswith("(by repetition: 0.20 0.36 0.33)")
    assert ts["TPOT p50 <= 0.9x colocated"].detail.endswith("(by repetition: 0.84 0.83 0.94)")
    # repetitions that do not pair up (another count, or a single one) give no per-repetition part
    assert compare.paired_ratios("median_ttft_ms", "colocated", {**runs, "colocated": runs["colocated"][:2]}) == ""
    assert compare.paired_ratios("median_ttft_ms", "colocated", {k: v[:1] for k, v in runs.items()}) == ""
    assert "repetition" not in compare.evaluate_targets(main, None)[0].detail


def test_every_system_runs_on_the_chosen_two_cores() -> None:
    c = _servers.Common(model="/m", python="py", cores=(4, 6))
    up = _servers.plan_system("pdserve", c, [9000, 8100], Path("/tmp/x")).procs[0]
    assert up.argv[up.argv.index("--cores") + 1] == "4,6" and "prefill core 4, decode core 6" in up.binding
    p, d, _ = _servers.plan_system("vllm-example", c, [1, 2, 3], Path("/tmp/y")).procs
    assert (_env_bind(p), _env_bind(d)) == ("4", "6")
    assert _env_bind(_servers.plan_system("colocated", c, [1]).procs[0]) == "4,6"
    a, b, _ = _servers.plan_system("colocated-rr", c, [1, 2, 3]).procs
    assert (_env_bind(a), _env_bind(b)) == ("4", "6")


def test_pick_cores() -> None:
    assert compare.pick_cores(None, [2, 3, 5]) == (2, 3)
    assert compare.pick_cores("5,2", [2, 3, 5]) == (5, 2)
    for bad in ("1,2", "2,2", "2", "2,3,5", "a,b", "²,3"):
        assert compare.pick_cores(bad, [2, 3, 5]) is None, bad
    assert compare.pick_cores(None, [0]) is None
