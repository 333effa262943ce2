"""An https upstream for the tests: TLS on loopback with a self-signed certificate (made by
the openssl command), relaying each connection to a plain HTTP upstream."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import threading


class TLSRelay:
    def __init__(self, directory, upstream_host: str, upstream_port: int):
        openssl = shutil.which("openssl")
        if openssl is None:
            raise RuntimeError("openssl is not installed")
        self.certificate = os.path.join(directory, "relay-cert.pem")
        key = os.path.join(directory, "relay-key.pem")
        subprocess.run(
            [
                openssl,
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                key,
                "-out",
                self.certificate,
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(self.certificate, key)
        self.upstream = (upstream_host, upstream_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            secure = self.context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError):
            client.close()  # the client refused our certificate
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            secure.close()
            return
        back = threading.Thread(target=_pipe, args=(upstream, secure), daemon=True)
        back.start()
        _pipe(secure, upstream)
        back.join(30)
        # Closed once both directions are done, never while the other thread may still read:
        # an fd closed under an SSL read is reused by the next socket the process opens, and
        # the SSL object then reads that socket's bytes (seen: a test's HTTP answer lost its
        # first 19 bytes).
        for sock in (secure, upstream):
            try:
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        self._closed.set()
        self.server.close()


def _pipe(source: socket.socket, target: socket.socket) -> None:
    """One direction, until the source ends; then a plain target hears the end (its write
    side shut down, so the other direction ends too; a TLS one learns it when its client
    closes)."""
    try:
        while chunk := source.recv(65536):
            target.sendall(chunk)
    except OSError:
        pass
    if not isinstance(target, ssl.SSLSocket):
        try:
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass
