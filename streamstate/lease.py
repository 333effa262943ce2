"""This host's lease in Redis: ``host:<id>``, set to expire after host_timeout and renewed well
inside it.  Other hosts' reapers clear this host's records, and so free its provider slots,
only once the key has expired (streamstate.reap_rules).  So a host that cannot renew its
lease must stop pulling before then: it is *fenced* once no renewal has succeeded for
half of host_timeout, and the other half is the margin in which its upstream connections
close (the egress relay aborts them; the launcher stops its FFmpegs).

Fencing is on in a multi-host set-up (``hosts`` lists the hosts): on a single host no one
else can take a slot, and a Redis outage must not stop a watched stream."""

from __future__ import annotations

import asyncio
import time
from typing import Callable

import redis

from . import runs

# Renewed host_timeout / RENEW_SHARE apart: several renewals may fail before it matters.
RENEW_SHARE = 5
# Fenced after host_timeout / FENCE_SHARE without a renewal: the rest of host_timeout is the
# margin in which this host's connections close before any other host can see the lease gone.
FENCE_SHARE = 2
FENCE_CHECK = 0.25  # seconds between looks at the clock: how late past the fence a cut may come


def renew_interval(host_timeout: float) -> float:
    return host_timeout / RENEW_SHARE


def fence_after(host_timeout: float) -> float:
    return host_timeout / FENCE_SHARE


def fencing_on(settings) -> bool:
    """Other hosts may take this host's slots: a multi-host set-up."""
    return bool(settings.hosts)


class HostLease:
    """The lease as one service holds it.  ``renew`` is blocking (a Redis call: run it in a
    thread); ``fenced`` only reads the clock, so a hung Redis call cannot delay it."""

    def __init__(self, client, host_id: str, host_timeout: float, clock: Callable[[], float] = time.monotonic):
        self.client, self.host_id, self.host_timeout = client, host_id, host_timeout
        self.clock = clock
        self.confirmed: float | None = None  # when the last successful renewal was sent (clock)

    def renew(self) -> bool:
        sent = self.clock()
        try:
            runs.refresh_host(self.client, self.host_id, self.host_timeout)
        except redis.RedisError:
            return False
        self.confirmed = max(self.confirmed or sent, sent)
        return True

    def age(self) -> float | None:
        """Seconds since the last successful renewal was sent (None: never)."""
        return None if self.confirmed is None else self.clock() - self.confirmed

    def fenced(self) -> bool:
        age = self.age()
        return age is None or age >= fence_after(self.host_timeout)


async def keep_lease(
    lease: HostLease, stopping: asyncio.Event, fence: Callable[[float | None], None], unfence: Callable[[], None]
) -> None:
    """Hold the lease until ``stopping``: renewed on its cadence in a thread (a hung Redis
    call delays no look at the clock), the clock looked at every FENCE_CHECK: ``fence(age)``
    once the lease lapses, ``unfence()`` once it is renewed again."""
    await asyncio.to_thread(lease.renew)  # a service that starts without its lease pulls nothing
    next_renewal = time.monotonic() + renew_interval(lease.host_timeout)
    renewing: asyncio.Future | None = None
    fenced = False
    while not stopping.is_set():
        if (renewing is None or renewing.done()) and time.monotonic() >= next_renewal:
            renewing = asyncio.ensure_future(asyncio.to_thread(lease.renew))
            next_renewal = time.monotonic() + renew_interval(lease.host_timeout)
        if lease.fenced() != fenced:
            fenced = not fenced
            fence(lease.age()) if fenced else unfence()
        try:
            await asyncio.wait_for(stopping.wait(), FENCE_CHECK)
        except asyncio.TimeoutError:
            pass
