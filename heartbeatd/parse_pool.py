"""Parse a backlog on every core: worker processes, each with its own parser and its own pipe.

Used only for large blocks (catching up after a restart, ``--once`` on a big
file); the live trickle of a followed log is parsed in heartbeatd itself.
Results come back in file order, so checkpoints and "the later wins" keep
their meaning.  Each worker returns a ChunkResult: counts, one time per
channel and one per (channel, viewer hash), never the lines.

One pipe per worker and no shared locks: a worker killed at any moment (a
SIGTERM to the whole process group under systemd, the OOM killer) cannot
deadlock heartbeatd, as multiprocessing.Pool's shared queue lock can.  A block
whose worker is gone is parsed in-process instead; nothing is lost.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import multiprocessing
import os
import signal

from streamstate.logformat import ChunkResult, LogLineParser

log = logging.getLogger("streamkeeper.heartbeatd")

POOL_MIN_BLOCK = 1 << 20  # smaller blocks are parsed in-process
MAX_AUTO_WORKERS = 4
PR_SET_PDEATHSIG = 1


def worker_count(setting: int) -> int:
    if setting:
        return setting
    return min(os.cpu_count() or 1, MAX_AUTO_WORKERS)


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when heartbeatd dies, however it dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _worker_main(connection, inherited, log_format: str, viewer_window: float) -> None:
    for other in inherited:  # other workers' parent ends, copied by fork
        other.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for heartbeatd to handle
    _die_with_parent()
    parser = LogLineParser(log_format, count_viewers=viewer_window > 0, viewer_window=viewer_window)
    while True:
        try:
            block = connection.recv_bytes()
        except (EOFError, OSError):
            return
        if not block:  # the stop sentinel
            return
        connection.send(parser.parse_chunk(block))


class ParsePool:
    """Ordered parallel parsing; create it before any thread starts (it forks)."""

    def __init__(self, log_format: str, viewer_window: float, workers: int):
        context = multiprocessing.get_context("fork")
        self.workers = workers
        self._connections: list = []
        self._processes: list = []
        for _ in range(workers):
            parent_end, child_end = context.Pipe(duplex=True)
            process = context.Process(
                target=_worker_main,
                daemon=True,
                name="heartbeatd-parse",
                args=(child_end, list(self._connections) + [parent_end], log_format, viewer_window),
            )
            process.start()
            child_end.close()
            self._connections.append(parent_end)
            self._processes.append(process)
        self._fallback = LogLineParser(log_format, count_viewers=viewer_window > 0, viewer_window=viewer_window)
        self._broken: set[int] = set()
        self._inflight: collections.deque = collections.deque()  # (worker, block, tag)
        self._busy: set[int] = set()  # one block at a time per worker: no pipe deadlock
        self._next = 0

    def submit(self, block: bytes, tag) -> None:
        """Hand ``block`` to an idle worker (in-process if none is left); call only when
        not ``full()``."""
        worker = self._pick_worker()
        if worker is not None:
            try:
                self._connections[worker].send_bytes(block)
                self._busy.add(worker)
            except OSError:
                self._mark_broken(worker)
                worker = None
        self._inflight.append((worker, block, tag))

    def _pick_worker(self) -> int | None:
        for _ in range(self.workers):
            worker = self._next
            self._next = (self._next + 1) % self.workers
            if worker not in self._broken and worker not in self._busy:
                return worker
        return None

    def full(self) -> bool:
        """Every live worker has a block (a worker never gets a second one before its
        answer is read: its answer could fill the pipe while we write to it)."""
        live = self.workers - len(self._broken)
        if live == 0:  # all gone: parsed in-process, one at a time
            return len(self._inflight) >= 1
        return len(self._busy) >= live or len(self._inflight) >= 2 * self.workers

    def pending(self) -> int:
        return len(self._inflight)

    def next_result(self) -> tuple[ChunkResult, object]:
        """The oldest submitted block's result (waits for it) and its tag."""
        worker, block, tag = self._inflight.popleft()
        self._busy.discard(worker)
        if worker is not None and worker not in self._broken:
            try:
                return self._connections[worker].recv(), tag
            except (EOFError, OSError):
                self._mark_broken(worker)
        return self._fallback.parse_chunk(block), tag

    def _mark_broken(self, worker: int) -> None:
        if worker not in self._broken:
            self._broken.add(worker)
            log.warning(
                "parse worker %d (pid %s) is gone; parsing its blocks in-process", worker, self._processes[worker].pid
            )

    def discard(self) -> None:
        """Stopping mid-backlog: results still owed are dropped (read again next time).

        A worker busy with a dropped block would answer it later, out of turn; so
        those workers are retired."""
        for worker, _, _ in self._inflight:
            if worker is not None:
                self._broken.add(worker)
        self._inflight.clear()

    def close(self) -> None:
        for connection in self._connections:
            try:
                connection.send_bytes(b"")
            except OSError:
                pass
        for process in self._processes:
            process.join(timeout=0.5)
            if process.is_alive():
                process.kill()
                process.join(timeout=2)
        for connection in self._connections:
            connection.close()
