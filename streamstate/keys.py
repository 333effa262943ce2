"""The Redis key schema.  No other module spells a Redis key.

The table of every key (its type, who writes it, who reads it) is written once, in
docs/design.md ("Redis keys"); tests/test_docs.py checks it against the functions here.
"""

from __future__ import annotations

import hashlib
import re

MAX_CHANNEL_ID_DIGITS = 18
# The one spelling of a channel id: 0, or up to 18 ASCII digits without a leading zero, so
# "7" and "007" can never be two channels (two FFmpegs on one upstream).  The same pattern
# is rendered into nginx's locations and heartbeatd's parser.
CHANNEL_ID_PATTERN = "0|[1-9][0-9]{0,%d}" % (MAX_CHANNEL_ID_DIGITS - 1)
CHANNEL_ID_RE = re.compile(CHANNEL_ID_PATTERN, re.ASCII)

STREAM_PREFIX = "stream:"
CHANNEL_PREFIX = "channel:"


class InvalidChannelId(ValueError):
    """A channel id that is not canonical: 0, or 1 to 18 ASCII digits with no leading zero."""


_ECHOABLE_ID_RE = re.compile(r"[A-Za-z0-9._+-]{1,40}")


def check_channel_id(channel_id: str | int) -> str:
    """Return the channel id as a string, or raise InvalidChannelId."""
    text = str(channel_id) if isinstance(channel_id, (str, int)) and not isinstance(channel_id, bool) else ""
    if not CHANNEL_ID_RE.fullmatch(text):
        # Echoed only when it is plainly a mistyped id: the message may reach an anonymous
        # client, and nothing it sent (a URL, markup, control characters) comes back.
        shown = f" {text!r}" if _ECHOABLE_ID_RE.fullmatch(text) else ""
        raise InvalidChannelId(
            f"invalid channel id{shown}: expected 0 or 1 to {MAX_CHANNEL_ID_DIGITS} digits without a leading zero"
        )
    return text


def pid_key(channel_id: str | int) -> str:
    return f"{STREAM_PREFIX}{check_channel_id(channel_id)}:pid"


def started_key(channel_id: str | int) -> str:
    return f"{STREAM_PREFIX}{check_channel_id(channel_id)}:started"


def last_access_key(channel_id: str | int) -> str:
    return f"{STREAM_PREFIX}{check_channel_id(channel_id)}:last_access"


def viewers_key(channel_id: str | int) -> str:
    return f"{STREAM_PREFIX}{check_channel_id(channel_id)}:viewers"


def run_key(channel_id: str | int) -> str:
    return f"{STREAM_PREFIX}{check_channel_id(channel_id)}:run"


def lock_key(channel_id: str | int) -> str:
    return f"{STREAM_PREFIX}{check_channel_id(channel_id)}:lock"


def failed_key(channel_id: str | int) -> str:
    return f"{STREAM_PREFIX}{check_channel_id(channel_id)}:failed"


FAILED_KEY_PATTERN = f"{STREAM_PREFIX}*:failed"


ACTIVE_STREAMS_KEY = "streams:active"


def host_key(host_id: str) -> str:
    return f"host:{host_id}"


def host_address_key(host_id: str) -> str:
    """Where a host's nginx is, as the other hosts reach it (kept with its lease)."""
    return f"hosts:{host_id}:address"


def valid_host_id(host_id: str) -> bool:
    """A host id as a key may carry it (found by SCAN, so hostile): printable, a hostname's length."""
    return 0 < len(host_id) <= 253 and host_id.isprintable()


_PROVIDER_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def valid_provider_name(provider: str) -> bool:
    return bool(_PROVIDER_NAME_RE.fullmatch(provider or ""))


def provider_slots_key(provider: str) -> str:
    if not valid_provider_name(provider):
        raise ValueError(f"invalid provider name {provider[:40]!r}")
    return f"provider:{provider}:slots"


def source_failed_key(source_url: str) -> str:
    """By a digest of the URL: the same source in two channels cools down once, and no
    account in a URL becomes part of a key name."""
    digest = hashlib.blake2b(source_url.encode(), digest_size=12, person=b"sk-source").hexdigest()
    return f"source:{digest}:failed"


def reaper_lock_key(host_id: str) -> str:
    return f"reaper:{host_id}:lock"


def reaper_last_pass_key(host_id: str) -> str:
    return f"reaper:{host_id}:last_pass"


def status_history_key(host_id: str) -> str:
    """A list of JSON samples {t, streams, viewers}, newest first, an hour of them."""
    return f"status:{host_id}:history"


def stream_keys(channel_id: str | int) -> list[str]:
    """Every key of a running stream, in the order the stop script takes them."""
    return [
        run_key(channel_id),
        pid_key(channel_id),
        started_key(channel_id),
        last_access_key(channel_id),
        viewers_key(channel_id),
    ]


def channel_key(channel_id: str | int) -> str:
    return f"{CHANNEL_PREFIX}{check_channel_id(channel_id)}"


# SCAN patterns: every stream's pid key (legacy records included), every channel.
CHANNEL_KEY_PATTERN = f"{CHANNEL_PREFIX}*"
PID_KEY_PATTERN = f"{STREAM_PREFIX}*:pid"


def _channel_id_between(key: str | bytes, prefix: str, suffix: str) -> str | None:
    """The canonical channel id between ``prefix`` and ``suffix`` of a key, or None."""
    if isinstance(key, bytes):
        key = key.decode("ascii", "replace")
    if not (key.startswith(prefix) and key.endswith(suffix)) or len(key) < len(prefix) + len(suffix):
        return None
    middle = key[len(prefix) : len(key) - len(suffix)]
    return middle if CHANNEL_ID_RE.fullmatch(middle) else None


def channel_id_from_channel_key(key: str | bytes) -> str | None:
    return _channel_id_between(key, CHANNEL_PREFIX, "")


def channel_id_from_pid_key(key: str | bytes) -> str | None:
    """The channel id of a ``stream:<id>:pid`` key, or None if it is not one."""
    return _channel_id_between(key, STREAM_PREFIX, ":pid")


def channel_id_from_failed_key(key: str | bytes) -> str | None:
    return _channel_id_between(key, STREAM_PREFIX, ":failed")
