"""Plain servers on loopback for the relay's tests: an HTTP/1.1 origin that keeps every request
head it gets, and a TCP listener that records every byte and answers nothing useful."""

from __future__ import annotations

import http.server
import socket
import threading


class KeepAliveOrigin:
    """An HTTP/1.1 origin on loopback answering keep-alive requests with a small body, and
    keeping every request head it received, as received."""

    def __init__(self, body: bytes):
        heads = self.heads = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                heads.append(self.requestline + "\r\n" + str(self.headers))
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class RecordingListener:
    """Accepts connections on loopback, records every byte, answers nothing useful."""

    def __init__(self, answer_after: bytes = b"\r\n\r\n"):
        self.answer_after = answer_after  # what ends a request: its head, or a chunked body
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.received = bytearray()
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            connection.settimeout(2)
            try:
                while chunk := connection.recv(65536):
                    self.received += chunk
                    if self.answer_after in self.received:
                        connection.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                        break
            except OSError:
                pass
            finally:
                connection.close()

    def url(self, path="/live/x.ts") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self):
        self.server.close()
