"""An FFmpeg child as the supervisor sees it: one a previous launcher started (held by a
pidfd), how one ended in words, and the pace at which one produces media."""

from __future__ import annotations

import asyncio
import collections
import signal

from streamstate.process import ProcessHandle

SLOW_WINDOW = 30.0  # seconds over which a stream's pace is judged


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


def exit_text(process) -> str:
    """How an FFmpeg ended, in words: its status, the signal that killed it, or (one a
    previous launcher started) that its status is not ours to read."""
    code = process.returncode
    if isinstance(process, AdoptedProcess):
        return "FFmpeg ended (started by a previous launcher: its exit status is unknown)"
    if code == 0:
        return "FFmpeg ended on its own (exit status 0: its input ended)"
    if code is not None and code < 0:
        try:
            return f"FFmpeg was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"FFmpeg was killed by signal {-code}"
    return f"FFmpeg exited with status {code}"


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


async def stop_with_grace(process, handle: ProcessHandle, grace: float) -> bool:
    """SIGTERM through the pidfd held on the proven process, SIGKILL after ``grace``; False if
    it took the SIGKILL.  Waited for on the event loop, not in a thread: a stalled FFmpeg
    ignoring SIGTERM must not hold a worker other streams need.  (The synchronous rule,
    for the reaper and streamctl, is streamstate.process.stop_processes.)"""
    with handle:
        handle.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), grace)
            return True
        except asyncio.TimeoutError:
            handle.signal(signal.SIGKILL)
            return False
