"""A SOCKS5 proxy for the tests (RFC 1928, with RFC 1929 username/password): loopback only,
CONNECT only, standard library only. Every request it sees is recorded in `requests`."""

from __future__ import annotations

import selectors
import socket
import threading
import time

HANDSHAKE_TIMEOUT = 10.0  # seconds, per socket operation until the relay starts
MAX_CLIENTS = 64  # connections beyond this are closed at once
_POLL = 0.25  # how often the loops look at the closed flag

# RFC 1928 reply codes
_SUCCEEDED = 0x00
_HOST_UNREACHABLE = 0x04
_CONNECTION_REFUSED = 0x05
_COMMAND_NOT_SUPPORTED = 0x07
_ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class Socks5Server:
    def __init__(
        self,
        username: str | None = None,
        password: str | None = None,
        host: str = "127.0.0.1",
        names: dict[str, str] | None = None,
    ):
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        self.names = dict(names or {})  # what this proxy's own DNS answers (name -> address)
        self.username = username
        self.password = password
        self.requests: list[dict] = []  # appended under _lock; read freely
        self.auth_failures = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._handlers: set[threading.Thread] = set()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.server = socket.create_server((host, 0), family=family)
        self.server.settimeout(_POLL)
        self.host = host
        self.port = self.server.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, daemon=True, name=f"socks5-accept-{self.port}")
        self._acceptor.start()

    # -- public ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting, end every open relay and handshake, and close their sockets."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            sockets = list(self._sockets)
            handlers = list(self._handlers)
        for sock in sockets:  # wakes any thread blocked in recv/send on them
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self.server.shutdown(socket.SHUT_RDWR)  # wakes accept() at once on Linux
        except OSError:
            pass
        deadline = time.monotonic() + 2
        self._acceptor.join(max(0.0, deadline - time.monotonic()))
        self.server.close()
        for thread in handlers:  # they close their own sockets on the way out
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:  # whatever a straggler still holds
            sockets = list(self._sockets)
            self._sockets.clear()
        for sock in sockets:
            _close(sock)

    def __enter__(self) -> "Socks5Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- bookkeeping ----------------------------------------------------------------------

    def _track(self, sock: socket.socket) -> bool:
        with self._lock:
            if self._closed.is_set():
                return False
            self._sockets.add(sock)
            return True

    def _release(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        _close(sock)

    def _record(self, atyp: str, host: str, port: int, user: str | None, ok: bool) -> None:
        with self._lock:
            self.requests.append({"atyp": atyp, "host": host, "port": port, "user": user, "ok": ok})

    # -- accepting ------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                refuse = self._closed.is_set() or len(self._handlers) >= MAX_CLIENTS
                if not refuse:
                    self._sockets.add(client)
                    thread = threading.Thread(
                        target=self._handle, args=(client,), daemon=True, name=f"socks5-client-{self.port}"
                    )
                    self._handlers.add(thread)
                    thread.start()  # under the lock, so close() never sees it unstarted
            if refuse:
                _close(client)

    def _handle(self, client: socket.socket) -> None:
        upstream = None
        try:
            client.settimeout(HANDSHAKE_TIMEOUT)
            upstream = self._negotiate(client)
            if upstream is not None:
                self._relay(client, upstream)
        except (OSError, ValueError):
            pass
        finally:
            self._release(client)
            if upstream is not None:
                self._release(upstream)
            with self._lock:
                self._handlers.discard(threading.current_thread())

    # -- the protocol ---------------------------------------------------------------------

    def _negotiate(self, client: socket.socket) -> socket.socket | None:
        """The greeting, the authentication and the request. Returns the connected upstream
        socket, or None when the client has been answered with a refusal."""
        version, count = _recv_exact(client, 2)
        if version != 5:
            return None
        methods = _recv_exact(client, count)
        wanted = 0x02 if self.username is not None else 0x00
        if wanted not in methods:
            client.sendall(b"\x05\xff")
            return None
        client.sendall(bytes([5, wanted]))
        user = None
        if wanted == 0x02:
            user = self._authenticate(client)
            if user is None:
                return None

        version, command, _reserved, atyp_code = _recv_exact(client, 4)
        if version != 5:
            return None
        if atyp_code == 1:
            atyp, host = "ipv4", socket.inet_ntop(socket.AF_INET, _recv_exact(client, 4))
        elif atyp_code == 3:
            length = _recv_exact(client, 1)[0]
            atyp, host = "domain", _recv_exact(client, length).decode("utf-8", "replace")
        elif atyp_code == 4:
            atyp, host = "ipv6", socket.inet_ntop(socket.AF_INET6, _recv_exact(client, 16))
        else:
            _reply(client, _ADDRESS_TYPE_NOT_SUPPORTED)
            return None
        port = int.from_bytes(_recv_exact(client, 2), "big")

        if command != 1:  # BIND and UDP ASSOCIATE are not offered
            self._record(atyp, host, port, user, False)
            _reply(client, _COMMAND_NOT_SUPPORTED)
            return None
        try:
            upstream = socket.create_connection((self.names.get(host, host), port), timeout=HANDSHAKE_TIMEOUT)
        except ConnectionRefusedError:
            self._record(atyp, host, port, user, False)
            _reply(client, _CONNECTION_REFUSED)
            return None
        except (OSError, UnicodeError):  # unresolvable, unreachable, timed out
            self._record(atyp, host, port, user, False)
            _reply(client, _HOST_UNREACHABLE)
            return None
        if not self._track(upstream):  # close() came while we were connecting
            _close(upstream)
            return None
        self._record(atyp, host, port, user, True)
        try:
            bound = upstream.getsockname()
            _reply(client, _SUCCEEDED, upstream.family, bound[0], bound[1])
        except OSError:
            self._release(upstream)
            raise
        return upstream

    def _authenticate(self, client: socket.socket) -> str | None:
        """RFC 1929. Returns the username on success; on failure answers 0x01 and returns None."""
        version, length = _recv_exact(client, 2)
        name = _recv_exact(client, length)
        length = _recv_exact(client, 1)[0]
        secret = _recv_exact(client, length)
        user = name.decode("utf-8", "replace")
        if version == 1 and user == self.username and secret.decode("utf-8", "replace") == self.password:
            client.sendall(b"\x01\x00")
            return user
        with self._lock:
            self.auth_failures += 1
        client.sendall(b"\x01\x01")
        return None

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        """Copy bytes both ways. An end of stream on one side is passed on as a half close;
        the relay ends when both directions have ended, on any error, or on close()."""
        client.settimeout(None)
        upstream.settimeout(None)
        with selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ, upstream)
            selector.register(upstream, selectors.EVENT_READ, client)
            open_directions = 2
            while open_directions and not self._closed.is_set():
                for key, _ in selector.select(_POLL):
                    source, target = key.fileobj, key.data
                    chunk = source.recv(65536)
                    if chunk:
                        target.sendall(chunk)
                        continue
                    selector.unregister(source)
                    open_directions -= 1
                    try:
                        target.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the client closed during the handshake")
        data += chunk
    return data


def _reply(
    client: socket.socket, code: int, family: int = socket.AF_INET, address: str = "0.0.0.0", port: int = 0
) -> None:
    if family == socket.AF_INET6:
        packed = b"\x04" + socket.inet_pton(socket.AF_INET6, address.split("%")[0])
    else:
        packed = b"\x01" + socket.inet_pton(socket.AF_INET, address)
    client.sendall(bytes([5, code, 0]) + packed + port.to_bytes(2, "big"))


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
