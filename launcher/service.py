"""The launcher: one supervisor per channel on this host, exactly one FFmpeg per channel.

Exclusivity: an asyncio lock per channel inside this process, and a Redis lock
with an expiry (``stream:<id>:lock``) across launcher processes and hosts.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

from streamstate import files, keys, runs
from streamstate.channels import Channel, get_channel
from streamstate.process import is_same_process
from streamstate.redis_client import redis_from_url

from .ffmpeg import build_argv
from .supervisor import StartFailed, StreamSupervisor

log = logging.getLogger("streamkeeper.launcher")


class ChannelNotFound(LookupError):
    pass


class Launcher:
    def __init__(self, settings):
        self.settings = settings
        self.redis = redis_from_url(settings.redis_url)
        self.supervisors: dict[str, StreamSupervisor] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.counters = {"starts": 0, "start_failures": 0, "joined": 0}
        self.warned: set[str] = set()      # warnings given once per process

    async def redis_call(self, function, *args, **kwargs):
        """streamstate's functions are plain and synchronous: run them off the event loop."""
        return await asyncio.to_thread(function, self.redis, *args, **kwargs)

    def _lock(self, channel_id: str) -> asyncio.Lock:
        return self._locks.setdefault(channel_id, asyncio.Lock())

    def active_supervisor(self, channel_id: str) -> StreamSupervisor | None:
        supervisor = self.supervisors.get(channel_id)
        if supervisor is not None and not supervisor.finished and supervisor.state in ("starting", "running"):
            return supervisor
        return None

    async def start(self, channel_id: str, channel: Channel | None = None) -> str:
        """Start the channel or join the start under way; 'started' or 'already_running'.

        Raises ChannelNotFound, ChannelError (bad record, refused source: FFmpeg
        never runs), StartFailed (with the reason).
        """
        channel_id = keys.check_channel_id(channel_id)
        timeout = float(self.settings.start_timeout)
        async with self._lock(channel_id):
            supervisor = self.active_supervisor(channel_id)
            if supervisor is not None:
                status = "already_running" if supervisor.state == "running" else "started"
                self.counters["joined"] += 1
            else:
                supervisor = await self._new_start(channel_id, channel)
                if supervisor is None:
                    return await self._wait_for_other_launcher(channel_id, timeout)
                status = "started"
        await supervisor.wait_playable(timeout)
        return status

    async def _new_start(self, channel_id: str, channel: Channel | None) -> StreamSupervisor | None:
        if channel is None:
            channel = await self.redis_call(get_channel, channel_id)
        if channel is None:
            raise ChannelNotFound(f"channel {channel_id}: no such channel ({keys.channel_key(channel_id)} "
                                  "does not exist)")
        argv = build_argv(channel, self.settings)          # refuses before anything runs
        token = uuid.uuid4().hex
        if not await self.redis_call(runs.acquire_start_lock, channel_id, token,
                                     float(self.settings.start_timeout) + 5):
            return None
        try:
            record = await self.redis_call(runs.get_run, channel_id)
            if record is not None and self._runs_elsewhere(record):
                return None
            if record is not None:
                log.info("channel %s: clearing a stale record (run %s, pid %s gone)", channel_id,
                         record.run_id[:8], record.pid)
                await self.redis_call(runs.delete_run_if, channel_id, record.run_id)
            supervisor = StreamSupervisor(self, channel, argv)
            self.supervisors[channel_id] = supervisor
            self.counters["starts"] += 1
            supervisor.begin()
        except BaseException:
            await self.redis_call(runs.release_start_lock, channel_id, token)
            raise
        asyncio.create_task(self._release_when_settled(supervisor, token))
        return supervisor

    async def _release_when_settled(self, supervisor: StreamSupervisor, token: str) -> None:
        """The start lock guards the first start only: once it is playable or has failed,
        the run record (or its absence) tells other launchers what they need."""
        try:
            await supervisor.wait_playable(float(self.settings.start_timeout) + 1)
        except StartFailed:
            pass
        try:
            await self.redis_call(runs.release_start_lock, supervisor.id, token)
        except Exception as exc:  # noqa: BLE001 - it expires by itself
            log.warning("channel %s: could not release the start lock (%s); it expires", supervisor.id, exc)

    def _runs_elsewhere(self, record: runs.RunRecord) -> bool:
        """A live run of another launcher process (this host: the process is alive and
        is the one recorded) or of another host."""
        if record.host != self.settings.host_id:
            return True
        return is_same_process(record.pid, record.pid_start)

    async def _wait_for_other_launcher(self, channel_id: str, timeout: float) -> str:
        """Another launcher holds the start: wait for its playlist instead of starting twice."""
        playlist = files.playlist_path(self.settings.hls_dir, channel_id)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if files.count_listed_segments(playlist) >= int(self.settings.min_segments):
                return "already_running"
            await asyncio.sleep(0.05)
        raise StartFailed(f"another launcher is starting channel {channel_id} and it is not "
                          f"playable after {timeout:g} s")

    async def stop(self, channel_id: str, reason: str) -> bool:
        channel_id = keys.check_channel_id(channel_id)
        supervisor = self.supervisors.get(channel_id)
        if supervisor is None or supervisor.finished:
            return False
        await supervisor.stop(reason)
        return True

    async def stop_all(self, reason: str) -> None:
        await asyncio.gather(*(s.stop(reason) for s in list(self.supervisors.values()) if not s.finished),
                             return_exceptions=True)

    async def refresh_host_forever(self) -> None:
        """Keep host:<host_id> alive, so other hosts' reapers leave this host's records alone."""
        interval = max(1.0, float(self.settings.reaper_interval) / 2)
        while True:
            try:
                await self.redis_call(runs.refresh_host, self.settings.host_id,
                                      float(self.settings.host_timeout))
            except Exception as exc:  # noqa: BLE001 - retried next time
                log.warning("cannot refresh host key: %s", exc)
            await asyncio.sleep(interval)

    async def clear_stale_records(self) -> int:
        """At start-up: records of this host whose FFmpeg is gone (a crashed launcher)."""
        cleared = 0
        for channel_id in await self.redis_call(runs.active_channels):
            record = await self.redis_call(runs.get_run, channel_id)
            if record is None or record.host != self.settings.host_id:
                continue
            if not is_same_process(record.pid, record.pid_start):
                await self.redis_call(runs.delete_run_if, channel_id, record.run_id)
                files.delete_stream_files(self.settings.hls_dir, channel_id)
                log.info("channel %s: cleared stale record of pid %s at start-up", channel_id, record.pid)
                cleared += 1
        return cleared

    async def streams(self) -> list[dict]:
        return await self.redis_call(collect_streams, self.settings, self.supervisors)


def collect_streams(client, settings, supervisors: dict) -> list[dict]:
    """GET /streams: every stream Redis lists as active, plus this process's supervisors."""
    ids = set(runs.active_channels(client)) | {cid for cid, s in supervisors.items() if not s.finished}
    ordered = sorted(ids, key=int)
    now = time.time()
    pipe = client.pipeline(transaction=False)
    for channel_id in ordered:
        pipe.hgetall(keys.run_key(channel_id))
        pipe.get(keys.last_access_key(channel_id))
        pipe.zcount(keys.viewers_key(channel_id), now - float(settings.viewer_window), "+inf")
    replies = pipe.execute() if ordered else []
    result = []
    for index, channel_id in enumerate(ordered):
        raw, last_access, viewers = replies[3 * index:3 * index + 3]
        record = runs.RunRecord.from_hash(channel_id, {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in (raw or {}).items()}) if raw else None
        supervisor = supervisors.get(channel_id)
        last = float(last_access) if last_access else None
        entry = {
            "id": channel_id,
            "state": supervisor.state if supervisor and not supervisor.finished else
            (record.state if record else "unknown"),
            "pid": record.pid if record else None,
            "host": record.host if record else None,
            "started": record.started if record else None,
            "last_access": last,
            "idle_seconds": round(now - last, 1) if last else None,
            "viewers": int(viewers or 0),
            "restarts": record.restarts if record else 0,
            "last_error": (supervisor.last_error if supervisor else record.last_error if record else ""),
        }
        result.append(entry)
    return result
