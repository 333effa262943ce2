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
import concurrent.futures
import time
import uuid
from typing import Callable

from . import runs

# Renewed host_timeout / RENEW_SHARE apart: several renewals may fail before it matters.
RENEW_SHARE = 5
# Fenced after host_timeout / FENCE_SHARE without a renewal: the rest of host_timeout is the
# margin in which this host's connections close before any other host can see the lease gone.
FENCE_SHARE = 2
FENCE_CHECK = 0.25  # seconds between looks at the clock at most: how late past the fence a cut may come
# Seconds before a renewal that failed is tried again (at most renew_interval): a failover's
# new master is found soon after the sentinels name it.
RETRY_RENEWAL = 0.5


def renew_interval(host_timeout: float) -> float:
    return host_timeout / RENEW_SHARE


def fence_after(host_timeout: float) -> float:
    return host_timeout / FENCE_SHARE


def fencing_on(settings) -> bool:
    """Other hosts may take this host's slots: a multi-host set-up."""
    return bool(settings.hosts)


class HostLease:
    """The lease as one service holds it.  ``renew`` is blocking (a Redis call: keep_lease runs
    it in a thread of its own); ``fenced`` only reads the clock, so a hung Redis call cannot
    delay it."""

    def __init__(
        self,
        client,
        host_id: str,
        host_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        address: str = "",
    ):
        """``address``: this host's nginx as the other hosts reach it, said with each renewal."""
        self.client, self.host_id, self.host_timeout = client, host_id, host_timeout
        self.address = address
        self.clock = clock
        self.confirmed: float | None = None  # when the last successful renewal was sent (clock)
        self.held: str | None = None  # the lease's id at the last renewal
        self.began = 0.0  # when the lease held now began (epoch, Redis's clock)
        # The last renewal found the lease lapsed (the key had expired, or it never held
        # one): other hosts may have taken this host's slots meanwhile.
        self.lapsed = True

    def renew(self) -> bool:
        sent = self.clock()
        candidate = uuid.uuid4().hex
        try:
            held = runs.refresh_host(self.client, self.host_id, self.host_timeout, candidate, self.address)
        except Exception:  # noqa: BLE001 - any failure to renew brings the fence nearer, nothing else
            return False
        lease_id, _, began = held.partition("@")
        self.lapsed = lease_id == candidate or (self.held is not None and lease_id != self.held)
        self.held = lease_id
        self.began = float(began) if began.replace(".", "", 1).isdigit() else time.time()
        self.confirmed = max(self.confirmed or sent, sent)
        return True

    def age(self) -> float | None:
        """Seconds since the last successful renewal was sent (None: never)."""
        return None if self.confirmed is None else self.clock() - self.confirmed

    def fenced(self) -> bool:
        age = self.age()
        return age is None or age >= fence_after(self.host_timeout)


async def keep_lease(
    lease: HostLease,
    stopping: asyncio.Event,
    fence: Callable[[float | None], None],
    unfence: Callable[[bool, float], None],
) -> None:
    """Hold the lease until ``stopping``.  The service starts fenced (nothing is pulled before
    a lease is held): ``unfence(lapsed, began)`` once a renewal succeeds (``lapsed``: the
    lease had expired; ``began``: when the lease held now began, so whatever was allowed
    before it is void), ``fence(age)`` once it lapses again, or if no renewal succeeds
    within fence_after of the start; a lapse found while unfenced is a fence and an
    unfence at once.  Renewals run on their
    cadence in a thread of their own (a busy shared pool or a hung Redis call delays no
    renewal of another and no look at the clock); the clock is read every FENCE_CHECK."""
    loop = asyncio.get_running_loop()
    renewer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lease")
    started = time.monotonic()
    next_renewal = started
    renewing: asyncio.Future | None = None
    fenced, announced = True, False  # announced: fence() was called for this lapse
    try:
        while not stopping.is_set():
            if renewing is not None and renewing.done():
                if not renewing.result():  # failed: tried again soon, not a whole interval later
                    next_renewal = min(next_renewal, time.monotonic() + RETRY_RENEWAL)
                elif lease.lapsed and not fenced:
                    # The key had gone while this service ran (another host may have taken its
                    # slots): fenced at once, then unfenced under the new lease.
                    fence(lease.age())
                    unfence(True, lease.began)
                    lease.lapsed = False  # said once
                renewing = None
            if renewing is None and time.monotonic() >= next_renewal:
                renewing = loop.run_in_executor(renewer, lease.renew)
                next_renewal = time.monotonic() + renew_interval(lease.host_timeout)
            lapsed = lease.fenced()
            if fenced and not lapsed:
                fenced, announced = False, False
                unfence(lease.lapsed, lease.began)
                lease.lapsed = False  # said once
            elif (
                lapsed
                and not announced
                and (not fenced or time.monotonic() - started >= fence_after(lease.host_timeout))
            ):
                fenced, announced = True, True
                fence(lease.age())
            look = min(FENCE_CHECK, fence_after(lease.host_timeout) / 4)
            try:
                await asyncio.wait_for(stopping.wait(), max(0.0, min(look, next_renewal - time.monotonic())))
            except asyncio.TimeoutError:
                pass
    finally:
        renewer.shutdown(wait=False)
