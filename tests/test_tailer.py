"""The tailer against real files: rotations with a writer running, partial and long lines."""

import os
import shutil
import threading

import pytest

from heartbeatd.tailer import LogTailer, Position
from tests.helpers import append, wait_for

pytestmark = pytest.mark.unit


def numbered(n: int) -> bytes:
    return f"line {n:07d} {'x' * (n % 50)}\n".encode()


def collect(tailer: LogTailer, sink: list[bytes]) -> Position | None:
    last = None
    for block, position in tailer.read_blocks():
        sink.extend(block.splitlines(keepends=True))
        if position is not None:
            last = position
    return last


class Writer(threading.Thread):
    """Appends numbered lines; rotations take ``lock`` so no line is half written."""

    def __init__(self, path, count):
        super().__init__(daemon=True)
        self.path, self.count = path, count
        self.lock = threading.Lock()
        self.written = 0

    def run(self):
        for n in range(self.count):
            with self.lock:
                with open(self.path, "ab") as handle:  # reopen each time, as nginx does after USR1
                    handle.write(numbered(n))
                self.written = n + 1


def holds(tailer: LogTailer, path) -> bool:
    """The tailer reads the file now at ``path``."""
    position = tailer.position()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return position is not None and (position.identity.dev, position.identity.ino) == (st.st_dev, st.st_ino)


def follow_while(tailer, writer, rotate, rotations=3):
    lines: list[bytes] = []
    done_rotations = 0
    writer.start()
    while writer.is_alive() or done_rotations < rotations:
        collect(tailer, lines)
        # The next rotation only once the tailer holds the file it rotates: two rotations
        # between two reads (a whole file it never saw) is no rotation a host lives with
        # (logrotate runs daily), and on a loaded machine the writer can outrun a read.
        if (
            done_rotations < rotations
            and writer.written > (done_rotations + 1) * writer.count // (rotations + 1)
            and holds(tailer, writer.path)
        ):
            rotate(done_rotations)
            done_rotations += 1
    writer.join()
    wait_for(lambda: collect(tailer, lines) or len(lines) >= writer.count, timeout=20, message="every line to be read")
    return lines


def test_rename_rotation_with_a_writer_running(tmp_path):
    path = tmp_path / "access.log"
    path.touch()
    tailer = LogTailer(str(path), drain_seconds=5)
    tailer.start(None, from_start=True)
    writer = Writer(path, 20000)

    def rotate(n):
        # logrotate's default: rename, the writer then opens a new file.
        os.rename(path, tmp_path / f"access.log.{n + 1}")

    lines = follow_while(tailer, writer, rotate)
    assert lines == [numbered(n) for n in range(20000)]
    assert tailer.stats.rotations == 3


def test_copytruncate_with_a_writer_running(tmp_path):
    path = tmp_path / "access.log"
    path.touch()
    tailer = LogTailer(str(path))
    tailer.start(None, from_start=True)
    writer = Writer(path, 20000)

    def rotate(n):
        with writer.lock:  # logrotate's copy + truncate, between two writes
            shutil.copyfile(path, tmp_path / f"access.log.{n + 1}")
            os.truncate(path, 0)

    lines = follow_while(tailer, writer, rotate)
    assert lines == [numbered(n) for n in range(20000)]
    assert tailer.stats.truncations == 3


def test_partial_line_waits_for_its_newline(tmp_path):
    path = tmp_path / "access.log"
    append(path, b"one\ntw")
    tailer = LogTailer(str(path))
    tailer.start(None, from_start=True)
    lines: list[bytes] = []
    position = collect(tailer, lines)
    assert lines == [b"one\n"] and position.offset == 4
    append(path, b"o\n")
    position = collect(tailer, lines)
    assert lines == [b"one\n", b"two\n"] and position.offset == 8


def test_long_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "access.log"
    append(path, b"before\n" + b"A" * 70000 + b"\nafter\n" + b"B" * 200000)
    tailer = LogTailer(str(path), read_size=16384)
    tailer.start(None, from_start=True)
    lines: list[bytes] = []
    collect(tailer, lines)
    append(path, b"B" * 100000 + b"\nlast\n")
    collect(tailer, lines)
    assert lines == [b"before\n", b"after\n", b"last\n"]
    assert tailer.stats.too_long == 2


def test_long_line_inside_one_large_read(tmp_path):
    path = tmp_path / "access.log"
    append(path, b"a\n" * 1000 + b"L" * 100000 + b"\n" + b"b\n" * 1000)
    tailer = LogTailer(str(path))
    tailer.start(None, from_start=True)
    lines: list[bytes] = []
    collect(tailer, lines)
    assert lines == [b"a\n"] * 1000 + [b"b\n"] * 1000
    assert tailer.stats.too_long == 1


def write_numbered(path, first: int, last: int) -> None:
    append(path, b"".join(numbered(n) for n in range(first, last)))


def read_and_stop(path) -> Position:
    """Read a log to its end as a stopped heartbeatd would have; its last position."""
    tailer = LogTailer(str(path))
    tailer.start(None, from_start=True)
    position = collect(tailer, [])
    tailer.close()
    return position


def resume(path, position, expect: str) -> list[bytes]:
    tailer = LogTailer(str(path))
    assert expect in tailer.start(position)
    lines: list[bytes] = []
    collect(tailer, lines)
    return lines


def test_resume_from_a_position_reads_only_what_is_new(tmp_path):
    path = tmp_path / "access.log"
    write_numbered(path, 0, 100)
    position = read_and_stop(path)
    write_numbered(path, 100, 150)
    assert resume(path, position, "resuming") == [numbered(n) for n in range(100, 150)]


def test_rotated_while_stopped_finishes_the_old_file_first(tmp_path):
    path = tmp_path / "access.log"
    write_numbered(path, 0, 100)
    position = read_and_stop(path)
    write_numbered(path, 100, 120)  # written after the checkpoint
    os.rename(path, tmp_path / "access.log.1")
    write_numbered(path, 120, 130)
    assert resume(path, position, "rotated while stopped") == [numbered(n) for n in range(100, 130)]


def test_truncated_while_stopped_finishes_the_copy_first(tmp_path):
    path = tmp_path / "access.log"
    write_numbered(path, 0, 100)
    position = read_and_stop(path)
    write_numbered(path, 100, 120)
    shutil.copyfile(path, tmp_path / "access.log.1")  # copytruncate while stopped
    os.truncate(path, 0)
    write_numbered(path, 120, 125)
    assert resume(path, position, "rotated while stopped") == [numbered(n) for n in range(100, 125)]


def test_first_start_begins_at_the_end_unless_from_start(tmp_path):
    path = tmp_path / "access.log"
    append(path, b"old\n")
    tailer = LogTailer(str(path))
    tailer.start(None)
    lines: list[bytes] = []
    collect(tailer, lines)
    append(path, b"new\n")
    collect(tailer, lines)
    assert lines == [b"new\n"]
