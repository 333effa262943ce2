"""A channel's sources in failover order: the one in use unless it failed recently, else the
next; a source that fails is skipped for source_cooldown by every host
(`source:<digest>:failed`).  A watched stream being replaced tries its sources even when all
are cooling down (waiting out the cooldown would leave its viewers with nothing; the
back-off spaces the tries); a cold start does not."""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from streamstate import providers
from streamstate.channels import Channel
from streamstate.redact import redact_url

log = logging.getLogger("streamkeeper.launcher")


class SourceOrder:
    def __init__(
        self, channel: Channel, redis_call: Callable[..., Awaitable[Any]], counters: dict[str, int], cooldown: float
    ):
        self.channel, self._call, self._counters, self._cooldown = channel, redis_call, counters, cooldown

    async def next(self, current: str, tried: list[str], *, replacing: bool) -> str | None:
        """The source to start next; None when every source was tried in this start, or all
        are cooling down on a cold start (``all_cooling`` then says so)."""
        sources = list(self.channel.sources)
        if len(sources) == 1:
            return None if tried else sources[0]
        start = sources.index(current) if current in sources else 0
        ordered = [s for s in sources[start:] + sources[:start] if s not in tried]
        try:
            cooling = await self._call(providers.cooling_sources, ordered)
        except Exception:  # noqa: BLE001 - without Redis, no cooldown is known
            cooling = set()
        for source in ordered:
            if source not in cooling:
                return source
        if not tried and replacing:
            log.info(
                "channel %s: every source failed within source_cooldown; trying source %d/%d again for its viewers",
                self.channel.id,
                sources.index(ordered[0]) + 1,
                len(sources),
            )
            return ordered[0]
        return None

    def all_cooling(self) -> str:
        return f"all {len(self.channel.sources)} sources failed within source_cooldown"

    async def failed(self, source: str, failure: str, last_error: str) -> None:
        """The source failed to start: logged, counted, skipped for source_cooldown."""
        sources = self.channel.sources
        log.warning(
            "channel %s: source %d/%d (%s) failed: %s; trying the next",
            self.channel.id,
            sources.index(source) + 1,
            len(sources),
            redact_url(source),
            last_error,
        )
        self._counters["failovers"] += 1
        try:
            await self._call(providers.mark_source_failed, source, failure, self._cooldown)
        except Exception as exc:  # noqa: BLE001 - the cooldown is a courtesy to the upstream
            log.warning("channel %s: cannot record the source's failure (%s)", self.channel.id, exc)
