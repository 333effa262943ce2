"""At start-up, this host's streams that a previous launcher ran (the hls_dir lock makes
this launcher the only one).  For each record of this host:

* its process proven to be the channel's FFmpeg: adopted and watched again;
* else an FFmpeg writing the channel's playlist that the record does not name yet (the
  previous launcher died between starting it and recording it): that one is adopted,
  and the record says so;
* else a run its launcher vouched for (it was between two FFmpegs): the run goes on, a
  new FFmpeg continues its viewers' playlist;
* else its FFmpeg is gone: the record is cleared by the one stop routine (files, keys,
  ticket, provider slot)."""

from __future__ import annotations

import asyncio
import logging
import os
import time

from streamstate import files, runs, stream_end
from streamstate.channel_check import validate
from streamstate.channels import Channel, ChannelError, get_channel
from streamstate.process import ProcessHandle, process_cmdline, process_start_time, stream_ffmpegs_under
from streamstate.redact import redact_url
from streamstate.upstreams import Upstream

from .child import AdoptedProcess
from .ffmpeg import start_number_of
from .host_services import HostServices
from .supervisor import StreamSupervisor

log = logging.getLogger("streamkeeper.launcher")


async def adopt_streams(host: HostServices, supervisors: dict[str, StreamSupervisor]) -> dict[str, int]:
    """Every record of this host adopted, resumed or cleared; the supervisors go into
    ``supervisors``; how many of each."""
    settings = host.settings
    counts = {"adopted": 0, "resumed": 0, "cleared": 0}
    # Every FFmpeg writing into hls_dir, read once: (pid, the playlist it writes).
    writing = await asyncio.to_thread(stream_ffmpegs_under, settings.hls_dir, host.ffmpeg_executable)
    unrecorded = _unrecorded_ffmpegs(writing)
    for channel_id in await host.redis_call(runs.active_channels):
        record = await host.redis_call(runs.get_run, channel_id)
        if record is None or record.host != settings.host_id or channel_id in supervisors:
            continue
        handle = await _proven_ffmpeg(host, record, unrecorded.get(channel_id))
        if handle is not None:
            supervisors[channel_id] = await _adopt(host, record, handle)
            counts["adopted"] += 1
        elif record.vouched(time.time()):
            if not os.path.exists(files.playlist_path(settings.hls_dir, channel_id)):
                # Vouched for, yet its playlist is not in this hls_dir: another launcher's
                # (the same host_id on two launchers is a mistake): left alone.
                log.warning(
                    "channel %s: its run %s is vouched for but its files are not in %s; "
                    "left alone (is another launcher using host_id %s?)",
                    channel_id,
                    record.run_id[:8],
                    settings.hls_dir,
                    settings.host_id,
                )
                continue
            supervisors[channel_id] = await _resume(host, record)
            counts["resumed"] += 1
        else:
            await _clear(host, record)
            counts["cleared"] += 1
    counts["files_removed"] = await _remove_left_files(host, supervisors, writing)
    return counts


async def _remove_left_files(
    host: HostServices, supervisors: dict[str, StreamSupervisor], writing: list[tuple[int, str]]
) -> int:
    """Files of channels this launcher does not run and no FFmpeg writes: left from before
    (a crash, a reboot; in a multi-host set-up another host may run the channel now, and
    nginx would serve this host's frozen playlist instead of forwarding).  How many channels'."""
    settings = host.settings
    written = {files.channel_of_file(os.path.basename(playlist)) for _, playlist in writing}
    try:
        names = await asyncio.to_thread(os.listdir, settings.hls_dir)
    except OSError:
        return 0
    left = {files.channel_of_file(name) for name in names} - written - set(supervisors) - {None}
    for channel_id in sorted(c for c in left if c is not None):
        await asyncio.to_thread(files.delete_stream_files, settings.hls_dir, channel_id)
        log.info("channel %s: removed its files left from before (no FFmpeg of this host writes them)", channel_id)
    return len(left)


def _unrecorded_ffmpegs(writing: list[tuple[int, str]]) -> dict[str, int]:
    """channel id -> pid of each FFmpeg writing a channel's own playlist in this hls_dir."""
    by_channel = {}
    for pid, playlist in writing:
        channel_id = files.channel_of_file(os.path.basename(playlist))
        if channel_id is not None and playlist.endswith(".ffmpeg.m3u8"):
            by_channel[channel_id] = pid
    return by_channel


async def _proven_ffmpeg(host: HostServices, record: runs.RunRecord, unrecorded: int | None) -> ProcessHandle | None:
    """The record's FFmpeg, proven; else the unrecorded one writing its playlist, proven
    (the record then names it)."""
    channel_id = record.channel
    handle = ProcessHandle.open_proven(record.pid, host.identity(channel_id, record.pid_start))
    if handle is not None or unrecorded is None:
        return handle
    pid_start = process_start_time(unrecorded)
    handle = ProcessHandle.open_proven(unrecorded, host.identity(channel_id, pid_start))
    if handle is not None:
        record.pid, record.pid_start = unrecorded, pid_start
        await host.redis_call(runs.update_run, channel_id, record.run_id, pid=unrecorded, pid_start=pid_start or "")
        log.info("channel %s: its FFmpeg pid %s was started but not recorded; adopting it", channel_id, unrecorded)
    return handle


async def _adopt(host: HostServices, record: runs.RunRecord, handle: ProcessHandle) -> StreamSupervisor:
    """Its FFmpeg watched again, its viewers' playlist published on from where it is."""
    channel_id = record.channel
    channel, upstream = await _channel_for_adoption(host, channel_id)
    supervisor = StreamSupervisor(host, channel, upstream, adopted=(AdoptedProcess(handle), record))
    supervisor.ffmpeg.source = next((s for s in channel.sources if redact_url(s) == record.source), channel.source_url)
    argv = process_cmdline(handle.pid)
    supervisor.publisher.adopt_run(
        start_number_of(argv),
        writes_public=bool(argv) and argv[-1] == files.playlist_path(host.settings.hls_dir, channel_id),
    )
    supervisor.begin()
    log.info(
        "channel %s: adopted pid %s (run %s)%s",
        channel_id,
        handle.pid,
        record.run_id[:8],
        "" if upstream else "; its channel record is unusable: it will not be restarted",
    )
    return supervisor


async def _resume(host: HostServices, record: runs.RunRecord) -> StreamSupervisor:
    """A run caught between two FFmpegs: the same run (its record, its provider slot)
    starts its next FFmpeg, continuing the viewers' playlist from the file."""
    channel, upstream = await _channel_for_adoption(host, record.channel)
    supervisor = StreamSupervisor(host, channel, upstream, run_id=record.run_id, resumed=record)
    supervisor.begin()
    log.info(
        "channel %s: its run %s was between two FFmpegs when the last launcher ended; starting its next one",
        record.channel,
        record.run_id[:8],
    )
    return supervisor


async def _clear(host: HostServices, record: runs.RunRecord) -> None:
    """Its FFmpeg is gone: the one stop routine clears the rest (no signal)."""
    await asyncio.to_thread(
        stream_end.stop_streams,
        host.redis,
        host.settings,
        [stream_end.StopTarget.of_record(record, "its FFmpeg is gone")],
        executable=host.ffmpeg_executable,
        log=log,
        signal=False,
        need_mark=False,
    )
    log.info(
        "channel %s: cleared the record of pid %s at start-up (its FFmpeg is gone)%s",
        record.channel,
        record.pid,
        f"; freed its slot of provider {record.provider}" if record.provider else "",
    )


async def _channel_for_adoption(host: HostServices, channel_id: str) -> tuple[Channel, Upstream | None]:
    """The channel and its upstream for restarts; without a usable record the stream is
    still watched (and cleaned when it ends), never restarted."""
    try:
        channel = await host.redis_call(get_channel, channel_id)
        if channel is not None:
            return channel, validate(channel, host.settings)
    except ChannelError as exc:
        log.warning("%s", exc)
    return Channel(id=channel_id, source_url=""), None
