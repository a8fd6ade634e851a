"""A child process that cannot be orphaned: own process group, log tee, bounded stop.

Used by the role daemon (one vLLM server) and by ``pdserve up`` (several daemons). vLLM forks
engine-core and TP worker processes; they stay in the child's process group, so signals go to the
whole group, and after the deadline every descendant seen while running is killed. On Linux the
child also gets SIGTERM if its parent dies (PR_SET_PDEATHSIG), so even a SIGKILLed daemon leaves
nothing running.
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Protocol

PR_SET_PDEATHSIG = 1


try:  # loaded here, in the parent: the pre-exec hook must not dlopen in a forked child
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True) if sys.platform.startswith("linux") else None
except OSError:  # pragma: no cover - non-glibc Linux
    _LIBC = None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _descendants(pid: int) -> list:
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - gone already, or psutil missing: nothing to add
        return []


class LineFilter(Protocol):
    """Decides which of the child's lines are printed (all of them are kept for ``tail``)."""

    def lines(self, line: str) -> list[str]: ...  # what to print now for this line

    def flush(self) -> list[str]: ...  # what to print when the output ends


class ManagedProcess:
    """One child in its own session; its output is copied line by line with a prefix."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
                 prefix: str | None = None, out: IO[str] | None = None, ring: int = 40,
                 on_line: Callable[[str], None] | None = None, cwd: str | None = None,
                 line_filter: LineFilter | None = None) -> None:
        self.name = name
        self.line_filter = line_filter
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.prefix = f"[{name}] " if prefix is None else prefix
        self.out = out
        self.lines: collections.deque[str] = collections.deque(maxlen=ring)
        self.on_line = on_line
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._known: dict[int, object] = {}  # pid -> psutil.Process seen while running
        self._tee: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "ManagedProcess":
        self.proc = subprocess.Popen(
            self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent if _LIBC is not None else None)
        self._tee = threading.Thread(target=self._copy, name=f"tee-{self.name}", daemon=True)
        self._tee.start()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def remember_descendants(self) -> None:
        """Record the child's current descendants (called periodically and before stopping)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for p in _descendants(self.proc.pid):
            self._known.setdefault(p.pid, p)

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # the child leads its own session: pgid == pid
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, deadline_s: float, sig: int = signal.SIGTERM) -> int | None:
        """SIGTERM the server, wait up to the deadline, then SIGKILL the group and all descendants.

        Only the server itself gets the first signal: it drains and then stops its engine
        processes in order. Signalled together, the engine died under the draining server
        (requests cut, an ``EngineDeadError`` traceback in the log). Leftovers are reaped after.
        """
        if self.proc is None:
            return None
        self.remember_descendants()
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass
            self.wait(max(0.0, deadline_s))
        if self.proc.poll() is None:
            self.signal_group(signal.SIGKILL)
            self.wait(10)
        self.reap_group(grace_s=min(5.0, max(0.5, deadline_s)))
        self.join_tee(2.0)
        return self.proc.poll()

    def reap_group(self, grace_s: float = 2.0) -> None:
        """After the child is gone: stragglers of its group/descendants get SIGTERM, then SIGKILL."""
        if self.proc is None:
            return
        self.signal_group(signal.SIGTERM)
        end = time.monotonic() + grace_s
        while time.monotonic() < end and self._alive_leftovers():
            time.sleep(0.1)
        if self._alive_leftovers():
            self.signal_group(signal.SIGKILL)
            for p in self._known.values():
                try:
                    p.kill()  # type: ignore[attr-defined]
                except Exception:  # noqa: BLE001
                    pass

    def _alive_leftovers(self) -> bool:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, 0)
            group = True
        except (ProcessLookupError, PermissionError):
            group = False
        others = False
        for p in self._known.values():
            try:
                others |= p.is_running() and p.status() != "zombie"  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001
                pass
        return group or others

    def join_tee(self, timeout: float) -> None:
        if self._tee is not None:
            self._tee.join(timeout)

    # -- output ----------------------------------------------------------------------------
    def _copy(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            with self._lock:
                self.lines.append(line)
            if self.on_line is not None:
                self.on_line(line)
            self._print(self.line_filter.lines(line) if self.line_filter is not None else [line])
        self.flush_filter()
        self.proc.stdout.close()

    def flush_filter(self) -> None:
        """Print what the line filter still holds (also called when the output has not ended yet)."""
        if self.line_filter is not None:
            self._print(self.line_filter.flush())

    def _print(self, lines: list[str]) -> None:
        if not lines:
            return
        out = self.out if self.out is not None else sys.stdout
        try:
            out.write("".join(f"{self.prefix}{line}\n" for line in lines))
            out.flush()
        except (OSError, ValueError):  # closed terminal: keep draining the pipe regardless
            pass

    def tail(self, n: int | None = None) -> list[str]:
        with self._lock:
            lines = list(self.lines)
        return lines if n is None else lines[-n:]
