"""A TCP proxy in front of a real decode instance that cuts its first streamed answer mid-way:
the connection drops after a few SSE events, as when a decode host dies (a test double)."""

from __future__ import annotations

import socket
import threading


class CutProxy:
    """Forwards 127.0.0.1:``port`` to ``target``. The first response to a streamed POST is cut
    after ``events`` SSE events (both sides closed); everything else passes unchanged."""

    def __init__(self, target_port: int, events: int = 4) -> None:
        self.target_port = target_port
        self.events = events
        self.cuts = 0
        self.before_cut = b""  # what the cut answer delivered (its complete events reached the client)
        self._lock = threading.Lock()
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def events_before_cut(self) -> int:
        """Complete SSE events the cut answer delivered (a partial one is dropped by its reader)."""
        body = self.before_cut.split(b"\r\n\r\n", 1)[-1]  # after the HTTP headers
        return body[: body.rfind(b"\n\n") + 2].count(b"data: {")

    def close(self) -> None:
        self._srv.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            state = {"streaming": False}
            threading.Thread(target=self._up, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, state), daemon=True).start()

    def _up(self, src: socket.socket, dst: socket.socket, state: dict) -> None:
        while data := self._recv(src):
            if b'"stream":true' in data:  # the streamed POST's body (health checks have none)
                state["streaming"] = True
            try:
                dst.sendall(data)
            except OSError:
                break
        self._close(src, dst)

    def _down(self, src: socket.socket, dst: socket.socket, state: dict) -> None:
        seen = 0
        sent = b""
        while data := self._recv(src):
            if state["streaming"]:
                seen += data.count(b"data: ")
                sent += data
                with self._lock:
                    cut = seen >= self.events and self.cuts == 0
                    if cut:
                        self.cuts += 1
                        self.before_cut = sent
                if cut:  # forward what came so far, then drop the connection
                    try:
                        dst.sendall(data)
                    except OSError:
                        pass
                    break
            try:
                dst.sendall(data)
            except OSError:
                break
        self._close(src, dst)

    @staticmethod
    def _recv(sock: socket.socket) -> bytes:
        try:
            return sock.recv(65536)
        except OSError:
            return b""

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
