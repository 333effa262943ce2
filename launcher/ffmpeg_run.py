"""A stream's FFmpeg, one at a time: prepared (egress ticket, resolver, argv), spawned in a
session of its own, waited on until its first segments are published, watched until it
ends, stalls, or the host cannot take its output, and stopped.  Why it ended is kept here
(cause, failure, last_error; launcher.diagnosis reads FFmpeg's log) for the supervisor,
which decides what follows (launcher.supervisor, streamstate.stream_end)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import time
from typing import Awaitable, Callable

from streamstate import egress, files, hls, stream_end
from streamstate.channels import Channel, ChannelError
from streamstate.process import ProcessHandle, process_start_time
from streamstate.redact import redact_url
from streamstate.stream_end import Cause
from streamstate.upstreams import Upstream

from .child import SLOW_WINDOW, AdoptedProcess, PaceMeter, exit_text, stop_with_grace
from .diagnosis import LOG_MARK, diagnose, relay_refused
from .ffmpeg import build_argv
from .host_services import HostServices
from .publisher import PlaylistPublisher
from .resolvers import ResolveFailed, resolve
from .run_record import WANTED_EVERY

log = logging.getLogger("streamkeeper.launcher")

POLL_READY = 0.05  # seconds between playlist checks while starting
# Seconds between health checks while running; each also publishes FFmpeg's new segments,
# so it is the most a segment waits to reach the viewers' playlist.
WATCH_INTERVAL = 0.25
SLOW_RATIO = 0.9  # media seconds per wall second below this: slower than real time
BACK_TO_REAL_TIME = 0.97  # ... and at or above this again: no longer slow (a margin against flapping)
LOG_CAP_EVERY = 40  # watch ticks between trims of FFmpeg's log file (10 s at WATCH_INTERVAL)


class FfmpegRun:
    def __init__(
        self,
        host: HostServices,
        channel: Channel,
        upstream: Upstream | None,
        publisher: PlaylistPublisher,
        slot_provider: str | None,
        stop_requested: Callable[[], bool],
    ):
        """``slot_provider``: the limited provider whose connection slot the stream holds;
        ``stop_requested``: the stream is being stopped (every wait ends early)."""
        self.host = host
        self.settings = host.settings
        self.channel = channel
        self.id = channel.id
        self.upstream = upstream  # None: the record is unusable, never (re)started
        self.publisher = publisher
        self.slot_provider = slot_provider
        self._stop_requested = stop_requested
        self.source = channel.source_url  # the source in use (channel.sources: the order)
        self.process: asyncio.subprocess.Process | AdoptedProcess | None = None
        self.pid_start: int | None = None
        self._spawned_at = 0.0
        self.cause: Cause | None = None  # why the last FFmpeg ended, for the next step
        self.failure = ""  # the class of the last failure, what a player may see
        self.last_error = ""  # the class and FFmpeg's own line (redacted), for operators
        self.slow = False  # producing slower than real time (logged once per episode)
        self.speed: float | None = None  # media seconds per wall second over SLOW_WINDOW
        self.log_path = files.ffmpeg_log_path(self.settings.log_dir, self.id)

    @property
    def child(self) -> "asyncio.subprocess.Process | AdoptedProcess":
        """The FFmpeg of this run: there is one from its spawn (or adoption) on."""
        assert self.process is not None
        return self.process

    @property
    def usable_upstream(self) -> Upstream:
        """The channel's upstream: a run whose record is unusable never spawns."""
        assert self.upstream is not None
        return self.upstream

    def adopt(self, process: AdoptedProcess, pid_start: int | None) -> None:
        """An FFmpeg a previous launcher started: this run's from now on."""
        self.process, self.pid_start = process, pid_start

    def set_failure(self, cause: Cause, detail: str = "", *, failure: str | None = None) -> None:
        """Why the stream cannot go on: ``failure`` (default the cause's own text) for players,
        and with ``detail`` for operators."""
        self.cause, self.failure = cause, failure or cause.text
        self.last_error = f"{self.failure}: {detail}" if detail else self.failure

    @property
    def freeze_limit(self) -> float:
        return hls.freeze_limit(self.settings.hls_time, self.settings.start_timeout)

    # -- spawning -----------------------------------------------------------------------
    async def relay_answers(self) -> bool:
        """Every connection goes through the egress relay: while it is down, nothing is the
        source's fault (no failover, no cooldown) and a restart waits for it."""
        if (
            await asyncio.to_thread(egress.open_connections, self.settings.egress_listen, egress.RELAY_CHECK_TIMEOUT)
            is not None
        ):
            return True
        self.set_failure(Cause.RELAY_DOWN, f"nothing answers on {self.settings.egress_listen}")
        return False

    async def relay_fenced(self) -> bool:
        """The relay refuses every connection: this host's lease lapsed (streamstate.lease)."""
        fenced = await asyncio.to_thread(egress.relay_fenced, self.settings.egress_listen, egress.RELAY_CHECK_TIMEOUT)
        return fenced is not False  # a relay that does not answer is no better

    async def _prepare(self, source: str, start_number: int) -> tuple[list[str], dict[str, str]]:
        """FFmpeg's argv and environment for one source: a fresh egress ticket, and the
        resolver's URL and cookies.  ResolveFailed or ChannelError say why not."""
        upstream = self.usable_upstream
        token = egress.write_ticket(self.settings.state_dir, self.id, upstream.proxy, self.slot_provider)
        relay = egress.relay_url(self.settings.egress_listen, self.id, token)
        url: str = source
        cookies: list[str] = []
        if upstream.resolver != "none":
            url, cookies = await asyncio.to_thread(resolve, upstream, source, relay, self.settings.tls_ca_file)
        argv = build_argv(
            self.channel,
            self.settings,
            upstream,
            source=url,
            cookies=cookies,
            start_number=start_number,
            target_duration=self.publisher.target_duration,
        )
        return argv, egress.ffmpeg_environment(self.settings.egress_listen, self.id, token)

    async def spawn(self, source: str, *, replacing: bool, restarts: int) -> int | None:
        """FFmpeg on ``source`` in a session of its own, its output appended to the channel's
        log file (not a pipe to the launcher: it outlives a launcher restart), numbering its
        segments on from the viewers' playlist; its first segment's number, or None if it
        could not be prepared (the resolver failed: the failure says why)."""
        self.source = source
        if self.slot_provider and replacing:
            # The previous FFmpeg's upstream connection is closed before the next opens one:
            # the provider never sees one connection over its limit, not even for a moment.
            if not await asyncio.to_thread(
                egress.wait_closed, self.settings.egress_listen, self.id, stream_end.RELAY_CLOSE_WAIT
            ):
                log.warning(
                    "channel %s: the relay still holds the previous FFmpeg's connection after %g s",
                    self.id,
                    stream_end.RELAY_CLOSE_WAIT,
                )
        start_number = self.publisher.begin_run()
        self._spawned_at = time.time()
        try:
            argv, environment = await self._prepare(source, start_number)
        except (ResolveFailed, ChannelError) as exc:
            self.note_failure(str(exc), from_ffmpeg=False)
            log.warning("channel %s: cannot start on %s: %s", self.id, redact_url(source), self.last_error)
            return None
        if self._stop_requested():
            return None
        log_fd = files.open_ffmpeg_log(
            self.settings.log_dir,
            self.id,
            f"{LOG_MARK}{time.strftime('%Y-%m-%dT%H:%M:%S')} start (restart {restarts})",
        )
        try:
            self.process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log_fd,
                start_new_session=True,
                env=environment,
            )
        finally:
            os.close(log_fd)
        self.pid_start = process_start_time(self.child.pid)
        return start_number

    # -- watching -----------------------------------------------------------------------
    async def until_playable(self, deadline: float) -> bool:
        """Until this FFmpeg's first min_segments segments are in the viewers' playlist."""
        minimum = self.settings.min_segments
        while time.monotonic() < deadline and not self._stop_requested():
            self.publisher.publish()
            if self.publisher.run_published >= minimum:
                return True
            if self._cannot_publish():
                return False
            if self.child.returncode is not None:
                self.note_failure(exit_text(self.process))
                return False
            if self._relay_refused():
                return False
            self.publisher.end_if_frozen(self.freeze_limit)
            await asyncio.sleep(POLL_READY)
        self.cause = Cause.SOURCE
        self.note_failure(f"no playable stream after {self.settings.start_timeout:g} s")
        return False

    async def watch(self, still_wanted: Callable[[], Awaitable[bool]]) -> str:
        """Until FFmpeg dies, stalls, or the stream is no longer wanted (``still_wanted``,
        asked every WANTED_EVERY); returns why.  Each tick publishes FFmpeg's new segments."""
        stall_after = hls.stall_after(self.settings.hls_time)
        pace = PaceMeter()
        checks = 0
        wanted_checked = 0.0
        while not self._stop_requested():
            try:
                await asyncio.wait_for(asyncio.shield(self.child.wait()), WATCH_INTERVAL)
            except asyncio.TimeoutError:
                pass
            self.publisher.publish()
            if self._cannot_publish():
                return self.last_error
            if self.child.returncode is not None:
                self.note_failure(exit_text(self.process), cause=Cause.EXITED)
                return self.last_error
            if self._relay_refused():
                return self.last_error
            unchanged = self.publisher.unchanged_for()
            if unchanged > stall_after:
                self.set_failure(Cause.STALLED, f"no new segment for {unchanged:.0f} s")
                return self.last_error
            if files.free_mb(self.settings.hls_dir) == 0:
                # FFmpeg writes empty playlists and truncated segments on a full disk, and
                # says nothing (seen with 5.1): under 1 MB free ends this FFmpeg.
                self.set_failure(Cause.DISK_FULL, f"under 1 MB free in {self.settings.hls_dir}")
                return self.last_error
            self._judge_pace(pace.update(self.publisher.media(), time.monotonic()))
            checks += 1
            if checks % LOG_CAP_EVERY == 0:
                files.cap_ffmpeg_log(self.settings.log_dir, self.id)
            if time.monotonic() - wanted_checked >= WANTED_EVERY:
                wanted_checked = time.monotonic()
                if not await still_wanted():
                    self.cause = None
                    return "no longer wanted (its record was stopped or replaced)"
        return "stop requested"

    def _cannot_publish(self) -> bool:
        """The viewers' playlist cannot be written: a full disk (waited out), or another
        error of the host's (this FFmpeg ends, and the next try says it again)."""
        error = self.publisher.write_error
        if error is None:
            return False
        if error.errno == errno.ENOSPC:
            self.set_failure(Cause.DISK_FULL, f"cannot write the playlist in {self.settings.hls_dir}")
        else:
            self.set_failure(
                Cause.LAUNCHER,
                f"cannot write the playlist ({error.strerror or error})",
            )
        return True

    def _judge_pace(self, ratio: float | None) -> None:
        if ratio is None:
            return
        self.speed = ratio
        if ratio < SLOW_RATIO and not self.slow:
            self.slow = True
            self.host.counters["slow"] += 1
            log.warning(
                "channel %s: slower than real time: %.2fx over the last %.0f s (host "
                "overloaded? lower max_streams or the quality)",
                self.id,
                ratio,
                SLOW_WINDOW,
            )
        elif ratio >= BACK_TO_REAL_TIME and self.slow:
            self.slow = False
            log.info("channel %s: back to real time (%.2fx)", self.id, ratio)

    def _relay_refused(self) -> bool:
        if not relay_refused(self.settings.state_dir, self.id, self._spawned_at):
            return False
        self.note_failure("refused by the egress relay")
        return True

    def note_failure(self, otherwise: str, *, from_ffmpeg: bool = True, cause: Cause = Cause.SOURCE) -> None:
        """Why FFmpeg failed (launcher.diagnosis); ``from_ffmpeg`` False: ``otherwise`` is the
        whole story (a resolver's failure, a record that cannot run) unless the relay refused."""
        log_path = self.log_path if from_ffmpeg else None
        found = diagnose(self.settings.state_dir, self.id, self._spawned_at, log_path, self.source, otherwise, cause)
        self.cause, self.failure, self.last_error = found.cause, found.failure, found.last_error

    # -- stopping -----------------------------------------------------------------------
    async def terminate(self, *, at_once: bool = False) -> None:
        """This FFmpeg, stopped (a replacement follows): SIGTERM through a pidfd held on the
        proven process, SIGKILL after the grace (``at_once``: SIGKILL now, its connection must
        close before anything else); then the child is reaped and its last segments published."""
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            handle = ProcessHandle.open_proven(process.pid, self.host.identity(self.id, self.pid_start))
            if handle is not None and at_once:
                with handle:
                    handle.signal(signal.SIGKILL)
            elif handle is not None and not await stop_with_grace(process, handle, self.settings.stop_grace):
                log.warning("channel %s: FFmpeg ignored SIGTERM for %g s; SIGKILL", self.id, self.settings.stop_grace)
            await process.wait()
        self.publisher.publish()

    def running_process(self) -> "asyncio.subprocess.Process | AdoptedProcess | None":
        """The FFmpeg if it still runs (the one the stop routine signals), else None."""
        process = self.process
        return process if process is not None and process.returncode is None else None
