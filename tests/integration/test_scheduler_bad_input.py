"""Bad input gets an OpenAI-style 4xx from the scheduler and never reaches an instance;
random bodies never produce a 5xx."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import MODEL, Cluster, MakeCluster

pytestmark = pytest.mark.integration


async def send(c: Cluster, path: str, data: bytes | str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with c.post(path, data=data, headers=headers or {"Content-Type": "application/json"}) as r:
        raw = await r.read()
        return r.status, json.loads(raw) if raw else None


def assert_error(status: int, body: Any, expected: int, param: str | None = "__any__") -> None:
    assert status == expected, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == expected and err["message"]
    if param != "__any__":
        assert err["param"] == param


CASES: list[tuple[str, Any, int, str | None]] = [
    ("/v1/completions", "{not json", 400, None),
    ("/v1/completions", "[1, 2]", 400, None),
    ("/v1/completions", "null", 400, None),
    ("/v1/completions", {"max_tokens": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "__any__"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "stream": "maybe"}, 400, "stream"),
    ("/v1/completions", {"prompt": [1.5, 2]}, 400, "__any__"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 5, "min_tokens": 10, "stream": True}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 17}, 400, "min_tokens"),  # vLLM's default max_tokens: 16
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 3,
                              "min_tokens": 4}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "stop": [1, 2]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "n": 2, "best_of": 1}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", '{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "kv_transfer_params": {"do_remote_prefill": True, "remote_port": "abc"}},
     400, "kv_transfer_params"),
    ("/v1/completions", {"prompt": "x", "kv_transfer_params": {}}, 400, "kv_transfer_params"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
     400, "max_completion_tokens"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), CASES)
async def test_bad_input_rejected_before_instances(cluster: Cluster, path: str, body: Any, status: int,
                                                   param: str | None) -> None:
    data = body if isinstance(body, str) else json.dumps(body)
    code, answer = await send(cluster, path, data)
    assert_error(code, answer, status, param)
    assert cluster.calls() == 0


@pytest.mark.parametrize("body", [
    {"prompt": "x", "max_tokens": 3, "stream": "true"},
    {"prompt": "x", "max_tokens": 3, "stream": 1, "stream_options": {"include_usage": "true"}},
    {"prompt": [504.0, 3434.0], "max_tokens": 3},
])
async def test_lax_values_vllm_accepts_are_accepted(cluster: Cluster, body: dict) -> None:
    """vLLM's pydantic models are lax: "true" and 1 are booleans, 504.0 is token 504."""
    async with cluster.post("/v1/completions", data=json.dumps(body), headers={"Content-Type": "application/json"}) as r:
        assert r.status == 200, await r.text()
        text = await r.text()
    streamed = "stream" in body
    assert text.rstrip().endswith("data: [DONE]") if streamed else json.loads(text)["choices"]
    sent = [r["body"] for f in cluster.decode for r in f.inference_requests()]
    assert sent and sent[-1].get("stream", False) is streamed  # normalized to a JSON boolean
    if "stream_options" in body:
        assert sent[-1]["stream_options"]["include_usage"] is True


async def test_unknown_model_404(cluster: Cluster) -> None:
    code, answer = await send(cluster, "/v1/completions", json.dumps({"model": "gpt-9", "prompt": "x"}))
    assert_error(code, answer, 404, "model")
    assert answer["error"]["type"] == "NotFoundError" and "gpt-9" in answer["error"]["message"]
    code, _ = await send(cluster, "/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}))
    assert code == 200


async def test_oversized_body_413(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, max_body_bytes=4096)
    code, answer = await send(c, "/v1/completions", json.dumps({"prompt": "x" * 10000}))
    assert_error(code, answer, 413)
    assert c.calls() == 0


async def test_too_long_prompt_400(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, max_model_len=100, chars_per_token_bound=4)
    # token ids: exact; a prompt that leaves no room for one token is refused ...
    code, answer = await send(c, "/v1/completions", json.dumps({"prompt": list(range(100)), "max_tokens": 1}))
    assert_error(code, answer, 400, "prompt")
    assert "maximum context length is 100" in answer["error"]["message"]
    # text: certainly too long
    code, answer = await send(c, "/v1/completions", json.dumps({"prompt": "abcd" * 200}))
    assert_error(code, answer, 400, "prompt")
    code, answer = await send(c, "/v1/chat/completions",
                              json.dumps({"messages": [{"role": "user", "content": "abcd" * 200}]}))
    assert_error(code, answer, 400, "messages")
    code, answer = await send(c, "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 101}))
    assert_error(code, answer, 400, "max_tokens")
    assert c.calls() == 0
    code, _ = await send(c, "/v1/completions", json.dumps({"prompt": list(range(50)), "max_tokens": 20}))
    assert code == 200
    # ... while prompt + max_tokens beyond the context is vLLM's business: it cuts max_tokens to fit
    code, _ = await send(c, "/v1/completions", json.dumps({"prompt": list(range(90)), "max_tokens": 20}))
    assert code == 200
    # a prompt word of Unicode digits ('²'.isdigit() is True, int('²') fails) is an ordinary word
    code, _ = await send(c, "/v1/completions", json.dumps({"prompt": "²", "max_tokens": 2}))
    assert code == 200


async def test_unknown_route_and_method(cluster: Cluster) -> None:
    async with cluster.get("/v1/nope") as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == 404
    async with cluster.post("/generate", json={"prompt": "x"}) as r:  # an OpenAI-mode scheduler
        assert r.status == 404 and "USE_OPENAI=0" in (await r.json())["error"]["message"]
    async with cluster.get("/v1/completions") as r:
        assert r.status == 405 and (await r.json())["error"]["code"] == 405


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_a_body_not_sent_as_json_is_415(cluster: Cluster, content_type: str | None) -> None:
    """As vLLM's OpenAI server: only application/json (curl -d without -H sends a form type)."""
    headers = {"Content-Type": content_type} if content_type else {}
    async with cluster.post("/v1/chat/completions", data=b'{"messages": [{"role": "user", "content": "x"}]}',
                            headers=headers, skip_auto_headers=["Content-Type"]) as r:
        assert_error(r.status, await r.json(), 415)
    assert cluster.calls() == 0
    code, _ = await send(cluster, "/v1/completions", '{"prompt": "x", "max_tokens": 1}',
                         {"Content-Type": "application/json; charset=utf-8"})
    assert code == 200


async def test_generate_bad_input(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, use_openai=False)
    for body in ({"prompt": 1}, {"text": "x"}, {"prompt": "x", "top_p": 2}):
        code, answer = await send(c, "/generate", json.dumps(body))
        assert_error(code, answer, 400)
    assert c.calls() == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["prompt", "messages", "model", "max_tokens", "temperature", "top_p", "top_k", "n", "best_of", "stream",
          "stream_options", "stop", "logprobs", "seed", "min_tokens", "max_completion_tokens", "presence_penalty",
          "kv_transfer_params", "use_beam_search", "response_format"]
bodies = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6),
    st.fixed_dictionaries({"prompt": st.text(max_size=30)},
                          optional={k: json_values for k in FIELDS if k != "prompt"}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"])}, optional={"content": json_values}), max_size=3)},
        optional={k: json_values for k in FIELDS if k != "messages"}),
)


async def test_fuzz_never_5xx_async(make_cluster: MakeCluster) -> None:
    """~1000 random bodies (random JSON values, random field types) to both endpoints: the
    answer is always < 500, and the scheduler keeps serving."""
    import asyncio

    c = await make_cluster(1, 1, max_model_len=4096, fake_kw={"output_tokens": 2, "require_kv_params": False})
    loop = asyncio.get_running_loop()
    statuses: list[int] = []

    @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), as_text=st.booleans())
    def check(body: Any, path: str, as_text: bool) -> None:
        data = body if as_text and isinstance(body, str) else json.dumps(body)
        status, answer = asyncio.run_coroutine_threadsafe(send(c, path, data), loop).result(30)
        statuses.append(status)
        assert status < 500, (path, body, answer)

    await asyncio.to_thread(check)
    assert len(statuses) >= 1000
    assert any(s == 200 for s in statuses) and any(s == 400 for s in statuses)
    async with c.get("/health") as r:
        assert r.status == 200
