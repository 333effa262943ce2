"""A provider account's connections on this host's side (streamstate.providers keeps them in
Redis, across every host): a start takes one; when all are held, the stream only this viewer
watched (a channel change) gives its up at once, else the one longest without a request if
that is at least preempt_idle; otherwise the start is refused (ProviderBusy)."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Callable

from streamstate import providers, runs
from streamstate.redis_client import REPLICA_WAIT_MS
from streamstate.runs import RunState
from streamstate.upstreams import Upstream

from .host_services import HostServices
from .supervisor import StartFailed, StreamSupervisor

log = logging.getLogger("streamkeeper.launcher")


class ProviderBusy(StartFailed):
    """Every connection of the channel's provider account is held by a watched stream (503;
    not a failure of the source: no failover, no cooldown)."""


class ProviderSlots:
    def __init__(self, host: HostServices, live_supervisors: Callable[[], list[StreamSupervisor]]):
        self._host, self._live = host, live_supervisors
        # One start at a time decides on each provider's slots (in this process).
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    async def _acquire(self, provider: str, limit: int, channel_id: str, run_id: str, grace: float) -> bool:
        """One try at a slot.  Through Sentinel a slot taken just before a failover could be
        lost with the old master (replication is asynchronous): it is waited for on a
        replica.  If none has it within REPLICA_WAIT_MS the start goes on, said (with no
        replica in sync there is nothing a failover could promote); the record's check after
        a failover (launcher.run_record) gives a slot up that another stream took meanwhile."""
        settings = self._host.settings
        if not settings.redis_sentinels:
            return await self._host.redis_call(
                providers.acquire_slot, provider, limit, channel_id, run_id, settings.host_id, grace
            )
        taken, on_replica = await self._host.redis_call(
            providers.acquire_slot_on_replica,
            provider,
            limit,
            channel_id,
            run_id,
            settings.host_id,
            grace,
            REPLICA_WAIT_MS,
        )
        if taken and not on_replica:
            log.warning(
                "channel %s: its slot of provider %s is on no replica after %d ms",
                channel_id,
                provider,
                REPLICA_WAIT_MS,
            )
        return taken

    async def take(self, upstream: Upstream, channel_id: str, run_id: str, viewer: str | None) -> None:
        """One of the provider's max_streams connections for this run, across every host.
        When all are held: the stream only this viewer watched (a channel change) is
        preempted at once, else the one longest without a request if that is at least
        preempt_idle; its connection is closed before the slot is taken.  Otherwise
        ProviderBusy."""
        provider = upstream.limited_provider
        if provider is None:
            return
        grace = self._host.settings.start_timeout + 10
        async with self._locks[provider.name]:
            # This host's running streams of the provider hold their slots first (after a
            # Redis restart lost them, before their supervisors write them again).
            for running in self._live():
                if running.provider_name == provider.name and running.id != channel_id:
                    await self._host.redis_call(
                        providers.hold_slot, provider.name, running.id, running.run_id, self._host.settings.host_id
                    )
            for _ in range(provider.max_streams + 2):
                if await self._acquire(provider.name, provider.max_streams, channel_id, run_id, grace):
                    return
                victim, why = await self._victim(provider.name, viewer, grace)
                if victim is None:
                    break
                self._host.counters["provider_preempted"] += 1
                log.info(
                    "channel %s: preempted (%s) to start channel %s on provider %s's last connection",
                    victim.id,
                    why,
                    channel_id,
                    provider.name,
                )
                await victim.stop(f"preempted by a start of channel {channel_id} (provider {provider.name})")
        self._host.counters["provider_refused"] += 1
        log.warning(
            "channel %s: not started: provider %s has all %d connections in use by watched channels",
            channel_id,
            provider.name,
            provider.max_streams,
        )
        raise ProviderBusy(
            f"provider {provider.name}: all {provider.max_streams} connections are in use by watched channels"
        )

    async def _victim(self, provider: str, viewer: str | None, grace: float):
        """(supervisor, why) of this host's stream of the provider to give its connection
        up, or (None, '')."""
        holders = set(await self._host.redis_call(providers.slot_channels, provider, grace))
        live = [s for s in self._live() if s.id in holders]
        # A stream still starting that only this viewer asked for: it left before it played.
        left = [s for s in live if s.state is RunState.STARTING and viewer and s.asked_by == {viewer}]
        if left:
            return left[0], "its only viewer changed channel before it played"
        mine = [s for s in live if s.state in (RunState.RUNNING, RunState.BACKOFF)]
        if not mine:
            return None, ""
        now = time.time()
        ids = [s.id for s in mine]
        last = await self._host.redis_call(runs.last_access_times, ids)
        window = self._host.settings.viewer_window
        watchers = (
            await self._host.redis_call(runs.recent_viewers, ids, now - window)
            if viewer and window > 0
            else [set() for _ in ids]
        )
        idle = [(now - (seen or s.started), s, seen_by) for s, seen, seen_by in zip(mine, last, watchers)]
        zapped = [entry for entry in idle if viewer and entry[2] == {viewer}]
        if zapped:
            seconds, supervisor, _ = max(zapped, key=lambda entry: entry[0])
            return supervisor, "its only viewer changed channel"
        seconds, supervisor, _ = max(idle, key=lambda entry: entry[0])
        if seconds >= self._host.settings.preempt_idle:
            return supervisor, f"no request for {seconds:.0f} s"
        return None, ""
