"""One channel's stream on this host, across its FFmpegs: start, wait until playable,
restart with back-off, wait out the host's problems, fail, stop.  One FFmpeg at a time
(spawn, watch, why it ended) is launcher.ffmpeg_run's.

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
import logging
import time

from streamstate import files, hls, runs, stream_end
from streamstate.channels import Channel
from streamstate.redact import redact_url
from streamstate.runs import RunState
from streamstate.stream_end import Cause, Next
from streamstate.upstreams import Upstream

from .child import AdoptedProcess
from .ffmpeg_run import FfmpegRun
from .host_services import HostServices
from .publisher import PlaylistPublisher
from .run_record import STATE_SLACK, WANTED_EVERY, RunRecordKeeper, promised_until
from .sources import SourceOrder

log = logging.getLogger("streamkeeper.launcher")

WAIT_TICK = 0.25  # seconds between looks while waiting (back-off, relay down, disk full)


class StartFailed(Exception):
    """The stream did not become playable; the message is the class of failure a player
    may see (``upstream refused: HTTP 403``), never a URL."""


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
        self.state = RunState.STARTING
        self.run_id = run_id or runs.new_run_id()
        self.started = time.time()
        self.restarts = 0
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
        self.asked_by: set[str] = set()  # viewers whose requests started or joined it (hashes)
        self._changed = asyncio.Condition()
        self._task: asyncio.Task | None = None
        self._stop_requested = False
        self._ending = False  # in the stop routine (_end): it finishes, even when fenced
        # The stream's FFmpeg, one at a time, and why the last one ended.
        self.ffmpeg = FfmpegRun(
            host, channel, upstream, self.publisher, self.slot_provider, lambda: self._stop_requested
        )
        if adopted:
            process, record = adopted
            self.run_id, self.started, self.restarts = record.run_id, record.started, record.restarts
            self.state = RunState.RUNNING
            self.ffmpeg.adopt(process, record.pid_start)
        if resumed:
            self.started, self.restarts = resumed.started, resumed.restarts
            self.publisher.resume()
        self.sources = SourceOrder(channel, host.redis_call, host.counters, self.settings.source_cooldown)
        provider = self.settings.providers.get(self.slot_provider or "")
        self.record = RunRecordKeeper(
            self.id,
            self.run_id,
            host.redis_call,
            self._record_now,
            start_timeout=self.settings.start_timeout,
            slot_limit=provider.max_streams if provider is not None else 0,
            start_grace=self.settings.start_timeout + STATE_SLACK,
        )

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
            self.ffmpeg.set_failure(Cause.LAUNCHER, str(exc))
            await self._end(RunState.FAILED, self.ffmpeg.last_error, signal=True)

    @property
    def provider_name(self) -> str | None:
        """The provider whose connection slot this stream holds (limited providers only)."""
        return self.slot_provider

    @property
    def last_error(self) -> str:
        """The class and FFmpeg's own line of the last failure (redacted), for operators."""
        return self.ffmpeg.last_error

    @property
    def speed(self) -> float | None:
        """Media seconds per wall second of its FFmpeg over the last 30 s."""
        return self.ffmpeg.speed

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
            raise StartFailed(self.ffmpeg.failure or f"stream {self.state}")

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
            if self._adopted is None and self.upstream is None:
                self.ffmpeg.failure = "channel record missing or unusable: cannot restart"
                await self._fail(self.ffmpeg.failure)
                return
            why, played = await self._one_ffmpeg(first)
            first = first and not played
            await self.ffmpeg.terminate()
            if self._stop_requested or not await self._after_exit(why, first, restart_times):
                return

    async def _one_ffmpeg(self, first: bool) -> tuple[str, bool]:
        """The stream's next FFmpeg (or the adopted one), from its start to its end: why it
        ended, and whether it played."""
        if self._adopted is not None:  # it plays already: watch it
            self._adopted = None
            await self.record.note_server()
        elif not await self._start_from_sources(first):
            return self.ffmpeg.last_error, False
        if first:
            log.info(
                "channel %s: playable after %.2f s (pid %s)",
                self.id,
                time.time() - self.started,
                self.ffmpeg.child.pid,
            )
        await self._set_state(RunState.RUNNING)
        why = await self.ffmpeg.watch(self._still_wanted)
        if (
            self.ffmpeg.cause in (Cause.EXITED, Cause.STALLED)
            and not self._stop_requested
            and not await self.ffmpeg.relay_answers()
        ):
            # Its connection went with the relay: the host's problem, waited out
            # without spending a restart or growing the back-off.
            why = self.ffmpeg.last_error
        return why, True

    async def _after_exit(self, why: str, first: bool, restart_times: collections.deque[float]) -> bool:
        """What follows an FFmpeg's end (stream_end.after_exit): a restart after its back-off,
        a wait for the host, a failure or the end; False once the stream is over.
        ``first``: it never played; ``restart_times``: the restarts so far (monotonic)."""
        window = self.settings.restart_window
        while restart_times and restart_times[0] < time.monotonic() - window:
            restart_times.popleft()
        step = stream_end.after_exit(
            self.ffmpeg.cause or Cause.EXITED,
            ever_playable=not first,
            wanted=await self._still_wanted(),
            restarts_in_window=len(restart_times),
            max_restarts=self.settings.max_restarts,
            restart_window=window,
        )
        if step.next is Next.STOP:
            log.info("channel %s: FFmpeg ended and the stream is %s", self.id, step.why)
            await self._end(RunState.STOPPED, step.why, signal=False)
            return False
        if step.next is Next.FAIL:
            await self._fail(why if first else f"{step.why}; last: {why}")
            return False
        if step.next is Next.WAIT:
            return await self._wait_for_host(why)
        restart_times.append(time.monotonic())
        self.restarts += 1
        log.warning(
            "channel %s: restarting FFmpeg%s (%s; restart %d)",
            self.id,
            f" in {step.delay:g} s" if step.delay else "",
            why,
            self.restarts,
        )
        return await self._backoff(step.delay)

    async def _backoff(self, delay: float) -> bool:
        """backoff for ``delay`` seconds, then starting; False if the stream ended meanwhile."""
        await self._set_state(RunState.BACKOFF, until=time.time() + delay + STATE_SLACK)
        deadline = time.monotonic() + delay
        next_look = time.monotonic() + WANTED_EVERY
        while time.monotonic() < deadline and not self._stop_requested:
            self.publisher.end_if_frozen(self.ffmpeg.freeze_limit)
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
        """A problem of this host, not of the stream (the egress relay down or fenced, hls_dir full):
        wait in backoff, spending no restart, until it is gone; then starting (True).  A full
        disk that stays full past the freeze limit fails the stream."""
        cause = self.ffmpeg.cause
        if cause is Cause.DISK_FULL:
            self.host.counters["disk_full"] += 1
        log.warning("channel %s: %s; starting FFmpeg again once it is solved", self.id, why)
        began = time.monotonic()
        limit = self.ffmpeg.freeze_limit
        while not self._stop_requested:
            await self._set_state(RunState.BACKOFF, until=time.time() + WANTED_EVERY + STATE_SLACK)
            if cause is Cause.RELAY_DOWN and await self.ffmpeg.relay_answers():
                break
            if cause is Cause.FENCED and not await self.ffmpeg.relay_fenced():
                break
            if cause is Cause.DISK_FULL and (files.free_mb(self.settings.hls_dir) or 0) >= max(
                1, self.settings.min_free_mb
            ):
                break
            if cause is Cause.DISK_FULL and time.monotonic() - began > limit:
                self.ffmpeg.cause, self.ffmpeg.failure = Cause.DISK_FULL, Cause.DISK_FULL.text
                await self._fail(f"{why}; still full after {limit:g} s")
                return False
            self.publisher.end_if_frozen(self.ffmpeg.freeze_limit)
            if not await self._still_wanted():
                await self._end(RunState.STOPPED, "no longer wanted", signal=False)
                return False
            await asyncio.sleep(WANTED_EVERY)
        if self._stop_requested:
            return False
        await self._set_state(RunState.STARTING)
        return True

    async def _fail(self, why: str) -> None:
        """failed: files and keys go; starts get 503 with the reason for failed_cooldown."""
        if not self.ffmpeg.failure:
            self.ffmpeg.note_failure("FFmpeg did not produce a playable stream")
        log.error("channel %s: failed: %s", self.id, why or self.ffmpeg.last_error or "unknown error")
        if self.ffmpeg.cause not in (Cause.RELAY_DOWN, Cause.FENCED):  # the host's: no cooldown for the channel
            try:
                await self.host.redis_call(
                    runs.mark_failed, self.id, self.ffmpeg.failure, self.settings.host_id, self.settings.failed_cooldown
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
            if not await self.ffmpeg.relay_answers():
                return False
            source = await self.sources.next(self.ffmpeg.source, tried, replacing=self.restarts > 0)
            if source is None:
                if not tried:
                    self.ffmpeg.set_failure(Cause.SOURCE, failure=self.sources.all_cooling())
                return False
            tried.append(source)
            if not await self._spawn(first, source):
                playable = False
            else:
                playable = await self.ffmpeg.until_playable(deadline)
            if playable:
                return True
            if (
                self.ffmpeg.cause in stream_end.NOT_THE_SOURCE
                or len(self.channel.sources) == 1
                or self._stop_requested
                or not await self.ffmpeg.relay_answers()
            ):
                return False
            await self.sources.failed(source, self.ffmpeg.failure, self.ffmpeg.last_error)
            await self.ffmpeg.terminate()
            if time.monotonic() >= deadline:
                return False
        return False

    async def _spawn(self, first: bool, source: str) -> bool:
        """FFmpeg on ``source`` (launcher.ffmpeg_run), then its record; False if it could
        not be prepared (the failure says why)."""
        start_number = await self.ffmpeg.spawn(source, replacing=not first, restarts=self.restarts)
        if start_number is None:
            return False
        await self.record.ffmpeg_started(first)
        log.info(
            "channel %s: FFmpeg started (pid %s, quality %s, source %s%s, first segment %d)",
            self.id,
            self.ffmpeg.child.pid,
            self.channel.quality,
            redact_url(source),
            f", proxy {redact_url(self.ffmpeg.usable_upstream.proxy)}" if self.ffmpeg.usable_upstream.proxy else "",
            start_number,
        )
        return True

    async def _still_wanted(self) -> bool:
        return await self.record.still_wanted()

    def _record_now(self) -> runs.RunRecord | None:
        """This run's record as it should be now; None before it has an FFmpeg."""
        if self.ffmpeg.process is None:
            return None
        return runs.RunRecord(
            channel=self.id,
            run_id=self.run_id,
            host=self.settings.host_id,
            pid=self.ffmpeg.process.pid,
            pid_start=self.ffmpeg.pid_start,
            started=self.started,
            state=self.state,
            last_error=self.ffmpeg.last_error,
            restarts=self.restarts,
            source=redact_url(self.ffmpeg.source),
            provider=self.provider_name or "",
            until=promised_until(self.state, self.settings.start_timeout),
        )

    async def end_fenced(self) -> None:
        """This host's lease lapsed (streamstate.lease): the stream ends now without a word
        to Redis, which cannot be reached (the other hosts clear its record once the lease
        has expired; this host's reaper does when it can): its FFmpeg stopped, its files
        gone, and nothing restarts it."""
        self._stop_requested = True
        self.publisher.close()
        await self.ffmpeg.terminate(at_once=True)  # its provider connection closes first
        task = self._task
        if task is not None and not task.done() and task is not asyncio.current_task() and not self._ending:
            self._detaching = True  # the cancelled run does not go through the stop routine (Redis)
            task.cancel()
            await asyncio.wait({task}, timeout=self.settings.stop_grace + 5)
        # One the run had started meanwhile; a run already in its stop routine finishes it
        # (and counts as running until then, so no new start here can meet its deletes).
        await self.ffmpeg.terminate(at_once=True)
        files.delete_stream_files(self.settings.hls_dir, self.id)
        async with self._changed:
            self.state = RunState.STOPPED
            self._changed.notify_all()
        log.warning("channel %s: ended: this host is fenced", self.id)

    def detach(self) -> None:
        """The launcher exits: stop watching, leave FFmpeg, its files and its record as they
        are; the next launcher adopts it."""
        self._detaching = True
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def _end(self, state: RunState, why: str, *, signal: bool) -> None:
        """The run is over: the one stop routine (streamstate.stream_end) in a thread, then
        the child reaped and the state set."""
        self._ending = True
        self.publisher.close()  # its files go now: the session is over
        process = self.ffmpeg.running_process() if signal else None
        target = stream_end.StopTarget(
            channel=self.id,
            pid=process.pid if process else 0,
            run_id=self.run_id,
            pid_start=self.ffmpeg.pid_start,
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
        await self.record.follow(state, until, self.restarts, self.ffmpeg.last_error)
