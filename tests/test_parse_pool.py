"""The parse pool: ordered results, and no line lost or hang when a worker dies."""

import os
import signal
import subprocess
import sys
import time

from heartbeatd.parse_pool import ParsePool
from streamstate.logformat import LogLineParser
from tests.conftest import REPO
from tests.helpers import children_of, sk_line, wait_for

T = 1795000000.0


def blocks(count=12, lines=2000):
    return [
        "".join(sk_line(T + b * lines + n, f"/live/stream_{b}_{n}.ts") for n in range(lines)).encode()
        for b in range(count)
    ]


def test_results_come_back_in_order_and_survive_a_killed_worker():
    pool = ParsePool("streamkeeper", 0, 2)
    results = []
    try:
        data = blocks()
        for index, block in enumerate(data):
            while pool.full():
                results.append(pool.next_result())
            pool.submit(block, index)
            if index == 3:
                os.kill(pool._processes[1].pid, signal.SIGKILL)
        while pool.pending():
            results.append(pool.next_result())
        assert not pool._processes[1].is_alive() and 1 in pool._broken
    finally:
        pool.close()
    reference = LogLineParser("streamkeeper", count_viewers=False)
    assert [tag for _, tag in results] == list(range(len(data)))
    assert [r.channel_times for r, _ in results] == [reference.parse_chunk(b).channel_times for b in data]


def test_sigterm_to_the_whole_process_group_exits_cleanly(tmp_path, redis_server):
    log = tmp_path / "access.log"
    log.write_text("".join(sk_line(time.time(), "/live/stream_1.m3u8") for _ in range(50_000)))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "heartbeatd",
            "--redis-url",
            redis_server.url,
            "--state-dir",
            str(tmp_path / "state"),
            "--log-file",
            str(log),
            "--from-start",
        ],
        cwd=REPO,
        start_new_session=True,
        env={**os.environ, "STREAMKEEPER_CONFIG": os.devnull, "STREAMKEEPER_PARSE_WORKERS": "2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: (tmp_path / "state").exists(), message="heartbeatd to start")
        # Its parse workers at work on the backlog: the SIGTERM reaches them too.
        wait_for(lambda: len(children_of(process.pid)) >= 2, timeout=30, message="its parse workers")
        os.killpg(process.pid, signal.SIGTERM)  # as systemd does: every process of the unit
        output, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, output
    assert "SIGTERM received" in output and "lines read" in output
