"""``make demo``: the whole stack on loopback, three live demo channels, a status line as people watch.

Ctrl-C (or SIGTERM) stops everything it started, leaving nothing running.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

import redis

from demo.stack import LocalStack
from streamstate import keys

DEMO_CHANNELS = {1: ("demo1", "copy"), 2: ("demo2", "low"), 3: ("demo3", "copy")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8080, help="nginx port (8080 if free, else any)")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long (0: until Ctrl-C)")
    args = parser.parse_args()

    stop = threading.Event()
    # Ctrl-C, a kill, or the terminal closing (SIGHUP): everything started is stopped.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())

    work = tempfile.mkdtemp(prefix="streamkeeper-demo-")
    # The product's promise, visible: a channel nobody watches stops 60 s after its last
    # request (the reaper looks every 10 s).
    stack = LocalStack(work, {"hls_time": 2, "hls_init_time": 1, "idle_timeout": 60, "reaper_interval": 10,
                              "viewer_window": 15}, heartbeatd=True, reaper=True, nginx_port=args.port)
    print(f"starting redis-server, the live upstream, stream-egress, stream-launcher, nginx, heartbeatd "
          f"and stream-reaper in {work} ...")
    try:
        stack.start()
        client = redis.Redis(port=stack.redis_port, decode_responses=True)
        for channel_id, (name, quality) in DEMO_CHANNELS.items():
            client.set(keys.channel_key(channel_id),
                       json.dumps({"source_url": stack.upstream_url(name), "quality": quality,
                                   "name": f"Demo {channel_id} ({quality})"}))
        print("\nstreamkeeper demo is up. Open a channel in VLC, ffplay or a web player (hls.js;\n"
              "every answer carries CORS headers), e.g. `vlc URL` or `ffplay URL`:\n")
        for channel_id in DEMO_CHANNELS:
            print(f"    {stack.playlist_url(channel_id, '?token=demo')}")
        print(f"\nlauncher: {stack.launcher_url('/streams')}    settings: {stack.config_path}")
        streamctl = os.path.join(os.path.dirname(sys.executable), "streamctl")
        print(f"point streamctl at this demo:  {streamctl} --config {stack.config_path} status")
        control = f"http://127.0.0.1:{stack.upstream_port}/control"
        print(f"practise an upstream's faults while you watch (the player should play on):\n"
              f"    curl -X POST {control}/drop              every upstream connection closes\n"
              f"    curl -X POST '{control}/stall?seconds=8' the upstream goes silent\n"
              f"    curl -X POST '{control}/restart?drop=1'  the upstream restarts, timestamps from zero\n"
              f"    curl -X POST '{control}/fail?name=demo1.ts' / heal?name=demo1.ts  a source gone\n")
        print("the first request starts the channel; the status below follows the viewers. Ctrl-C stops.\n")
        deadline = time.monotonic() + args.seconds if args.seconds else None
        while not stop.wait(2.0):
            print(status_line(stack), flush=True)
            if deadline and time.monotonic() > deadline:
                break
            for name, process in stack.processes.items():
                if process.poll() is not None:
                    print(f"{name} exited ({process.returncode}); stopping. Its log: {work}/{name}.log")
                    stop.set()
    finally:
        print("\nstopping everything ...", flush=True)
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("stopped; nothing left running.")
    return 0


def status_line(stack: LocalStack) -> str:
    status, body = stack.launcher_json("/streams")
    if status != 200:
        return time.strftime("%H:%M:%S") + f" launcher answered {status}"
    parts = []
    for entry in body["streams"]:
        idle = entry["idle_seconds"]
        parts.append(f"ch {entry['id']}: {entry['state']}, {entry['viewers']} viewer(s), "
                     f"idle {idle:.0f} s" if idle is not None else f"ch {entry['id']}: {entry['state']}")
    return time.strftime("%H:%M:%S ") + ("; ".join(parts) if parts else "no stream running (open a URL above)")


if __name__ == "__main__":
    sys.exit(main())
