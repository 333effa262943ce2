"""One channel's FFmpeg on this host: start it, wait until playable, watch it, restart it, stop it.

States (streamstate.runs.TRANSITIONS): ``starting`` (FFmpeg runs, its first segment
not yet published), ``running``, ``backoff`` (between two FFmpegs), ``failed``,
``stopping``/``stopped``.

The viewers' playlist is published from FFmpeg's by this stream's PlaylistPublisher
(launcher.publisher), so it outlives any one FFmpeg: while the stream is wanted (its
run record is still this run and not ``stopping``), a dead or stalled FFmpeg is
replaced and the viewers' playlist continues, with a discontinuity, never served
unchanged for longer than streamstate.hls.freeze_limit.  What follows an FFmpeg's end
and the stop itself are streamstate.stream_end's rules.  Idle stops are the reaper's
job: it marks the record ``stopping`` before it signals.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import logging
import os
import time
from typing import Any, Awaitable, Callable

from streamstate import egress, files, hls, runs, stream_end
from streamstate.channels import Channel, ChannelError
from streamstate.process import ProcessHandle, StreamProcess, process_start_time
from streamstate.redact import redact_url
from streamstate.runs import RunState
from streamstate.settings import Settings
from streamstate.stream_end import Cause, Next
from streamstate.upstreams import Upstream

from .child import SLOW_WINDOW, AdoptedProcess, PaceMeter, exit_text, stop_with_grace
from .diagnosis import LOG_MARK, diagnose, relay_refused
from .ffmpeg import DISK_FULL, build_argv
from .publisher import PlaylistPublisher
from .resolvers import ResolveFailed, resolve
from .run_record import RunRecordKeeper
from .sources import SourceOrder

log = logging.getLogger("streamkeeper.launcher")

POLL_READY = 0.05  # seconds between playlist checks while starting
# Seconds between health checks while running; each also publishes FFmpeg's new segments,
# so it is the most a segment waits to reach the viewers' playlist.
WATCH_INTERVAL = 0.25
WAIT_TICK = 0.25  # seconds between looks while waiting (back-off, relay down, disk full)
WANTED_EVERY = 2.0  # seconds between reads of the record: is the stream still wanted?
# The launcher's promise in the record (runs.RunRecord.until): a stream starting or in
# back-off has its next state by then, or the reaper may take it for stale.
STATE_SLACK = 10.0
# While watching, the launcher renews that promise at each look at the record (WANTED_EVERY):
# a few looks' worth, so the reaper never takes a watched run for stale in the instant
# between its FFmpeg's death and the launcher noticing it.
VOUCH_AHEAD = 3 * WANTED_EVERY + STATE_SLACK
SLOW_RATIO = 0.9  # media seconds per wall second below this: slower than real time


class StartFailed(Exception):
    """The stream did not become playable; the message is the class of failure a player
    may see (``upstream refused: HTTP 403``), never a URL."""


RELAY_DOWN = "egress relay unavailable"


@dataclasses.dataclass(frozen=True)
class HostServices:
    """What a stream's supervisor uses of its host, handed to it (no back-pointer to the
    Launcher): Redis (its client, and calls in the launcher's Redis threads), the counters
    the metrics show, and what proves a pid is a channel's FFmpeg."""

    settings: Settings
    redis: Any
    redis_call: Callable[..., Awaitable[Any]]
    counters: dict[str, int]
    ffmpeg_executable: str | None
    identity: Callable[[str, int | None], StreamProcess]


class StreamSupervisor:
    def __init__(
        self,
        host: HostServices,
        channel: Channel,
        upstream: Upstream | None,
        adopted: "tuple[AdoptedProcess, runs.RunRecord] | None" = None,
        run_id: str | None = None,
        resumed: "runs.RunRecord | None" = None,
    ):
        """``adopted``: an FFmpeg a previous launcher started, and its record; ``resumed``:
        the record of a run a previous launcher left between two FFmpegs (its next starts
        at once, continuing the viewers' playlist)."""
        self.host = host
        self.settings = host.settings
        self.channel = channel
        self.id = channel.id
        self.upstream = upstream  # None: the record is unusable, never (re)started
        self.source = channel.source_url  # the source in use (channel.sources: the order)
        self._spawned_at = 0.0
        self.state = RunState.STARTING
        self.run_id = run_id or runs.new_run_id()
        self.process: asyncio.subprocess.Process | AdoptedProcess | None = None
        self.pid_start: int | None = None
        self.started = time.time()
        self.restarts = 0
        self.cause: Cause | None = None  # why the last FFmpeg ended, for the next step
        self.failure = ""  # the class of the last failure, what a player may see
        self.last_error = ""  # the class and FFmpeg's own line (redacted), for operators
        self.log_path = files.ffmpeg_log_path(self.settings.log_dir, self.id)
        profile = self.settings.quality_profiles.get(channel.quality, {})
        self.publisher = PlaylistPublisher(
            self.settings.hls_dir,
            self.id,
            list_size=self.settings.hls_list_size,
            target_duration=hls.target_duration(self.settings.hls_time, profile),
        )
        self._adopted = adopted[0] if adopted else None
        self._resumed = resumed
        inherited = adopted[1] if adopted else resumed
        # The provider account whose connection slot this run holds (taken before the start;
        # an adopted or resumed run's is in its record).
        limited = upstream.limited_provider if upstream is not None else None
        self.slot_provider = (inherited.provider or None) if inherited else limited.name if limited else None
        self._detaching = False  # the launcher is exiting: leave FFmpeg running
        self.slow = False  # producing slower than real time (logged once per episode)
        self.speed: float | None = None  # media seconds per wall second over SLOW_WINDOW
        self.asked_by: set[str] = set()  # viewers whose requests started or joined it (hashes)
        self._changed = asyncio.Condition()
        self._task: asyncio.Task | None = None
        self._stop_requested = False
        self._wanted_checked = 0.0  # monotonic time of the last read of the record
        if adopted:
            process, record = adopted
            self.run_id, self.process, self.pid_start = record.run_id, process, record.pid_start
            self.started, self.restarts, self.state = record.started, record.restarts, RunState.RUNNING
        if resumed:
            self.started, self.restarts = resumed.started, resumed.restarts
            self.publisher.resume()
        self.sources = SourceOrder(channel, host.redis_call, host.counters, self.settings.source_cooldown)
        self.record = RunRecordKeeper(self.id, self.run_id, host.redis_call, self._record_now, VOUCH_AHEAD)

    # -- what the HTTP handlers call ------------------------------------------------
    def begin(self) -> None:
        self._task = asyncio.create_task(self._run_guarded(), name=f"stream-{self.id}")

    async def _run_guarded(self) -> None:
        """Whatever goes wrong (Redis gone at the first start, say), no FFmpeg is left
        running unsupervised and waiters get an answer."""
        try:
            await self._run()
        except asyncio.CancelledError:
            if not self._detaching:
                await self._end(RunState.STOPPED, "supervisor cancelled", signal=True)
            raise
        except Exception as exc:  # noqa: BLE001 - reported as the stream's error
            log.error("channel %s: supervisor failed: %s", self.id, exc)
            self.cause, self.failure = Cause.LAUNCHER, "launcher error"
            self.last_error = f"launcher error: {exc}"
            await self._end(RunState.FAILED, self.last_error, signal=True)

    @property
    def child(self) -> "asyncio.subprocess.Process | AdoptedProcess":
        """This run's FFmpeg: there is one from its spawn (or adoption) on."""
        assert self.process is not None
        return self.process

    @property
    def usable_upstream(self) -> Upstream:
        """The channel's upstream: a run whose record is unusable never spawns."""
        assert self.upstream is not None
        return self.upstream

    @property
    def provider_name(self) -> str | None:
        """The provider whose connection slot this stream holds (limited providers only)."""
        return self.slot_provider

    @property
    def finished(self) -> bool:
        return self._task is not None and self._task.done()

    async def wait_playable(self, timeout: float) -> None:
        """Return once running; raise StartFailed (with the reason) or on timeout."""
        try:
            async with self._changed:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.state in (RunState.RUNNING, RunState.FAILED, RunState.STOPPED)),
                    timeout,
                )
        except asyncio.TimeoutError:
            raise StartFailed(f"no playable stream after {timeout:g} s") from None
        if self.state is not RunState.RUNNING:
            raise StartFailed(self.failure or f"stream {self.state}")

    async def stop(self, reason: str) -> None:
        """The stream ends now, by the one stop routine (streamstate.stream_end): marked
        stopping, FFmpeg signalled, files, keys, ticket, provider slot."""
        self._stop_requested = True
        self.publisher.close()
        if not self.state.ended:
            log.info("channel %s: stopping (%s)", self.id, reason)
            await self._set_state(RunState.STOPPING)
        await self._end(RunState.STOPPED, reason, signal=True)
        if self._task is not None and not self._task.done() and self._task is not asyncio.current_task():
            await asyncio.wait({self._task}, timeout=self.settings.stop_grace + 5)

    # -- the run ----------------------------------------------------------------
    async def _run(self) -> None:
        """starting -> running -> (exit or stall) -> what stream_end.after_exit says: a
        restart (backoff -> starting, the viewers' playlist continuing), a wait, a failure,
        or the end."""
        restart_times: collections.deque[float] = collections.deque()
        first = self._adopted is None and self._resumed is None
        if self._resumed is not None:  # a record to keep, written to this Redis
            await self.record.note_server()
        while not self._stop_requested:
            if self._adopted is not None:  # it plays already: watch it
                self._adopted, playable = None, True
                await self.record.note_server()
            elif self.upstream is None:
                self.failure = "channel record missing or unusable: cannot restart"
                await self._fail(self.failure)
                return
            else:
                playable = await self._start_from_sources(first)
            if playable:
                if first:
                    log.info(
                        "channel %s: playable after %.2f s (pid %s)",
                        self.id,
                        time.time() - self.started,
                        self.child.pid,
                    )
                first = False
                await self._set_state(RunState.RUNNING)
                why = await self._watch()
                if (
                    self.cause in (Cause.EXITED, Cause.STALLED)
                    and not self._stop_requested
                    and not await self._relay_answers()
                ):
                    # Its connection went with the relay: the host's problem, waited out
                    # without spending a restart or growing the back-off.
                    why = self.last_error
            else:
                why = self.last_error
            await self._terminate()
            if self._stop_requested:
                return
            window = self.settings.restart_window
            while restart_times and restart_times[0] < time.monotonic() - window:
                restart_times.popleft()
            step = stream_end.after_exit(
                self.cause or Cause.EXITED,
                ever_playable=not first,
                wanted=await self._still_wanted(),
                restarts_in_window=len(restart_times),
                max_restarts=self.settings.max_restarts,
                restart_window=window,
            )
            if step.next is Next.STOP:
                log.info("channel %s: FFmpeg ended and the stream is %s", self.id, step.why)
                await self._end(RunState.STOPPED, step.why, signal=False)
                return
            if step.next is Next.FAIL:
                await self._fail(why if first else f"{step.why}; last: {why}")
                return
            if step.next is Next.WAIT:
                if not await self._wait_for_host(why):
                    return
                continue
            restart_times.append(time.monotonic())
            self.restarts += 1
            log.warning(
                "channel %s: restarting FFmpeg%s (%s; restart %d)",
                self.id,
                f" in {step.delay:g} s" if step.delay else "",
                why,
                self.restarts,
            )
            if not await self._backoff(step.delay):
                return

    async def _backoff(self, delay: float) -> bool:
        """backoff for ``delay`` seconds, then starting; False if the stream ended meanwhile."""
        await self._set_state(RunState.BACKOFF, until=time.time() + delay + STATE_SLACK)
        deadline = time.monotonic() + delay
        next_look = time.monotonic() + WANTED_EVERY
        while time.monotonic() < deadline and not self._stop_requested:
            self._enforce_freeze_limit()
            if time.monotonic() >= next_look:
                # A stream reaped (idle) or stopped during a long back-off ends now, not when
                # the back-off is over: the launcher's view and Redis's agree.
                next_look = time.monotonic() + WANTED_EVERY
                if not await self._still_wanted():
                    break
            await asyncio.sleep(min(WAIT_TICK, max(0.0, deadline - time.monotonic())))
        if self._stop_requested:
            return False
        if delay and not await self._still_wanted():
            log.info("channel %s: no longer wanted during its back-off", self.id)
            await self._end(RunState.STOPPED, "no longer wanted", signal=False)
            return False
        await self._set_state(RunState.STARTING)
        return True

    async def _wait_for_host(self, why: str) -> bool:
        """A problem of this host, not of the stream (the egress relay down, hls_dir full):
        wait in backoff, spending no restart, until it is gone; then starting (True).  A full
        disk that stays full past the freeze limit fails the stream."""
        cause = self.cause
        if cause is Cause.DISK_FULL:
            self.host.counters["disk_full"] += 1
        log.warning("channel %s: %s; starting FFmpeg again once it is solved", self.id, why)
        began = time.monotonic()
        limit = hls.freeze_limit(self.settings.hls_time, self.settings.start_timeout)
        while not self._stop_requested:
            await self._set_state(RunState.BACKOFF, until=time.time() + WANTED_EVERY + STATE_SLACK)
            if cause is Cause.RELAY_DOWN and await self._relay_answers():
                break
            if cause is Cause.DISK_FULL and (files.free_mb(self.settings.hls_dir) or 0) >= max(
                1, self.settings.min_free_mb
            ):
                break
            if cause is Cause.DISK_FULL and time.monotonic() - began > limit:
                self.cause, self.failure = Cause.DISK_FULL, DISK_FULL
                await self._fail(f"{why}; still full after {limit:g} s")
                return False
            self._enforce_freeze_limit()
            if not await self._still_wanted():
                await self._end(RunState.STOPPED, "no longer wanted", signal=False)
                return False
            await asyncio.sleep(WANTED_EVERY)
        if self._stop_requested:
            return False
        await self._set_state(RunState.STARTING)
        return True

    def _enforce_freeze_limit(self) -> None:
        """No viewers' playlist is served unchanged past the freeze limit: the session ends
        and its files go (a player's next request starts the channel again)."""
        limit = hls.freeze_limit(self.settings.hls_time, self.settings.start_timeout)
        if self.publisher.playlist is not None and self.publisher.unchanged_for() > limit:
            log.warning(
                "channel %s: its playlist did not change for %.0f s (freeze limit %g s); its "
                "files are removed, the next request starts it again",
                self.id,
                self.publisher.unchanged_for(),
                limit,
            )
            self.publisher.end_session()

    async def _fail(self, why: str) -> None:
        """failed: files and keys go; starts get 503 with the reason for failed_cooldown."""
        if not self.failure:
            self._note_failure("FFmpeg did not produce a playable stream")
        log.error("channel %s: failed: %s", self.id, why or self.last_error or "unknown error")
        if self.cause is not Cause.RELAY_DOWN:  # the host's problem: the channel is not cooled down
            try:
                await self.host.redis_call(
                    runs.mark_failed, self.id, self.failure, self.settings.host_id, self.settings.failed_cooldown
                )
            except Exception as exc:  # noqa: BLE001 - the cooldown is a courtesy to the upstream
                log.warning("channel %s: cannot record the failure (%s)", self.id, exc)
        await self._end(RunState.FAILED, why, signal=False)

    async def _start_from_sources(self, first: bool) -> bool:
        """Start FFmpeg on the current source, else on the next ones: a source that fails
        (refused, unreachable, nothing playable) is skipped for source_cooldown and the next
        is tried at once, all within one start_timeout."""
        deadline = time.monotonic() + self.settings.start_timeout
        tried: list[str] = []
        while not self._stop_requested:
            if not await self._relay_answers():
                return False
            source = await self.sources.next(self.source, tried, replacing=self.restarts > 0)
            if source is None:
                if not tried:
                    self.cause, self.failure = Cause.SOURCE, self.sources.all_cooling()
                    self.last_error = self.failure
                return False
            tried.append(source)
            self.source = source
            if not await self._spawn(first, source):
                playable = False
            else:
                playable = await self._wait_until_playable(deadline)
            if playable:
                return True
            if (
                self.cause in stream_end.NOT_THE_SOURCE
                or len(self.channel.sources) == 1
                or self._stop_requested
                or not await self._relay_answers()
            ):
                return False
            await self.sources.failed(source, self.failure, self.last_error)
            await self._terminate()
            if time.monotonic() >= deadline:
                return False
        return False

    async def _relay_answers(self) -> bool:
        """Every connection goes through the egress relay: while it is down, nothing is the
        source's fault (no failover, no cooldown) and a restart waits for it."""
        if (
            await asyncio.to_thread(egress.open_connections, self.settings.egress_listen, egress.RELAY_CHECK_TIMEOUT)
            is not None
        ):
            return True
        self.cause, self.failure = Cause.RELAY_DOWN, RELAY_DOWN
        self.last_error = f"{RELAY_DOWN}: nothing answers on {self.settings.egress_listen}"
        return False

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

    async def _spawn(self, first: bool, source: str) -> bool:
        """FFmpeg in a session of its own, its output appended to the channel's log file (not
        a pipe to the launcher: it outlives a launcher restart), numbering its segments on
        from the viewers' playlist; False if it could not be prepared (the resolver failed:
        the failure says why)."""
        if self.slot_provider and not first:
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
            self._note_failure(str(exc), from_ffmpeg=False)
            log.warning("channel %s: cannot start on %s: %s", self.id, redact_url(source), self.last_error)
            return False
        if self._stop_requested:
            return False
        log_fd = files.open_ffmpeg_log(
            self.settings.log_dir,
            self.id,
            f"{LOG_MARK}{time.strftime('%Y-%m-%dT%H:%M:%S')} start (restart {self.restarts})",
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
        if first and self.record.written_to is None:
            await self.record.write()
        else:
            await self._update_record(
                pid=self.child.pid,
                pid_start=self.pid_start or "",
                state=RunState.STARTING,
                restarts=self.restarts,
                last_error=self.last_error,
                source=redact_url(source),
                until=f"{time.time() + self.settings.start_timeout + STATE_SLACK:.3f}",
            )
        log.info(
            "channel %s: FFmpeg started (pid %s, quality %s, source %s%s, first segment %d)",
            self.id,
            self.child.pid,
            self.channel.quality,
            redact_url(source),
            f", proxy {redact_url(self.usable_upstream.proxy)}" if self.usable_upstream.proxy else "",
            start_number,
        )
        return True

    async def _wait_until_playable(self, deadline: float) -> bool:
        """Until this FFmpeg's first min_segments segments are in the viewers' playlist."""
        minimum = self.settings.min_segments
        while time.monotonic() < deadline and not self._stop_requested:
            self.publisher.publish()
            if self.publisher.run_published >= minimum:
                return True
            if self._cannot_publish():
                return False
            if self.child.returncode is not None:
                self._note_failure(exit_text(self.process))
                return False
            if self._relay_refused():
                return False
            self._enforce_freeze_limit()
            await asyncio.sleep(POLL_READY)
        self.cause = Cause.SOURCE
        self._note_failure(f"no playable stream after {self.settings.start_timeout:g} s")
        return False

    async def _watch(self) -> str:
        """Until FFmpeg dies, stalls, or the stream is no longer wanted; returns why.  Each
        tick publishes FFmpeg's new segments."""
        stall_after = hls.stall_after(self.settings.hls_time)
        pace = PaceMeter()
        checks = 0
        while not self._stop_requested:
            try:
                await asyncio.wait_for(asyncio.shield(self.child.wait()), WATCH_INTERVAL)
            except asyncio.TimeoutError:
                pass
            self.publisher.publish()
            if self._cannot_publish():
                return self.last_error
            if self.child.returncode is not None:
                self._note_failure(exit_text(self.process), cause=Cause.EXITED)
                return self.last_error
            if self._relay_refused():
                return self.last_error
            unchanged = self.publisher.unchanged_for()
            if unchanged > stall_after:
                self.cause, self.failure = Cause.STALLED, "stalled"
                self.last_error = f"stalled: no new segment for {unchanged:.0f} s"
                return self.last_error
            if files.free_mb(self.settings.hls_dir) == 0:
                # FFmpeg writes empty playlists and truncated segments on a full disk, and
                # says nothing (seen with 5.1): under 1 MB free ends this FFmpeg.
                self.cause, self.failure = Cause.DISK_FULL, DISK_FULL
                self.last_error = f"disk full: under 1 MB free in {self.settings.hls_dir}"
                return self.last_error
            self._judge_pace(pace.update(self.publisher.media(), time.monotonic()))
            checks += 1
            if checks % 40 == 0:
                files.cap_ffmpeg_log(self.settings.log_dir, self.id)
            if time.monotonic() - self._wanted_checked >= WANTED_EVERY and not await self._still_wanted():
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
            self.cause, self.failure = Cause.DISK_FULL, DISK_FULL
            self.last_error = f"disk full: cannot write the playlist in {self.settings.hls_dir}"
        else:
            self.cause, self.failure = Cause.LAUNCHER, "launcher error"
            self.last_error = f"launcher error: cannot write the playlist ({error.strerror or error})"
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
        elif ratio >= 0.97 and self.slow:
            self.slow = False
            log.info("channel %s: back to real time (%.2fx)", self.id, ratio)

    def _relay_refused(self) -> bool:
        if not relay_refused(self.settings.state_dir, self.id, self._spawned_at):
            return False
        self._note_failure("refused by the egress relay")
        return True

    def _note_failure(self, otherwise: str, *, from_ffmpeg: bool = True, cause: Cause = Cause.SOURCE) -> None:
        """Why FFmpeg failed (launcher.diagnosis); ``from_ffmpeg`` False: ``otherwise`` is the
        whole story (a resolver's failure, a record that cannot run) unless the relay refused."""
        log_path = self.log_path if from_ffmpeg else None
        found = diagnose(self.settings.state_dir, self.id, self._spawned_at, log_path, self.source, otherwise, cause)
        self.cause, self.failure, self.last_error = found.cause, found.failure, found.last_error

    async def _update_record(self, **fields) -> None:
        await self.record.update(**fields)

    async def _still_wanted(self) -> bool:
        self._wanted_checked = time.monotonic()
        return await self.record.still_wanted()

    def _record_now(self) -> runs.RunRecord | None:
        """This run's record as it should be now; None before it has an FFmpeg."""
        if self.process is None:
            return None
        return runs.RunRecord(
            channel=self.id,
            run_id=self.run_id,
            host=self.settings.host_id,
            pid=self.process.pid,
            pid_start=self.pid_start,
            started=self.started,
            state=self.state,
            last_error=self.last_error,
            restarts=self.restarts,
            source=redact_url(self.source),
            provider=self.provider_name or "",
            until=time.time()
            + (
                self.settings.start_timeout + STATE_SLACK
                if self.state in (RunState.STARTING, RunState.BACKOFF)
                else VOUCH_AHEAD
            ),
        )

    def detach(self) -> None:
        """The launcher exits: stop watching, leave FFmpeg, its files and its record as they
        are; the next launcher adopts it."""
        self._detaching = True
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def _terminate(self) -> None:
        """This run's FFmpeg, stopped (a replacement follows): SIGTERM through a pidfd held
        on the proven process, SIGKILL after the grace; then the child is reaped and its
        last segments published."""
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            handle = ProcessHandle.open_proven(process.pid, self.host.identity(self.id, self.pid_start))
            if handle is not None and not await stop_with_grace(process, handle, self.settings.stop_grace):
                log.warning("channel %s: FFmpeg ignored SIGTERM for %g s; SIGKILL", self.id, self.settings.stop_grace)
            await process.wait()
        self.publisher.publish()

    async def _end(self, state: RunState, why: str, *, signal: bool) -> None:
        """The run is over: the one stop routine (streamstate.stream_end) in a thread, then
        the child reaped and the state set."""
        self.publisher.close()  # its files go now: the session is over
        process = self.process if signal and self.process is not None and self.process.returncode is None else None
        target = stream_end.StopTarget(
            channel=self.id,
            pid=process.pid if process else 0,
            run_id=self.run_id,
            pid_start=self.pid_start,
            provider=self.slot_provider or "",
            why=why,
        )
        await asyncio.to_thread(
            stream_end.stop_streams,
            self.host.redis,
            self.settings,
            [target],
            executable=self.host.ffmpeg_executable,
            log=log,
            need_mark=False,
        )
        if process is not None:
            await process.wait()
        await self._set_state(state)

    async def _set_state(self, state: RunState, *, until: float | None = None) -> None:
        """The one place the state changes: only along runs.TRANSITIONS; the run record
        follows (states past a run's end are not kept there: its keys go).  ``until``: the
        launcher's promise for starting and backoff (runs.RunRecord.until)."""
        if not self.state.can_become(state):
            log.error("channel %s: refused state change %s -> %s", self.id, self.state, state)
            return
        async with self._changed:
            self.state = state
            self._changed.notify_all()
        if state in (*runs.VOUCHED_STATES, RunState.STOPPING) and self.record.written_to is not None:
            if state is RunState.STARTING and until is None:
                until = time.time() + self.settings.start_timeout + STATE_SLACK
            if state is RunState.RUNNING and until is None:
                until = time.time() + VOUCH_AHEAD
            fields = {"restarts": self.restarts, "last_error": self.last_error} if state is RunState.BACKOFF else {}
            await self._update_record(state=state, until=f"{until:.3f}" if until else "", **fields)
