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

import asyncio
import contextlib
import json
import os
import secrets
import time

from . import files, keys

TICKET_DIR = "egress"
PROXY_ENV_NAMES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")
CONNECTIONS_PATH = "/connections"        # the relay's own status route (origin-form GET)


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
    files.write_atomic(ticket_path(state_dir, channel_id),
                       json.dumps({"token": token, "proxy": proxy or "", "provider": provider or "",
                                   "written": time.time()}).encode(),
                       mode=0o600)
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


def ffmpeg_environment(egress_listen: str, channel_id: str, token: str,
                       base: dict | None = None) -> dict[str, str]:
    """FFmpeg's environment: the relay as its only proxy; no other proxy variable, no
    no_proxy (nothing may bypass the relay)."""
    environment = {k: v for k, v in (os.environ if base is None else base).items()
                   if k.lower() not in PROXY_ENV_NAMES}
    environment["http_proxy"] = relay_url(egress_listen, channel_id, token)
    return environment


def record_refusal(state_dir: str, channel_id: str, kind: str, reason: str) -> None:
    """The relay refused a connection of the channel: kind 'address', 'proxy' or
    'unreachable' (the upstream did not answer)."""
    with contextlib.suppress(OSError):
        files.write_atomic(refusal_path(state_dir, channel_id),
                           json.dumps({"kind": kind, "reason": reason, "at": time.time()}).encode(),
                           mode=0o600)


def read_refusal(state_dir: str, channel_id: str, since: float) -> dict | None:
    """The relay's last refusal for the channel, if it came at or after ``since``."""
    try:
        with open(refusal_path(state_dir, channel_id), "rb") as handle:
            data = json.loads(handle.read(8192))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("at"), (int, float)) or data["at"] < since:
        return None
    return data


async def open_connections(egress_listen: str, timeout: float = 2.0) -> dict[str, int] | None:
    """Upstream connections the relay holds open, per channel; None if it does not answer."""
    host, _, port = egress_listen.rpartition(":")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), timeout)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        writer.write(f"GET {CONNECTIONS_PATH} HTTP/1.0\r\nHost: relay\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(1 << 20), timeout)
        head, _, body = raw.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
            return None
        data = json.loads(body)
        return {str(k): int(v) for k, v in data.get("channels", {}).items()}
    except (OSError, ValueError, asyncio.TimeoutError, AttributeError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def wait_closed(egress_listen: str, channel_id: str, timeout: float) -> bool:
    """Wait until the relay holds no upstream connection of the channel (its FFmpeg has
    exited; the relay closes the upstream side right after); False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        counts = await open_connections(egress_listen)
        if counts is None or not counts.get(channel_id):     # a relay that is down holds none
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
