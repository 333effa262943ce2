"""What the launcher and the egress relay share on this host: tickets and refusals.

Before it starts a channel's FFmpeg, the launcher writes a *ticket*,
``<state_dir>/egress/<id>.json`` (mode 0600): a fresh token and the proxy the
channel's traffic must take.  FFmpeg gets ``http_proxy=http://<id>:<token>@<egress_listen>``
in its environment (never in its argv, which every local user can read), so every
connection it makes, redirects and HLS segments included, goes to the relay, which
finds the ticket by the id and the token.

When the relay refuses a connection (an address upstream_deny forbids, a proxy that
cannot be used) or cannot make it (the upstream does not answer), it writes
``<id>.refused`` beside the ticket: the launcher reads it to give the player the true
reason instead of FFmpeg's "HTTP error 403" or "502".

Files, not Redis: they are this host's business, and they outlive a restart of the
launcher, of the relay and of Redis alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import secrets
import socket
import time

from . import files, keys

TICKET_DIR = "egress"
PROXY_ENV_NAMES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")
CONNECTIONS_PATH = "/connections"  # the relay's own status route (origin-form GET)
# Seconds the launcher gives the relay to answer whether it is up: a relay that is down is
# refused at once, so a generous bound costs nothing then, and a busy host is not taken for
# one whose relay is down.
RELAY_CHECK_TIMEOUT = 3.0


def ticket_dir(state_dir: str) -> str:
    return os.path.join(state_dir, TICKET_DIR)


def ticket_path(state_dir: str, channel_id: str) -> str:
    return os.path.join(ticket_dir(state_dir), f"{keys.check_channel_id(channel_id)}.json")


def refusal_path(state_dir: str, channel_id: str) -> str:
    return os.path.join(ticket_dir(state_dir), f"{keys.check_channel_id(channel_id)}.refused")


def write_ticket(state_dir: str, channel_id: str, proxy: str | None, provider: str | None = None) -> str:
    """A new ticket for the channel's next FFmpeg (or resolver): its proxy, and the provider
    whose connection slot it holds; returns its token."""
    os.makedirs(ticket_dir(state_dir), mode=0o700, exist_ok=True)
    token = secrets.token_hex(16)
    files.write_atomic(
        ticket_path(state_dir, channel_id),
        json.dumps({"token": token, "proxy": proxy or "", "provider": provider or "", "written": time.time()}).encode(),
        mode=0o600,
    )
    return token


def read_ticket(state_dir: str, channel_id: str) -> dict | None:
    try:
        with open(ticket_path(state_dir, channel_id), "rb") as handle:
            data = json.loads(handle.read(8192))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("token"), str):
        return None
    return data


def delete_ticket(state_dir: str, channel_id: str) -> None:
    for path in (ticket_path(state_dir, channel_id), refusal_path(state_dir, channel_id)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def relay_url(egress_listen: str, channel_id: str, token: str) -> str:
    return f"http://{channel_id}:{token}@{egress_listen}"


def ffmpeg_environment(egress_listen: str, channel_id: str, token: str, base: dict | None = None) -> dict[str, str]:
    """FFmpeg's environment: the relay as its only proxy; no other proxy variable, no
    no_proxy (nothing may bypass the relay)."""
    environment = {k: v for k, v in (os.environ if base is None else base).items() if k.lower() not in PROXY_ENV_NAMES}
    environment["http_proxy"] = relay_url(egress_listen, channel_id, token)
    return environment


class RefusalKind(enum.StrEnum):
    """Why the relay refused a connection of a stream (the note's ``kind``, and the
    X-Streamkeeper-Refused header); ``text`` is the class of failure a player sees."""

    ADDRESS = "address"  # an address upstream_deny or our own services cover
    PROXY = "proxy"  # the channel's proxy cannot be used (fail closed)
    UNREACHABLE = "unreachable"  # the upstream did not answer
    FENCED = "fenced"  # this host could not renew its Redis lease: it pulls nothing (streamstate.lease)

    @property
    def text(self) -> str:
        return _REFUSAL_TEXT[self]


_REFUSAL_TEXT = {
    RefusalKind.ADDRESS: "upstream address not allowed",
    RefusalKind.PROXY: "upstream proxy unusable",
    RefusalKind.UNREACHABLE: "upstream unreachable",
    RefusalKind.FENCED: "host fenced: its Redis lease lapsed",
}


@dataclasses.dataclass(frozen=True)
class Refusal:
    kind: RefusalKind
    reason: str


def record_refusal(state_dir: str, channel_id: str, kind: RefusalKind, reason: str) -> None:
    """The relay refused a connection of the channel: a note the launcher reads."""
    with contextlib.suppress(OSError):
        files.write_atomic(
            refusal_path(state_dir, channel_id),
            json.dumps({"kind": kind.value, "reason": reason, "at": time.time()}).encode(),
            mode=0o600,
        )


def read_refusal(state_dir: str, channel_id: str, since: float) -> Refusal | None:
    """The relay's last refusal for the channel, if it came at or after ``since`` (a note
    of an unknown kind reads as the proxy's: fail closed)."""
    try:
        with open(refusal_path(state_dir, channel_id), "rb") as handle:
            data = json.loads(handle.read(8192))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("at"), (int, float)) or data["at"] < since:
        return None
    try:
        kind = RefusalKind(str(data.get("kind")))
    except ValueError:
        kind = RefusalKind.PROXY
    return Refusal(kind, str(data.get("reason", ""))[:300])


def open_connections(egress_listen: str, timeout: float = 2.0) -> dict[str, int] | None:
    """Upstream connections the relay holds open, per channel; None if it does not answer.
    (Blocking, bounded by ``timeout``: async callers run it in a thread.)"""
    data = relay_status(egress_listen, timeout)
    try:
        return None if data is None else {str(k): int(v) for k, v in data.get("channels", {}).items()}
    except (ValueError, TypeError, AttributeError):
        return None


def relay_fenced(egress_listen: str, timeout: float = 2.0) -> bool | None:
    """The relay refuses every connection because this host's lease lapsed (streamstate.lease);
    None if it does not answer."""
    data = relay_status(egress_listen, timeout)
    return None if data is None else data.get("fenced") is True


def relay_status(egress_listen: str, timeout: float = 2.0) -> dict | None:
    """The relay's GET /connections answer (channels, counters, fenced); None if it does not
    answer with one."""
    host, _, port = egress_listen.rpartition(":")
    deadline = time.monotonic() + timeout
    received = b""
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            sock.sendall(f"GET {CONNECTIONS_PATH} HTTP/1.0\r\nHost: relay\r\n\r\n".encode())
            while len(received) < 1 << 20:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
            return None
        data = json.loads(body)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def wait_closed(egress_listen: str, channel_id: str, timeout: float) -> bool:
    """Wait until the relay holds no upstream connection of the channel (its FFmpeg has
    exited; the relay closes the upstream side right after); False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        counts = open_connections(egress_listen, timeout=max(0.1, min(2.0, deadline - time.monotonic())))
        if counts is None or not counts.get(channel_id):  # a relay that is down holds none
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
