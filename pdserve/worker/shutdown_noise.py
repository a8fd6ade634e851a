"""vLLM's known shutdown noise, left out of a stopping daemon's log.

On every stop, vLLM 0.32 (CPU) prints ~35-60 lines that report nothing wrong: nanobind's leak
report for triton's bindings, ``resource_tracker`` warnings about its own shared memory, and,
when its output handler sees the engine core exit first, an ``AsyncLLM output_handler failed.``
record whose traceback ends in ``EngineDeadError``. Operators read them as a crash. Once the
daemon has asked the server to stop, those lines (and only those) are counted instead of printed.
The output handler's record is held until its last line shows what it is: only lines that carry
that record's own prefix are held (vLLM prefixes every line of a multi-line record), everything
else passes at once, and the record is printed in full unless it ends in ``EngineDeadError``.
Nothing is hidden before the stop, and the daemon's failure report (the last lines of the log)
still has every line.
"""

from __future__ import annotations

import re
import threading

SHOW_ENV = "PDSERVE_SHOW_SHUTDOWN_NOISE"

_NOISE = re.compile(
    r"nanobind: |^ - leaked |^ - \.\.\. skipped remainder"
    r"|resource_tracker: There appear to be \d+ leaked|^\s+warnings\.warn\('resource_tracker: ")
# nanobind ends its report with this URL and no newline: whatever comes next is on the same line
_NANOBIND_URL = re.compile(r"^See https://nanobind\.readthedocs\.io/\S*?refleaks\.html")
_HANDLER_FAILED = "AsyncLLM output_handler failed"
_ENGINE_DEAD = "EngineDeadError"
_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")
_MAX_HELD = 400  # a record longer than this is printed as it comes


class ShutdownNoise:
    """A line filter for the log tee: ``lines(line)`` returns the lines to print now. Thread-safe:
    the tee thread filters while the daemon's main thread may ``flush`` at the end."""

    def __init__(self) -> None:
        self.stopping = False
        self.hidden = 0
        self.kinds: dict[str, None] = {}  # what was left out, in order of first appearance
        self._held: list[str] = []  # the output handler's record, until its exception line
        self._prefix = ""  # that record's per-line prefix
        self._lock = threading.Lock()

    def lines(self, line: str) -> list[str]:
        with self._lock:
            return self._lines(line)

    def flush(self) -> list[str]:
        """What is still held when the output ends (a record that never finished)."""
        with self._lock:
            held, self._held = self._held, []
            return held

    def _lines(self, line: str) -> list[str]:
        if not self.stopping:
            return [line]
        if self._held and line.startswith(self._prefix):
            self._held.append(line)
            if _EXCEPTION_LINE.match(line[len(self._prefix):]):
                held, self._held = self._held, []
                if _ENGINE_DEAD in line:
                    self._hide(len(held), "an EngineDeadError traceback after the engine stopped")
                    return []
                return held
            if len(self._held) > _MAX_HELD:
                held, self._held = self._held, []
                return held
            return []
        at = line.find(_HANDLER_FAILED)
        if at >= 0 and not self._held:
            self._prefix, self._held = line[:at], [line]
            return []
        url = _NANOBIND_URL.match(line)
        if url:
            rest = line[url.end():]
            self._hide(0 if rest.strip() else 1, "nanobind leak reports")
            return self._lines(rest) if rest.strip() else []
        if _NOISE.search(line):
            self._hide(1, "resource_tracker warnings" if "resource_tracker" in line else "nanobind leak reports")
            return []
        return [line]

    def _hide(self, n: int, kind: str) -> None:
        self.hidden += n
        self.kinds[kind] = None

    def summary(self, name: str) -> str | None:
        if not self.hidden:
            return None
        return (f"pdserve serve: {name}: left out {self.hidden} lines of vLLM's usual shutdown noise "
                f"({', '.join(self.kinds)}); {SHOW_ENV}=1 shows them")
