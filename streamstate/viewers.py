"""Who a viewer is: the one rule heartbeatd (from access log lines) and the launcher (from
the request nginx forwards) share, so a launcher can tell whether the viewer asking for a
channel is the only one watching another (a channel change)."""

from __future__ import annotations

import hashlib


def viewer_identity(token: bytes, address: bytes, user_agent: bytes) -> bytes:
    """The token when there is one, else address + user agent (as nginx logs them)."""
    if token and token != b"-":
        return b"t:" + token
    return b"a:" + address + b"\0" + user_agent


def viewer_hash(identity: bytes) -> str:
    """What Redis keeps of a viewer: a hash, never the token or address in clear."""
    return hashlib.blake2b(identity, digest_size=10, person=b"streamkeeper").hexdigest()


def token_from_query(query: bytes) -> bytes:
    """``token=`` of a query string, undecoded (as nginx's $arg_token)."""
    for part in query.split(b"&"):
        if part.startswith(b"token="):
            return part[6:]
    return b""


def nginx_log_escape(value: bytes) -> bytes:
    """A variable as nginx's log_format (escape=default) writes it: ``"``, ``\\`` and bytes
    outside printable ASCII as \\xHH; empty as ``-``."""
    if not value:
        return b"-"
    out = bytearray()
    for byte in value:
        if byte in (0x22, 0x5C) or byte < 0x20 or byte > 0x7E:
            out += b"\\x%02X" % byte
        else:
            out.append(byte)
    return bytes(out)


def viewer_of_request(query: str, address: str, user_agent: str) -> str:
    """The hash heartbeatd gives the viewer whose request nginx forwarded to the launcher."""
    agent = nginx_log_escape(user_agent.encode("latin-1", "replace"))
    return viewer_hash(
        viewer_identity(
            token_from_query(query.encode("latin-1", "replace")), (address or "-").encode("ascii", "replace"), agent
        )
    )
