"""What a reaper pass does with each stream: the rules, as pure logic (the clock, the live
hosts and the process proof are given); streamstate.reaping collects the streams and
carries the actions out.

Rules, in the order a pass applies them:

* Redis cannot be read -> stop nothing (fail safe); the caller exits non-zero.
* Only one pass per host at a time: ``reaper:<host>:lock`` (SET NX with an expiry).
* A record of another host: left alone while that host's ``host:<id>`` key lives;
  cleared as stale (never signalled) once the host has not been seen for host_timeout.
* A record of this host its launcher vouches for (``until``: renewed every few seconds
  while it watches the run, and set for ``starting`` and ``backoff``) -> kept: its pid may
  be the FFmpeg that just ended, and the launcher is about to start the next.
* A record of this host whose pid is not proven to be its FFmpeg (streamstate.process:
  the configured FFmpeg executable, writing exactly this channel's playlist, with the
  recorded start time where there is one) -> stale: keys and files cleared, nothing
  signalled.  Signals go through a pidfd opened before the proof.
* Idle (now - last_access, else started) past idle_timeout -> stop, with the one stop
  routine (streamstate.stream_end): marked ``stopping`` (so the launcher does not
  restart it), SIGTERM, SIGKILL after stop_grace, files, keys only if they still
  belong to that run (compare-and-delete, so a stream started again meanwhile keeps
  its keys), its egress ticket, its provider slot.
* Files in hls_dir of no running stream, older than orphan_age -> deleted.
* FFmpeg processes writing into hls_dir that no record knows -> stopped.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Callable

from . import runs, stream_end


@dataclasses.dataclass
class StreamView:
    """What a pass knows of one stream."""

    channel: str
    run: runs.RunRecord | None
    pid_raw: str | None
    started: float | None
    last_access: float | None

    @property
    def legacy(self) -> bool:
        return self.run is None

    @property
    def pid(self) -> int:
        if self.run is not None:
            return self.run.pid
        raw = (self.pid_raw or "").strip()
        # A pid has at most 7 digits (pid_max is 2^22); longer text is junk, never int()'d.
        return int(raw) if len(raw) <= 10 and raw.isascii() and raw.isdigit() and raw == str(int(raw)) else 0

    def idle(self, now: float) -> float | None:
        reference = self.last_access if self.last_access is not None else self.started
        return None if reference is None else now - reference


class ActionKind(enum.StrEnum):
    """What a pass does with a stream (the value is what --json shows)."""

    STOP = "stop"  # this host's, idle past idle_timeout: stopped
    STALE = "stale"  # its FFmpeg is gone (or its host is): its keys are cleared
    KEEP = "keep"  # watched, or vouched for by its launcher
    FOREIGN = "foreign"  # another live host's: its own reaper's

    @property
    def verb(self) -> str:
        """What a dry run says it would do."""
        return {ActionKind.STOP: "stop", ActionKind.STALE: "clear"}.get(self, "leave")


@dataclasses.dataclass
class Action:
    kind: ActionKind
    channel: str
    pid: int
    why: str
    idle: float | None = None
    run_id: str | None = None
    pid_start: int | None = None
    pid_raw: str | None = None  # a legacy record's pid key as stored (compared on delete)
    provider: str | None = None  # the provider slot its run holds
    host: str | None = None  # another host's record (its files and ticket are not here)

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def target(self) -> stream_end.StopTarget:
        return stream_end.StopTarget(
            channel=self.channel,
            pid=self.pid,
            run_id=self.run_id,
            pid_start=self.pid_start,
            pid_raw=self.pid_raw,
            provider=self.provider or "",
            local=self.host is None,
            why=self.why,
        )


@dataclasses.dataclass
class PassSummary:
    host: str
    dry_run: bool
    started: float
    duration: float = 0.0
    skipped: str = ""  # why the pass did nothing (another reaper holds the lock)
    streams: int = 0
    stopped: int = 0
    stale: int = 0
    kept: int = 0
    foreign: int = 0
    orphan_files: int = 0
    orphan_processes: int = 0
    invalid_members: int = 0  # junk in streams:active (not a channel id): removed
    actions: list = dataclasses.field(default_factory=list)

    def line(self) -> str:
        if self.skipped:
            return f"pass skipped: {self.skipped}"
        prefix = "dry run: would have " if self.dry_run else "pass: "
        return (
            f"{prefix}stopped {self.stopped}, cleared {self.stale} stale, kept {self.kept}, "
            f"left {self.foreign} of other hosts, removed {self.orphan_files} orphan file(s) and "
            f"{self.orphan_processes} orphan process(es); {self.streams} stream(s) in "
            f"{self.duration:.3f} s"
        )

    def as_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["actions"] = [a.as_dict() for a in self.actions]
        return data


def decide(
    view: StreamView, now: float, live_hosts: set[str], host_id: str, settings, proven: Callable[[StreamView], bool]
) -> Action:
    """What a pass does with one stream (pure: the clock, the live hosts and the process
    proof are given): another live host's is left to it, a dead host's is stale; one its
    launcher vouches for is kept while watched; one whose pid is not its FFmpeg is stale
    (never signalled); one idle past idle_timeout is stopped; else kept."""
    channel, pid = view.channel, view.pid
    idle = view.idle(now)
    run = view.run

    def action(kind: ActionKind, why: str, host: str | None = None) -> Action:
        return Action(
            kind=kind,
            channel=channel,
            pid=pid,
            why=why,
            host=host,
            idle=None if idle is None else round(idle, 1),
            pid_raw=None if run else view.pid_raw,
            run_id=run.run_id if run else None,
            pid_start=run.pid_start if run else None,
            provider=(run.provider or None) if run else None,
        )

    if run is not None and run.host and run.host != host_id:
        if run.host in live_hosts:
            return action(ActionKind.FOREIGN, f"runs on host {run.host}")
        return action(ActionKind.STALE, f"host {run.host} not seen for {settings.host_timeout:g} s", host=run.host)
    vouched_state = run.state if run is not None and run.vouched(now) else None
    if vouched_state is not None and (idle is None or idle <= settings.idle_timeout):
        return action(ActionKind.KEEP, f"its launcher vouches for it ({vouched_state})")
    if vouched_state is None and not proven(view):
        why = "no pid" if not pid else f"pid {pid} is not this stream's FFmpeg (gone or reused)"
        return action(ActionKind.STALE, why)
    if idle is None or idle > settings.idle_timeout:
        shown = "never watched" if idle is None else f"idle {idle:.0f} s"
        return action(ActionKind.STOP, f"{shown} > idle_timeout {settings.idle_timeout:g} s")
    return action(ActionKind.KEEP, "watched")
