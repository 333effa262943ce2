"""A run's record in Redis, as its supervisor keeps it: written whole at a start, updated at
each change, read to know whether the run is still wanted (which renews the launcher's
promise), and written again when a Redis restart lost it.  A Redis error never ends a
stream: it is logged, and the stream runs on."""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable

from streamstate import providers, runs

log = logging.getLogger("streamkeeper.launcher")


class RunRecordKeeper:
    def __init__(
        self,
        channel_id: str,
        run_id: str,
        redis_call: Callable[..., Awaitable[Any]],
        now: Callable[[], runs.RunRecord | None],
        vouch_ahead: float,
    ):
        """``now``: the record as it should be now (None before the run has an FFmpeg);
        ``vouch_ahead``: how far ahead each look at the record renews the promise."""
        self.channel_id, self.run_id = channel_id, run_id
        self._call, self._now, self._vouch_ahead = redis_call, now, vouch_ahead
        self.written_to: str | None = None  # the Redis server (its run_id) the record went to

    async def note_server(self) -> None:
        """The record is in the Redis that answers now (an adopted or resumed run's)."""
        self.written_to = await self._call(runs.redis_server_id)

    async def write(self) -> None:
        """The record, whole, with the identity of the Redis server it went to."""
        record = self._now()
        if record is not None:
            await self._call(runs.record_run, record)
            await self.note_server()

    async def update(self, **fields) -> None:
        """Keep the record current; a Redis error is logged, never fatal to the stream."""
        try:
            await self._call(runs.update_run, self.channel_id, self.run_id, **fields)
        except Exception as exc:  # noqa: BLE001 - redis errors of any kind
            log.warning("channel %s: cannot update its record (%s)", self.channel_id, exc)

    async def still_wanted(self) -> bool:
        """The record is still this run and not being stopped.  While Redis cannot be read
        the answer is yes: a Redis outage must not take watched streams down."""
        try:
            # One round trip: read whether it is still this run, and renew the promise then.
            answer = await self._call(runs.vouch, self.channel_id, self.run_id, time.time() + self._vouch_ahead)
        except Exception as exc:  # noqa: BLE001 - redis errors of any kind
            log.warning("channel %s: cannot read its record (%s); keeping it running", self.channel_id, exc)
            return True
        if answer < 0:
            return await self._lost()
        return answer == 1

    async def _lost(self) -> bool:
        """The record is gone.  Deleted on purpose (a stop, the reaper's compare-and-delete):
        not wanted.  Lost with a Redis that restarted empty or from an older snapshot (its
        run_id changed since the record was written): written again, and the stream runs on."""
        record = self._now()
        try:
            server = await self._call(runs.redis_server_id)
            if server == self.written_to or record is None:
                return False
            await self.write()
            if record.provider:  # its connection is open: its slot is held
                await self._call(providers.hold_slot, record.provider, self.channel_id, self.run_id, record.host)
        except Exception as exc:  # noqa: BLE001 - Redis gone again: keep running, ask later
            log.warning("channel %s: cannot write its record again (%s); keeping it running", self.channel_id, exc)
            return True
        log.info("channel %s: record lost with a Redis restart; written again (pid %s)", self.channel_id, record.pid)
        return True
