"""Values read from Redis, which is hostile: text (undecodable bytes replaced), JSON (junk,
or nested too deep, is None), numbers and epoch times (inf, nan, the far future are junk),
and keys holding junk of another type (WRONGTYPE)."""

from __future__ import annotations

import json
import math
import typing

import redis


@typing.overload
def text(value: None) -> None: ...


@typing.overload
def text(value: bytes | str | int | float) -> str: ...


def text(value):
    """A Redis value as text: undecodable bytes replaced, never an error."""
    if value is None or value is False:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def json_value(raw):
    """A JSON value read from Redis; None for junk (not JSON, not text, nested too deep)."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, TypeError, RecursionError):
        return None


def wrong_type(exc: Exception) -> bool:
    """A Redis error that says our key holds junk of another type (WRONGTYPE)."""
    return isinstance(exc, redis.ResponseError) and "WRONGTYPE" in str(exc)


def clear_other_type(client, key: str, kind: str) -> None:
    """Delete the key if it holds another Redis type than ``kind`` (junk: our writes would
    fail on it with WRONGTYPE, forever)."""
    if text(client.type(key)) not in (kind, "none"):
        client.delete(key)


def int_or_none(value) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


# A time more than this far in the future is junk (it would keep a stream alive forever).
FUTURE_SLACK = 60.0


def epoch_seconds(value, now: float | None = None) -> float | None:
    """An epoch time from Redis (last_access, started): None unless it is a finite number,
    and, with ``now``, not in the future beyond FUTURE_SLACK (inf, nan, 1e999 are junk)."""
    try:
        number = float(text(value)) if value is not None else None
    except (TypeError, ValueError):
        return None
    if number is None or not math.isfinite(number) or number < 0:
        return None
    if now is not None and number > now + FUTURE_SLACK:
        return None
    return number
