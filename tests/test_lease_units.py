"""The host lease (streamstate.lease) as logic: a fake Redis that can hang or fail, a real
event loop.  A service starts fenced, is unfenced by its first renewal (saying whether the
lease had lapsed), is fenced when renewals stop succeeding, even while one hangs."""

from __future__ import annotations

import asyncio
import threading

import pytest
import redis

from streamstate import lease

pytestmark = pytest.mark.unit

HOST_TIMEOUT = 2.0  # fenced 1 s after the last renewal; renewed every 0.4 s (margin for a loaded machine)


class FakeRedis:
    """Just what refresh_host uses: a registered script that keeps the lease's id."""

    def __init__(self):
        self.value: str | None = None
        self.down = False
        self.hang = threading.Event()  # set: a renewal blocks until released
        self.release = threading.Event()

    def register_script(self, source):
        def run(keys, args):
            if self.hang.is_set():
                self.release.wait(5)
            if self.down:
                raise redis.ConnectionError("redis down")
            if self.value is None:
                self.value = f"{args[1]}@1000.000000"  # a new lease, begun by Redis's clock
            return self.value

        return run


async def hold(client: FakeRedis, events: list, until) -> None:
    stopping = asyncio.Event()
    held = lease.HostLease(client, "hostB", HOST_TIMEOUT)
    task = asyncio.create_task(
        lease.keep_lease(
            held,
            stopping,
            lambda age: events.append(("fence", age)),
            lambda lapsed, began: events.append(("unfence", lapsed)),
        )
    )
    try:
        async with asyncio.timeout(10):
            while not until(events):
                await asyncio.sleep(0.01)
    finally:
        stopping.set()
        await task


def test_a_service_starts_fenced_and_its_first_renewal_says_the_lease_was_new():
    events: list = []
    asyncio.run(hold(FakeRedis(), events, lambda e: e))
    assert events == [("unfence", True)]  # the key did not exist: a new lease (lapsed)


def test_a_lease_that_stood_is_not_lapsed():
    client = FakeRedis()
    client.value = "0abc@999.000000"  # another service of this host kept it
    events: list = []
    asyncio.run(hold(client, events, lambda e: e))
    assert events == [("unfence", False)]


def test_renewals_failing_fence_the_service_and_a_renewal_unfences_it():
    client = FakeRedis()
    events: list = []

    def script(e):
        if e == [("unfence", True)]:
            client.down = True
        if len(e) == 2 and e[1][0] == "fence":
            client.down = False
        return len(e) == 3

    asyncio.run(hold(client, events, script))
    assert [kind for kind, _ in events] == ["unfence", "fence", "unfence"]
    assert events[1][1] >= lease.fence_after(HOST_TIMEOUT)  # the age it was fenced at
    assert events[2] == ("unfence", False)  # the key never expired here (the fake keeps it)


def test_a_hung_renewal_does_not_delay_the_fence():
    client = FakeRedis()
    events: list = []

    def script(e):
        if e == [("unfence", True)]:
            client.hang.set()
        return len(e) == 2

    try:
        asyncio.run(hold(client, events, script))
    finally:
        client.release.set()
    assert [kind for kind, _ in events] == ["unfence", "fence"]


def test_a_service_that_never_renews_is_fenced_from_its_start():
    client = FakeRedis()
    client.down = True
    events: list = []
    asyncio.run(hold(client, events, lambda e: e))
    assert events == [("fence", None)]


def test_a_lease_lost_while_held_fences_and_unfences_under_the_new_one():
    """Attack finding: a key lost while the service was unfenced (a lagging replica promoted,
    a flush) went unnoticed; other hosts could reap this host's records meanwhile."""
    client = FakeRedis()
    events: list = []

    def script(e):
        if e == [("unfence", True)]:
            client.value = None  # the key is gone; the next renewal starts a new lease
            events.append(("lost", None))
        return len(e) == 4

    asyncio.run(hold(client, events, script))
    assert events[1:] == [("lost", None), ("fence", events[2][1]), ("unfence", True)]
