"""Parse a backlog on every core: a pool of worker processes, each with its own parser.

Used only for large blocks (catching up after a restart, ``--once`` on a big
file); the live trickle of a followed log is parsed in heartbeatd itself.
Results come back in file order, so checkpoints and "the later wins" keep
their meaning.  Each worker returns a ChunkResult: counts, one time per
channel and one per (channel, viewer hash), never the lines.
"""
from __future__ import annotations

import collections
import multiprocessing
import os
import signal

from .logformat import ChunkResult, LogLineParser

POOL_MIN_BLOCK = 1 << 20      # smaller blocks are parsed in-process
MAX_AUTO_WORKERS = 4

_worker_parser: LogLineParser | None = None


def _init_worker(log_format: str, viewer_window: float) -> None:
    global _worker_parser
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _worker_parser = LogLineParser(log_format, count_viewers=viewer_window > 0,
                                   viewer_window=viewer_window)


def _parse_in_worker(block: bytes) -> ChunkResult:
    return _worker_parser.parse_chunk(block)


def worker_count(setting: int) -> int:
    if setting:
        return setting
    return min(os.cpu_count() or 1, MAX_AUTO_WORKERS)


class ParsePool:
    """Ordered parallel parsing; create it before any thread starts (it forks)."""

    def __init__(self, log_format: str, viewer_window: float, workers: int):
        self.workers = workers
        self._pool = multiprocessing.get_context("fork").Pool(
            workers, initializer=_init_worker, initargs=(log_format, viewer_window))
        self._inflight: collections.deque = collections.deque()

    def submit(self, block: bytes, tag) -> None:
        self._inflight.append((self._pool.apply_async(_parse_in_worker, (block,)), tag))

    def full(self) -> bool:
        return len(self._inflight) >= 2 * self.workers

    def pending(self) -> int:
        return len(self._inflight)

    def next_result(self) -> tuple[ChunkResult, object]:
        """The oldest submitted block's result (waits for it) and its tag."""
        result, tag = self._inflight.popleft()
        return result.get(), tag

    def discard(self) -> None:
        self._inflight.clear()

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()
