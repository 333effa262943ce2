"""What the egress relay costs: CPU seconds per GB relayed, and streams per core at 5 Mbit/s.

Every upstream byte of every stream passes through stream-egress, so its cost decides
whether relaying everything (the design: every connection checked, proxies honoured)
is affordable.  Two measurements, on loopback, of the relay process's own CPU time
(/proc/<pid>/stat, user + system):

* bulk: 8 connections each pull 128 MB as fast as they can (large reads);
* paced: N connections at 5 Mbit/s each, 1316-byte writes (7 TS packets, what a live
  IPTV source sends) for 20 s: the realistic case, more reads per byte.

Bounded: at most 1 GB in bulk, at most 60 s paced.  Writes bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import sys
import tempfile
import time

from bench.results import write_section
from streamstate import egress

BULK_CONNECTIONS = 8
BULK_BYTES = 128 * 1024 * 1024
PACED_STREAMS = 40
PACED_SECONDS = 20.0
STREAM_BITS_PER_SECOND = 5_000_000
PACKET_GROUP = 1316  # 7 x 188-byte TS packets, one UDP-sized write


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def source(reader, writer, *, paced: bool) -> None:
    """An upstream: bulk bytes, or a paced live stream."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: video/mp2t\r\nConnection: close\r\n\r\n")
    try:
        if paced:
            chunk = b"\x47" * PACKET_GROUP
            interval = PACKET_GROUP * 8 / STREAM_BITS_PER_SECOND
            start = time.monotonic()
            sent = 0
            while time.monotonic() - start < PACED_SECONDS:
                due = start + sent * interval
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
                writer.write(chunk)
                sent += 1
                if sent % 64 == 0:
                    await writer.drain()
        else:
            chunk = b"\x47" * 65536
            for _ in range(BULK_BYTES // len(chunk)):
                writer.write(chunk)
                await writer.drain()
        await writer.drain()
    except ConnectionError:
        pass
    writer.close()


async def client(relay_port: int, source_port: int, channel: str, token: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay_port)
    auth = base64.b64encode(f"{channel}:{token}".encode()).decode()
    writer.write(
        f"GET http://127.0.0.1:{source_port}/live/{channel}.ts HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Proxy-Authorization: Basic {auth}\r\nConnection: close\r\n\r\n".encode()
    )
    total = 0
    while chunk := await reader.read(1 << 20):
        total += len(chunk)
    writer.close()
    return total


async def run(relay_pid: int, relay_port: int, state_dir: str, *, paced: bool, count: int) -> tuple[int, float, float]:
    server = await asyncio.start_server(lambda r, w: source(r, w, paced=paced), "127.0.0.1", 0)
    source_port = server.sockets[0].getsockname()[1]
    tokens = {str(900 + i): egress.write_ticket(state_dir, str(900 + i), None) for i in range(count)}
    cpu_before, wall_before = cpu_seconds(relay_pid), time.monotonic()
    totals = await asyncio.gather(*(client(relay_port, source_port, c, t) for c, t in tokens.items()))
    cpu, wall = cpu_seconds(relay_pid) - cpu_before, time.monotonic() - wall_before
    server.close()
    return sum(totals), cpu, wall


def main() -> None:
    work = tempfile.mkdtemp(prefix="sk-bench-relay-")
    state_dir = os.path.join(work, "state")
    relay_port = free_port()
    config = os.path.join(work, "streamkeeper.toml")
    with open(config, "w") as handle:
        handle.write(
            f'state_dir = "{state_dir}"\negress_listen = "127.0.0.1:{relay_port}"\n'
            f'upstream_allow = ["127.0.0.0/8"]\nredis_url = "redis://127.0.0.1:1/0"\n'
        )
    relay = subprocess.Popen(
        [sys.executable, "-m", "egress", "--config", config, "--log-level", "WARNING"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        deadline = time.monotonic() + 20
        while socket.socket().connect_ex(("127.0.0.1", relay_port)) != 0:
            if time.monotonic() > deadline or relay.poll() is not None:
                raise SystemExit("the relay did not start")
            time.sleep(0.05)
        bulk_bytes, bulk_cpu, bulk_wall = asyncio.run(
            run(relay.pid, relay_port, state_dir, paced=False, count=BULK_CONNECTIONS)
        )
        paced_bytes, paced_cpu, paced_wall = asyncio.run(
            run(relay.pid, relay_port, state_dir, paced=True, count=PACED_STREAMS)
        )
    finally:
        relay.terminate()
        relay.wait(timeout=20)
    gb = 1e9
    bulk_per_gb = bulk_cpu / (bulk_bytes / gb)
    paced_per_gb = paced_cpu / (paced_bytes / gb)
    core_share = paced_cpu / paced_wall  # of one core, for PACED_STREAMS
    streams_per_core = PACED_STREAMS / core_share if core_share else float("inf")
    text = f"""## Egress relay (bench/relay.py)

Every upstream byte passes through stream-egress (Python asyncio, one process). Its own CPU
time (user + system), loopback, {os.cpu_count()} cores:

| load | bytes relayed | relay CPU | CPU s per GB |
|---|---|---|---|
| bulk: {BULK_CONNECTIONS} connections, as fast as possible | {bulk_bytes / 1e6:.0f} MB in {bulk_wall:.1f} s ({bulk_bytes * 8 / bulk_wall / 1e9:.2f} Gbit/s) | {bulk_cpu:.2f} s | {bulk_per_gb:.2f} |
| paced: {PACED_STREAMS} streams at 5 Mbit/s, {PACKET_GROUP}-byte writes | {paced_bytes / 1e6:.0f} MB in {paced_wall:.1f} s | {paced_cpu:.2f} s ({100 * core_share:.1f} % of a core) | {paced_per_gb:.2f} |

Streams per core at 5 Mbit/s (paced): **{streams_per_core:.0f}**. A 720p `medium` encode
takes half a core per stream (bench/capacity.py), so the relay adds about
{100 * (core_share / PACED_STREAMS) / 0.5:.1f} % to a transcoded stream's CPU, and at most one core
for {streams_per_core:.0f} `copy` streams: relaying every connection is affordable.
"""
    print(text)
    write_section("relay", text)


if __name__ == "__main__":
    main()
