"""How a stream ends: what follows when its FFmpeg exits, and the one routine that stops it.

Two rules, each written once, for the launcher's supervisor, the reaper, ``streamctl
stop`` (with or without the launcher) and the launcher's adoption at start-up:

* :func:`after_exit` decides what follows an FFmpeg that ended while its stream was
  not being stopped: restart it (the viewers' playlist continues: streamstate.hls),
  wait without spending a restart (a problem of the host, not of the stream), fail
  it, or let it go (nobody wants it any more).
* :func:`stop_streams` stops streams in one order: **mark** the record ``stopping``
  (so no launcher restarts it), **signal** the proven process (SIGTERM through a
  pidfd, SIGKILL after stop_grace), delete its **files**, its **keys** (only while
  they still belong to the run stopped), its egress **ticket**, and last its provider
  **slot**, once the relay holds none of its connections (a provider never sees one
  connection over its limit).
"""

from __future__ import annotations

import dataclasses
import enum
import logging

import redis

from . import egress, files, keys, providers, runs
from .process import ProcessHandle, StreamProcess, stop_processes

# The longest the stop waits for the relay to close a stream's upstream connections
# before it frees the slot anyway (the relay closes them as soon as FFmpeg's side closes).
RELAY_CLOSE_WAIT = 5.0
MAX_BACKOFF = 60.0  # seconds; the wait before a restart doubles from 1 s up to this


class Next(enum.Enum):
    RESTART = "restart"  # a new FFmpeg continues the viewers' playlist after ``delay``
    WAIT = "wait"  # the host's problem (relay down, disk full): retry, spending no restart
    FAIL = "fail"  # failed: files and keys go, starts get 503 for failed_cooldown
    STOP = "stop"  # no longer wanted: files and keys go


class Cause(enum.Enum):
    """Why an FFmpeg ended, as far as the next step cares (the text a player or an
    operator sees is kept beside it, never branched on)."""

    EXITED = "exited"  # it exited or crashed
    STALLED = "stalled"  # no new segment for stall_after
    SOURCE = "source"  # the source refused, failed or sent nothing playable
    REFUSED = "refused"  # the relay refused an address (or the upstream was unreachable)
    PROXY = "proxy"  # the channel's proxy cannot be used: no source would do better
    RELAY_DOWN = "relay down"  # the egress relay does not answer
    DISK_FULL = "disk full"  # hls_dir is full
    LAUNCHER = "launcher error"
    FENCED = "fenced"  # the relay refused: this host's lease lapsed (streamstate.lease)

    @property
    def text(self) -> str:
        """The class of failure a player sees, for the causes that have one of their own
        (the others' text comes from what FFmpeg or the source said: launcher.diagnosis)."""
        return _CAUSE_TEXT.get(self, self.value)


_CAUSE_TEXT = {Cause.RELAY_DOWN: "egress relay unavailable", Cause.FENCED: "host fenced: its Redis lease lapsed"}


# Causes that say nothing about the source: another source would not do better.
NOT_THE_SOURCE = frozenset({Cause.RELAY_DOWN, Cause.DISK_FULL, Cause.LAUNCHER, Cause.PROXY, Cause.FENCED})


@dataclasses.dataclass(frozen=True)
class Step:
    next: Next
    delay: float = 0.0
    why: str = ""


def after_exit(
    cause: Cause,
    *,
    ever_playable: bool,
    wanted: bool,
    restarts_in_window: int,
    max_restarts: int,
    restart_window: float,
) -> Step:
    """What follows an FFmpeg that ended (not by a stop): see the module docstring.

    The first restart within restart_window is immediate (the viewers' players hold a few
    segments: a crash costs them nothing if the new FFmpeg is quick), the next ones wait
    1, 2, 4 ... MAX_BACKOFF seconds; past max_restarts within the window, the stream fails.
    """
    if not wanted:
        return Step(Next.STOP, why="no longer wanted (its record was stopped or replaced)")
    if cause in (Cause.RELAY_DOWN, Cause.DISK_FULL, Cause.FENCED):
        return Step(Next.WAIT, why=cause.value)
    if not ever_playable:
        return Step(Next.FAIL, why="never became playable")
    if restarts_in_window >= max_restarts:
        return Step(Next.FAIL, why=f"{restarts_in_window} restarts in {restart_window:g} s")
    delay = 0.0 if restarts_in_window == 0 else min(2.0 ** (restarts_in_window - 1), MAX_BACKOFF)
    return Step(Next.RESTART, delay=delay)


# -- the stop routine ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StopTarget:
    """One stream to stop, as the caller read it (its record, or a legacy record's pid)."""

    channel: str
    pid: int
    run_id: str | None = None  # None: a legacy record (or junk): compared by its pid key
    pid_start: int | None = None
    pid_raw: str | None = None  # a legacy record's pid key as stored
    provider: str = ""  # the provider whose connection slot the run holds
    local: bool = True  # this host's: signal it, delete its files and ticket
    why: str = ""  # for the log line

    @classmethod
    def of_record(cls, record: runs.RunRecord, why: str, *, local: bool = True) -> "StopTarget":
        return cls(
            channel=record.channel,
            pid=record.pid,
            run_id=record.run_id,
            pid_start=record.pid_start,
            provider=record.provider,
            local=local,
            why=why,
        )


@dataclasses.dataclass
class Stopped:
    target: StopTarget
    signalled: bool = False  # its process was proven and signalled
    killed: bool = False  # ... and needed SIGKILL
    keys_deleted: bool = False  # False: a newer run owns them now (or Redis failed)


class StopAborted(RuntimeError):
    """Redis failed before any stream was marked: nothing was signalled."""


def stop_streams(
    client,
    settings,
    targets: list[StopTarget],
    *,
    executable: str | None,
    log: logging.Logger,
    signal: bool = True,
    need_mark: bool = True,
    relay_wait: float = RELAY_CLOSE_WAIT,
) -> list[Stopped]:
    """Stop ``targets`` in the one order (module docstring); blocking, bounded by
    stop_grace and ``relay_wait``.  ``signal``: False when the process is known gone (a
    stale record).  ``need_mark``: a Redis failure at the mark aborts (StopAborted) so a
    stream is never signalled while a launcher could still restart it; the launcher's own
    stop (it will not restart) passes False and goes on without Redis."""
    results = [Stopped(target) for target in targets]
    if not targets:
        return results
    _mark(client, targets, need_mark, log)
    if signal:
        _signal(settings, results, executable, log)
    # The relay closes a stream's upstream connection once its FFmpeg is gone; the record that
    # protects its provider slot goes only after that (a slot whose run has no record is free).
    _wait_relay(settings, results, log, relay_wait)
    for result in results:
        if result.target.local:
            _on_disk(
                log,
                result.target.channel,
                "its files",
                files.delete_stream_files,
                settings.hls_dir,
                result.target.channel,
            )
    _delete_keys(client, results, log)
    for result in results:
        if result.target.local and result.keys_deleted:
            _on_disk(
                log,
                result.target.channel,
                "its egress ticket",
                egress.delete_ticket,
                settings.state_dir,
                result.target.channel,
            )
    _release_slots(client, results, log)
    return results


def _on_disk(log: logging.Logger, channel: str, what: str, delete, *args) -> None:
    """A file step that cannot be done (a read-only or foreign directory) is said, and the
    stop goes on: its keys and slot must not stay behind for want of a file."""
    try:
        delete(*args)
    except OSError as exc:
        log.warning("channel %s: cannot delete %s (%s); the reaper removes them as orphans", channel, what, exc)


def _mark(client, targets: list[StopTarget], need_mark: bool, log: logging.Logger) -> None:
    marked = [t for t in targets if t.run_id]
    if not marked:
        return
    try:
        pipe = client.pipeline(transaction=False)
        for target in marked:
            runs.mark_stopping_in(pipe, client, target.channel, target.run_id or "")
        pipe.execute()
    except redis.RedisError as exc:
        if need_mark:
            raise StopAborted(f"redis unavailable ({exc}); nothing was stopped") from None
        log.warning(
            "cannot mark %s stopping (%s); stopping anyway", ", ".join(f"channel {t.channel}" for t in marked), exc
        )


def _signal(settings, results: list[Stopped], executable: str | None, log: logging.Logger) -> None:
    handles: dict[ProcessHandle, Stopped] = {}
    for result in results:
        target = result.target
        if not target.local or not target.pid:
            continue
        proof = StreamProcess.of_channel(executable, settings.hls_dir, target.channel, target.pid_start)
        handle = ProcessHandle.open_proven(target.pid, proof)
        if handle is None:
            log.info(
                "channel %s: pid %s is gone or no longer its FFmpeg; nothing to signal", target.channel, target.pid
            )
            continue
        handles[handle] = result
        result.signalled = True
        log.info("channel %s: stopping pid %s (%s)", target.channel, target.pid, target.why)
    try:
        for handle in stop_processes(list(handles), settings.stop_grace):
            handles[handle].killed = True
            log.warning(
                "channel %s: pid %s ignored SIGTERM for %g s; SIGKILL",
                handles[handle].target.channel,
                handle.pid,
                settings.stop_grace,
            )
    finally:
        for handle in handles:
            handle.close()


def _delete_keys(client, results: list[Stopped], log: logging.Logger) -> None:
    items = [
        (r.target.channel, "run", r.target.run_id)
        if r.target.run_id
        else (r.target.channel, "pid", r.target.pid_raw or "")
        for r in results
    ]
    try:
        for start in range(0, len(items), BATCH):
            for result, deleted in zip(
                results[start : start + BATCH], runs.delete_many_if_ours(client, items[start : start + BATCH])
            ):
                result.keys_deleted = deleted
    except redis.RedisError as exc:
        log.warning("cannot delete the keys of %d stopped stream(s) (%s); the reaper clears them", len(results), exc)


BATCH = 500  # records per compare-and-delete script call


def _wait_relay(settings, results: list[Stopped], log: logging.Logger, relay_wait: float) -> None:
    """This host's streams holding a provider slot: until the relay holds none of their
    connections (another host's stale run: its connections are not ours to see)."""
    for result in results:
        target = result.target
        if (
            target.local
            and target.provider
            and target.run_id
            and not egress.wait_closed(settings.egress_listen, target.channel, relay_wait)
        ):
            log.warning(
                "channel %s: the relay still holds its upstream connection after %g s; its "
                "slot of provider %s is freed anyway",
                target.channel,
                relay_wait,
                target.provider,
            )


def _release_slots(client, results: list[Stopped], log: logging.Logger) -> None:
    """A slot is freed only by the run that held it."""
    for result in results:
        target = result.target
        if not target.provider or not target.run_id or not keys.valid_provider_name(target.provider):
            continue
        try:
            providers.release_slot(client, target.provider, target.channel, target.run_id)
        except redis.RedisError as exc:
            log.warning(
                "channel %s: cannot free its slot of provider %s (%s); it is reclaimed at the next start",
                target.channel,
                target.provider,
                exc,
            )
