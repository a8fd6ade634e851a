"""benchmarks/serve.py: workloads, arrivals, percentile/goodput math, repeats (pure, no server)."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from benchmarks import serve
from benchmarks.serve import Outcome, Vocab

pytestmark = pytest.mark.unit

VOCAB = Vocab(size=1000, special=frozenset({0, 1, 2}))


def test_random_workload_is_exact_and_seeded() -> None:
    a = serve.random_workload(10, 512, 64, VOCAB, seed=7)
    b = serve.random_workload(10, 512, 64, VOCAB, seed=7)
    c = serve.random_workload(10, 512, 64, VOCAB, seed=8)
    assert a == b and a != c
    assert all(r.prompt_len == 512 and r.output_len == 64 for r in a)
    assert len({tuple(r.prompt) for r in a}) == 10  # unique prompts: no accidental prefix-cache hits
    assert all(0 <= t < 1000 and t not in VOCAB.special for r in a for t in r.prompt)


def test_random_workload_range_ratio() -> None:
    reqs = serve.random_workload(200, 100, 20, VOCAB, seed=1, range_ratio=0.5)
    lens = [r.prompt_len for r in reqs]
    assert min(lens) >= 50 and max(lens) <= 150 and len(set(lens)) > 20
    assert all(10 <= r.output_len <= 30 for r in reqs)


def test_shared_prefix_workload() -> None:
    reqs = serve.shared_prefix_workload(3, 4, 16, 8, 5, VOCAB, seed=0)
    assert len(reqs) == 12
    assert [r.tag for r in reqs[:4]] == ["group0-0", "group1-0", "group2-0", "group0-1"]
    groups: dict[str, set[tuple[int, ...]]] = {}
    for r in reqs:
        assert r.prompt_len == 24
        groups.setdefault(r.tag.split("-")[0], set()).add(tuple(r.prompt[:16]))
    assert all(len(p) == 1 for p in groups.values())  # one prefix per group
    assert len({next(iter(p)) for p in groups.values()}) == 3  # different across groups
    assert len({tuple(r.prompt) for r in reqs}) == 12


def test_multi_turn_workload_grows_each_chat() -> None:
    reqs = serve.multi_turn_workload(conversations=2, turns=3, system_len=10, user_len=4, assistant_len=3,
                                     output_len=8, vocab=VOCAB, seed=0)
    assert [r.tag for r in reqs] == ["chat0-turn0", "chat1-turn0", "chat0-turn1", "chat1-turn1",
                                     "chat0-turn2", "chat1-turn2"]
    chat0 = [r for r in reqs if r.tag.startswith("chat0")]
    assert [r.prompt_len for r in chat0] == [14, 21, 28]
    for prev, nxt in zip(chat0, chat0[1:]):
        assert nxt.prompt[:prev.prompt_len] == prev.prompt  # the chat so far is the next prompt's prefix


def test_workload_spec_build_and_describe() -> None:
    spec = serve.WorkloadSpec(dataset="shared-prefix", num_prompts=10, num_groups=4, prefix_len=8, suffix_len=4,
                              output_len=3)
    assert len(spec.build(VOCAB, 0)) == 10
    assert len(spec.build(VOCAB, 0, n=3)) == 3
    assert "shared-prefix 4 groups" in spec.describe()
    mt = serve.WorkloadSpec(dataset="multi-turn", num_prompts=9, conversations=4)
    assert len(mt.build(VOCAB, 0)) == 9
    with pytest.raises(ValueError, match="unknown dataset"):
        serve.WorkloadSpec(dataset="sharegpt").build(VOCAB, 0)


def test_vocab_from_model(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 500, "eos_token_id": [2, 400]}))
    v = serve.vocab_from_model(tmp_path)
    assert v.size == 500 and {2, 400} <= v.special and v.low == 256  # no tokenizer.json: stay clear of low ids
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 0}, {"id": 1}]}))
    v = serve.vocab_from_model(tmp_path)
    assert v.low == 0 and {0, 1, 2, 400} <= v.special


def test_arrival_offsets_poisson_rescaled() -> None:
    offs = serve.arrival_offsets(40, 1.0, seed=3)
    assert offs == serve.arrival_offsets(40, 1.0, seed=3)
    assert offs != serve.arrival_offsets(40, 1.0, seed=4)
    assert all(b >= a for a, b in zip(offs, offs[1:]))
    assert offs[-1] == pytest.approx(40.0)  # vLLM rescales so n requests take n/rate seconds
    assert serve.arrival_offsets(3, math.inf, 0) == [0.0, 0.0, 0.0]
    assert serve.arrival_offsets(0, 1.0, 0) == []
    even = serve.arrival_offsets(4, 2.0, 0, burstiness=1e9)  # very high burstiness: nearly uniform
    assert even == pytest.approx([0.5, 1.0, 1.5, 2.0], rel=1e-3)
    with pytest.raises(ValueError):
        serve.arrival_offsets(3, 0.0, 0)


def test_percentile_matches_numpy_linear() -> None:
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert serve.percentile(xs, 50) == 3.0
    assert serve.percentile(xs, 0) == 1.0 and serve.percentile(xs, 100) == 5.0
    assert serve.percentile(xs, 99) == pytest.approx(4.96)
    assert serve.percentile([1.0, 2.0], 25) == pytest.approx(1.25)
    assert serve.percentile([], 99) == 0.0
    np = pytest.importorskip("numpy")
    data = [0.3, 7.1, 2.2, 9.9, 4.4, 4.4, 1.0]
    for p in (1, 10, 50, 90, 99):
        assert serve.percentile(data, p) == pytest.approx(float(np.percentile(data, p)))


def test_parse_goodput() -> None:
    assert serve.parse_goodput(["ttft:2000", "tpot:70"]) == {"ttft": 2000.0, "tpot": 70.0}
    assert serve.parse_goodput(["ttft:1500,e2el:9000"]) == {"ttft": 1500.0, "e2el": 9000.0}
    assert serve.parse_goodput([]) == {}
    for bad in (["ttft"], ["itl:5"], ["ttft:abc"], ["tpot:0"]):
        with pytest.raises(ValueError):
            serve.parse_goodput(bad)


def _o(ttft: float, latency: float, tokens: int = 11, ok: bool = True, prompt: int = 100) -> Outcome:
    gaps = [(latency - ttft) / (tokens - 1)] * (tokens - 1) if tokens > 1 else []
    return Outcome(success=ok, prompt_len=prompt, output_tokens=tokens if ok else 0, ttft=ttft,
                   latency=latency, itl=gaps, error="" if ok else "boom")


def test_summarize_metrics_and_goodput() -> None:
    outs = [_o(0.5, 1.5), _o(1.0, 3.0), _o(3.0, 4.0), _o(0.0, 0.0, ok=False)]
    s = serve.summarize(outs, duration_s=10.0, slo_ms={"ttft": 2000, "tpot": 150})
    assert (s["completed"], s["failed"]) == (3, 1)
    assert s["median_ttft_ms"] == pytest.approx(1000.0)
    assert s["p99_ttft_ms"] == pytest.approx(serve.percentile([500, 1000, 3000], 99))
    # TPOT = (E2E - TTFT) / (tokens - 1): 100, 200, 100 ms
    assert s["median_tpot_ms"] == pytest.approx(100.0)
    assert s["mean_tpot_ms"] == pytest.approx(400 / 3)
    assert s["median_itl_ms"] == pytest.approx(100.0)
    assert s["median_e2el_ms"] == pytest.approx(3000.0)
    assert s["total_output_tokens"] == 33 and s["total_input_tokens"] == 300
    assert s["output_throughput"] == pytest.approx(3.3)
    assert s["request_throughput"] == pytest.approx(0.3)
    # good: the first only (second: TPOT 200 > 150; third: TTFT 3000 > 2000; failed never counts)
    assert s["good_requests"] == 1 and s["request_goodput"] == pytest.approx(0.1)
    assert s["errors"] == ["boom"]
    assert serve.summarize(outs, 10.0)["request_goodput"] == pytest.approx(0.3)  # no SLO: all completed


def test_goodput_one_token_output_has_zero_tpot() -> None:
    one = Outcome(success=True, output_tokens=1, ttft=0.1, latency=0.1)
    assert serve.is_good(one, {"tpot": 1.0, "ttft": 200})
    assert not serve.is_good(one, {"ttft": 50})
    assert serve.is_good(_o(0.1, 1.1, tokens=11), {"e2el": 1100})
    assert not serve.is_good(_o(0.1, 1.1, tokens=11), {"e2el": 1099})
    s = serve.summarize([one], 1.0)
    assert s["median_tpot_ms"] == 0.0  # like vLLM: 1-token outputs are left out of TPOT


def test_summarize_empty_run() -> None:
    s = serve.summarize([], 0.0, {"ttft": 1})
    assert s["completed"] == 0 and s["median_ttft_ms"] == 0.0 and s["request_goodput"] == 0.0


def test_median_of_repeats() -> None:
    runs = [{"median_ttft_ms": v, "completed": 40, "slo_ms": {"ttft": 2}, "errors": [], "ok": True}
            for v in (300.0, 100.0, 200.0)]
    runs[1]["errors"] = ["x"]
    m = serve.median_of_repeats(runs)
    assert m["median_ttft_ms"] == 200.0 and m["completed"] == 40 and m["repeats"] == 3
    assert m["slo_ms"] == {"ttft": 2} and m["errors"] == ["x"] and m["ok"] is True
    assert serve.median_of_repeats([]) == {}
    assert statistics.median([1, 2]) == serve.median_of_repeats([{"a": 1}, {"a": 2}])["a"]


def test_format_summary_mentions_every_metric() -> None:
    s = serve.median_of_repeats([serve.summarize([_o(0.5, 1.5)], 2.0, {"ttft": 2000, "tpot": 70})])
    text = serve.format_summary(s, "pdserve")
    for word in ("TTFT", "TPOT", "ITL", "E2E", "goodput (ttft:2000 tpot:70)", "tok/s", "pdserve"):
        assert word in text


def test_plot_vs_rate_writes_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    points = []
    for rate in (0.5, 1.0, 2.0):
        s = serve.summarize([_o(0.1 * rate, 1.0 + rate)], 1.0)
        s["rate"] = rate
        points.append(s)
    out = serve.plot_vs_rate({"a": points, "b": points[:1]}, tmp_path / "p.png", "title")
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    burst = dict(points[0], rate=math.inf)  # 'inf' (all at once) is drawn on a categorical axis
    assert serve.plot_vs_rate({"a": [points[0], burst]}, tmp_path / "q.png").exists()


def test_cli_refuses_non_loopback() -> None:
    with pytest.raises(SystemExit):
        serve.main(["--base-url", "http://10.0.0.1:9000"])


def test_workloads_with_one_seed_share_no_prefix() -> None:
    """The main (512) and long (1536) workloads use one --seed; no prompt may prefix another's."""
    short = serve.WorkloadSpec(input_len=512, num_prompts=3).build(VOCAB, 0)
    long = serve.WorkloadSpec(input_len=1536, num_prompts=3).build(VOCAB, 0)
    assert short == serve.WorkloadSpec(input_len=512, num_prompts=3).build(VOCAB, 0)
    assert all(s.prompt[:16] != lg.prompt[:16] for s in short for lg in long)
    again = serve.WorkloadSpec(input_len=512, num_prompts=3).build(VOCAB, 1)  # the next repeat
    assert all(a.prompt[:16] != b.prompt[:16] for a in short for b in again)
