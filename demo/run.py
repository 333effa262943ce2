"""``make demo``: the whole stack on loopback, three live demo channels: a place to practise.

Every part runs in a session of its own, so Ctrl-C reaches only this program, which stops
every stream, then every part, and says "nothing left running" only once it is true.  Stop
any one part (its pid is printed) and watch `streamctl doctor` name it: the demo starts it
again after --restart-after seconds.  If a part cannot be brought back, the demo stops and
keeps its work directory (the logs) and says where.
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
from streamstate.process import ProcessHandle, StreamProcess, resolve_executable, stop_processes, stream_ffmpegs_under

DEMO_CHANNELS = {1: ("demo1", "copy"), 2: ("demo2", "low"), 3: ("demo3", "copy")}
STATUS_EVERY = 2.0  # seconds between status lines
# Seconds a stopped part stays down: time to run doctor and see it named (the reaper's check
# turns FAIL only after 2 x reaper_interval = 20 s without a pass).
RESTART_AFTER = 30.0
REAPER_INTERVAL = 10.0  # the demo's reaper_interval: an idle channel stops within 10 s of idle_timeout
STATUS_QUIET = 60.0  # an unchanged status line is printed again after this long
RESTART_TRIES = 3  # a part that will not come back after this many tries stops the demo


class Demo:
    def __init__(self, port: int, restart_after: float):
        self.work = tempfile.mkdtemp(prefix="streamkeeper-demo-")
        self.restart_after = restart_after
        # The product's promise, visible: a channel nobody watches stops 60 s after its last
        # request (the reaper looks every 10 s).
        # Faults to practise on cost restarts: the demo allows more of them than a host.
        self.stack = LocalStack(
            self.work,
            {
                "hls_time": 2,
                "hls_init_time": 1,
                "idle_timeout": 60,
                "reaper_interval": REAPER_INTERVAL,
                "viewer_window": 15,
                "max_restarts": 20,
                "restart_window": 120,
            },
            heartbeatd=True,
            reaper=True,
            nginx_port=port,
            own_sessions=True,
            persistent_redis=True,
        )
        self.down_since: dict[str, float] = {}
        self.back_since: dict[str, float] = {}  # brought back; its tries reset once it stays up
        self.tries: dict[str, int] = {}
        self.last_status = ("", 0.0)  # the last status line printed, and when
        self.failed = ""  # why the demo stopped on its own (its logs are kept)
        self.streamctl = os.path.join(os.path.dirname(sys.executable), "streamctl")

    # -- up -------------------------------------------------------------------------------
    def start(self) -> None:
        print(
            f"starting redis-server, the live upstream, stream-egress, stream-launcher, nginx, heartbeatd "
            f"and stream-reaper in {self.work} ...",
            flush=True,
        )
        self.stack.start()
        client = redis.Redis(port=self.stack.redis_port, decode_responses=True)
        for channel_id, (name, quality) in DEMO_CHANNELS.items():
            # Each with a fallback source (the same broadcast under another name), so failing
            # the first (`/control/fail?name=demo1.ts`) shows a failover.
            client.set(
                keys.channel_key(channel_id),
                json.dumps(
                    {
                        "source_url": self.stack.upstream_url(name),
                        "quality": quality,
                        "fallback_urls": [self.stack.upstream_url(f"{name}-fallback")],
                        "name": f"Demo {channel_id} ({quality})",
                    }
                ),
            )
        client.close()
        self.print_guide()

    def print_guide(self) -> None:
        stack, sk = self.stack, f"{self.streamctl} --config {self.stack.config_path}"
        control = f"http://127.0.0.1:{stack.upstream_port}/control"
        print(
            "\nstreamkeeper demo is up. Open a channel in VLC, ffplay or a web player (hls.js; every\n"
            "answer carries CORS headers), e.g. `vlc URL` or `ffplay URL`.\n"
            "(VLC refuses to run as root: run it as your own user.)\n"
        )
        for channel_id in DEMO_CHANNELS:
            print(f"    {stack.playlist_url(channel_id, '?token=demo')}")
        print(f"\nlauncher: {stack.launcher_url('/streams')}    settings: {stack.config_path}")
        print(f"point streamctl at this demo:  {sk} status")
        print(f"check this host:               {sk} doctor --nginx-conf {stack.nginx_conf}")
        print(
            "\nthe parts, each a process of its own: stop one (kill PID) and watch doctor name it;\n"
            f"the demo starts it again {self.restart_after:g} s later:"
        )
        for name in stack.parts():
            print(f"    {name:<11} pid {stack.processes[name].pid:<8} log {self.work}/{name}.log")
        print(
            f"\npractise an upstream's faults while you watch (the player should play on):\n"
            f"    curl -X POST {control}/drop              every upstream connection closes\n"
            f"    curl -X POST '{control}/stall?seconds=8' the upstream goes silent\n"
            f"    curl -X POST '{control}/restart?drop=1'  the upstream restarts, timestamps from zero\n"
            f"    curl -X POST '{control}/fail?name=demo1.ts' / heal?name=demo1.ts  a source gone (the\n"
            f"        channel fails over to its fallback source)\n"
        )
        print("the first request starts the channel; the status below follows the viewers. Ctrl-C stops.\n", flush=True)

    # -- watching ---------------------------------------------------------------------------
    def tend_parts(self) -> None:
        """A part that exited is said once, and started again after restart_after."""
        now = time.monotonic()
        for name in self.stack.parts():
            process = self.stack.processes[name]
            if process.poll() is None:
                # Up for restart_after: it really came back (not a squatter on its port that
                # fooled the readiness check), so its tries start again from zero.
                if name in self.back_since and now - self.back_since[name] >= self.restart_after:
                    del self.back_since[name]
                    self.tries[name] = 0
                continue
            if name not in self.down_since:
                self.down_since[name] = now
                self.back_since.pop(name, None)
                print(
                    f"{time.strftime('%H:%M:%S')} {name} {exit_text(process.returncode)}; `streamctl doctor` "
                    f"names it {self.doctor_sees(name)}; the demo starts it again in "
                    f"{self.restart_after:g} s. Its log: "
                    f"{self.work}/{name}.log",
                    flush=True,
                )
            elif now - self.down_since[name] >= self.restart_after:
                self.bring_back(name)

    @staticmethod
    def doctor_sees(name: str) -> str:
        """When doctor names a part that is gone: at once, but the reaper only once it has missed
        two passes, and the upstream only through its channels."""
        if name == "reaper":
            return f"after {2 * REAPER_INTERVAL:g} s without a pass"
        return "only through its channels (--channel 1)" if name == "upstream" else "now"

    def bring_back(self, name: str) -> None:
        self.tries[name] = self.tries.get(name, 0) + 1
        try:
            process = self.stack.start_part(name)
        except (RuntimeError, OSError) as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if self.tries[name] >= RESTART_TRIES:
                self.failed = f"{name} did not come back after {RESTART_TRIES} tries ({first_line})"
            else:
                print(
                    f"{time.strftime('%H:%M:%S')} {name} did not start ({first_line}); trying again "
                    f"in {self.restart_after:g} s",
                    flush=True,
                )
                self.down_since[name] = time.monotonic()
            return
        del self.down_since[name]
        self.back_since[name] = time.monotonic()
        print(f"{time.strftime('%H:%M:%S')} {name} is back (pid {process.pid})", flush=True)

    def print_status(self) -> None:
        """The status line when it changed, else once every STATUS_QUIET seconds."""
        line, now = self.status_line(), time.monotonic()
        if line != self.last_status[0] or now - self.last_status[1] >= STATUS_QUIET:
            print(time.strftime("%H:%M:%S ") + line, flush=True)
            self.last_status = (line, now)

    def status_line(self) -> str:
        try:
            status, body = self.stack.launcher_json("/streams")
        except OSError:
            return "the launcher does not answer (streams run on; new viewers wait)"
        if status != 200:
            return f"the launcher answered {status}"
        parts = []
        for entry in body["streams"]:
            viewers = f", {entry['viewers']} viewer(s)" if entry["state"] == "running" else ""
            parts.append(f"ch {entry['id']}: {entry['state']}{viewers}")
        return "; ".join(parts) if parts else "no stream running (open a URL above)"

    # -- down -------------------------------------------------------------------------------
    def stop(self) -> bool:
        """Every stream, then every part; True once nothing of the demo runs."""
        self.stop_streams()
        self.stack.stop()
        left = [pid for pid, _ in stream_ffmpegs_under(self.stack.hls_dir, resolve_executable("ffmpeg"))]
        left += [p.pid for p in self.stack.processes.values() if p.poll() is None]
        if left:
            print(f"still running: pid(s) {', '.join(map(str, left))}", flush=True)
        return not left

    def stop_streams(self) -> None:
        """By the launcher if it answers, else directly, as `streamctl stop --all` does."""
        try:
            status, _ = self.stack.launcher_json("/streams/stop", "POST")
            if status == 200:
                return
        except OSError:
            pass
        try:
            from streamstate.reaping import Reaper
            from streamstate.settings import load_settings

            Reaper(load_settings(self.stack.config_path)).stop_host_streams("the demo stops")
        except Exception as exc:  # noqa: BLE001 - Redis down too: stop the FFmpegs by proof below
            print(f"could not stop the streams through Redis ({exc}); stopping their FFmpegs", flush=True)
        ffmpeg = resolve_executable("ffmpeg")
        handles = [
            handle
            for pid, playlist in stream_ffmpegs_under(self.stack.hls_dir, ffmpeg)
            if (handle := ProcessHandle.open_proven(pid, StreamProcess(ffmpeg, (playlist,))))
        ]
        stop_processes(handles, 5.0)
        for handle in handles:
            handle.close()


def exit_text(returncode: int) -> str:
    """'was killed by SIGKILL', 'exited with status 1', 'exited'."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}" if returncode else "exited"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8080, help="nginx port (8080 if free, else any)")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long (0: until Ctrl-C)")
    parser.add_argument(
        "--restart-after",
        type=float,
        default=RESTART_AFTER,
        help="seconds a stopped part stays down before the demo starts it again",
    )
    args = parser.parse_args()

    stop = threading.Event()
    # Ctrl-C, a kill, or the terminal closing (SIGHUP): everything started is stopped.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    demo = Demo(args.port, args.restart_after)
    try:
        demo.start()
        deadline = time.monotonic() + args.seconds if args.seconds else None
        while not stop.wait(STATUS_EVERY) and not demo.failed:
            demo.print_status()
            demo.tend_parts()
            if deadline and time.monotonic() > deadline:
                break
    except RuntimeError as exc:  # a part did not start at all
        demo.failed = str(exc).splitlines()[0]
    finally:
        print("\nstopping every stream, then every part ...", flush=True)
        clean = demo.stop()
    if demo.failed:
        print(f"the demo stopped: {demo.failed}. Its logs stay in {demo.work}")
        return 1
    if not clean:
        print(f"stopped, but something still runs (above); its logs stay in {demo.work}")
        return 1
    shutil.rmtree(demo.work, ignore_errors=True)
    print("stopped; nothing left running.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
