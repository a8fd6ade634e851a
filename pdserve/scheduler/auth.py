"""Optional API keys for the scheduler's API.

When keys are configured (``--api-key``, ``PDSERVE_API_KEYS``, ``PDSERVE_API_KEY_FILE``), every
route except ``/health`` (and ``/metrics`` unless ``--protect-metrics``) needs
``Authorization: Bearer <key>`` or ``x-api-key: <key>``; otherwise 401 in the OpenAI error shape.

The comparison is constant-time with respect to the keys: the presented key and every configured
key are hashed to SHA-256 first (equal lengths, so not even a key's length leaks) and compared
with :func:`hmac.compare_digest` against *every* key, with no early exit on a match. Keys are
never logged: the access log has no headers, and error messages never echo what was sent.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping

from pdserve.errors import ConfigError
from pdserve.scheduler.errors import ApiError

OPEN_PATHS = frozenset({"/health", "/ping"})


def read_key_file(path: str) -> list[str]:
    """One key per line; blank lines and ``#`` comments skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ConfigError("PDSERVE_API_KEY_FILE / --api-key-file", None, f"cannot read {path}: {exc.strerror or exc}",
                          "point it at a readable file with one API key per line") from None
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ApiKeys:
    """The configured keys (as digests) and which paths they guard."""

    def __init__(self, keys: Iterable[str], protect_metrics: bool = False) -> None:
        self._digests = [_digest(k) for k in keys if k]
        self.open_paths = OPEN_PATHS if protect_metrics else OPEN_PATHS | {"/metrics"}

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __repr__(self) -> str:  # never show keys, not even their digests
        return f"<ApiKeys {len(self._digests)} key(s)>"

    def protects(self, path: str) -> bool:
        return bool(self._digests) and path not in self.open_paths

    def valid(self, presented: str | None) -> bool:
        if presented is None:
            return False
        d = _digest(presented)
        ok = 0
        for k in self._digests:  # all of them, always: timing does not tell which key matched
            ok |= hmac.compare_digest(d, k)
        return bool(ok)

    @staticmethod
    def presented(headers: Mapping[str, str]) -> str | None:
        auth = headers.get("Authorization")
        if auth:
            scheme, _, token = auth.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
        key = headers.get("x-api-key")
        return key.strip() if key else None

    def check(self, path: str, headers: Mapping[str, str]) -> None:
        """Raise 401 when ``path`` is guarded and no valid key was presented."""
        if not self.protects(path):
            return
        token = self.presented(headers)
        if token is None:
            raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
                           type_="AuthenticationError", headers={"WWW-Authenticate": "Bearer"})
        if not self.valid(token):
            raise ApiError(401, "Incorrect API key provided.", type_="AuthenticationError",
                           headers={"WWW-Authenticate": "Bearer"})


def instance_headers(instance_api_key: str | None) -> dict[str, str]:
    """Headers every request to an instance carries: its own key (vLLM ``--api-key``) if any.
    The client's Authorization header is never forwarded (the scheduler builds its own headers)."""
    return {"Authorization": f"Bearer {instance_api_key}"} if instance_api_key else {}
