"""A run's record in Redis, as its supervisor keeps it: written whole at a start, updated at
each change, read to know whether the run is still wanted (which renews the launcher's
promise), and written again when a Redis restart lost it.  A Redis error never ends a
stream: it is logged, and the stream runs on."""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable

from streamstate import providers, runs
from streamstate.runs import RunState

log = logging.getLogger("streamkeeper.launcher")

WANTED_EVERY = 2.0  # seconds between reads of the record: is the stream still wanted?
# The launcher's promise in the record (runs.RunRecord.until): a stream starting or in
# back-off has its next state by then, or the reaper may take it for stale.
STATE_SLACK = 10.0
# While watching, the launcher renews that promise at each look at the record (WANTED_EVERY):
# a few looks' worth, so the reaper never takes a watched run for stale in the instant
# between its FFmpeg's death and the launcher noticing it.
VOUCH_AHEAD = 3 * WANTED_EVERY + STATE_SLACK


def promised_until(state: RunState, start_timeout: float) -> float:
    """The promise a run in ``state`` makes (runs.RunRecord.until): a start is playable
    within start_timeout; a watched run is looked at again within VOUCH_AHEAD."""
    if state in (RunState.STARTING, RunState.BACKOFF):
        return time.time() + start_timeout + STATE_SLACK
    return time.time() + VOUCH_AHEAD


class RunRecordKeeper:
    def __init__(
        self,
        channel_id: str,
        run_id: str,
        redis_call: Callable[..., Awaitable[Any]],
        now: Callable[[], runs.RunRecord | None],
        start_timeout: float,
        slot_limit: int = 0,
        start_grace: float = 0.0,
    ):
        """``now``: the record as it should be now (None before the run has an FFmpeg);
        ``slot_limit``: its provider's max_streams (0: none), ``start_grace`` as for slots."""
        self.channel_id, self.run_id = channel_id, run_id
        self._call, self._now = redis_call, now
        self._start_timeout = start_timeout
        self._slot_limit, self._start_grace = slot_limit, start_grace
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

    async def ffmpeg_started(self, first: bool) -> None:
        """The run's new FFmpeg: the record written whole at the run's first, else its
        FFmpeg's fields (pid, start time, source, restarts, last error, the promise)."""
        if first and self.written_to is None:
            await self.write()
            return
        record = self._now()
        if record is not None:
            await self.update(
                pid=record.pid,
                pid_start=record.pid_start or "",
                state=RunState.STARTING,
                restarts=record.restarts,
                last_error=record.last_error,
                source=record.source,
                until=f"{promised_until(RunState.STARTING, self._start_timeout):.3f}",
            )

    async def follow(self, state: RunState, until: float | None, restarts: int, last_error: str) -> None:
        """The record follows the run's new state (states past its end are not kept: its keys
        go with the stop); ``until``: the promise, by default the state's own; a back-off
        also says how many restarts so far, and why."""
        if state not in (*runs.VOUCHED_STATES, RunState.STOPPING) or self.written_to is None:
            return
        if state in (RunState.STARTING, RunState.RUNNING) and until is None:
            until = promised_until(state, self._start_timeout)
        fields = {"restarts": restarts, "last_error": last_error} if state is RunState.BACKOFF else {}
        await self.update(state=state, until=f"{until:.3f}" if until else "", **fields)

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
            answer = await self._call(runs.vouch, self.channel_id, self.run_id, time.time() + VOUCH_AHEAD)
        except Exception as exc:  # noqa: BLE001 - redis errors of any kind
            log.warning("channel %s: cannot read its record (%s); keeping it running", self.channel_id, exc)
            return True
        if answer < 0:
            return await self._lost()
        return answer == 1

    async def _lost(self) -> bool:
        """The record is gone.  Deleted on purpose (a stop, the reaper's compare-and-delete):
        not wanted.  Lost with a Redis that restarted empty or from an older snapshot (its
        run_id changed since the record was written) or with a failover (replication is
        asynchronous): written again, and the stream runs on, with its provider slot taken
        again within the limit.  A slot another stream took meanwhile is that stream's: this
        one ends, so the provider never sees one connection over its limit for longer than
        it took to notice."""
        record = self._now()
        try:
            server = await self._call(runs.redis_server_id)
            if server == self.written_to or record is None:
                return False
            await self.write()
            if record.provider and not await self._slot_again(record):
                log.warning(
                    "channel %s: its slot of provider %s was lost with Redis and another stream holds it "
                    "now; this stream ends (the provider's limit holds)",
                    self.channel_id,
                    record.provider,
                )
                return False
        except Exception as exc:  # noqa: BLE001 - Redis gone again: keep running, ask later
            log.warning("channel %s: cannot write its record again (%s); keeping it running", self.channel_id, exc)
            return True
        log.info(
            "channel %s: record lost with a Redis restart or failover; written again (pid %s)",
            self.channel_id,
            record.pid,
        )
        return True

    async def _slot_again(self, record: runs.RunRecord) -> bool:
        """Its connection is open: its slot is held again, within the limit (False: full)."""
        if not self._slot_limit:
            await self._call(providers.hold_slot, record.provider, self.channel_id, self.run_id, record.host)
            return True
        return await self._call(
            providers.acquire_slot,
            record.provider,
            self._slot_limit,
            self.channel_id,
            self.run_id,
            record.host,
            self._start_grace,
        )
