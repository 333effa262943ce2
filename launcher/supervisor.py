"""One channel's FFmpeg on this host: start it, wait until playable, watch it, restart it, stop it.

States: ``starting`` (FFmpeg runs, no playable playlist yet), ``running``
(the playlist lists at least ``min_segments`` segments), ``failed`` (it did
not become playable, or kept dying), ``stopping``/``stopped``.

While the stream is wanted (its run record in Redis is still this run and not
``stopping``), a dead or stalled FFmpeg is restarted with back-off; its
playlist and segments are deleted first, so nginx never serves a dead stream's
playlist and the next request comes to the launcher again.  Idle stops are the
reaper's job: it marks the record ``stopping`` before it signals.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import time

from streamstate import egress, files, providers, runs
from streamstate.channels import Channel, ChannelError
from streamstate.process import ProcessHandle, process_start_time, stop_processes
from streamstate.redact import redact_url
from streamstate.upstreams import Upstream

from .ffmpeg import build_argv, classify_failure
from .resolvers import ResolveFailed, resolve

log = logging.getLogger("streamkeeper.launcher")

POLL_READY = 0.05            # seconds between playlist checks while starting
WATCH_INTERVAL = 0.5         # seconds between health checks while running
RELAY_WAIT = 1.0             # seconds between looks at a relay that is down, while a stream waits
MAX_BACKOFF = 60.0           # seconds; the wait before a restart doubles from 1 s up to this
STDERR_LINES = 40           # lines of FFmpeg's log read for the reason of a failure
LOG_MARK = "--- streamkeeper: "   # the line the launcher writes before each FFmpeg start
SLOW_WINDOW = 30.0           # seconds over which a stream's pace is judged
SLOW_RATIO = 0.9             # media seconds per wall second below this: slower than real time


class StartFailed(Exception):
    """The stream did not become playable; the message is the class of failure a player
    may see (``upstream refused: HTTP 403``), never a URL."""


class PaceMeter:
    """Media produced against wall time, sampled when segments appear: a stream writing
    slower than real time (an overloaded host) cannot keep its viewers playing."""

    def __init__(self):
        self.last_sequence = -1
        self.media = 0.0
        self.samples: collections.deque[tuple[float, float]] = collections.deque()

    def update(self, media: tuple[int, list[float]] | None, now: float) -> float | None:
        """Take the playlist's (media sequence, durations); the pace (media seconds per wall
        second) over the last SLOW_WINDOW seconds once that much has been seen, else None."""
        if media is not None:
            sequence, durations = media
            grew = False
            for offset, duration in enumerate(durations):
                if sequence + offset > self.last_sequence:
                    self.last_sequence = sequence + offset
                    self.media += duration
                    grew = True
            if grew:
                self.samples.append((now, self.media))
        while len(self.samples) > 2 and self.samples[1][0] <= now - SLOW_WINDOW:
            self.samples.popleft()
        if len(self.samples) < 2:
            return None
        (first_time, first_media), (last_time, last_media) = self.samples[0], self.samples[-1]
        if last_time - first_time < SLOW_WINDOW:
            return None
        return (last_media - first_media) / (last_time - first_time)


class AdoptedProcess:
    """An FFmpeg a previous launcher started (it outlives launchers): held by a pidfd, whose
    readiness says it exited.  Looks like an asyncio Process to the supervisor; its exit
    status is not ours to read (-1 once it has exited)."""

    def __init__(self, handle: ProcessHandle):
        self.pid = handle.pid
        self._handle = handle
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future = loop.create_future()
        loop.add_reader(handle.fileno(), self._on_exit)

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._handle.fileno())
        self._handle.close()
        if not self._exited.done():
            self._exited.set_result(None)

    @property
    def returncode(self) -> int | None:
        return -1 if self._exited.done() else None

    async def wait(self) -> int:
        await asyncio.shield(self._exited)
        return -1


# The egress relay's notes (streamstate.egress) as the class of failure a player sees.
REFUSAL_CLASSES = {"address": "upstream address not allowed", "proxy": "upstream proxy unusable",
                   "unreachable": "upstream unreachable"}
RELAY_DOWN = "egress relay unavailable"
# Failures that say nothing about the source: another source would not do better.
NOT_SOURCE_FAILURES = ("disk full", "upstream proxy unusable", "launcher error", RELAY_DOWN)


class StreamSupervisor:
    def __init__(self, launcher, channel: Channel, upstream: Upstream | None,
                 adopted: "tuple[AdoptedProcess, runs.RunRecord] | None" = None,
                 run_id: str | None = None):
        self.launcher = launcher
        self.settings = launcher.settings
        self.channel = channel
        self.id = channel.id
        self.upstream = upstream           # None: the record is unusable, never (re)started
        self.source = channel.source_url   # the source in use (channel.sources: the order)
        self._spawned_at = 0.0
        self.state = "starting"
        self.run_id = run_id or runs.new_run_id()
        self.process: asyncio.subprocess.Process | None = None
        self.pid_start: int | None = None
        self.started = time.time()
        self.written_to: str | None = None   # the Redis server (INFO run_id) the record went to
        self.restarts = 0
        self.failure = ""           # the class of the last failure, what a player may see
        self.last_error = ""        # the class and FFmpeg's own line (redacted), for operators
        self.log_path = files.ffmpeg_log_path(self.settings.log_dir, self.id)
        self._adopted = adopted[0] if adopted else None
        # The provider account whose connection slot this run holds (taken before the start;
        # an adopted run's is in its record).
        self.slot_provider = ((adopted[1].provider or None) if adopted else
                              upstream.provider.name if upstream is not None and upstream.limited else None)
        self._detaching = False     # the launcher is exiting: leave FFmpeg running
        self.slow = False           # producing slower than real time (logged once per episode)
        self._changed = asyncio.Condition()
        self._task: asyncio.Task | None = None
        self._stop_requested = False
        if adopted:
            process, record = adopted
            self.run_id, self.process, self.pid_start = record.run_id, process, record.pid_start
            self.started, self.restarts, self.state = record.started, record.restarts, "running"

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
                await self._terminate()
                files.delete_stream_files(self.settings.hls_dir, self.id)
            raise
        except Exception as exc:  # noqa: BLE001 - reported as the stream's error
            log.error("channel %s: supervisor failed: %s", self.id, exc)
            self.failure = "launcher error"
            self.last_error = f"launcher error: {exc}"
            await self._terminate()
            files.delete_stream_files(self.settings.hls_dir, self.id)
            try:
                await self.launcher.redis_call(runs.delete_run_if, self.id, self.run_id)
            except Exception:  # noqa: BLE001 - the reaper clears it as stale
                pass
            await self._set_state("failed")

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
                    self._changed.wait_for(lambda: self.state in ("running", "failed", "stopped")),
                    timeout)
        except asyncio.TimeoutError:
            raise StartFailed(f"no playable stream after {timeout:g} s") from None
        if self.state != "running":
            raise StartFailed(self.failure or f"stream {self.state}")

    async def stop(self, reason: str) -> None:
        """Stop FFmpeg (SIGTERM through its pidfd, SIGKILL after stop_grace), delete files
        and keys."""
        self._stop_requested = True
        if self.state not in ("stopped", "failed", "stopping"):
            log.info("channel %s: stopping (%s)", self.id, reason)
            await self._set_state("stopping")
        files.delete_stream_files(self.settings.hls_dir, self.id)
        await self._terminate()
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task}, timeout=float(self.settings.stop_grace) + 5)
        await self._clear("stopped")

    # -- the run ----------------------------------------------------------------
    async def _run(self) -> None:
        """starting -> running -> (exit or stall) -> backoff -> starting ...; failed after
        max_restarts within restart_window (or a first start that never plays), with the
        reason; stopped when no longer wanted."""
        restarts_in_window: collections.deque[float] = collections.deque()
        first = self._adopted is None
        while not self._stop_requested:
            if self._adopted is not None:                # it plays already: watch it
                self._adopted, playable = None, True
                self.written_to = await self.launcher.redis_call(runs.redis_server_id)
            elif self.upstream is None:
                self.failure = "channel record missing or unusable: cannot restart"
                await self._fail(self.failure)
                return
            else:
                playable = await self._start_from_sources(first)
            if playable:
                if first:
                    log.info("channel %s: playable after %.2f s (pid %s)", self.id,
                             time.time() - self.started, self.process.pid)
                first = False
                await self._set_state("running")
                why = await self._watch()
            else:
                why = self.last_error
            # The files go before FFmpeg is signalled: a stalled FFmpeg may take the whole
            # stop_grace to die, and nginx must not serve its frozen playlist meanwhile.
            files.delete_stream_files(self.settings.hls_dir, self.id)
            await self._terminate()
            files.delete_stream_files(self.settings.hls_dir, self.id)
            if self._stop_requested:
                break
            if self.failure == "disk full":
                self.launcher.counters["disk_full"] += 1
                await self._fail(why)
                return
            if first:                                    # never became playable
                await self._fail(why)
                return
            if not await self._still_wanted():
                log.info("channel %s: FFmpeg ended and the stream is no longer wanted", self.id)
                await self._clear("stopped")
                return
            if self.failure == RELAY_DOWN:
                # A host problem, not the stream's: wait for the relay, spend no restart.
                log.warning("channel %s: %s; starting FFmpeg again once it answers", self.id, self.last_error)
                await self._set_state("backoff")
                await asyncio.sleep(RELAY_WAIT)
                await self._set_state("starting")
                continue
            now = time.monotonic()
            while restarts_in_window and restarts_in_window[0] < now - float(self.settings.restart_window):
                restarts_in_window.popleft()
            if len(restarts_in_window) >= int(self.settings.max_restarts):
                await self._fail(f"{len(restarts_in_window)} restarts in "
                                 f"{float(self.settings.restart_window):g} s; last: {why}")
                return
            restarts_in_window.append(now)
            self.restarts += 1
            delay = min(2.0 ** (len(restarts_in_window) - 1), MAX_BACKOFF)
            log.warning("channel %s: restarting FFmpeg in %g s (%s; restart %d)", self.id, delay,
                        why, self.restarts)
            await self._set_state("backoff")
            await asyncio.sleep(delay)
            await self._set_state("starting")

    async def _fail(self, why: str) -> None:
        """failed: files and keys go; starts get 503 with the reason for failed_cooldown."""
        if not self.failure:
            self._note_failure("FFmpeg did not produce a playable stream")
        log.error("channel %s: failed: %s", self.id, why or self.last_error or "unknown error")
        if self.failure == RELAY_DOWN:           # the host's problem: the channel is not cooled down
            await self._clear("failed")
            return
        try:
            await self.launcher.redis_call(runs.mark_failed, self.id, self.failure,
                                           self.settings.host_id, float(self.settings.failed_cooldown))
        except Exception as exc:  # noqa: BLE001 - the cooldown is a courtesy to the upstream
            log.warning("channel %s: cannot record the failure (%s)", self.id, exc)
        await self._clear("failed")

    async def _start_from_sources(self, first: bool) -> bool:
        """Start FFmpeg on the current source, else on the next ones: a source that fails
        (refused, unreachable, nothing playable) is skipped for source_cooldown and the next
        is tried at once, all within one start_timeout."""
        deadline = time.monotonic() + float(self.settings.start_timeout)
        tried: list[str] = []
        while not self._stop_requested:
            if not await self._relay_answers():
                return False
            source = await self._next_source(tried)
            if source is None:
                return False
            tried.append(source)
            self.source = source
            if not await self._spawn(first, source):
                playable = False
            else:
                playable = await self._wait_until_playable(deadline)
            if playable:
                return True
            if (self.failure in NOT_SOURCE_FAILURES or len(self.channel.sources) == 1
                    or self._stop_requested or not await self._relay_answers()):
                return False
            await self._source_failed(source)
            files.delete_stream_files(self.settings.hls_dir, self.id)
            await self._terminate()
            if time.monotonic() >= deadline:
                return False
        return False

    async def _relay_answers(self) -> bool:
        """Every connection goes through the egress relay: while it is down, nothing is the
        source's fault (no failover, no cooldown) and a restart waits for it."""
        if await egress.open_connections(self.settings.egress_listen, timeout=1.0) is not None:
            return True
        self.failure = RELAY_DOWN
        self.last_error = f"{RELAY_DOWN}: nothing answers on {self.settings.egress_listen}"
        return False

    async def _next_source(self, tried: list[str]) -> str | None:
        """The current source unless it failed recently, else the next one in order; None when
        every source was tried in this start or is cooling down (the failure says so)."""
        sources = list(self.channel.sources)
        if len(sources) == 1:
            return None if tried else sources[0]
        start = sources.index(self.source) if self.source in sources else 0
        ordered = [s for s in sources[start:] + sources[:start] if s not in tried]
        try:
            cooling = await self.launcher.redis_call(providers.cooling_sources, ordered)
        except Exception:  # noqa: BLE001 - without Redis, no cooldown is known
            cooling = set()
        for source in ordered:
            if source not in cooling:
                return source
        if not tried:
            self.failure = f"all {len(sources)} sources failed within source_cooldown"
            self.last_error = self.failure
        return None

    async def _source_failed(self, source: str) -> None:
        sources = self.channel.sources
        log.warning("channel %s: source %d/%d (%s) failed: %s; trying the next", self.id,
                    sources.index(source) + 1, len(sources), redact_url(source), self.last_error)
        self.launcher.counters["failovers"] += 1
        try:
            await self.launcher.redis_call(providers.mark_source_failed, source, self.failure,
                                           float(self.settings.source_cooldown))
        except Exception as exc:  # noqa: BLE001 - the cooldown is a courtesy to the upstream
            log.warning("channel %s: cannot record the source's failure (%s)", self.id, exc)

    async def _prepare(self, source: str) -> tuple[list[str], dict[str, str]]:
        """FFmpeg's argv and environment for one source: a fresh egress ticket, and the
        resolver's URL and cookies.  ResolveFailed or ChannelError say why not."""
        token = egress.write_ticket(self.settings.state_dir, self.id, self.upstream.proxy, self.slot_provider)
        relay = egress.relay_url(self.settings.egress_listen, self.id, token)
        url, cookies = source, []
        if self.upstream.resolver != "none":
            url, cookies = await asyncio.to_thread(resolve, self.upstream, source, relay,
                                                   self.settings.tls_ca_file)
        argv = build_argv(self.channel, self.settings, upstream=self.upstream, source=url, cookies=cookies)
        return argv, egress.ffmpeg_environment(self.settings.egress_listen, self.id, token)

    async def _spawn(self, first: bool, source: str) -> bool:
        """FFmpeg in a session of its own, its output appended to the channel's log file (not
        a pipe to the launcher: it outlives a launcher restart); False if it could not be
        prepared (the resolver failed: the failure says why)."""
        files.delete_stream_files(self.settings.hls_dir, self.id)   # never serve a stale playlist
        self._spawned_at = time.time()
        try:
            argv, environment = await self._prepare(source)
        except (ResolveFailed, ChannelError) as exc:
            self._note_failure(str(exc), from_ffmpeg=False)
            log.warning("channel %s: cannot start on %s: %s", self.id, redact_url(source), self.last_error)
            return False
        log_fd = files.open_ffmpeg_log(
            self.settings.log_dir, self.id,
            f"{LOG_MARK}{time.strftime('%Y-%m-%dT%H:%M:%S')} start (restart {self.restarts})")
        try:
            self.process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=log_fd, start_new_session=True, env=environment)
        finally:
            os.close(log_fd)
        self.pid_start = process_start_time(self.process.pid)
        if first and self.written_to is None:
            await self._write_record()
        else:
            await self._update_record(pid=self.process.pid, pid_start=self.pid_start or "",
                                      state="starting", restarts=self.restarts,
                                      last_error=self.last_error, source=redact_url(source))
        log.info("channel %s: FFmpeg started (pid %s, quality %s, source %s%s)", self.id,
                 self.process.pid, self.channel.quality, redact_url(source),
                 f", proxy {redact_url(self.upstream.proxy)}" if self.upstream.proxy else "")
        return True

    async def _wait_until_playable(self, deadline: float) -> bool:
        playlist = files.playlist_path(self.settings.hls_dir, self.id)
        minimum = int(self.settings.min_segments)
        while time.monotonic() < deadline and not self._stop_requested:
            if files.count_listed_segments(playlist) >= minimum:
                return True
            if self.process.returncode is not None:
                self._note_failure(f"FFmpeg exited with status {self.process.returncode}")
                return False
            if self._relay_refused():
                return False
            await asyncio.sleep(POLL_READY)
        self._note_failure(f"no playable stream after {float(self.settings.start_timeout):g} s")
        return False

    async def _watch(self) -> str:
        """Until FFmpeg dies, stalls, or the stream is no longer wanted; returns why."""
        playlist = files.playlist_path(self.settings.hls_dir, self.id)
        stall_after = max(3 * float(self.settings.hls_time), 6.0)
        pace = PaceMeter()
        checks = empty_checks = 0
        while not self._stop_requested:
            try:
                await asyncio.wait_for(asyncio.shield(self.process.wait()), WATCH_INTERVAL)
            except asyncio.TimeoutError:
                pass
            if self.process.returncode is not None:
                self._note_failure(f"FFmpeg exited with status {self.process.returncode}")
                return f"FFmpeg exited: {self.last_error}"
            if self._relay_refused():
                return self.last_error
            try:
                age = time.time() - os.stat(playlist).st_mtime
            except FileNotFoundError:
                age = stall_after + 1
            if age > stall_after:
                self.failure = "stalled"
                self.last_error = f"stalled: playlist not updated for {age:.0f} s"
                return self.last_error
            if files.free_mb(self.settings.hls_dir) == 0:
                # FFmpeg writes empty playlists and truncated segments on a full disk, and
                # says nothing (seen with 5.1): under 1 MB free ends the stream.
                self.failure = "disk full"
                self.last_error = f"disk full: under 1 MB free in {self.settings.hls_dir}"
                return self.last_error
            media = files.playlist_media(playlist)      # read once a tick: emptiness and pace
            if media is not None and not media[1]:
                empty_checks += 1
                if empty_checks >= 2:             # FFmpeg replaces it whole: never empty twice
                    self.failure = "playlist empty"
                    self.last_error = "playlist empty: it lists no segment (write error?)"
                    return self.last_error
            else:
                empty_checks = 0
            self._judge_pace(pace.update(media, time.monotonic()))
            checks += 1
            if checks % 20 == 0:
                files.cap_ffmpeg_log(self.settings.log_dir, self.id)
            if checks % 4 == 0 and not await self._still_wanted():
                return "no longer wanted (its record was stopped or replaced)"
        return "stop requested"

    def _judge_pace(self, ratio: float | None) -> None:
        if ratio is None:
            return
        if ratio < SLOW_RATIO and not self.slow:
            self.slow = True
            self.launcher.counters["slow"] += 1
            log.warning("channel %s: slower than real time: %.2fx over the last %.0f s (host "
                        "overloaded? lower max_streams or the quality)", self.id, ratio, SLOW_WINDOW)
        elif ratio >= 0.97 and self.slow:
            self.slow = False
            log.info("channel %s: back to real time (%.2fx)", self.id, ratio)

    def _relay_refused(self) -> bool:
        """The relay refused one of this run's connections (an address not allowed, a proxy
        that cannot be used): the run ends with that reason, even where FFmpeg would carry on
        (its HLS demuxer skips a segment it cannot fetch and tries the next)."""
        refusal = egress.read_refusal(self.settings.state_dir, self.id, self._spawned_at)
        if refusal is None or refusal.get("kind") not in ("address", "proxy"):
            return False
        self._note_failure("refused by the egress relay")
        return True

    def _note_failure(self, otherwise: str, *, from_ffmpeg: bool = True) -> None:
        """Why FFmpeg failed: the egress relay's refusal if it refused one of its connections
        (an address not allowed, a proxy that cannot be used), else FFmpeg's own output; the
        class, and the line that says so (redacted)."""
        refusal = egress.read_refusal(self.settings.state_dir, self.id, self._spawned_at)
        if refusal is not None:
            self.failure = REFUSAL_CLASSES.get(refusal.get("kind"), "upstream proxy unusable")
            self.last_error = f"{self.failure}: {str(refusal.get('reason', ''))[:300]}"
            return
        if not from_ffmpeg:
            self.failure = self.last_error = otherwise
            return
        tail = files.log_tail(self.log_path, STDERR_LINES, since=LOG_MARK)
        label, detail = classify_failure(tail, self.source)
        self.failure = label or otherwise
        self.last_error = f"{self.failure}: {detail}" if detail else self.failure

    async def _update_record(self, **fields) -> None:
        """Keep the run record current; a Redis error is logged, never fatal to the stream."""
        try:
            await self.launcher.redis_call(runs.update_run, self.id, self.run_id, **fields)
        except Exception as exc:  # noqa: BLE001 - redis errors of any kind
            log.warning("channel %s: cannot update its record (%s)", self.id, exc)

    async def _still_wanted(self) -> bool:
        """Its record is still this run and not being stopped.  While Redis cannot be read
        the answer is yes: a Redis outage must not take watched streams down."""
        try:
            record = await self.launcher.redis_call(runs.get_run, self.id)
        except Exception as exc:  # noqa: BLE001 - redis errors of any kind
            log.warning("channel %s: cannot read its record (%s); keeping it running", self.id, exc)
            return True
        if record is None:
            return await self._record_lost()
        return record.run_id == self.run_id and record.state != "stopping"

    async def _write_record(self) -> None:
        """The run record, whole, with the identity of the Redis server it went to."""
        record = runs.RunRecord(channel=self.id, run_id=self.run_id, host=self.settings.host_id,
                                pid=self.process.pid, pid_start=self.pid_start, started=self.started,
                                state=self.state if self.state in runs.STATES else "starting",
                                last_error=self.last_error, restarts=self.restarts,
                                source=redact_url(self.source),
                                provider=self.provider_name or "")
        await self.launcher.redis_call(runs.record_run, record)
        self.written_to = await self.launcher.redis_call(runs.redis_server_id)

    async def _record_lost(self) -> bool:
        """The record is gone.  Deleted on purpose (a stop, the reaper's compare-and-delete):
        not wanted.  Lost with a Redis that restarted empty or from an older snapshot (its
        run_id changed since the record was written): written again, and the stream runs on."""
        try:
            server = await self.launcher.redis_call(runs.redis_server_id)
            if server == self.written_to or self.process is None:
                return False
            await self._write_record()
            if self.provider_name:            # its connection is open: its slot is held
                await self.launcher.redis_call(providers.hold_slot, self.provider_name, self.id,
                                               self.run_id, self.settings.host_id)
        except Exception as exc:  # noqa: BLE001 - Redis gone again: keep running, ask later
            log.warning("channel %s: cannot write its record again (%s); keeping it running", self.id, exc)
            return True
        log.info("channel %s: record lost with a Redis restart; written again (pid %s)", self.id,
                 self.process.pid)
        return True

    def detach(self) -> None:
        """The launcher exits: stop watching, leave FFmpeg, its files and its record as they
        are; the next launcher adopts it."""
        self._detaching = True
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def _terminate(self) -> None:
        """The stop routine (streamstate.process): SIGTERM through a pidfd held on the proven
        process, SIGKILL after the grace; then the child is reaped."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        handle = ProcessHandle.open_proven(process.pid, self.launcher.identity(self.id, self.pid_start))
        if handle is not None:
            with handle:
                grace = float(self.settings.stop_grace)
                if await asyncio.to_thread(stop_processes, [handle], grace):
                    log.warning("channel %s: FFmpeg ignored SIGTERM for %g s; SIGKILL", self.id, grace)
        await process.wait()

    async def _clear(self, state: str) -> None:
        """The run is over: files, keys, its egress ticket, then its provider slot (once the
        relay holds none of its connections)."""
        files.delete_stream_files(self.settings.hls_dir, self.id)
        egress.delete_ticket(self.settings.state_dir, self.id)
        try:
            await self.launcher.redis_call(runs.delete_run_if, self.id, self.run_id)
        finally:
            await self.launcher.release_slot(self)
        await self._set_state(state)

    async def _set_state(self, state: str) -> None:
        """The one place the state changes: only along runs.TRANSITIONS; the run record
        follows (states past a run's end are not kept there: its keys go)."""
        if state != self.state and state not in runs.TRANSITIONS[self.state]:
            log.error("channel %s: refused state change %s -> %s", self.id, self.state, state)
            return
        async with self._changed:
            self.state = state
            self._changed.notify_all()
        if state in ("starting", "running", "backoff", "stopping") and self.written_to is not None:
            await self._update_record(state=state)
