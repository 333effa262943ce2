"""The launcher: one supervisor per channel on this host, exactly one FFmpeg per channel.

Exclusivity: an asyncio lock per channel inside this process, and a Redis lock
with an expiry (``stream:<id>:lock``) across launcher processes and hosts.

Capacity: at most ``max_streams`` FFmpegs on this host.  A start beyond it
preempts the stream that has gone longest without any request, if that is at
least ``preempt_idle``; otherwise it is refused (503, Retry-After).  A start
also needs ``min_free_mb`` free in hls_dir.

Nothing is kept for a channel id before its record is found, so a scan of
made-up ids leaves the launcher's memory as it was.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import time

from streamstate import egress, files, keys, providers, runs
from streamstate.channel_check import validate
from streamstate.channels import Channel, get_channel
from streamstate.process import (
    StreamProcess,
    resolve_executable,
)
from streamstate.redis_client import redis_for
from streamstate.runs import RunState
from streamstate.stream_end import Cause
from streamstate.streams_view import collect_streams
from streamstate.upstreams import Upstream

from .adoption import adopt_streams
from .host_key import HostKeeper
from .host_services import HostServices
from .peers import RunsElsewhere, peer_of, refuse_if_elsewhere, take_over
from .slots import ProviderSlots
from .supervisor import StartFailed, StreamSupervisor

log = logging.getLogger("streamkeeper.launcher")

# Threads for Redis calls (redis-py's pool is thread-safe): each call takes a round trip.
REDIS_THREADS = 8


class ChannelNotFound(LookupError):
    pass


class HostBusy(StartFailed):
    """max_streams reached and no stream idle long enough to give its place up (503)."""


class RelayDown(StartFailed):
    """The egress relay does not answer: no FFmpeg could reach its upstream (503)."""


class HostFenced(StartFailed):
    """This host could not renew its Redis lease (streamstate.lease): it starts nothing (503)."""


class CoolingDown(StartFailed):
    """The channel failed within failed_cooldown: its starts get the same reason (503),
    and no FFmpeg runs, for ``seconds_left`` more."""

    def __init__(self, reason: str, seconds_left: float):
        super().__init__(reason)
        self.seconds_left = seconds_left


class Launcher:
    def __init__(self, settings):
        self.settings = settings
        self.redis = redis_for(settings)
        self.ffmpeg_executable = resolve_executable(settings.ffmpeg)
        self.supervisors: dict[str, StreamSupervisor] = {}
        self._redis_pool = concurrent.futures.ThreadPoolExecutor(REDIS_THREADS, thread_name_prefix="redis")
        # channel id -> [lock, holders and waiters]; an entry lives only while in use
        self._locks: dict[str, list] = {}
        self._legacy_locks: dict[str, list] = {}  # the same, for the legacy route's record and start
        self._capacity = asyncio.Lock()  # one start at a time decides on a free place
        self.counters = {
            "starts": 0,
            "start_failures": 0,
            "joined": 0,
            "busy": 0,
            "preempted": 0,
            "disk_full": 0,
            "slow": 0,
            "failovers": 0,
            "provider_preempted": 0,
            "provider_refused": 0,
            "relay_down": 0,
        }
        # What each stream's supervisor uses of this host (no back-pointer to the Launcher).
        self.host_services = HostServices(
            settings=settings,
            redis=self.redis,
            redis_call=self.redis_call,
            counters=self.counters,
            ffmpeg_executable=self.ffmpeg_executable,
            identity=self.identity,
        )
        self.slots = ProviderSlots(self.host_services, self.live_supervisors)
        # host:<host_id>, kept alive; in a multi-host set-up this host's lease (fencing).
        self.host_key = HostKeeper(settings, self.redis_call, self.live_supervisors)
        self.warned: set[str] = set()  # warnings given once per process
        # channel -> until when (monotonic) its refusals in failed_cooldown go unlogged
        self.warned_cooldowns: dict[str, float] = {}

    async def redis_call(self, function, *args, **kwargs):
        """streamstate's functions are plain and synchronous: run them off the event loop, in
        threads of their own (waits for processes and relays use the default ones: a slow
        stop never delays another stream's Redis call)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._redis_pool, functools.partial(function, self.redis, *args, **kwargs)
        )

    def _channel_lock(self, channel_id: str):
        """The channel's start lock in this process."""
        return _keyed_lock(self._locks, channel_id)

    def legacy_lock(self, channel_id: str):
        """The channel's lock around a legacy start (its record written, the start, the record
        put back): held outside the start lock."""
        return _keyed_lock(self._legacy_locks, channel_id)

    def identity(self, channel_id: str, start_time: int | None) -> StreamProcess:
        """What proves a pid is this channel's FFmpeg (streamstate.process)."""
        return StreamProcess.of_channel(self.ffmpeg_executable, self.settings.hls_dir, channel_id, start_time)

    def active_supervisor(self, channel_id: str) -> StreamSupervisor | None:
        supervisor = self.supervisors.get(channel_id)
        if supervisor is not None and not supervisor.finished and supervisor.state in runs.VOUCHED_STATES:
            return supervisor
        return None

    async def start(self, channel_id: str, channel: Channel | None = None, viewer: str | None = None) -> str:
        """Start the channel or join the start under way; 'started' or 'already_running'.

        ``viewer``: the hash of the viewer asking (streamstate.viewers), so a channel change
        frees the provider connection of the channel only that viewer watched.
        Raises ChannelNotFound, ChannelError (bad record, refused source: FFmpeg
        never runs), StartFailed (with the reason).
        """
        channel_id = keys.check_channel_id(channel_id)
        if self.host_key.fenced and self.host_key.lapsed:
            raise HostFenced("host fenced: its Redis lease lapsed")
        if self.host_key.fenced:
            raise StartFailed("host starting: its Redis lease is not held yet")
        timeout = self.settings.start_timeout
        supervisor = self.active_supervisor(channel_id)
        created = False
        if supervisor is None and self.settings.hosts:
            await refuse_if_elsewhere(self.host_services, channel_id)
        if supervisor is None:
            failed = await self.redis_call(runs.get_failed, channel_id)
            if failed is not None:  # failed_cooldown: no FFmpeg, the same reason
                raise CoolingDown(failed["reason"], await self.redis_call(runs.failed_seconds_left, channel_id))
            if channel is None:
                channel = await self.redis_call(get_channel, channel_id)
            if channel is None:
                raise ChannelNotFound(f"channel {channel_id}: no such channel")
            upstream = validate(channel, self.settings)  # refuses before anything runs
            async with self._channel_lock(channel_id):
                supervisor = self.active_supervisor(channel_id)
                if supervisor is None:
                    supervisor = await self._new_start(channel, upstream, viewer)
                    if supervisor is not None and viewer:
                        supervisor.asked_by.add(viewer)
                    if supervisor is None:
                        return await self._wait_for_other_launcher(channel_id, timeout)
                    created = True
        if not created:
            self.counters["joined"] += 1
        if viewer:
            supervisor.asked_by.add(viewer)
        status = "started" if created or supervisor.state is not RunState.RUNNING else "already_running"
        await supervisor.wait_playable(timeout)
        if viewer:
            await self._record_viewer(channel_id, viewer)
        return status

    async def _record_viewer(self, channel_id: str, viewer: str) -> None:
        """The viewer this start answers watches the channel from now: a channel change a
        moment later knows it without waiting for heartbeatd (runs.record_viewer)."""
        try:
            await self.redis_call(runs.record_viewer, channel_id, viewer, time.time())
        except Exception as exc:  # noqa: BLE001 - heartbeatd records it anyway
            log.warning("channel %s: cannot record its viewer (%s)", channel_id, exc)

    async def _new_start(self, channel: Channel, upstream: Upstream, viewer: str | None) -> StreamSupervisor | None:
        """A supervisor for the channel, once this host has room, its provider a free
        connection, and the start lock is ours; None when another launcher runs or starts it."""
        channel_id = channel.id
        self._check_free_space(channel_id)
        await self._check_relay(channel_id)
        token = runs.start_lock_token(self.settings.host_id)
        if not await self._take_start_lock(channel_id, token):
            return None
        try:
            record = await self.redis_call(runs.get_run, channel_id)
            if record is not None and record.host != self.settings.host_id:
                await take_over(self.host_services, record)
            elif record is not None and self._runs_elsewhere(record):
                await self.redis_call(runs.release_start_lock, channel_id, token)
                return None
            elif record is not None:
                log.info(
                    "channel %s: clearing a stale record (run %s, pid %s gone)",
                    channel_id,
                    record.run_id[:8],
                    record.pid,
                )
                await self.redis_call(runs.delete_run_if, channel_id, record.run_id)
            run_id = runs.new_run_id()
            await self.slots.take(upstream, channel_id, run_id, viewer)
            try:
                async with self._capacity:
                    await self._make_room(channel_id)
                    if self.host_key.fenced:  # fenced while this start waited: it must not run
                        raise HostFenced("host fenced: its Redis lease lapsed")
                    supervisor = StreamSupervisor(self.host_services, channel, upstream, run_id=run_id)
                    self.supervisors[channel_id] = supervisor
                    self.counters["starts"] += 1
                    supervisor.begin()
            except BaseException:
                if upstream.limited_provider is not None:
                    await self.redis_call(providers.release_slot, upstream.limited_provider.name, channel_id, run_id)
                raise
        except BaseException:
            await self.redis_call(runs.release_start_lock, channel_id, token)
            raise
        asyncio.create_task(self._release_when_settled(supervisor, token))
        return supervisor

    async def _release_when_settled(self, supervisor: StreamSupervisor, token: str) -> None:
        """The start lock guards the first start only: once it is playable or has failed,
        the run record (or its absence) tells other launchers what they need."""
        try:
            await supervisor.wait_playable(self.settings.start_timeout + 1)
        except StartFailed:
            pass
        try:
            await self.redis_call(runs.release_start_lock, supervisor.id, token)
        except Exception as exc:  # noqa: BLE001 - it expires by itself
            log.warning("channel %s: could not release the start lock (%s); it expires", supervisor.id, exc)

    def _check_free_space(self, channel_id: str) -> None:
        """min_free_mb in hls_dir, or the start is refused (a full disk served players
        truncated segments while FFmpeg kept running)."""
        minimum = self.settings.min_free_mb
        free = files.free_mb(self.settings.hls_dir)
        if minimum and free is not None and free < minimum:
            self.counters["disk_full"] += 1
            log.error(
                "channel %s: not started: %d MB free in %s, min_free_mb is %d",
                channel_id,
                free,
                self.settings.hls_dir,
                minimum,
            )
            raise StartFailed(Cause.DISK_FULL.text)

    def status_line(self) -> str:
        """systemd's STATUS=: streams per state, and what was refused or failed."""
        states = collections.Counter(s.state for s in self.live_supervisors())
        shown = (
            ", ".join(
                f"{states[state]} {state.value}"
                for state in (RunState.RUNNING, RunState.STARTING, RunState.BACKOFF, RunState.STOPPING)
                if states[state]
            )
            or "no stream"
        )
        return (
            f"{shown}; starts {self.counters['starts']}, failed {self.counters['start_failures']}, "
            f"busy {self.counters['busy']}"
        )

    def live_supervisors(self) -> list[StreamSupervisor]:
        return [s for s in self.supervisors.values() if not s.finished]

    async def _make_room(self, channel_id: str) -> None:
        """At most max_streams FFmpegs: when full, stop the stream longest without any
        request if that is at least preempt_idle (its FFmpeg has exited when this returns),
        else HostBusy."""
        live = self.live_supervisors()
        limit = self.settings.max_streams
        if len(live) < limit:
            return
        last = await self.redis_call(runs.last_access_times, [s.id for s in live])
        now = time.time()
        idle = sorted(
            ((now - (seen or s.started), s) for s, seen in zip(live, last) if s.state is RunState.RUNNING),
            key=lambda pair: pair[0],
            reverse=True,
        )
        preempt_idle = self.settings.preempt_idle
        if not idle or idle[0][0] < preempt_idle:
            self.counters["busy"] += 1
            log.warning(
                "channel %s: not started: host at max_streams (%d) and no stream idle for %g s",
                channel_id,
                limit,
                preempt_idle,
            )
            raise HostBusy(f"host busy: {limit} streams running, none idle for {preempt_idle:g} s")
        seconds, victim = idle[0]
        self.counters["preempted"] += 1
        log.info("channel %s: preempted (no request for %.0f s) to start channel %s", victim.id, seconds, channel_id)
        await victim.stop(f"preempted by a start of channel {channel_id}")

    async def _check_relay(self, channel_id: str) -> None:
        """Every upstream connection goes through the egress relay: without it, no start."""
        if (
            await asyncio.to_thread(egress.open_connections, self.settings.egress_listen, egress.RELAY_CHECK_TIMEOUT)
            is None
        ):
            self.counters["relay_down"] += 1
            log.error(
                "channel %s: not started: the egress relay does not answer on %s (is stream-egress running?)",
                channel_id,
                self.settings.egress_listen,
            )
            raise RelayDown(Cause.RELAY_DOWN.text)

    async def _take_start_lock(self, channel_id: str, token: str) -> bool:
        """The channel's start lock, across hosts.  Held by another host: RunsElsewhere.  Held
        by this host while it starts nothing of the channel (the caller holds the channel's
        lock here, and no supervisor runs it): a lock whose release was lost (Redis
        unreachable at the time), dropped and taken.  False: another launcher process of
        this host (an old one still running) starts it."""
        ttl = self.settings.start_timeout + 5
        if await self.redis_call(runs.acquire_start_lock, channel_id, token, ttl):
            return True
        value, holder = await self.redis_call(runs.start_lock_holder, channel_id)
        if holder is not None and holder != self.settings.host_id:
            raise RunsElsewhere(
                f"channel {channel_id} is starting on host {holder}; retry shortly",
                await peer_of(self.settings, self.redis_call, holder),
            )
        if holder == self.settings.host_id and value and self.active_supervisor(channel_id) is None:
            log.info("channel %s: dropping a start lock this host left (its release was lost)", channel_id)
            await self.redis_call(runs.drop_start_lock, channel_id, value)
            return await self.redis_call(runs.acquire_start_lock, channel_id, token, ttl)
        return False

    def _runs_elsewhere(self, record: runs.RunRecord) -> bool:
        """A live run of another launcher process (this host: the process is proven to be
        the channel's FFmpeg, started when recorded) or of another host."""
        if record.host != self.settings.host_id:
            return True
        return self.identity(record.channel, record.pid_start).proven_by(record.pid)

    async def _wait_for_other_launcher(self, channel_id: str, timeout: float) -> str:
        """Another launcher holds the start: wait for its playlist instead of starting twice."""
        playlist = files.playlist_path(self.settings.hls_dir, channel_id)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if files.count_listed_segments(playlist) >= self.settings.min_segments:
                return "already_running"
            await asyncio.sleep(0.05)
        raise StartFailed(
            f"another launcher is starting channel {channel_id} and it is not playable after {timeout:g} s"
        )

    async def stop(self, channel_id: str, reason: str) -> bool:
        channel_id = keys.check_channel_id(channel_id)
        supervisor = self.supervisors.get(channel_id)
        if supervisor is None or supervisor.finished:
            return False
        await supervisor.stop(reason)
        return True

    async def stop_all(self, reason: str) -> None:
        await asyncio.gather(
            *(s.stop(reason) for s in list(self.supervisors.values()) if not s.finished), return_exceptions=True
        )

    async def adopt_streams(self) -> dict[str, int]:
        """At start-up: this host's streams a previous launcher ran (launcher.adoption)."""
        return await adopt_streams(self.host_services, self.supervisors)

    def detach_all(self) -> None:
        """The launcher exits without stopping anything: the next one adopts the streams."""
        for supervisor in self.live_supervisors():
            supervisor.detach()

    async def streams(self) -> dict:
        return await self.redis_call(collect_streams, self.settings, self.supervisors)


@contextlib.asynccontextmanager
async def _keyed_lock(table: dict[str, list], key: str):
    """The lock of ``key`` in ``table``, forgotten once nobody holds or awaits it."""
    entry = table.get(key)
    if entry is None:
        entry = table[key] = [asyncio.Lock(), 0]
    entry[1] += 1
    try:
        async with entry[0]:
            yield
    finally:
        entry[1] -= 1
        if entry[1] == 0:
            del table[key]
