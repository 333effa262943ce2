"""heartbeatd's main loop: wake, read to the end, flush on a fixed cadence."""

from __future__ import annotations

import logging
import os
import threading
import time
import typing

import redis

from streamstate import heartbeats, runs
from streamstate.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from streamstate.daemon import StopSignals, sd_notify, watchdog_interval
from streamstate.logformat import LogLineParser
from streamstate.redis_client import redis_for, redis_where

from .metrics import HeartbeatMetrics
from .parse_pool import POOL_MIN_BLOCK, ParsePool, worker_count
from .pending import PendingHeartbeats
from .tailer import LogTailer, Position

log = logging.getLogger("streamkeeper.heartbeatd")

POLL_INTERVAL = 0.5  # fallback wake-up when inotify says nothing
MAX_BACKOFF = 30.0  # seconds between Redis retries, at most
STOP_FLUSH_TIMEOUT = 1.5  # seconds the final flush may take after SIGTERM
EXIT_SETUP = 2  # a setting points somewhere unusable
HELD_AFTER_OUTAGE = 30.0  # seconds heartbeats of not-yet-running streams are retried after one


class HeartbeatService:
    def __init__(self, settings, *, log_file: str | None = None, from_start: bool = False, once: bool = False):
        self.settings = settings
        self.log_path = log_file or settings.access_log
        self.once = once
        self.from_start = from_start
        self.window = settings.viewer_window
        self.parser = LogLineParser(settings.log_format, count_viewers=self.window > 0, viewer_window=self.window)
        self.pending = PendingHeartbeats()
        self.tailer = LogTailer(self.log_path)
        self.checkpoint_file = checkpoint_path(settings.state_dir, self.log_path)
        self.metrics = HeartbeatMetrics()
        self.redis = redis_for(settings)
        self.wake = threading.Event()
        self.signals = StopSignals(self.wake)
        self.position: Position | None = None  # after the last block read
        self.saved_position: Position | None = None
        self.redis_down_since: float | None = None
        self.recovering_until = 0.0  # after an outage: retry heartbeats of streams not (yet) running
        self.retry_at = 0.0
        self.backoff = 1.0
        self.last_trim: dict[str, float] = {}
        self.next_host_refresh = 0.0
        self._observer: typing.Any = None  # watchdog's Observer, once it watches
        self.pool = None
        workers = worker_count(settings.parse_workers)
        if workers > 1:  # forks: before any thread is started
            self.pool = ParsePool(settings.log_format, self.window, workers)

    # -- life cycle ---------------------------------------------------------------
    def run(self) -> int:
        self.signals.install()
        try:
            os.makedirs(self.settings.state_dir, exist_ok=True)
            if not os.access(self.settings.state_dir, os.W_OK):
                raise PermissionError(f"{self.settings.state_dir} is not writable")
        except OSError as exc:
            log.error("setting state_dir: cannot keep the checkpoint there: %s", exc)
            self._close()
            return EXIT_SETUP
        checkpoint = load_checkpoint(self.checkpoint_file, self.log_path)
        try:
            log.info("%s", self.tailer.start(checkpoint, from_start=self.from_start))
        except OSError as exc:
            log.error("setting access_log: cannot read %s: %s", self.log_path, exc)
            self._close()
            return EXIT_SETUP
        self.position = self.saved_position = checkpoint
        if self.once:
            return self._run_once()
        self._start_watching()
        self.metrics.serve(self.settings.metrics_listen)
        sd_notify("READY=1\nSTATUS=following " + self.log_path)
        try:
            self._loop()
        finally:
            self._stop_watching()
        return self._shutdown()

    def _run_once(self) -> int:
        interval = self.settings.flush_interval
        next_flush = time.monotonic() + interval
        for _ in self._read_available():
            if time.monotonic() >= next_flush:
                self._flush()
                next_flush = time.monotonic() + interval
        ok = self._flush()
        self._close()
        self._log_summary()
        if not ok:
            log.error(
                "redis is unreachable (%s): heartbeats not written, checkpoint not moved", redis_where(self.settings)
            )
            return 1
        return 0

    def _loop(self) -> None:
        interval = self.settings.flush_interval
        next_flush = time.monotonic() + interval
        ping_every = watchdog_interval()
        next_ping = time.monotonic()
        stop = self.signals.stop
        while not stop.is_set():
            for _ in self._read_available():
                if stop.is_set():
                    break
                if time.monotonic() >= next_flush:  # keep the cadence during catch-up
                    self._flush()
                    next_flush = _next_tick(next_flush, interval)
            now = time.monotonic()
            if now >= next_flush:
                self._flush()
                next_flush = _next_tick(next_flush, interval)
                sd_notify("STATUS=" + self.metrics.status_line())
            if ping_every is not None and now >= next_ping:
                sd_notify("WATCHDOG=1")
                next_ping = now + ping_every
            self.wake.wait(max(0.0, min(POLL_INTERVAL, next_flush - time.monotonic())))
            self.wake.clear()

    def _shutdown(self) -> int:
        log.info("%s received: flushing and writing the checkpoint", self.signals.signal_name or "stop")
        sd_notify("STOPPING=1")
        self.redis.connection_pool.connection_kwargs["socket_timeout"] = STOP_FLUSH_TIMEOUT
        self.retry_at = 0.0
        self._flush()
        self._close()
        self._log_summary()
        return 0

    def _close(self) -> None:
        self.tailer.close()
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    # -- reading ------------------------------------------------------------------
    def _read_available(self):
        """Read every complete line there is now; yields after each block taken in.

        Large blocks (a backlog) go to the parse pool, in order; the live
        trickle is parsed here.  A block's position is taken only once its
        heartbeats are in ``pending``, so a checkpoint never runs ahead.
        """
        pool = self.pool
        try:
            for block, position in self.tailer.read_blocks():
                if pool is not None and (pool.pending() or len(block) >= POOL_MIN_BLOCK):
                    pool.submit(block, position)
                    while pool.full():
                        self._take_in(*pool.next_result())
                        yield
                else:
                    self._take_in(self.parser.parse_chunk(block), position)
                    yield
            while pool is not None and pool.pending():
                self._take_in(*pool.next_result())
                yield
        finally:
            if pool is not None:
                pool.discard()  # stopping mid-backlog: those blocks are read again next time
            self.metrics.too_long = self.tailer.stats.too_long

    def _take_in(self, chunk, position: Position | None) -> None:
        self.pending.add(chunk)
        self.metrics.count_chunk(chunk)
        if position is not None:
            self.position = position

    # -- writing ------------------------------------------------------------------
    def _flush(self) -> bool:
        """Write pending heartbeats; on success, move the checkpoint.  False if Redis failed."""
        if not self.pending and self.position == self.saved_position:
            return True
        now_mono = time.monotonic()
        if self.redis_down_since is not None and now_mono < self.retry_at:
            return False
        now = time.time()
        # Ending an outage, or just after one: report the channels not running, to keep them.
        recovering = self.redis_down_since is not None or now_mono < self.recovering_until
        skipped: list[str] = []
        try:
            if self.pending:
                channel_times = {ch: min(t, now) for ch, t in self.pending.channel_times.items()}
                viewers = self.pending.viewers_by_channel(now=now, window=self.window) if self.window > 0 else None
                trim = self._channels_to_trim(channel_times, now)
                running, skipped = heartbeats.write_heartbeats(
                    self.redis,
                    channel_times,
                    viewers,
                    trim_channels=trim,
                    viewer_window=self.window,
                    now=now,
                    report_skipped=recovering,
                )
                self.metrics.count_flush(len(channel_times), running)
                for channel in trim:
                    self.last_trim[channel] = now
        except redis.RedisError as exc:
            self.metrics.redis_errors += 1
            if self.redis_down_since is None:
                self.redis_down_since = now_mono
                log.error(
                    "redis unavailable (%s); keeping %d channel(s) of heartbeats in memory and retrying",
                    exc,
                    len(self.pending.channel_times),
                )
            self.retry_at = now_mono + self.backoff
            self.backoff = min(self.backoff * 2, MAX_BACKOFF)
            return False
        if self.redis_down_since is not None:
            # A Redis that restarted empty has no stream:<id>:pid until each launcher
            # writes its records again (within seconds): heartbeats of streams not running
            # yet are kept and written again for HELD_AFTER_OUTAGE seconds.
            log.info("redis is back after %.1f s; heartbeats written", now_mono - self.redis_down_since)
            self.redis_down_since = None
            self.recovering_until = now_mono + HELD_AFTER_OUTAGE
        self.backoff = 1.0
        if recovering and skipped:
            self.pending = self.pending.keep_only(skipped)
        else:
            self.pending.clear()
        self._save_position()
        self._refresh_host(now_mono)
        return True

    def _refresh_host(self, now_mono: float) -> None:
        """host:<host_id> says this host is alive (other hosts' reapers leave its records).
        A --once batch run says nothing about the host."""
        if self.once or now_mono < self.next_host_refresh:
            return
        try:
            runs.refresh_host(self.redis, self.settings.host_id, self.settings.host_timeout)
            self.next_host_refresh = now_mono + self.settings.reaper_interval / 2
        except redis.RedisError as exc:
            log.warning("cannot refresh host key: %s", exc)

    def _channels_to_trim(self, channel_times, now: float) -> list[str]:
        if self.window <= 0:
            return []
        due = []
        for channel in channel_times:
            # First trim one window after the channel is first seen, then once a window.
            last = self.last_trim.setdefault(channel, now)
            if now - last >= self.window:
                due.append(channel)
        return due

    def _save_position(self) -> None:
        if self.position is None or self.position == self.saved_position:
            return
        try:
            save_checkpoint(self.checkpoint_file, self.log_path, self.position)
            self.saved_position = self.position
        except OSError as exc:
            log.error("cannot write checkpoint %s: %s", self.checkpoint_file, exc)

    # -- wake-ups -----------------------------------------------------------------
    def _start_watching(self) -> None:
        """inotify on the log's directory; any event means 'read to the end'."""
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:  # pragma: no cover - watchdog is a dependency
            log.warning("watchdog is not installed; polling every %.1f s", POLL_INTERVAL)
            return
        wake = self.wake

        class _Wake(FileSystemEventHandler):
            def on_any_event(self, event):
                wake.set()

        directory = os.path.dirname(self.log_path) or "."
        try:
            observer = Observer()
            observer.schedule(_Wake(), directory, recursive=False)
            observer.daemon = True
            observer.start()
            self._observer = observer
        except OSError as exc:
            log.warning("cannot watch %s (%s); polling every %.1f s", directory, exc, POLL_INTERVAL)

    def _stop_watching(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer = None

    def _log_summary(self) -> None:
        log.info("%s", self.metrics.summary_line())


def _next_tick(previous: float, interval: float) -> float:
    """The next tick of a fixed cadence on the monotonic clock (skipping missed ones)."""
    now = time.monotonic()
    nxt = previous + interval
    if nxt <= now:
        nxt = now + interval - ((now - previous) % interval)
    return nxt
