"""The launcher's limits (issue: hardening): max_streams with preemption, a scan of made-up
ids, a full disk, a stream slower than real time.  Each runs a launcher of its own on the
stack's Redis and upstream, with the settings it needs."""

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request

import pytest

from streamstate import files, hls, keys
from tests.helpers import add_channel, ffmpegs_writing, wait_for

pytestmark = pytest.mark.e2e


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))


def metric(launcher, name: str) -> float:
    with urllib.request.urlopen(launcher.url("/metrics"), timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def test_max_streams_preempts_the_longest_idle_stream_else_refuses(stack, extra_launcher, tmp_path):
    """Finding 4: a host runs at most max_streams FFmpegs."""
    launcher = extra_launcher(max_streams=2, preempt_idle=5, hls_dir=str(tmp_path / "hls"))
    for channel in (801, 802, 803, 804):
        add_channel(stack, channel)
    for channel in (801, 802):
        status, body = launcher.json(f"/channel/{channel}/start", "POST")
        assert status == 200, (body, launcher.log()[-2000:])
    stack.redis.set(keys.last_access_key(801), f"{time.time() - 60:.3f}")  # nobody for a minute
    stack.redis.set(keys.last_access_key(802), f"{time.time():.3f}")
    status, body = launcher.json("/channel/803/start", "POST")
    assert status == 200 and body["status"] == "started"
    playlist = files.ffmpeg_playlist_path(launcher.hls_dir, 801)
    assert not any(playlist in argv for argv in _ffmpeg_argvs())  # 801 preempted
    assert "channel 801: preempted" in launcher.log()
    stack.redis.set(keys.last_access_key(803), f"{time.time():.3f}")
    status, body = launcher.json("/channel/804/start", "POST")  # nobody idle: refused
    assert status == 503 and "host busy" in body["error"]
    request = urllib.request.Request(
        launcher.url("/channel/804/start"), method="POST", headers={"X-Streamkeeper-Accel": "1"}
    )
    # Issue 17: the old try/except passed silently on a 200.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 503 and refused.value.headers["Retry-After"]
    running = [a for a in _ffmpeg_argvs() if a[-1].startswith(launcher.hls_dir)]
    assert len(running) == 2
    assert metric(launcher, "streamkeeper_launcher_preempted_total") == 1
    assert metric(launcher, "streamkeeper_launcher_busy_total") >= 1


def _ffmpeg_argvs():
    from tests.helpers import ffmpeg_processes

    return [argv for _, argv in ffmpeg_processes()]


def scan_ids(port: int, first: int, count: int, connections: int = 8, batch: int = 200) -> dict:
    """GET /channel/<id>/start for ``count`` made-up ids, pipelined on a few keep-alive
    connections (a scanner's pace, cheap for the client); status -> how many."""
    import socket

    statuses: dict[int, int] = {}

    def one_connection(ids):
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            reader = sock.makefile("rb")
            for start in range(0, len(ids), batch):
                chunk = ids[start : start + batch]
                sock.sendall(
                    b"".join(
                        b"GET /channel/%d/start HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n\r\n" % c
                        for c in chunk
                    )
                )
                for _ in chunk:
                    status = int(reader.readline().split()[1])
                    length = 0
                    while (line := reader.readline()) not in (b"\r\n", b""):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    reader.read(length)
                    statuses[status] = statuses.get(status, 0) + 1

    ids = list(range(first, first + count))
    threads = [threading.Thread(target=one_connection, args=(ids[n::connections],)) for n in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return statuses


def test_a_scan_of_made_up_ids_keeps_nothing(stack, extra_launcher, tmp_path):
    """Finding 5: 100,000 made-up ids leave the launcher's memory within 5 MB of where it was."""
    launcher = extra_launcher(hls_dir=str(tmp_path / "hls"))
    scan_ids(launcher.port, 10_000_000, 5_000)  # warm up: pools, caches, arenas
    before = rss_kib(launcher.process.pid)
    statuses = scan_ids(launcher.port, 20_000_000, 100_000)
    after = rss_kib(launcher.process.pid)
    assert statuses == {404: 100_000}
    assert after - before < 5 * 1024, (before, after)


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs for hls_dir: a disk that can really fill (needs root to mount)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mountpoint)], check=True)
    yield str(mountpoint)
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_a_full_disk_is_waited_out_and_never_lists_a_cut_segment(stack, extra_launcher, small_disk):
    """Finding 11, and continuity: when the disk fills under FFmpeg, no segment it cut short is
    ever listed, the stream waits for space without spending a restart (starts of other
    channels get 503 "disk full" meanwhile), and once space is back its playlist goes on
    (a discontinuity, the media sequence still rising)."""
    launcher = extra_launcher(hls_dir=os.path.join(small_disk, "hls"), min_free_mb=4)
    add_channel(stack, 805)
    add_channel(stack, 806)
    assert launcher.json("/channel/805/start", "POST")[0] == 200
    playlist = files.playlist_path(launcher.hls_dir, 805)
    before = hls.read(playlist).media_sequence
    filler = os.path.join(small_disk, "filler")
    cut_listed = []

    def listed_segments_are_whole():
        listing = hls.read(playlist)
        for segment in listing.segments if listing else []:
            path = os.path.join(launcher.hls_dir, segment.uri)
            try:
                size = os.path.getsize(path)
            except FileNotFoundError:
                continue
            if size % 188:
                cut_listed.append((segment.uri, size))
        return "disk full" in launcher.log()

    with open(filler, "wb") as handle:  # the disk fills up under FFmpeg
        try:
            while True:
                handle.write(b"\0" * (1 << 20))
                handle.flush()
                listed_segments_are_whole()
        except OSError:
            pass
    wait_for(
        listed_segments_are_whole, timeout=30, interval=0.1, message="the disk-full wait: " + launcher.log()[-3000:]
    )
    assert cut_listed == []
    status, body = launcher.json("/channel/806/start", "POST")
    assert status == 503 and body["error"] == "channel 806: disk full"
    assert metric(launcher, "streamkeeper_launcher_disk_full_total") >= 1
    os.unlink(filler)
    wait_for(
        lambda: b"#EXT-X-DISCONTINUITY" in open(playlist, "rb").read(),
        timeout=30,
        message="the stream to go on once space is back: " + launcher.log()[-2000:],
    )
    assert hls.read(playlist).media_sequence >= before
    listed = {s["id"]: s for s in launcher.json("/streams")[1]["streams"]}
    assert listed["805"]["restarts"] == 0  # waiting for space spent no restart
    assert launcher.json("/channel/806/start", "POST")[0] == 200
    for channel in (805, 806):
        launcher.json(f"/channel/{channel}/stop", "POST")
    assert not any(a[-1] == files.ffmpeg_playlist_path(launcher.hls_dir, 805) for a in _ffmpeg_argvs())


def test_a_stream_slower_than_real_time_is_logged_once_and_counted(stack, channel_id, extra_launcher, tmp_path):
    """Finding 4, last part: FFmpeg producing 0.5 s of media a second, for over 30 s."""
    profiles = {
        "halfspeed": {
            "video": ["-vf", "realtime=speed=0.5", "-c:v", "libx264", "-preset", "ultrafast", "-g", "25"],
            "audio": ["-an"],
        }
    }
    launcher = extra_launcher(hls_dir=str(tmp_path / "hls"), quality_profiles=json.dumps(profiles))
    add_channel(stack, channel_id, quality="halfspeed")
    assert launcher.json(f"/channel/{channel_id}/start", "POST")[0] == 200
    wait_for(
        lambda: "slower than real time" in launcher.log(),
        timeout=60,
        interval=0.5,
        message="the slow stream to be noticed",
    )
    assert launcher.log().count("slower than real time") == 1
    assert metric(launcher, "streamkeeper_launcher_slow_total") == 1
    assert metric(launcher, "streamkeeper_launcher_slow_streams") == 1
    launcher.json(f"/channel/{channel_id}/stop", "POST")
    assert not ffmpegs_writing(type("S", (), {"hls_dir": launcher.hls_dir})(), channel_id)


def test_a_request_head_sent_slowly_is_cut_off(stack):
    """Finding: 1,000 local clients sending one byte every 2 s held their connections. Now a
    request head must arrive within a few seconds (launcher/http_guard.py); nginx's requests,
    sent whole, are served as before."""
    import socket

    from launcher.http_guard import HEAD_TIMEOUT

    slow = [socket.create_connection(("127.0.0.1", stack.launcher_port)) for _ in range(300)]
    for n, sock in enumerate(slow):
        # Half begin with empty lines (finding, issue 16: "\r\n\r\n" first was taken for a
        # whole head and disarmed the timer).
        sock.sendall(b"\r\n\r\nG" if n % 2 else b"G")
        sock.settimeout(0.01)

    def all_cut_off():
        for sock in list(slow):
            try:
                sock.sendall(b"E")
                if sock.recv(1) == b"":
                    raise OSError("closed")
            except socket.timeout:
                continue  # still open: nothing to read yet
            except OSError:
                slow.remove(sock)
                sock.close()
        return not slow

    wait_for(
        all_cut_off, timeout=HEAD_TIMEOUT + 20, interval=0.5, message=f"every slow client cut off ({len(slow)} left)"
    )
    assert stack.launcher_json("/healthz")[0] == 200


def test_idle_connections_at_the_cap_give_their_place_to_a_new_one(monkeypatch):
    """Finding (attack, issue 16): MAX_CONNECTIONS idle keep-alive connections locked nginx out
    (every new connection was closed).  At the cap, a new connection takes the place of the
    one idle the longest; one whose request is being answered is never cut.  aiohttp's own
    server behind the guard, in this process, with a cap of 4."""
    import asyncio

    from aiohttp import web

    from launcher import http_guard

    monkeypatch.setattr(http_guard, "MAX_CONNECTIONS", 4)

    async def scenario():
        release = asyncio.Event()

        async def handle(request):
            if request.path == "/slow":
                await release.wait()
            return web.Response(text="ok")

        server = await http_guard.listen(web.Server(handle), "127.0.0.1", 0, 16)
        port = server.sockets[0].getsockname()[1]

        async def request(path, reader_writer=None):
            reader, writer = reader_writer or await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"ok"), 10)
            return head, (reader, writer)

        busy = await asyncio.open_connection("127.0.0.1", port)
        busy[1].write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        idle = []
        for _ in range(3):  # served, then kept alive and idle
            _, connection = await request("/")
            idle.append(connection)
            await asyncio.sleep(0.01)  # distinct idle times, oldest first
        head, newcomer = await request("/")  # the cap is reached: the idlest gives way
        assert head.startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(idle[0][0].read(), 10) == b""  # cut
        for reader, writer in idle[1:]:
            assert (await request("/", (reader, writer)))[0].startswith(b"HTTP/1.1 200")
        release.set()
        assert (await asyncio.wait_for(busy[0].readuntil(b"ok"), 10)).startswith(b"HTTP/1.1 200")
        for _, writer in [busy, newcomer, *idle]:
            writer.close()
        server.close()

    asyncio.run(scenario())
