"""Per-deployment request shaping: model aliases, default sampling parameters, a system prompt.

All three edit the client's JSON object before it is validated and forwarded; when none applies
to a request its bytes are forwarded untouched (the fast path). Kept apart from the flow so the
rules are in one place:

- **model aliases**: clients may call the model by any ``--served-model-name``; the instances are
  called with their own served name (learned at start-up), and the answers carry the name the
  client used (``"model"`` is rewritten in the JSON answer and in every SSE event).
- **defaults**: applied only when the request does not have the key at all. An explicit JSON
  ``null`` counts as set (the client asked for the engine's default) and is left alone.
- **system prompt** (chat only): ``if-missing`` adds it when no message has role ``system``;
  ``prepend`` puts it before any existing one; ``replace`` removes existing system messages.
  A fixed system prompt is the prefix every chat request shares: with prefix-affinity routing it
  lands on the same prefill instance, which computes it once and serves it from its prefix cache
  afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from pdserve.errors import ConfigError
from pdserve.scheduler.config import SchedulerConfig
from pdserve.scheduler.relay import dumps

_NOT_DEFAULTABLE = frozenset({"model", "prompt", "messages", "stream", "stream_options", "kv_transfer_params",
                              "prompt_embeds"})


def check_defaults(defaults: dict[str, Any], source: str) -> None:
    """Reject defaults that could never be valid in a request (checked once, at start-up)."""
    from pdserve.scheduler.models import SamplingFields

    for key in defaults:
        if key in _NOT_DEFAULTABLE:
            raise ConfigError(source, f"defaults.{key}", "is part of the request, not a sampling default",
                              f"remove {key} from the defaults")
    try:
        SamplingFields.model_validate(defaults)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        key = ".".join(str(p) for p in err["loc"])
        raise ConfigError(source, f"defaults.{key}", f"{err.get('input')!r}: {err.get('msg')}",
                          f"give {key} a value vLLM accepts (e.g. temperature in [0, 2], top_p in (0, 1])") from None


@dataclass(slots=True)
class Shaped:
    changed: bool  # the body was edited: forward a re-serialised copy, not the client's bytes
    answer_model: str | None  # the name the answer must carry (None: leave the instance's name)


class RequestShaper:
    def __init__(self, cfg: SchedulerConfig) -> None:
        self.upstream = cfg.upstream_model
        self.aliases = frozenset(cfg.served_model_names)
        self.primary = cfg.served_model_names[0] if cfg.served_model_names else None
        self.defaults = dict(cfg.defaults)
        self.system_prompt = cfg.system_prompt
        self.mode = cfg.system_prompt_mode
        renames = bool(self.upstream and self.aliases - {self.upstream})
        self.active = renames or bool(self.defaults) or bool(self.system_prompt)

    def upstream_bytes(self) -> bytes | None:
        return b'"model":' + dumps(self.upstream) if self.upstream else None

    def shape(self, endpoint: str, body: Any) -> Shaped:
        """Edit ``body`` in place. A body that is not a JSON object is left to validation."""
        if not self.active or not isinstance(body, dict):
            return Shaped(False, None)
        changed = False
        answer: str | None = None
        model = body.get("model")
        if self.upstream:
            if isinstance(model, str) and model in self.aliases:
                if model != self.upstream:
                    body["model"] = self.upstream
                    changed = True
                    answer = model
            elif model is None and self.primary and self.primary != self.upstream:
                answer = self.primary
        for key, value in self.defaults.items() if endpoint in ("chat", "completions", "generate") else ():
            if key not in body:
                if key == "max_tokens" and "max_completion_tokens" in body:
                    continue
                body[key] = value
                changed = True
        if self.system_prompt and (endpoint == "chat" or (endpoint == "tokenize" and "messages" in body)):
            changed |= self._system(body)
        return Shaped(changed, answer)

    def _system(self, body: dict[str, Any]) -> bool:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            return False
        ours = {"role": "system", "content": self.system_prompt}
        has_system = any(m.get("role") == "system" for m in msgs)
        if self.mode == "if-missing":
            if has_system:
                return False
            body["messages"] = [ours, *msgs]
        elif self.mode == "prepend":
            body["messages"] = [ours, *msgs]
        else:  # replace
            body["messages"] = [ours, *(m for m in msgs if m.get("role") != "system")]
        return True
