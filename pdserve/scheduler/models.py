"""Request models: validate what the scheduler must understand, pass everything else through.

The models check the types and ranges of the fields the scheduler reads or that would make an
instance fail (so bad input gets a 400 here and never costs a prefill), and use
``extra="allow"`` so every other sampling parameter vLLM accepts reaches the instances. The
models are used only for validation: the original JSON object is what gets forwarded, never a
re-serialised model (that would add defaults or coerce values).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, model_validator

from pdserve.scheduler.affinity import chat_view
from pdserve.scheduler.errors import ApiError, bad_request


_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1  # vLLM's bounds; beyond them the engine overflows (a 500)
# lax ints, as vLLM's own models: a JSON 504.0 is token 504 (504.5 is refused)
TokenId = Annotated[int, Field(ge=0, le=_I64_MAX)]


class _Model(BaseModel):
    # vLLM validates with pydantic in lax mode too; we reject NaN/inf which vLLM would turn into
    # an engine error (a 500) rather than a 400.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class StreamOptions(_Model):
    include_usage: bool | None = None  # lax, as vLLM: "true" and 1 are true
    continuous_usage_stats: bool | None = None


class SamplingFields(_Model):
    """Sampling parameters common to /v1/completions, /v1/chat/completions and /generate."""

    model: StrictStr | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=_I64_MAX)
    min_tokens: int | None = Field(default=None, ge=0, le=_I64_MAX)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=_I64_MAX)
    min_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=_I64_MAX)
    best_of: int | None = Field(default=None, ge=1, le=_I64_MAX)
    use_beam_search: bool | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    length_penalty: float | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool | None = None
    seed: int | None = Field(default=None, ge=_I64_MIN, le=_I64_MAX)
    top_logprobs: int | None = Field(default=None, ge=0, le=_I64_MAX)


class CompletionRequest(SamplingFields):
    # vLLM also accepts prompt_embeds instead of a prompt; checked in validate_completion.
    prompt: StrictStr | list[StrictStr] | list[TokenId] | list[list[TokenId]] | None = None
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=_I64_MAX)
    suffix: StrictStr | None = None


class ChatMessage(_Model):
    role: StrictStr
    content: StrictStr | list[Any] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1, le=_I64_MAX)


class GenerateRequest(SamplingFields):
    """vLLM's plain ``/generate`` API: ``{"prompt": ..., "stream": ..., **SamplingParams}``."""

    prompt: StrictStr
    logprobs: int | None = Field(default=None, ge=0, le=_I64_MAX)


class ResponsesRequest(SamplingFields):
    """vLLM's ``/v1/responses`` (stateless: the answer is not stored for a later request)."""

    input: StrictStr | list[Any]
    instructions: StrictStr | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=_I64_MAX)
    previous_response_id: StrictStr | None = None
    background: bool | None = None


# the OpenAI sampling fields Anthropic's request lacks: vLLM's /v1/messages ignores them
_NOT_ANTHROPIC = frozenset(SamplingFields.model_fields) - {"model", "stream", "max_tokens", "temperature",
                                                          "top_p", "top_k"}


class MessagesRequest(SamplingFields):
    """Anthropic's Messages API as vLLM serves it (``/v1/messages``)."""

    messages: list[ChatMessage]  # (vLLM accepts an empty list)
    max_tokens: int = Field(ge=1, le=_I64_MAX)  # required, as in Anthropic's API
    system: StrictStr | list[Any] | None = None
    stop_sequences: list[StrictStr] | None = None

    @model_validator(mode="before")
    @classmethod
    def _ignore_openai_fields(cls, data: Any) -> Any:
        """vLLM ignores ``n``, ``seed``, ``stop`` ... on this route, so neither checks nor reads them
        here (they stay in the forwarded body, for vLLM to ignore)."""
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if k not in _NOT_ANTHROPIC}


Endpoint = Literal["completions", "chat", "generate", "responses", "messages"]
_M = TypeVar("_M", bound=BaseModel)
_MODELS: dict[str, type[SamplingFields]] = {
    "completions": CompletionRequest,
    "chat": ChatCompletionRequest,
    "generate": GenerateRequest,
    "responses": ResponsesRequest,
    "messages": MessagesRequest,
}


def _param_path(body: Any, loc: tuple[Any, ...], missing: bool) -> str | None:
    """The error's location in the request body, without pydantic's union-member tags (for
    ``"content": 5`` pydantic says ``messages.0.content.str``; the client's field is
    ``messages.0.content``)."""
    parts: list[str] = []
    node = body
    for i, part in enumerate(loc):
        if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and part in node:
            node = node[part]
        elif not (missing and i == len(loc) - 1 and isinstance(node, dict)):
            break  # a union member's tag, not a field of the body
        parts.append(str(part))
    return ".".join(parts) or None


def _first_error(exc: ValidationError, body: Any) -> ApiError:
    err = exc.errors(include_url=False)[0]
    loc = _param_path(body, tuple(err["loc"]), err.get("type") == "missing")
    msg = err.get("msg", "invalid value")
    if loc:
        msg = f"{loc}: {msg}"
    return bad_request(msg, param=loc)


def validate_as(schema: type[_M], body: Any) -> _M:
    """``body`` (parsed JSON) as ``schema``, or :class:`ApiError` 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        raise _first_error(exc, body) from None


def validate(endpoint: Endpoint, body: Any) -> SamplingFields:
    """Validate a parsed JSON body; raise :class:`ApiError` 400 naming the first bad field."""
    req = validate_as(_MODELS[endpoint], body)
    if isinstance(req, CompletionRequest):
        if req.prompt is None and body.get("prompt_embeds") is None:
            raise bad_request("either `prompt` or `prompt_embeds` must be provided", param="prompt")
        if isinstance(req.prompt, list) and len(req.prompt) == 0:
            raise bad_request("prompt must not be empty", param="prompt")
    if isinstance(req, ResponsesRequest):
        if req.previous_response_id is not None:
            raise bad_request("previous_response_id is not served: a stored response lives on the one instance that "
                              "answered it, and prefill and decode are two. Send the conversation in `input` (or "
                              "vLLM's previous_input_messages) instead", param="previous_response_id")
        if req.background:
            raise bad_request("background responses are not served through the scheduler (they are stored on one "
                              "instance); send them to an instance directly", param="background")
    if req.best_of is not None and req.best_of < (req.n or 1):
        raise bad_request("best_of must be greater than or equal to n", param="best_of")
    if body.get("kv_transfer_params") is not None:
        # the decode instance's connector would act on them: a client must not point it at hosts
        raise bad_request("kv_transfer_params are set by the scheduler, which pairs the prefill and "
                          "decode instances itself; leave them out (to drive a hand-over yourself, "
                          "send them to the instances directly)", param="kv_transfer_params")
    if endpoint in ("responses", "messages"):
        return req  # (vLLM's responses and messages requests have no min_tokens or stream_options to check)
    limit = max_tokens_of(endpoint, req) or (None if endpoint == "chat" else 16)  # vLLM's defaults
    if req.min_tokens and limit is not None and req.min_tokens > limit:
        raise bad_request(f"min_tokens must be less than or equal to max_tokens={limit}, got {req.min_tokens}.",
                          param="min_tokens")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options can only be set when stream is true", param="stream_options")
    return req


def prompt_text_for_routing(endpoint: Endpoint, body: dict[str, Any], limit: int) -> str | bytes:
    """The first ``limit`` characters of what the prefill instance will see first.

    Used by prefix-affinity: requests sharing this prefix go to the same prefill instance, where
    vLLM's prefix cache already holds its KV. For chat, role and content of the leading messages
    stand in for the rendered chat template (the template is a deterministic function of them).
    """
    endpoint, body = chat_view(endpoint, body)
    if endpoint == "chat":
        parts: list[str] = []
        size = 0
        for m in body.get("messages") or ():
            content = m.get("content")
            if not isinstance(content, str):
                content = repr(content)
            piece = f"<{m.get('role')}>{content}"
            parts.append(piece)
            size += len(piece)
            if size >= limit:
                break
        return "".join(parts)[:limit]
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt[:limit]
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):
            return first[:limit]
        if isinstance(first, int):
            return repr(prompt[:limit])
        if isinstance(first, list):
            return repr(first[:limit])
    return ""


# vLLM runs these tools between engine turns of one response, each turn with the request's
# kv_transfer_params: a later turn would pull KV the prefill side has freed
_BUILTIN_TOOLS = frozenset({"web_search_preview", "code_interpreter", "container", "mcp"})


def decode_only_reason(endpoint: Endpoint, body: dict[str, Any]) -> str | None:
    """Why a request must skip the prefill instance, or None.

    ``batch``: several prompts in one completion request. vLLM returns the KV handle of the first
    prompt only, so the others' prefilled blocks would wait on the prefill side until their lease
    expires, and the decode instance computes those prompts anyway. ``prompt_logprobs`` (also
    ``echo`` with logprobs, which vLLM turns into them): vLLM reads no external (or cached) KV for
    such a request; the prefill would be computed twice. ``builtin_tools``: a response that runs
    vLLM's built-in tools takes several engine turns (see ``_BUILTIN_TOOLS``)."""
    if body.get("prompt_logprobs") is not None:
        return "prompt_logprobs"
    if endpoint == "responses" and any(isinstance(t, dict) and t.get("type") in _BUILTIN_TOOLS
                                       for t in body.get("tools") or ()):
        return "builtin_tools"
    # vLLM turns echo into prompt logprobs: completions with logprobs, chat always (top_logprobs is 0 by default)
    if body.get("echo") is True and (endpoint == "chat" or body.get("logprobs") is not None):
        return "prompt_logprobs"
    prompt = body.get("prompt") if endpoint != "chat" else None
    if isinstance(prompt, list) and len(prompt) > 1 and any(isinstance(p, (str, list)) for p in prompt):
        return "batch"  # (a list of numbers is one prompt's token ids)
    return None


def estimate_prompt_tokens(endpoint: Endpoint, body: dict[str, Any], chars_per_token: float) -> tuple[int, bool]:
    """(token count, exact?) of the prompt without a tokenizer.

    Token-id prompts are exact. For text the count is len/chars_per_token: a lower bound when
    ``chars_per_token`` is an upper bound on the characters one token covers, which is how the
    max-model-len check uses it (it must never reject a prompt that fits).
    """
    endpoint, body = chat_view(endpoint, body)
    if endpoint == "chat":
        chars = 0
        for m in body.get("messages") or ():
            c = m.get("content")
            if isinstance(c, str):
                chars += len(c)
            elif isinstance(c, list):
                for part in c:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        chars += len(part["text"])
        return int(chars / chars_per_token), False
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return int(len(prompt) / chars_per_token), False
    if isinstance(prompt, list) and prompt:
        if isinstance(prompt[0], int):
            return len(prompt), True
        if isinstance(prompt[0], list):
            return max(len(p) for p in prompt), True
        if isinstance(prompt[0], str):
            return int(max(len(p) for p in prompt) / chars_per_token), False
    return 0, False


def normalize_flags(body: dict[str, Any], req: SamplingFields) -> bool:
    """Write lax-parsed flags (``"stream": "true"``) back as JSON booleans; True when the body changed.

    vLLM parses them the same lax way, but the scheduler reads some of them from the body, where
    the string "false" would be truthy."""
    changed = False
    if body.get("stream") is not None and type(body["stream"]) is not bool:
        body["stream"], changed = bool(req.stream), True
    opts = body.get("stream_options")
    if isinstance(opts, dict) and req.stream_options is not None:
        for key in ("include_usage", "continuous_usage_stats"):
            if opts.get(key) is not None and type(opts[key]) is not bool:
                opts[key], changed = bool(getattr(req.stream_options, key)), True
    return changed


def max_tokens_of(endpoint: Endpoint, req: SamplingFields) -> int | None:
    """The output bound the request asks for (``max_completion_tokens`` exists only for chat: on
    the other endpoints it is an unknown, unvalidated pass-through field)."""
    if endpoint == "chat":
        return req.max_completion_tokens or req.max_tokens  # type: ignore[attr-defined]
    if isinstance(req, ResponsesRequest):
        return req.max_output_tokens
    return req.max_tokens


def check_length(endpoint: Endpoint, req: SamplingFields, body: dict[str, Any], max_model_len: int | None,
                 chars_per_token: float) -> int:
    """Reject prompts that leave no room in the model's context, and max_tokens beyond it; return
    the prompt's token estimate."""
    est, exact = estimate_prompt_tokens(endpoint, body, chars_per_token)
    if not max_model_len:
        return est
    max_tokens = max_tokens_of(endpoint, req)
    if max_tokens is not None and max_tokens > max_model_len:
        name = "max_output_tokens" if endpoint == "responses" else "max_tokens"
        raise bad_request(f"{name}={max_tokens} is larger than the model's context length ({max_model_len} tokens)",
                          param=name)
    # like vLLM 0.32, max_tokens is cut to what the context leaves; only a prompt that leaves no room
    # for one token is refused (a response with truncation "auto": vLLM drops the oldest input)
    if est >= max_model_len and not (endpoint == "responses" and body.get("truncation") == "auto"):
        what = f"{est} prompt tokens" if exact else f"at least {est} prompt tokens (estimated)"
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{what}, which leaves no room for an answer. Please reduce the length of the prompt.",
            param={"chat": "messages", "messages": "messages", "responses": "input"}.get(endpoint, "prompt"),
        )
    return est
