"""Heartbeats read but not yet written: per-channel maxima and viewers, bounded by
channels and viewers, never by lines."""
from __future__ import annotations

import hashlib

from .logformat import ChunkResult, LogLineParser

# Bounds on what is held while Redis is away.
MAX_PENDING_VIEWER_KEYS = 200_000
MAX_IDENTITY_CACHE = 100_000


def viewer_hash(identity: bytes) -> str:
    """What Redis keeps of a viewer: a hash, never the token or address in clear."""
    return hashlib.blake2b(identity, digest_size=10, person=b"streamkeeper").hexdigest()


class PendingHeartbeats:
    def __init__(self, parser: LogLineParser):
        self.parser = parser
        self.channel_times: dict[str, float] = {}
        self.viewer_times: dict[tuple, object] = {}
        self.viewers_dropped = 0
        self._identity_cache: dict[tuple, str] = {}

    def __bool__(self) -> bool:
        return bool(self.channel_times)

    def add(self, chunk: ChunkResult) -> None:
        times = self.channel_times
        for channel, when in chunk.channel_times.items():
            if when > times.get(channel, 0.0):
                times[channel] = when
        if chunk.viewer_times:
            if len(self.viewer_times) < MAX_PENDING_VIEWER_KEYS:
                # Chunks arrive in file order, each sorted by time: the later wins.
                self.viewer_times.update(chunk.viewer_times)
            else:
                self.viewers_dropped += len(chunk.viewer_times)

    def viewers_by_channel(self, *, now: float, window: float) -> dict[str, dict[str, float]]:
        """channel -> {viewer hash: last request time}, only viewers inside the window."""
        cutoff = now - window
        result: dict[str, dict[str, float]] = {}
        cache = self._identity_cache
        if len(cache) > MAX_IDENTITY_CACHE:
            cache.clear()
        for key, raw_time in self.viewer_times.items():
            when = float(raw_time)
            if when < cutoff:
                continue
            raw = key[1:]
            member = cache.get(raw)
            if member is None:
                member = cache[raw] = viewer_hash(self.parser.viewer_identity(raw))
            channel = key[0].decode()
            seen = result.setdefault(channel, {})
            if when > seen.get(member, 0.0):
                seen[member] = min(when, now)
        return result

    def clear(self) -> None:
        self.channel_times = {}
        self.viewer_times = {}
