"""``streamctl doctor``: checks of this host, each one line: ok, warn or FAIL, the problem and
the fix.  It finds by itself every failure the old host was diagnosed with by hand: the
wrong port in nginx's fallback, a start endpoint that did not exist, ``access_log off``
where streams are served, no scheduler for the cleanup, last_access never bumped, stale
Redis keys, an empty playlist served, an upstream refusing direct connections, a SOCKS
proxy FFmpeg ignored.  Every check has a deadline: doctor never hangs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import click
import redis

from streamstate import egress, files, hls, keys, providers, runs
from streamstate.channel_check import validate
from streamstate.channels import ChannelError, get_channel
from streamstate.cli_options import settings_options
from streamstate.process import process_cmdline, resolve_executable
from streamstate.redact import redact_url
from streamstate.redis_client import redis_from_url
from streamstate.runs import RunState
from streamstate.upstreams import proxy_endpoint, socks_connection

from . import nginx_conf

OK, WARN, FAIL = "ok", "warn", "FAIL"
TIMEOUT = 3.0  # seconds any one probe may take
PROBE_DEADLINE = 8.0  # seconds a source probe may take in all
REDIS_SLOW_MS = 50  # a PING slower than this is worth a warning
NEEDED_PROTOCOLS = ("http", "https", "tcp", "tls", "crypto", "httpproxy")


@dataclasses.dataclass
class Check:
    status: str
    check: str
    detail: str


# -- Redis -------------------------------------------------------------------------------


def check_redis(settings) -> list[Check]:
    """Reachable and fast, within seconds; persisting the catalogue (AOF or snapshots)."""
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=TIMEOUT, socket_timeout=TIMEOUT)
    where = redact_url(settings.redis_url)
    started = time.monotonic()
    try:
        client.ping()
    except redis.RedisError as exc:
        return [Check(FAIL, "redis", f"{where} does not answer ({exc}); start redis-server or fix redis_url")]
    took = (time.monotonic() - started) * 1000
    found = [Check(OK if took < REDIS_SLOW_MS else WARN, "redis", f"{where} answers in {took:.1f} ms")]
    try:
        appendonly = client.config_get("appendonly").get("appendonly")
        save = client.config_get("save").get("save")
    except redis.RedisError as exc:  # CONFIG renamed or refused: cannot tell
        return found + [
            Check(
                WARN,
                "redis persistence",
                f"cannot read Redis's config ({exc}); make sure "
                "appendonly is yes: the channel catalogue lives only in Redis",
            )
        ]
    if appendonly == "yes":
        found.append(Check(OK, "redis persistence", "appendonly yes (AOF)"))
    elif save:
        found.append(
            Check(
                WARN,
                "redis persistence",
                f"snapshots only (save {save!r}): channels added "
                "since the last snapshot are lost with a restart; set appendonly yes",
            )
        )
    else:
        found.append(
            Check(
                FAIL,
                "redis persistence",
                "no AOF and no snapshots: a Redis restart loses "
                "every channel record (running streams survive it); set appendonly yes",
            )
        )
    return found


# -- nginx -------------------------------------------------------------------------------


def check_nginx(settings, conf_file: str | None) -> list[Check]:
    """The /live/ location logs to the file heartbeatd follows, in a format it parses; a
    missing playlist falls back to the address the launcher listens on."""
    from streamstate.logformat import LogFormatError, LogLineParser, normalise_format

    try:
        text, source = nginx_conf.effective_config(conf_file)
        root = nginx_conf.parse(text)
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return [Check(FAIL, "nginx config", f"cannot read it ({exc}); give --nginx-conf FILE")]
    live = nginx_conf.live_locations(root)
    if not live:
        return [
            Check(
                FAIL,
                "nginx config",
                f"no location serves /live/ in {source}: include the snippet " "`streamctl nginx-config` renders",
            )
        ]
    found = []
    formats = nginx_conf.log_formats(root)
    expected = LogLineParser(settings.log_format).format
    logs = list({tuple(d.args): d for location in live for d in location.inherited("access_log")}.values())
    if not logs or any(d.args and d.args[0] == "off" for d in logs):
        found.append(
            Check(
                FAIL,
                "nginx access log",
                "access_log off (or none) where /live/ is served: "
                "heartbeatd sees no viewer and the reaper stops watched streams; render the "
                "snippet again (`streamctl nginx-config`)",
            )
        )
    else:
        for directive in logs:
            path, name = directive.args[0], (directive.args[1] if len(directive.args) > 1 else "combined")
            if path != settings.access_log:
                found.append(
                    Check(
                        FAIL,
                        "nginx access log",
                        f"/live/ logs to {path}, heartbeatd follows "
                        f"{settings.access_log}: set access_log (the setting) or the snippet to one file",
                    )
                )
                continue
            fmt = formats.get(name)
            try:
                parses = fmt is not None and normalise_format(fmt) == expected and LogLineParser(fmt)
            except LogFormatError:
                parses = False
            if not parses:
                found.append(
                    Check(
                        FAIL,
                        "nginx access log",
                        f"/live/ logs in format {name!r}, not the one "
                        f"heartbeatd parses (log_format setting {settings.log_format!r}): render "
                        "the snippet again",
                    )
                )
            else:
                found.append(
                    Check(
                        OK, "nginx access log", f"/live/ logs to {path} in format {name!r}, " "which heartbeatd parses"
                    )
                )
    for port, names in nginx_conf.default_servers_in_front(root):
        found.append(
            Check(
                FAIL,
                "nginx server",
                f"the server {names!r} is default_server on port {port}: it "
                "answers /live/ instead of ours (Debian's sites-enabled/default); remove it, or "
                "give nginx_listen another port",
            )
        )
    targets = nginx_conf.fallback_targets(root)
    listen = settings.launcher_listen
    if not targets:
        found.append(
            Check(
                FAIL,
                "nginx fallback",
                "no fallback for a missing playlist (error_page 404 = "
                "@start_stream): a cold channel is a 404; render the snippet again",
            )
        )
    for name, address in targets:
        if _same_address(address, listen):
            found.append(Check(OK, "nginx fallback", f"{name} proxies to {address}, where the launcher listens"))
        else:
            found.append(
                Check(
                    FAIL,
                    "nginx fallback",
                    f"{name} proxies to {address} but the launcher listens "
                    f"on {listen} (launcher_listen): render the snippet again and reload nginx",
                )
            )
    return found


def check_nginx_answers(settings) -> list[Check]:
    """Something answers HTTP on nginx_listen (from this host): where viewers come in."""
    address = _local_address(settings.nginx_listen)
    if address is None:
        return [
            Check(
                WARN,
                "nginx answers",
                f"cannot check nginx_listen {settings.nginx_listen!r} from here " "(a unix socket?)",
            )
        ]
    try:
        status, _ = _get(f"http://{address}/live/")
    except (OSError, TimeoutError) as exc:
        return [
            Check(
                FAIL,
                "nginx answers",
                f"nothing answers on {address} (nginx_listen {settings.nginx_listen}: "
                f"{exc}): viewers reach nothing; start nginx (systemctl start nginx) or fix nginx_listen",
            )
        ]
    return [Check(OK, "nginx answers", f"answers on {address} (HTTP {status} for /live/)")]


def _local_address(listen: str) -> str | None:
    """host:port to reach nginx's listen (80, 127.0.0.1:8080, [::]:80, *:80) from this host."""
    first = listen.split()[0] if listen.split() else ""
    if first.isdigit():
        return f"127.0.0.1:{first}"
    host, sep, port = first.rpartition(":")
    if not sep or not port.isdigit() or first.startswith("unix:"):
        return None
    host = {"*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
    return f"{host}:{port}"


def _same_address(a: str, b: str) -> bool:
    def split(text):
        host, _, port = text.rpartition(":")
        host = host.strip("[]")
        return ("127.0.0.1" if host == "localhost" else host), port or "80"

    return split(a) == split(b)


# -- the services ------------------------------------------------------------------------


def check_launcher(settings) -> list[Check]:
    """It answers on launcher_listen, and its start route exists there."""
    base = f"http://{settings.launcher_listen}"
    try:
        status, body = _get(f"{base}/healthz")
    except TimeoutError:
        status, body = 0, ""
        found = [
            Check(
                FAIL,
                "launcher",
                f"no answer from {settings.launcher_listen} within {TIMEOUT:g} s "
                "(its /healthz asks Redis: is Redis hanging?)",
            )
        ]
    except OSError as exc:
        found = [
            Check(
                FAIL,
                "launcher",
                f"nothing answers on {settings.launcher_listen} ({exc}): start "
                "it (systemctl start streamkeeper-launcher)",
            )
        ]
    else:
        found = []
    if found:
        return found + check_relay(settings)
    found = [
        Check(
            OK if status == 200 else FAIL,
            "launcher",
            f"answers on {settings.launcher_listen}"
            + ("" if status == 200 else f" but is unhealthy: {_health_reason(body)}"),
        )
    ]
    try:
        status, body = _get(f"{base}/channel/x/start")  # an invalid id: 400 from the route itself
    except OSError as exc:
        status, body = 0, str(exc)
    if status == 400 and "invalid channel id" in body:
        found.append(Check(OK, "launcher start route", f"{base}/channel/<id>/start exists"))
    else:
        found.append(
            Check(
                FAIL,
                "launcher start route",
                f"{base}/channel/<id>/start answered {status}: " "whatever listens there is not this launcher",
            )
        )
    return found + check_relay(settings)


def check_relay(settings) -> list[Check]:
    counts = egress.open_connections(settings.egress_listen, timeout=TIMEOUT)
    if counts is None:
        return [
            Check(
                FAIL,
                "egress relay",
                f"nothing answers on {settings.egress_listen}: every start "
                "fails with 'egress relay unavailable'; start it (systemctl start streamkeeper-egress)",
            )
        ]
    return [
        Check(
            OK,
            "egress relay",
            f"answers on {settings.egress_listen} " f"({sum(counts.values())} upstream connection(s) open)",
        )
    ]


def check_validator(settings) -> list[Check]:
    """auth_url answers (a validator that is down makes every playlist request a 500)."""
    if not settings.auth_url:
        return []
    try:
        status, _ = _get(settings.auth_url)
    except OSError as exc:
        return [
            Check(
                FAIL,
                "viewer validator",
                f"{redact_url(settings.auth_url)} does not answer ({exc}): "
                "every playlist request gets 500 from nginx; start it or unset auth_url",
            )
        ]
    return [
        Check(
            OK if status < 500 else FAIL,
            "viewer validator",
            f"{redact_url(settings.auth_url)} answers {status} to a request without a token",
        )
    ]


def _health_reason(body: str) -> str:
    try:
        data = json.loads(body)
        return f"Redis: {data.get('redis')}" if isinstance(data, dict) and data.get("redis") else body[:120]
    except ValueError:
        return " ".join(body.split())[:120]


def check_heartbeatd(settings) -> list[Check]:
    """Running (a process of that name), and how far behind the access log it is."""
    from streamstate.checkpoint import checkpoint_path, load_checkpoint

    running = [
        pid
        for pid, argv in _processes()
        if any(os.path.basename(a) == "heartbeatd" for a in argv[:3]) and _same_config(argv, settings.config_path)
    ]
    if not running:
        return [
            Check(
                FAIL,
                "heartbeatd",
                "not running: last_access is never bumped and the reaper stops "
                "watched streams; start it (systemctl start streamkeeper-heartbeatd)",
            )
        ]
    position = load_checkpoint(checkpoint_path(settings.state_dir, settings.access_log), settings.access_log)
    try:
        size = os.stat(settings.access_log).st_size
    except OSError:
        size = None
    if position is None or size is None:
        return [Check(OK, "heartbeatd", f"running (pid {running[0]}); no checkpoint yet")]
    lag = max(0, size - position.offset)
    return [
        Check(
            OK if lag < 1 << 20 else WARN,
            "heartbeatd",
            f"running (pid {running[0]}), {lag} bytes of {settings.access_log} behind",
        )
    ]


def check_reaper(client, settings) -> list[Check]:
    """It passed within 2 x reaper_interval (the cleanup has a scheduler)."""
    data = runs.reaper_last_pass(client, settings.host_id)
    last = runs.epoch_seconds(data.get("time"))
    interval = settings.reaper_interval
    if last is None:
        return [
            Check(
                FAIL,
                "reaper",
                f"no pass recorded for host {settings.host_id}: idle streams are never "
                "stopped; start stream-reaper (systemctl start streamkeeper-reaper)",
            )
        ]
    age = time.time() - last
    if age > 2 * interval:
        return [
            Check(
                FAIL,
                "reaper",
                f"last pass {age:.0f} s ago (reaper_interval {interval:g} s): start it "
                "(systemctl start streamkeeper-reaper)",
            )
        ]
    return [Check(OK, "reaper", f"last pass {age:.0f} s ago")]


# -- streams -------------------------------------------------------------------------------


def _streams_not_playing(client, settings) -> list[Check]:
    """This host's streams that are waiting to start their next FFmpeg (back-off), and
    channels that failed here and answer 503 for failed_cooldown: each with its last error."""
    found = []
    active = runs.active_channels(client)
    for channel, (record, *_rest) in zip(active, runs.read_batch(client, active) if active else []):
        if record is None or record.host != settings.host_id:
            continue
        if record.state is RunState.BACKOFF:
            found.append(
                Check(
                    FAIL,
                    f"channel {channel}",
                    f"not playing: waiting to restart FFmpeg (restart "
                    f"{record.restarts}); last error: {record.last_error or 'none recorded'}; "
                    f"`streamctl logs {channel}` shows FFmpeg's own lines",
                )
            )
        elif record.state is RunState.STARTING and record.restarts:
            found.append(
                Check(
                    WARN,
                    f"channel {channel}",
                    f"being replaced (restart {record.restarts}); "
                    f"last error: {record.last_error or 'none recorded'}",
                )
            )
    for failed in runs.failed_channels(client):
        if failed["host"] == settings.host_id:
            found.append(
                Check(
                    FAIL,
                    f"channel {failed['id']}",
                    f"failed: {failed['reason']}; starts answer 503 "
                    f"for {failed['cooldown_seconds']:g} s more (failed_cooldown); "
                    f"`streamctl logs {failed['id']}` shows why",
                )
            )
    return found


def _records_without_channels(client, settings) -> list[Check]:
    """This host's running streams whose channel record is gone (a Redis that lost its data
    keeps the streams, not the catalogue): they play on, but are never restarted."""
    active = runs.active_channels(client)
    if not active:
        return []
    present = client.mget([keys.channel_key(c) for c in active])
    found = []
    for channel, (record, *_rest), raw in zip(active, runs.read_batch(client, active), present):
        if raw is None and record is not None and record.host in ("", settings.host_id):
            found.append(
                Check(
                    WARN,
                    f"channel {channel}",
                    f"runs, but its channel record (channel:{channel}) "
                    "is gone (a Redis restarted without its data?): it will not be restarted if "
                    "its FFmpeg ends; add it again (`streamctl channels add` or `import`)",
                )
            )
    return found


def check_streams(client, settings) -> list[Check]:
    """Every stale record, as the reaper's next pass would judge it (its run record, or the
    old host's keys alone: stream:<id>:pid, :started, :last_access), junk in streams:active,
    provider slots no running stream holds, FFmpegs no record knows; empty or stale
    playlists in hls_dir; free space."""
    from streamstate.reaping import ActionKind, Reaper, RedisUnavailable

    found = []
    try:
        summary = Reaper(settings, client, dry_run=True).run_pass()
    except RedisUnavailable as exc:
        return [Check(FAIL, "streams", str(exc))]
    channels = summary.streams
    for action in summary.actions:
        if action.kind is ActionKind.STALE and action.host is None:  # another host's: its own doctor
            kind = "its run record" if action.run_id else "the old host's keys (no run record)"
            found.append(
                Check(
                    FAIL,
                    f"channel {action.channel}",
                    f"stale record ({kind}): {action.why}; `streamctl reap` clears it "
                    "(the reaper does at its next pass)",
                )
            )
    for member in runs.read_active(client).invalid:
        found.append(
            Check(
                FAIL,
                "streams:active",
                f"holds {runs.shown_member(member)}, no channel id: " "`streamctl reap` removes it",
            )
        )
    if summary.orphan_processes:
        found.append(
            Check(
                FAIL,
                "streams",
                f"{summary.orphan_processes} FFmpeg(s) writing into "
                f"{settings.hls_dir} that no record knows: `streamctl reap` stops them",
            )
        )
    found += _streams_not_playing(client, settings) + _records_without_channels(client, settings)
    grace = settings.start_timeout + 10
    for name in sorted(settings.providers):
        stale = providers.stale_slots(client, name, grace)
        if stale:
            shown = ", ".join(runs.shown_member(c) if not keys.CHANNEL_ID_RE.fullmatch(c) else c for c in stale)
            found.append(
                Check(
                    WARN,
                    f"provider {name}",
                    f"slot(s) held by no running stream: {shown}; " "the next start on the account reclaims them",
                )
            )
    stale_after = hls.freeze_limit(settings.hls_time, settings.start_timeout)
    now = time.time()
    try:
        names = sorted(os.listdir(settings.hls_dir))
    except OSError as exc:
        return found + [Check(FAIL, "hls_dir", f"{settings.hls_dir}: {exc}")]
    for name in names:
        match = re.fullmatch(r"stream_(%s)\.m3u8" % keys.CHANNEL_ID_PATTERN, name)
        if not match:
            continue
        path = os.path.join(settings.hls_dir, name)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read below
            found.append(Check(FAIL, f"channel {match.group(1)}", f"{name} is not a regular file; remove it"))
            continue
        age = now - info.st_mtime
        media = files.playlist_media(path)
        channel = match.group(1)
        fix = (
            f"`streamctl stop {channel}` if it runs, else delete {path} (the reaper does after "
            f"orphan_age, {settings.orphan_age:g} s)"
        )
        if media is not None and not media[1]:
            found.append(
                Check(FAIL, f"channel {channel}", f"{name} lists no segment: nginx serves an empty " f"playlist; {fix}")
            )
        elif age > stale_after:
            found.append(
                Check(
                    FAIL,
                    f"channel {channel}",
                    f"{name} not updated for {age:.0f} s: players see "
                    f"a frozen stream; the launcher publishes it: if the launcher is down (its "
                    f"check above), start it; else {fix}",
                )
            )
    if not [c for c in found if c.check.startswith(("channel ", "streams"))]:
        found.append(Check(OK, "streams", f"{channels} record(s), none stale; no empty or stale playlist"))
    return found


def check_space(settings) -> list[Check]:
    found = []
    free = files.free_mb(settings.hls_dir)
    if free is not None:
        minimum = settings.min_free_mb
        found.append(
            Check(
                OK if free >= minimum else FAIL,
                "hls_dir space",
                f"{free} MB free in {settings.hls_dir}"
                + ("" if free >= minimum else f", under min_free_mb {minimum}: starts are refused"),
            )
        )
    return found


def check_ffmpeg(settings) -> list[Check]:
    binary = resolve_executable(settings.ffmpeg)
    if binary is None:
        return [Check(FAIL, "ffmpeg", f"{settings.ffmpeg} not found: apt-get install ffmpeg, or set ffmpeg")]
    try:
        version = subprocess.run([binary, "-version"], capture_output=True, text=True, timeout=10).stdout
        protocols = subprocess.run(
            [binary, "-hide_banner", "-protocols"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [Check(FAIL, "ffmpeg", f"{binary} does not run: {exc}")]
    inputs = protocols.split("Output:")[0].split()
    missing = [p for p in NEEDED_PROTOCOLS if p not in inputs]
    first = version.splitlines()[0] if version else binary
    if missing:
        return [
            Check(
                FAIL, "ffmpeg", f"{first}: lacks the protocols {', '.join(missing)} (https and HLS sources need them)"
            )
        ]
    return [Check(OK, "ffmpeg", f"{first}; protocols {', '.join(NEEDED_PROTOCOLS)}")]


def check_proxies(settings) -> list[Check]:
    """upstream_proxy and each provider's proxy accept connections (socks: a handshake)."""
    found = []
    proxies = [("upstream_proxy", settings.upstream_proxy)] + [
        (f"provider {name} proxy", provider.proxy) for name, provider in settings.providers.items()
    ]
    for label, proxy in proxies:
        if not proxy:
            continue
        problem = _proxy_problem(proxy)
        found.append(
            Check(FAIL, label, f"{redact_url(proxy)}: {problem}; its channels answer 503 'upstream " "proxy unusable'")
            if problem
            else Check(OK, label, f"{redact_url(proxy)} usable")
        )
    return found


def _proxy_problem(proxy: str) -> str | None:
    parts = urlsplit(proxy)
    try:
        sock = socket.create_connection(proxy_endpoint(proxy), timeout=TIMEOUT)
    except OSError as exc:
        return f"does not accept connections ({exc})"
    with sock:
        if not parts.scheme.startswith("socks"):
            return None
        method = b"\x02" if parts.username else b"\x00"
        try:
            sock.sendall(b"\x05\x01" + method)
            answer = sock.recv(2)
        except OSError as exc:
            return f"no SOCKS5 answer ({exc})"
        if answer != b"\x05" + method:
            return "refuses our SOCKS5 login method" if answer[:1] == b"\x05" else "is not a SOCKS5 proxy"
        if parts.username:
            from urllib.parse import unquote

            user, password = unquote(parts.username).encode(), unquote(parts.password or "").encode()
            try:
                sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
                if sock.recv(2) != b"\x01\x00":
                    return "rejects the username or password"
            except OSError as exc:
                return f"no answer to the login ({exc})"
    return None


def check_channel(client, settings, channel_id: str) -> list[Check]:
    """The record is valid; its source answers with the channel's headers, directly and
    through its proxy (e.g. '403 without proxy, 200 through it')."""
    label = f"channel {channel_id}"
    try:
        channel = get_channel(client, keys.check_channel_id(channel_id))
        if channel is None:
            return [Check(FAIL, label, "no such channel (streamctl channels add)")]
        upstream = validate(channel, settings)
    except (ChannelError, keys.InvalidChannelId) as exc:
        return [Check(FAIL, label, f"record unusable: {exc}")]
    found = [
        Check(
            OK,
            label,
            f"record valid (source {redact_url(channel.source_url)}"
            + (f", provider {upstream.provider.name}" if upstream.provider else "")
            + (f", resolver {upstream.resolver}" if upstream.resolver != "none" else "")
            + ")",
        )
    ]
    headers = {"User-Agent": upstream.user_agent, **upstream.headers}
    if upstream.referer:
        headers["Referer"] = upstream.referer
    for index, source in enumerate(channel.sources):
        which = "source" if index == 0 else f"fallback {index}"
        direct = _probe_within(source, headers, None, settings)
        via = _probe_within(source, headers, upstream.proxy, settings) if upstream.proxy else None
        answer = f"{direct} without proxy" + (f", {via} through {redact_url(upstream.proxy or '')}" if via else "")
        good = (via or direct).startswith("2")
        found.append(Check(OK if good else FAIL, f"{label} {which}", f"{redact_url(source)}: {answer}"))
    return found


def _probe_within(url: str, headers: dict, proxy: str | None, settings) -> str:
    """_probe with one deadline for all of it (DNS, connect, a server that trickles its
    headers), and never to an address the relay would refuse."""
    if proxy is None:
        refusal = _refused_address(url, settings)
        if refusal:
            return f"not asked ({refusal})"
    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(_probe(url, headers, proxy)), daemon=True)
    worker.start()
    worker.join(PROBE_DEADLINE)
    return result[0] if result else f"no answer within {PROBE_DEADLINE:g} s"


def _refused_address(url: str, settings) -> str | None:
    from streamstate.upstreams import AddressPolicy, literal_address

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    try:
        addresses = (
            [literal_address(host)]
            if literal_address(host)
            else sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
        )
    except OSError as exc:
        return f"{host} does not resolve: {exc}"
    policy = AddressPolicy.from_settings(settings)
    return next((reason for address in addresses if address and (reason := policy.refusal(address, port))), None)


def _probe(url: str, headers: dict, proxy: str | None) -> str:
    """The HTTP status the source answers (headers only, then closed), or why none."""
    handlers = []
    if proxy and proxy.startswith("http://"):
        handlers.append(urllib.request.ProxyHandler({"http": proxy, "https": proxy}))
    elif not proxy:
        handlers.append(urllib.request.ProxyHandler({}))
    else:
        return _probe_socks(url, headers, proxy)
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT) as response:
            return str(response.status)
    except urllib.error.HTTPError as exc:
        return str(exc.code)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"no answer ({getattr(exc, 'reason', exc)})"


def _probe_socks(url: str, headers: dict, proxy: str) -> str:
    import http.client
    import ssl

    import socks

    parts, target = urlsplit(proxy), urlsplit(url)
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        host = target.hostname or ""
        sock = socks_connection(proxy, host, port, TIMEOUT)
        if target.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        connection = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        connection.sock = sock
        connection.request("GET", (target.path or "/") + (f"?{target.query}" if target.query else ""), headers=headers)
        status = connection.getresponse().status
        connection.close()
        return str(status)
    except (OSError, socks.ProxyError, http.client.HTTPException) as exc:
        return f"no answer ({str(exc).replace(parts.password or chr(0), '***')[:120]})"


# -- helpers --------------------------------------------------------------------------------


def _get(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(
            urllib.request.Request(url, headers={"Accept": "application/json"}), timeout=TIMEOUT
        ) as response:
            return response.status, response.read(4096).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(4096).decode("utf-8", "replace")
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise TimeoutError(str(exc.reason)) from None
        raise OSError(str(exc.reason)) from None


def _same_config(argv: list[str], config_path: str | None) -> bool:
    """A process started with another --config is another stack's (one started without
    one may be ours: the environment names its file)."""
    if "--config" not in argv or not config_path:
        return True
    index = argv.index("--config")
    return index + 1 < len(argv) and os.path.realpath(argv[index + 1]) == os.path.realpath(config_path)


def _processes() -> list[tuple[int, list[str]]]:
    found = []
    for entry in os.listdir("/proc"):
        argv = process_cmdline(int(entry)) if entry.isdigit() else []
        if argv:
            # python -m heartbeatd: the module name is what counts
            found.append((int(entry), [os.path.basename(argv[0])] + argv[1:] if "-m" not in argv[:2] else argv[2:]))
    return found


@click.command("doctor")
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Print the checks as a JSON list.")
@click.option(
    "--channel",
    "channel_id",
    metavar="ID",
    help="Also check this channel: its record, and what its source answers (directly and through its proxy).",
)
@click.option(
    "--nginx-conf",
    "nginx_conf_file",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Read nginx's configuration from FILE instead of `nginx -T`.",
)
def doctor_command(settings_loader, as_json, channel_id, nginx_conf_file):
    """Check this host's streamkeeper set-up; one line per check: ok, warn or FAIL, the
    problem and the fix.

    Redis (answers, fast, persists); nginx (answers on nginx_listen, the fallback reaches
    the launcher, /live/ logs where and how heartbeatd reads); the launcher and its start
    route; the egress relay; heartbeatd (running, its lag); the reaper's last pass; this
    host's streams waiting to restart or failed (with the last error); stale records, empty
    or stale playlists; FFmpeg and its protocols; every proxy; free space. --channel ID adds
    the channel's record and its source's answer.
    Exit codes: 0 no check failed, 1 a check failed, 2 bad settings.
    """
    settings = settings_loader()
    checks = check_redis(settings)
    redis_up = checks[0].status != FAIL
    client = redis_from_url(settings.redis_url)
    checks += (
        check_nginx(settings, nginx_conf_file)
        + check_nginx_answers(settings)
        + check_launcher(settings)
        + check_validator(settings)
        + check_heartbeatd(settings)
    )
    if redis_up:
        checks += check_reaper(client, settings) + check_streams(client, settings)
    checks += check_space(settings) + check_ffmpeg(settings) + check_proxies(settings)
    if channel_id is not None and redis_up:
        checks += check_channel(client, settings, channel_id)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(c) for c in checks], indent=2))
    else:
        for c in checks:
            click.echo(f"{c.status:<4}  {c.check}: {c.detail}")
    raise SystemExit(1 if any(c.status == FAIL for c in checks) else 0)
