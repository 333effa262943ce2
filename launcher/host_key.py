"""This host's key in Redis (host:<host_id>), kept alive so other hosts' reapers leave its
records alone; in a multi-host set-up it is the host's lease (streamstate.lease), and a
lease that lapses fences the launcher: its streams end, and it takes no start until the
lease is renewed."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from streamstate import lease, runs
from streamstate.redis_client import redis_for

from .supervisor import StreamSupervisor

log = logging.getLogger("streamkeeper.launcher")


class HostKeeper:
    def __init__(
        self,
        settings,
        redis_call: Callable[..., Awaitable[Any]],
        live_supervisors: Callable[[], list[StreamSupervisor]],
    ):
        self.settings, self._redis_call, self._live = settings, redis_call, live_supervisors
        # The lease lapsed, or is not held yet: this host starts nothing.
        self.fenced = lease.fencing_on(settings)
        # The lease lapsed (fence() was called): starts get 421, which takes this host out of
        # the edge's ring.  Before the first renewal (a start-up) they get 503: a launcher
        # restart must not take its host out.
        self.lapsed = False
        self._ending: set[asyncio.Task] = set()  # streams being ended by the fence (kept till done)

    async def keep_forever(self) -> None:
        """Keep host:<host_id> alive, so other hosts' reapers leave this host's records alone.
        In a multi-host set-up it is this host's lease (streamstate.lease): once it lapses,
        every stream here ends without a word to Redis and no start is taken until it is
        renewed; the streams ended stay ended (a viewer's next request starts a channel on
        whichever host then serves it)."""
        if lease.fencing_on(self.settings):
            # A client of its own, each renewal tried once: its cadence is keep_lease's.
            held = lease.HostLease(
                redis_for(self.settings, once=True),
                self.settings.host_id,
                self.settings.host_timeout,
                address=self.settings.host_address,
            )
            await lease.keep_lease(held, asyncio.Event(), self._fence, self._unfence)
            return
        interval = max(1.0, self.settings.reaper_interval / 2)
        while True:
            try:
                await self._redis_call(
                    runs.refresh_host,
                    self.settings.host_id,
                    self.settings.host_timeout,
                    address=self.settings.host_address,
                )
            except Exception as exc:  # noqa: BLE001 - retried next time
                log.warning("cannot refresh host key: %s", exc)
            await asyncio.sleep(interval)

    def _fence(self, age: float | None) -> None:
        self.fenced = self.lapsed = True
        live = self._live()
        log.error(
            "fenced: this host's Redis lease was not renewed for %s (fence after %g s); ending its %d stream(s) "
            "and taking no start until it is renewed",
            "its whole start" if age is None else f"{age:.1f} s",
            lease.fence_after(self.settings.host_timeout),
            len(live),
        )
        for supervisor in live:
            task = asyncio.create_task(supervisor.end_fenced(), name=f"fence-{supervisor.id}")
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)

    def _unfence(self, lapsed: bool, began: float) -> None:
        self.fenced = self.lapsed = False
        log.warning(
            "lease %s: no longer fenced; starts are taken again (streams ended by the fence stay ended)",
            "held anew" if lapsed else "renewed",
        )
