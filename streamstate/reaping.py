"""One reaper pass: stop streams idle past idle_timeout, clear stale records, files and
processes.  It reads every stream (SCAN), decides what to do with each by the rules of
streamstate.reap_rules, and carries that out with the one stop routine
(streamstate.stream_end); then orphan files and processes, then its pass summary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid

import click
import redis

from . import files, keys, redis_values, runs, stream_end
from .process import (
    ProcessHandle,
    StreamProcess,
    process_age,
    process_start_time,
    resolve_executable,
    stop_processes,
    stream_ffmpegs_under,
)
from .reap_rules import Action, ActionKind, PassSummary, StreamView, decide
from .redis_client import redis_for

log = logging.getLogger("streamkeeper.reaper")

EXIT_REDIS = 1  # a pass could not reach Redis: nothing was stopped

BATCH = 500
SCAN_COUNT = 1000
# A Redis younger than this may have lost records the launchers have not written again yet
# (they do within seconds): no FFmpeg is taken for an orphan meanwhile.
ORPHAN_GRACE_AFTER_REDIS_START = 10.0


class RedisUnavailable(RuntimeError):
    pass


class Reaper:
    def __init__(self, settings, client: redis.Redis | None = None, *, dry_run: bool = False):
        self.settings = settings
        self.host = settings.host_id
        self.redis = client or redis_for(settings)
        self.dry_run = dry_run
        self.hls_dir = settings.hls_dir
        self.ffmpeg = resolve_executable(settings.ffmpeg)
        self._invalid_members: list = []

    # -- the pass -------------------------------------------------------------------
    def run_pass(self) -> PassSummary:
        summary = PassSummary(host=self.host, dry_run=self.dry_run, started=time.time())
        began = time.monotonic()
        token = uuid.uuid4().hex
        try:
            if not self.dry_run and not self._lock(token):
                summary.skipped = "another reaper of this host is running a pass"
                return summary
            try:
                views = self._collect()
                now = time.time()
                live_hosts = self._live_hosts(views)
                actions = [self._decide(view, now, live_hosts) for view in views]
                summary.streams = len(views)
                summary.actions = [a for a in actions if a.kind is not ActionKind.KEEP]
                summary.kept = sum(a.kind is ActionKind.KEEP for a in actions)
                summary.foreign = sum(a.kind is ActionKind.FOREIGN for a in actions)
                if not self.dry_run:
                    self._clear_stale([a for a in actions if a.kind is ActionKind.STALE])
                    self._stop([a for a in actions if a.kind is ActionKind.STOP])
                summary.stopped = sum(a.kind is ActionKind.STOP for a in actions)
                summary.stale = sum(a.kind is ActionKind.STALE for a in actions)
                # Only this host's own runs keep processes and files here: a channel another
                # host runs now (it took it over) has none of this host's, and its old files
                # would be served stale by this host's nginx.
                running = {a.channel for a in actions if a.kind is ActionKind.KEEP}
                elsewhere = {a.channel for a in actions if a.kind is ActionKind.FOREIGN}
                summary.orphan_processes = self._orphan_processes(running)
                summary.orphan_files = self._orphan_files(running, now, elsewhere)
                summary.invalid_members = self._remove_invalid_members()
            finally:
                if not self.dry_run:
                    self._unlock(token)
            summary.duration = time.monotonic() - began
            if not self.dry_run:
                self._record_pass(summary)
        except redis.RedisError as exc:
            raise RedisUnavailable(f"redis unavailable ({exc}); nothing was stopped") from None
        summary.duration = time.monotonic() - began
        return summary

    def stop_host_streams(self, reason: str, channel: str | None = None) -> list[str]:
        """Every stream of this host (or only ``channel``), stopped now with the one stop
        routine (streamstate.stream_end): what `streamctl stop` falls back to when the
        launcher is not there to do it.  Returns the channels stopped."""
        views = [
            v
            for v in self._collect()
            if (v.run is None or not v.run.host or v.run.host == self.host) and channel in (None, v.channel)
        ]
        actions = [self._decide(view, time.time(), set()) for view in views]
        # Only streams proven to be FFmpegs writing into this hls_dir; stale records are
        # the reaper's next pass's business.
        stops = [
            dataclasses.replace(a, kind=ActionKind.STOP, why=reason)
            for a in actions
            if a.kind in (ActionKind.STOP, ActionKind.KEEP)
        ]
        self._stop(stops)
        return [a.channel for a in stops]

    def _lock(self, token: str) -> bool:
        ttl = max(self.settings.reaper_interval * 2, self.settings.stop_grace * 3 + 30)
        return bool(self.redis.set(keys.reaper_lock_key(self.host), token, nx=True, px=int(ttl * 1000)))

    def _unlock(self, token: str) -> None:
        try:
            runs.release_lock(self.redis, keys.reaper_lock_key(self.host), token)
        except redis.RedisError:
            pass  # it expires

    # -- reading ------------------------------------------------------------------
    def _collect(self) -> list[StreamView]:
        """Every stream Redis knows: the active set and every stream:<id>:pid (SCAN)."""
        active = runs.read_active(self.redis)
        self._invalid_members = active.invalid
        ids = set(active.channels)
        for key in self.redis.scan_iter(match=keys.PID_KEY_PATTERN, count=SCAN_COUNT):  # type-blind
            channel = keys.channel_id_from_pid_key(key)
            if channel:
                ids.add(channel)
        ordered = sorted(ids, key=int)
        views = []
        for start in range(0, len(ordered), BATCH):  # one round trip per batch
            batch = ordered[start : start + BATCH]
            now = time.time()
            for channel, (run, pid, started, last_access) in zip(batch, runs.read_batch(self.redis, batch)):
                views.append(
                    StreamView(
                        channel=channel,
                        run=run,
                        pid_raw=pid,
                        started=redis_values.epoch_seconds(started, now),
                        last_access=redis_values.epoch_seconds(last_access, now),
                    )
                )
        return views

    def _live_hosts(self, views: list[StreamView]) -> set[str]:
        others = sorted({v.run.host for v in views if v.run and v.run.host and v.run.host != self.host})
        if not others:
            return set()
        pipe = self.redis.pipeline(transaction=False)
        for host in others:
            pipe.exists(keys.host_key(host))
        return {host for host, alive in zip(others, pipe.execute()) if alive}

    # -- deciding -------------------------------------------------------------------
    def _decide(self, view: StreamView, now: float, live_hosts: set[str]) -> Action:
        return decide(view, now, live_hosts, self.host, self.settings, self._proven)

    def _proven(self, view: StreamView) -> bool:
        start_time = view.run.pid_start if view.run is not None else None
        return StreamProcess.of_channel(self.ffmpeg, self.hls_dir, view.channel, start_time).proven_by(view.pid)

    # -- acting -------------------------------------------------------------------
    def _clear_stale(self, actions: list[Action]) -> None:
        """Records whose process is gone: the stop routine without a signal."""
        self._end(actions, signal=False)
        for action in actions:
            log.info("channel %s: cleared stale record (pid %s): %s", action.channel, action.pid, action.why)

    def _stop(self, actions: list[Action]) -> None:
        for result, action in zip(self._end(actions, signal=True), actions):
            if result.keys_deleted:
                log.info("channel %s: stopped (pid %s, %s)", action.channel, action.pid, action.why)
            else:
                log.info(
                    "channel %s: stopped pid %s; its keys now belong to a newer run and stay",
                    action.channel,
                    action.pid,
                )

    def _end(self, actions: list[Action], *, signal: bool) -> list[stream_end.Stopped]:
        try:
            return stream_end.stop_streams(
                self.redis, self.settings, [a.target() for a in actions], executable=self.ffmpeg, log=log, signal=signal
            )
        except stream_end.StopAborted as exc:
            raise RedisUnavailable(str(exc)) from None

    def _remove_invalid_members(self) -> int:
        """Members of streams:active that are no channel id: skipped by every reader,
        removed here (no stream can be one of them)."""
        junk = self._invalid_members
        if junk and not self.dry_run:
            try:
                self.redis.srem(keys.ACTIVE_STREAMS_KEY, *junk)
            except redis.ResponseError as exc:
                log.error("%s is not a set (%s): fix or delete it by hand", keys.ACTIVE_STREAMS_KEY, exc)
                return len(junk)
            log.warning(
                "removed %d invalid member(s) of %s: %s",
                len(junk),
                keys.ACTIVE_STREAMS_KEY,
                ", ".join(runs.shown_member(m) for m in junk[:5]),
            )
        return len(junk)

    def _orphan_files(self, running: set[str], now: float, elsewhere: frozenset[str] | set[str] = frozenset()) -> int:
        """Playlists and segments of no running stream here, older than orphan_age; those of a
        channel another live host runs (``elsewhere``) at once, whatever their age."""
        try:
            names = os.listdir(self.hls_dir)
        except FileNotFoundError:
            return 0
        removed = 0
        age_limit = self.settings.orphan_age
        for name in names:
            channel = files.channel_of_file(name)
            if channel is None or channel in running:
                continue
            path = os.path.join(self.hls_dir, name)
            try:
                age = now - os.stat(path).st_mtime
            except OSError:
                continue
            if age <= age_limit and channel not in elsewhere:
                continue
            if self.dry_run:
                removed += 1
                continue
            if files.remove_entry(path):
                removed += 1
                log.info("channel %s: removed orphan file %s (%.0f s old)", channel, name, age)
        return removed

    def _orphan_processes(self, running: set[str]) -> int:
        """The configured FFmpeg writing a playlist in hls_dir that no record knows: stopped,
        each logged, its files removed.  "No record knows it" is decided from a fresh read
        of the records, taken now (after the stop phase, which can last stop_grace: a stream
        started meanwhile has a record by now), and never for a process younger than
        start_timeout (a launcher may not have written its record yet)."""
        candidates = [
            (pid, playlist)
            for pid, playlist in stream_ffmpegs_under(self.hls_dir, self.ffmpeg)
            if (process_age(pid) or 0.0) >= self.settings.start_timeout
        ]
        if not candidates:
            return 0
        uptime = int(self.redis.info("server").get("uptime_in_seconds", 0) or 0)
        if uptime < ORPHAN_GRACE_AFTER_REDIS_START:
            log.info(
                "redis started %d s ago: no FFmpeg is taken for an orphan before its launcher "
                "has written its record again",
                uptime,
            )
            return 0
        known_pids = {view.pid for view in self._collect() if view.pid}
        stopped = 0
        for pid, playlist in candidates:
            if pid in known_pids:
                continue
            handle = ProcessHandle.open_proven(pid, StreamProcess(self.ffmpeg, (playlist,), process_start_time(pid)))
            if handle is None:
                continue
            with handle:
                stopped += 1
                if self.dry_run:
                    continue
                log.warning(
                    "orphan FFmpeg pid %s writing %s: no record knows it; stopping it", pid, os.path.basename(playlist)
                )
                stop_processes([handle], self.settings.stop_grace)
            channel = files.channel_of_file(os.path.basename(playlist))
            if channel is not None and channel not in running:
                files.delete_stream_files(self.hls_dir, channel)
        return stopped

    def _record_pass(self, summary: PassSummary) -> None:
        try:
            redis_values.clear_other_type(self.redis, keys.reaper_last_pass_key(self.host), "hash")  # junk
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(
                keys.reaper_last_pass_key(self.host),
                mapping={
                    "time": f"{summary.started:.3f}",
                    "duration": f"{summary.duration:.3f}",
                    "streams": summary.streams,
                    "stopped": summary.stopped,
                    "stale": summary.stale,
                    "kept": summary.kept,
                    "orphan_files": summary.orphan_files,
                    "orphan_processes": summary.orphan_processes,
                },
            )
            pipe.hincrby(keys.reaper_last_pass_key(self.host), "passes", 1)
            pipe.execute()
            runs.refresh_host(self.redis, self.host, self.settings.host_timeout)
        except redis.RedisError as exc:
            log.error("could not record the pass in redis: %s", exc)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def summary_json(summary: PassSummary) -> str:
    return json.dumps(summary.as_dict(), indent=2)


def run_one(reaper: Reaper, as_json: bool) -> int:
    """One pass, its log lines (each action of a dry run), its summary; the exit code:
    0 done, EXIT_REDIS when Redis cannot be reached (nothing was stopped)."""
    try:
        summary = reaper.run_pass()
    except RedisUnavailable as exc:
        log.error("%s", exc)
        return EXIT_REDIS
    except Exception as exc:  # noqa: BLE001 - one bad pass must not end the service
        log.error("pass failed: %s: %s", type(exc).__name__, exc)
        return EXIT_REDIS
    if reaper.dry_run:
        for action in summary.actions:
            log.info(
                "dry run: channel %s: would %s pid %s: %s", action.channel, action.kind.verb, action.pid, action.why
            )
    log.info("%s", summary.line())
    if as_json:
        click.echo(summary_json(summary))
    return 0
