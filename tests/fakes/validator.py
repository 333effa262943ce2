"""The operator's viewer validator (auth_url) for the tests: what nginx's auth_request asks."""

from __future__ import annotations

import http.server
import threading


class Validator:
    """The operator's validator on loopback: ``good_token`` may watch the channels in
    ``allowed``; no token 401, any other 403.  Every call is recorded."""

    def __init__(self, allowed: set[str], good_token: str):
        calls = self.calls = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                token = self.headers.get("X-Streamkeeper-Token", "")
                channel = self.headers.get("X-Streamkeeper-Channel", "")
                calls.append((token, channel, self.headers.get("X-Original-URI", "")))
                status = 401 if not token else 200 if token == good_token and channel in allowed else 403
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/validate"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
