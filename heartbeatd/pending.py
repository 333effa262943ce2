"""Heartbeats read but not yet written: per-channel maxima and viewers, bounded by
channels and viewers, never by lines."""

from __future__ import annotations

from streamstate.logformat import ChunkResult

# Bound on the viewers held while Redis is away.
MAX_PENDING_VIEWERS = 200_000


class PendingHeartbeats:
    def __init__(self):
        self.channel_times: dict[str, float] = {}
        self.viewer_times: dict[tuple[str, str], float] = {}
        self.viewers_dropped = 0

    def __bool__(self) -> bool:
        return bool(self.channel_times)

    def add(self, chunk: ChunkResult) -> None:
        times = self.channel_times
        for channel, when in chunk.channel_times.items():
            if when > times.get(channel, 0.0):
                times[channel] = when
        if chunk.viewer_times:
            if len(self.viewer_times) < MAX_PENDING_VIEWERS:
                # Chunks arrive in file order, each sorted by time: the later wins
                # (Redis keeps the greater score in any case: ZADD GT).
                self.viewer_times.update(chunk.viewer_times)
            else:
                self.viewers_dropped += len(chunk.viewer_times)

    def viewers_by_channel(self, *, now: float, window: float) -> dict[str, dict[str, float]]:
        """channel -> {viewer hash: last request time}, only viewers inside the window."""
        cutoff = now - window
        result: dict[str, dict[str, float]] = {}
        for (channel, member), when in self.viewer_times.items():
            if when >= cutoff:
                result.setdefault(channel, {})[member] = min(when, now)
        return result

    def keep_only(self, channels) -> "PendingHeartbeats":
        """A copy holding only these channels' heartbeats (to write again later)."""
        wanted = set(channels)
        kept = PendingHeartbeats()
        kept.channel_times = {c: t for c, t in self.channel_times.items() if c in wanted}
        kept.viewer_times = {k: t for k, t in self.viewer_times.items() if k[0] in wanted}
        return kept

    def clear(self) -> None:
        self.channel_times = {}
        self.viewer_times = {}
