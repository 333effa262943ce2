"""A TCP forwarder the test owns, between a host's services and Redis: ``cut()`` is a network
partition (every connection through it closed, new ones closed at once), ``heal()`` ends it.
Loopback only; threads; stopped with ``close()``."""

from __future__ import annotations

import socket
import threading


class TcpForwarder:
    def __init__(self, target_port: int, host: str = "127.0.0.1"):
        """``target_port`` may be set later (``target``), before the first connection."""
        if host not in ("127.0.0.1", "::1"):
            raise ValueError("the forwarder listens on loopback only")
        self.target = (host, target_port)
        self.listener = socket.create_server((host, 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._cut = False
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="forwarder").start()

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            for sock in self._sockets:
                _close(sock)
            self._sockets.clear()

    def heal(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        _close(self.listener)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                if self._cut:
                    _close(client)
                    continue
            try:
                server = socket.create_connection(self.target, timeout=2)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._sockets |= {client, server}
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            with self._lock:
                self._sockets -= {source, sink}
            _close(source)
            _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
