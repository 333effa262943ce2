"""Build a parser for nginx access-log lines from the nginx ``log_format`` itself.

The parser works on whole chunks of complete lines with one compiled bytes
regex and ``re.findall``.  Each line matches either

* the *viewing* branch: a 2xx/304 request for a channel's playlist or segment;
  the time, the channel and (when viewers are counted) the viewer's fields
  are captured, or
* the *other* branch: a line of the format that is not a viewing request.

A line that matches neither is malformed.  Both branches read a line only as
far as the last field streamkeeper needs.  When the viewer fields come last
(as in our own format) the viewing branch captures the rest of the line as one
"viewer tail", which is split into token / address / user agent once per
distinct tail, not once per line.  All per-line work runs inside the regex
engine and C-level builtins; Python code runs once per distinct channel or
viewer.
"""

from __future__ import annotations

import bisect
import dataclasses
import gc
import re
import shlex
import time
from datetime import datetime
from itertools import compress
from operator import itemgetter
from typing import Callable, Sequence

from .urls import ACCEL_PREFIX
from .viewers import token_from_query, viewer_hash, viewer_identity  # viewer_hash: re-exported

# Our own format, written only here: `streamctl nginx-config` renders it into the snippet's
# `log_format streamkeeper '...'`.  The fields heartbeatd reads come first and the viewer's
# last, so a line is parsed no further than needed:
#   $msec             the request's own time (epoch seconds, ms): heartbeats carry it
#   $status           only 2xx and 304 count as viewing
#   $request_method   GET, HEAD, OPTIONS
#   "$uri"            nginx's normalised path: what it served (/live//stream_5.m3u8 and
#                     /live/stream_%35.m3u8 are logged as /live/stream_5.m3u8), no query
#   $remote_addr      with the user agent, tells token-less viewers apart
#   "$arg_token"      the player's token argument; heartbeatd keeps only a hash of it
#   "$http_user_agent"
STREAMKEEPER_LOG_FORMAT = '$msec $status $request_method "$uri" $remote_addr "$arg_token" "$http_user_agent"'

TIME_VARIABLES = ("msec", "time_iso8601", "time_local")
REQUEST_VARIABLES = ("request", "request_uri", "uri")
VIEWER_VARIABLES = ("arg_token", "remote_addr", "http_user_agent")
MAX_CHANNEL_ID_DIGITS = 18

# A viewing path: /live/stream_<id>.m3u8 or /live/stream_<id>_<seq>.<ts|m4s|mp4|aac>,
# or the internal path nginx serves a cold start's playlist from (urls.ACCEL_PREFIX:
# clients cannot get a 2xx there, so such a line is a first viewer's playlist).
# The second group is b"8" for a playlist, b"" for a segment: viewers are counted
# from playlist requests only (a player fetches its playlist with the token and
# its segments without; counting both would count every player twice).
_VIEW_PATH = (
    rb"(?:/live/|" + re.escape(ACCEL_PREFIX.encode()) + rb")stream_([0-9]++)(?:\.m3u(8)|_[0-9]++\.(?:ts|m4s|mp4|aac))"
)

_TIME_PATTERNS = {
    "msec": rb"[0-9]++\.[0-9]++",
    "time_iso8601": rb"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:[+-][0-9]{2}:[0-9]{2}|Z)",
    "time_local": rb"[0-9]{2}/[A-Z][a-z]{2}/[0-9]{4}:[0-9]{2}:[0-9]{2}:[0-9]{2} [+-][0-9]{4}",
}

MAX_MEMBER_CACHE = 100_000
# With $request_method in the format, only these count (an OPTIONS preflight is not watching).
VIEWING_METHODS = rb"(?:GET|HEAD)"

_VARIABLE_RE = re.compile(r"\$\{([A-Za-z0-9_]+)\}|\$([A-Za-z0-9_]+)")


class LogFormatError(ValueError):
    """The log_format cannot be used (no time, no request, unparsable)."""


@dataclasses.dataclass
class ChunkResult:
    """What one chunk of complete lines held."""

    lines: int = 0
    matched: int = 0  # viewing requests (channel, 2xx/304)
    other: int = 0  # well-formed lines that are not viewing requests
    malformed: int = 0
    bad_channel: int = 0  # viewing path with a channel id that is not canonical
    newest_time: float = 0.0  # newest request time among matched lines
    # channel id (str) -> newest request time (epoch seconds)
    channel_times: dict = dataclasses.field(default_factory=dict)
    # (channel id, viewer hash) -> newest request time (epoch seconds)
    viewer_times: dict = dataclasses.field(default_factory=dict)


def normalise_format(text: str) -> str:
    """Accept a bare format or a pasted ``log_format name [escape=..] '...' '...';``."""
    text = text.strip().rstrip(";").strip()
    if text.startswith("log_format"):
        try:
            words = shlex.split(text)
        except ValueError as exc:
            raise LogFormatError(f"cannot read the pasted log_format: {exc}") from None
        words = words[2:]  # drop 'log_format' and the format's name
        if words and words[0].startswith("escape="):
            words = words[1:]
        return "".join(words)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        try:
            return "".join(shlex.split(text))
        except ValueError:
            return text[1:-1]
    return text


def tokenize_format(fmt: str) -> list[tuple[str, str]]:
    """Split a log_format into ('lit', text) and ('var', name) tokens."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    for match in _VARIABLE_RE.finditer(fmt):
        if match.start() > pos:
            tokens.append(("lit", fmt[pos : match.start()]))
        tokens.append(("var", match.group(1) or match.group(2)))
        pos = match.end()
    if pos < len(fmt):
        tokens.append(("lit", fmt[pos:]))
    return tokens


def _parse_time_local(raw: bytes) -> float:
    return datetime.strptime(raw.decode("ascii"), "%d/%b/%Y:%H:%M:%S %z").timestamp()


def _parse_time_iso8601(raw: bytes) -> float:
    text = raw.decode("ascii")
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    return datetime.fromisoformat(text).timestamp()


_TIME_PARSERS: dict[str, Callable[[bytes], float]] = {
    "msec": float,
    "time_iso8601": _parse_time_iso8601,
    "time_local": _parse_time_local,
}


def _field_pattern(tokens: list[tuple[str, str]], index: int) -> bytes:
    """A variable's generic pattern: anything up to the literal that follows it."""
    following = tokens[index + 1] if index + 1 < len(tokens) else None
    if following is None:
        return rb"[^\n]*+"
    if following[0] == "lit":
        delimiter = re.escape(following[1].encode()[:1])
        return rb"[^" + delimiter + rb"\n]*+"
    return rb"[^ \n]*?"


class LogLineParser:
    """Parses chunks of complete lines written with one nginx log_format."""

    def __init__(self, log_format: str, *, count_viewers: bool = True, viewer_window: float = float("inf")):
        fmt = normalise_format(STREAMKEEPER_LOG_FORMAT if log_format == "streamkeeper" else log_format)
        self.format = fmt
        tokens = tokenize_format(fmt)
        names = [value for kind, value in tokens if kind == "var"]
        time_vars = [name for name in TIME_VARIABLES if name in names]
        request_vars = [name for name in REQUEST_VARIABLES if name in names]
        if not time_vars:
            raise LogFormatError(
                "log_format has no usable time variable: it needs $msec, $time_iso8601 or "
                f"$time_local (format: {fmt!r})"
            )
        if not request_vars:
            raise LogFormatError(
                f"log_format has no request: it needs $request, $request_uri or $uri (format: {fmt!r})"
            )
        if "status" not in names:
            raise LogFormatError(f"log_format has no $status (format: {fmt!r})")
        self.time_variable = time_vars[0]
        self.request_variable = request_vars[0]
        self.count_viewers = count_viewers
        self.viewer_window = viewer_window
        self._convert_time = _TIME_PARSERS[self.time_variable]
        self._member_cache: dict[tuple, str] = {}
        self._build(tokens)

    # -- regex construction ---------------------------------------------------
    def _build(self, tokens: list[tuple[str, str]]) -> None:
        """Compile the two-branch line regex (see the module docstring)."""
        first_index: dict[str, int] = {}
        for index, (kind, value) in enumerate(tokens):
            if kind == "var" and value not in first_index:
                first_index[value] = index
        core = (self.time_variable, "status", self.request_variable)
        core_end = max(first_index[name] for name in core)
        viewer_vars = [v for v in VIEWER_VARIABLES if v in first_index] if self.count_viewers else []
        # Without $arg_token the token is read from the request's query string.
        self._query_token = bool(viewer_vars) and "arg_token" not in first_index and self.request_variable != "uri"
        # Viewer fields after every core field: capture the rest of the line as
        # one "tail" (cheap), split it once per distinct tail.
        tail_mode = bool(viewer_vars) and min(first_index[v] for v in viewer_vars) > core_end
        needed = set(core) if tail_mode else set(core) | set(viewer_vars)
        stop_at = max(first_index[name] for name in needed)

        group_names: list[str] = []
        view_parts: list[bytes] = []
        other_parts: list[bytes] = []
        for index in range(stop_at + 1):
            kind, value = tokens[index]
            if kind == "lit":
                literal = re.escape(value.encode())
                view_parts.append(literal)
                other_parts.append(literal)
                continue
            generic = _TIME_PATTERNS.get(value) or _field_pattern(tokens, index)
            other_parts.append(rb"[0-9]{3}" if value == "status" else generic)
            if value == "request_method":
                view_parts.append(VIEWING_METHODS)  # a preflight is not watching
            elif value not in needed or first_index[value] != index:
                view_parts.append(generic)
            elif value == self.time_variable:
                group_names.append("time")
                view_parts.append(b"(" + generic + b")")
            elif value == "status":
                view_parts.append(rb"(?:2[0-9][0-9]|304)")
            elif value == self.request_variable:
                view_parts.append(self._viewing_request(tokens, index, group_names, last=index == stop_at))
            else:  # a viewer field captured on its own (viewer fields not last)
                group_names.append(value)
                view_parts.append(b"(" + generic + b")")

        self._tail_regex = None
        self._tail_names: list[str] = []
        if tail_mode:
            group_names.append("tail")
            view_parts.append(rb"(.*)")
            self._tail_regex, self._tail_names = self._tail_parser(tokens, core_end)
        # The other branch reads up to the start of the last core field: enough
        # to tell a line of this format from a malformed one.
        pattern = rb"\n(?:" + b"".join(view_parts) + b"|" + b"".join(other_parts[:core_end]) + b")"
        self._regex = re.compile(pattern)
        index_of = {name: i for i, name in enumerate(group_names)}
        self._get_channel = itemgetter(index_of["channel"])
        self._get_time = itemgetter(index_of["time"])
        self._get_playlist = itemgetter(index_of["playlist"])
        self._viewer_fields = [n for n in group_names if n in VIEWER_VARIABLES or n in ("query", "tail")]
        self._get_viewer_key: Callable[[Sequence[bytes]], tuple] | None = None
        if self._viewer_fields:
            self._get_viewer_key = itemgetter(index_of["channel"], *(index_of[n] for n in self._viewer_fields))

    def _query_pattern(self, end: bytes, capture: bool) -> bytes:
        body = rb"[^ " + end + rb"\n]*+"
        return rb"(?:\?(" + body + rb"))?" if capture else rb"(?:\?" + body + rb")?"

    def _viewing_request(self, tokens, index: int, group_names: list[str], *, last: bool) -> bytes:
        """The pattern of a viewing request in $request, $request_uri or $uri.

        ``last``: nothing after it is matched (a viewer tail may follow), so the
        pattern stops right after the path.
        """
        group_names += ["channel", "playlist"]
        variable = tokens[index][1]
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        delimiter = following[1].encode()[:1] if following and following[0] == "lit" else b""
        end = re.escape(delimiter) if delimiter else rb"\n"
        method = rb"[A-Z]++ " if variable == "request" else b""
        if variable == "uri":
            return _VIEW_PATH + rb"(?=" + end + b")"
        if last:
            return method + _VIEW_PATH + (rb"(?=[? ])" if variable == "request" else rb"(?=[?" + end + rb"])")
        if self._query_token:
            group_names.append("query")
        query = self._query_pattern(end, self._query_token)
        if variable == "request":
            return method + _VIEW_PATH + query + rb" " + _field_pattern(tokens, index)
        return _VIEW_PATH + query + rb"(?=" + end + b")"

    def _tail_parser(self, tokens: list[tuple[str, str]], core_end: int):
        """A regex splitting a viewer tail (what follows the last core field)."""
        parts, names = [], []
        kind, value = tokens[core_end]
        if value == self.request_variable and value != "uri":
            following = tokens[core_end + 1] if core_end + 1 < len(tokens) else None
            delimiter = following[1].encode()[:1] if following and following[0] == "lit" else b""
            end = re.escape(delimiter) if delimiter else rb"\n"
            if self._query_token:
                names.append("query")
            parts.append(self._query_pattern(end, self._query_token))
            parts.append(_field_pattern(tokens, core_end))
        for index in range(core_end + 1, len(tokens)):
            kind, value = tokens[index]
            if kind == "lit":
                parts.append(re.escape(value.encode()))
            elif value in VIEWER_VARIABLES and value not in names:
                names.append(value)
                parts.append(b"(" + _field_pattern(tokens, index) + b")")
            else:
                parts.append(_field_pattern(tokens, index))
        return re.compile(b"".join(parts)), names

    # -- parsing ----------------------------------------------------------------
    def parse_chunk(self, data: bytes) -> ChunkResult:
        """Parse ``data``: complete lines, each ending in b'\\n'.

        The cyclic garbage collector is paused meanwhile: the rows are
        short-lived tuples without cycles, and collecting them generation by
        generation costs a fifth of the time.
        """
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._parse_chunk(data)
        finally:
            if was_enabled:
                gc.enable()

    def _parse_chunk(self, data: bytes) -> ChunkResult:
        result = ChunkResult()
        if not data:
            return result
        result.lines = data.count(b"\n")
        rows = self._regex.findall(b"\n" + data)
        result.malformed = result.lines - len(rows)
        if not rows:
            return result
        # Sort by time (rows of the other branch have an empty time and come
        # first); then the value a dict keeps last for a key is the newest.
        get_time = self._get_time
        if self._convert_time is float and len(set(map(len, map(get_time, rows)))) <= 2:
            rows.sort(key=get_time)  # one width of $msec (or b''): bytes order is numeric
            times = list(map(get_time, rows))
        else:
            times = self._epoch_times(rows)
            order = sorted(range(len(times)), key=times.__getitem__)
            rows = list(map(rows.__getitem__, order))
            times = list(map(times.__getitem__, order))
        empty = times[0] if not get_time(rows[0]) else None
        first_view = bisect.bisect_right(times, empty) if empty is not None else 0
        if first_view:
            del rows[:first_view], times[:first_view]
        result.other = first_view
        if not rows:
            return result
        result.matched = len(rows)
        newest = dict(zip(map(self._get_channel, rows), times))
        channel_times = {}
        for channel, when in newest.items():
            # The canonical spelling only (keys.CHANNEL_ID_PATTERN): nginx serves no other.
            if len(channel) <= MAX_CHANNEL_ID_DIGITS and (channel[0] != 48 or channel == b"0"):
                channel_times[channel.decode()] = float(when)
            else:
                result.bad_channel += 1
        result.channel_times = channel_times
        result.newest_time = float(times[-1])
        if self._get_viewer_key is not None:
            # Only requests inside the viewer window can count (time moves one
            # way): a backlog's older rows are not looked at.
            cutoff = time.time() - self.viewer_window
            first = bisect.bisect_left(times, cutoff, key=float)
            is_playlist = map(self._get_playlist, rows[first:])
            viewer_rows = compress(rows[first:], is_playlist)
            viewer_times = compress(times[first:], map(self._get_playlist, rows[first:]))
            raw_viewers = dict(zip(map(self._get_viewer_key, viewer_rows), viewer_times))
            result.viewer_times = self._resolve_viewers(raw_viewers, channel_times)
        return result

    def _resolve_viewers(self, raw_viewers: dict, channel_times: dict) -> dict:
        """{(channel bytes, raw fields...): time} -> {(channel, viewer hash): epoch}.

        Runs once per distinct (channel, viewer) of the chunk; the hash of a raw
        viewer is cached across chunks.
        """
        cache = self._member_cache
        if len(cache) > MAX_MEMBER_CACHE:
            cache.clear()
        resolved: dict[tuple[str, str], float] = {}
        for key, when in raw_viewers.items():
            raw = key[1:]
            member = cache.get(raw)
            if member is None:
                member = cache[raw] = viewer_hash(self.viewer_identity(raw))
            channel = key[0].decode()
            if channel in channel_times:
                resolved[(channel, member)] = float(when)
        return resolved

    def _epoch_times(self, rows: list[tuple]) -> list[float]:
        """Every row's time as epoch seconds (rows of the other branch: -inf)."""
        raw = list(map(self._get_time, rows))
        converted = {value: (self._convert_time(value) if value else float("-inf")) for value in set(raw)}
        return list(map(converted.__getitem__, raw))

    def viewer_identity(self, raw_fields: tuple) -> bytes:
        """The identity of a viewer from a viewer_times key's fields (after the channel).

        The token when there is one, else address + user agent.
        """
        if self._tail_regex is not None:
            match = self._tail_regex.match(raw_fields[0])
            fields = dict(zip(self._tail_names, match.groups())) if match else {}
            fields.pop("tail", None)
        else:
            fields = dict(zip(self._viewer_fields, raw_fields))
        token = fields.get("arg_token", b"")
        if not token and fields.get("query"):
            token = token_from_query(fields["query"])
        return viewer_identity(token, fields.get("remote_addr", b""), fields.get("http_user_agent", b""))
