"""Follow a log file by path, across both kinds of rotation, losing no line.

* rename + create (logrotate's default, nginx reopens on USR1): the file we
  hold is read to its end, then kept open and drained for a while (nginx may
  write to it until it reopens), and the new file is read from its start.
* copytruncate: the file shrinks, or its first bytes change.  The rotated copy
  (a sibling whose first bytes are ours) is read from our offset to its end,
  then the file is read from its start.

Blocks of complete lines are handed out with the position after them; a
partial last line waits for its newline.  A line over ``max_line`` bytes is
dropped and counted, without ever being held whole in memory.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import time
from typing import Iterator

from streamstate.checkpoint import FileIdentity, Position

log = logging.getLogger("streamkeeper.heartbeatd")

FINGERPRINT_BYTES = 256
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")


def read_fingerprint(fd: int) -> bytes:
    return os.pread(fd, FINGERPRINT_BYTES, 0)


def fingerprint_matches(fd: int, fingerprint: bytes) -> bool:
    """The file still starts with these bytes (a shorter file can't match)."""
    return os.pread(fd, len(fingerprint), 0) == fingerprint if fingerprint else True


@dataclasses.dataclass
class TailStats:
    too_long: int = 0
    rotations: int = 0
    truncations: int = 0


class _OpenFile:
    """One open file being read: fd, read offset, partial line."""

    def __init__(self, fd: int, offset: int, name: str):
        self.fd = fd
        st = os.fstat(fd)
        self.dev, self.ino = st.st_dev, st.st_ino
        self.fingerprint = read_fingerprint(fd)
        self.read_offset = offset
        self.pending = b""  # a partial line, waiting for its newline
        self.skipping = False  # inside an over-long line, dropping it
        self.line_start = offset  # offset of the first byte not yet handed out
        self.name = name
        self.last_growth = time.monotonic()

    def identity(self) -> FileIdentity:
        if len(self.fingerprint) < FINGERPRINT_BYTES:
            self.fingerprint = read_fingerprint(self.fd)
        return FileIdentity(self.dev, self.ino, self.fingerprint)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class LogTailer:
    def __init__(self, path: str, *, max_line: int = 65536, read_size: int = 4 << 20, drain_seconds: float = 10.0):
        self.path = path
        self.max_line = max_line
        self.read_size = read_size
        self.drain_seconds = drain_seconds
        self.stats = TailStats()
        self._current: _OpenFile | None = None
        self._draining: list[_OpenFile] = []

    # -- opening ----------------------------------------------------------------
    def start(self, position: Position | None, *, from_start: bool = False) -> str:
        """Open the log; resume at ``position`` when it still names a file we can find.

        Returns a one-line description of where reading starts.
        """
        fd = self._open_path()
        if fd is None:
            return f"{self.path} does not exist yet; waiting for it"
        current = _OpenFile(fd, 0, self.path)
        if position is None:
            if not from_start:
                current.read_offset = current.line_start = os.fstat(fd).st_size
            self._current = current
            return f"{self.path}: no checkpoint, starting at offset {current.read_offset}"
        ident = position.identity
        same_inode = (current.dev, current.ino) == (ident.dev, ident.ino)
        if same_inode and fingerprint_matches(fd, ident.fingerprint) and os.fstat(fd).st_size >= position.offset:
            current.read_offset = current.line_start = position.offset
            self._current = current
            return f"{self.path}: resuming at offset {position.offset}"
        # Rotated (or truncated) while we were stopped: finish the old file first.
        old = self._find_rotated(ident, exclude_inode=None if not same_inode else (current.dev, current.ino))
        self._current = current
        if old is not None:
            old.read_offset = old.line_start = position.offset
            self._draining.append(old)
            self.stats.rotations += 1
            return (
                f"{self.path}: rotated while stopped; finishing {old.name} from offset "
                f"{position.offset}, then the new file from its start"
            )
        return (
            f"{self.path}: rotated while stopped and the checkpointed file was not found; "
            "reading the current file from its start"
        )

    def _open_path(self) -> int | None:
        try:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except PermissionError:
            if self._current is not None or self._draining:
                # After a rotation created it with the wrong owner: keep trying, loudly.
                log.error("%s: permission denied; retrying", self.path)
                return None
            raise

    def _find_rotated(self, ident: FileIdentity, exclude_inode=None) -> _OpenFile | None:
        """A rotated sibling (``access.log.1``, ``access.log-2026...``) that is our file."""
        directory = os.path.dirname(self.path) or "."
        base = os.path.basename(self.path)
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            return None
        for name in names:
            if name == base or not name.startswith(base) or name.endswith(COMPRESSED_SUFFIXES):
                continue
            full = os.path.join(directory, name)
            try:
                fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            st = os.fstat(fd)
            if exclude_inode and (st.st_dev, st.st_ino) == exclude_inode:
                os.close(fd)
                continue
            if (st.st_dev, st.st_ino) == (ident.dev, ident.ino) or (
                ident.fingerprint and fingerprint_matches(fd, ident.fingerprint)
            ):
                return _OpenFile(fd, 0, full)
            os.close(fd)
        return None

    # -- reading ----------------------------------------------------------------
    def read_blocks(self) -> Iterator[tuple[bytes, Position | None]]:
        """Blocks of complete lines available now, with the position after each.

        The position is None for blocks of a rotated file still being drained
        (the checkpoint keeps naming the current file).
        """
        for old in list(self._draining):
            for block in self._read_to_end(old):
                yield block, None
            if time.monotonic() - old.last_growth > self.drain_seconds:
                self._finish(old)
        if self._current is None:
            fd = self._open_path()
            if fd is None:
                return
            self._current = _OpenFile(fd, 0, self.path)
            log.info("%s appeared; reading it from its start", self.path)
        current = self._current
        if self._truncated(current):
            yield from self._handle_truncation(current)
        for block in self._read_to_end(current):
            yield block, self.position()
        rotated = self._rotated_away(current)
        if rotated:
            # Drained to the end above; keep it open for late writes, read the new file.
            self._draining.append(current)
            current.last_growth = time.monotonic()
            self._current = None
            self.stats.rotations += 1
            log.info("%s was rotated (renamed); draining the old file, reading the new one from its start", self.path)
            fd = self._open_path()
            if fd is not None:
                self._current = _OpenFile(fd, 0, self.path)
                for block in self._read_to_end(self._current):
                    yield block, self.position()

    def position(self) -> Position | None:
        if self._current is None:
            return None
        return Position(self._current.identity(), self._current.line_start)

    def _finish(self, old: _OpenFile) -> None:
        if old.pending:
            log.warning("%s: dropping a %d-byte last line without a newline after rotation", old.name, len(old.pending))
        old.close()
        self._draining.remove(old)

    def _rotated_away(self, current: _OpenFile) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False  # renamed, new file not created yet: keep reading the old one
        return (st.st_dev, st.st_ino) != (current.dev, current.ino)

    def _truncated(self, current: _OpenFile) -> bool:
        size = os.fstat(current.fd).st_size
        if size < current.read_offset:
            return True
        return (
            bool(current.fingerprint)
            and current.read_offset > 0
            and not fingerprint_matches(current.fd, current.fingerprint)
        )

    def _handle_truncation(self, current: _OpenFile) -> Iterator[tuple[bytes, Position | None]]:
        """copytruncate: finish the copy from our offset, then read from the start."""
        self.stats.truncations += 1
        ident = FileIdentity(current.dev, current.ino, current.fingerprint)
        copy = self._find_rotated(ident, exclude_inode=(current.dev, current.ino))
        if copy is not None:
            copy.read_offset = copy.line_start = current.line_start
            copy.pending = b""
            log.info(
                "%s was truncated (copytruncate); finishing its copy %s from offset %d",
                self.path,
                copy.name,
                current.line_start,
            )
            for block in self._read_to_end(copy):
                yield block, None
            copy.close()
        else:
            log.warning(
                "%s was truncated and no rotated copy was found; lines written after "
                "offset %d before the truncation may be missed",
                self.path,
                current.line_start,
            )
        current.read_offset = current.line_start = 0
        current.pending = b""
        current.skipping = False
        current.fingerprint = read_fingerprint(current.fd)

    def _read_to_end(self, f: _OpenFile) -> Iterator[bytes]:
        while True:
            try:
                data = os.pread(f.fd, self.read_size, f.read_offset)
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            if not data:
                return
            f.read_offset += len(data)
            f.last_growth = time.monotonic()
            block = self._complete_lines(f, data)
            if block:
                yield block

    def _complete_lines(self, f: _OpenFile, data: bytes) -> bytes:
        """Join with the partial line; return the complete lines, keep the rest."""
        if f.skipping:
            newline = data.find(b"\n")
            if newline < 0:
                f.line_start = f.read_offset
                return b""
            data = data[newline + 1 :]
            f.skipping = False
            f.line_start = f.read_offset - len(data)
        buffer = f.pending + data if f.pending else data
        last_newline = buffer.rfind(b"\n")
        if last_newline < 0:
            f.pending = buffer
            if len(f.pending) > self.max_line:
                self.stats.too_long += 1
                log.warning("%s: skipping a line over %d bytes at offset %d", f.name, self.max_line, f.line_start)
                f.pending = b""
                f.skipping = True
                f.line_start = f.read_offset
            return b""
        block = buffer[: last_newline + 1]
        f.pending = buffer[last_newline + 1 :]
        f.line_start = f.read_offset - len(f.pending)
        if len(f.pending) > self.max_line:
            self.stats.too_long += 1
            f.pending = b""
            f.skipping = True
            f.line_start = f.read_offset
        return self._drop_long_lines(block, f.name)

    def _drop_long_lines(self, block: bytes, name: str) -> bytes:
        """Remove complete lines longer than max_line (checked in windows, not per line)."""
        window = self.max_line // 2
        if len(block) <= window:
            return block
        suspects = [
            start
            for start in range(0, len(block), window)
            if block.find(b"\n", start, start + window) < 0 and start + window <= len(block)
        ]
        if not suspects:
            return block
        keep, cursor, dropped = [], 0, 0
        for start in suspects:
            if start < cursor:
                continue
            line_start = block.rfind(b"\n", 0, start) + 1
            line_end = block.find(b"\n", start) + 1
            if line_end - line_start - 1 > self.max_line:
                keep.append(block[cursor:line_start])
                cursor = line_end
                dropped += 1
        if not dropped:
            return block
        keep.append(block[cursor:])
        self.stats.too_long += dropped
        log.warning("%s: skipped %d line(s) over %d bytes", name, dropped, self.max_line)
        return b"".join(keep)

    def close(self) -> None:
        for f in self._draining:
            f.close()
        self._draining.clear()
        if self._current is not None:
            self._current.close()
            self._current = None
