"""doctor's checks of what this host stands on: Redis, nginx, free space, FFmpeg, the proxies
(streamkeeper's own services: streamctl.checks_services)."""

from __future__ import annotations

import socket
import subprocess
import time
from urllib.parse import unquote, urlsplit

import redis

from streamstate import files, lease
from streamstate.logformat import LogFormatError, LogLineParser, normalise_format
from streamstate.process import resolve_executable
from streamstate.redact import redact_url
from streamstate.redis_client import redis_error_text, redis_for, redis_where
from streamstate.setting_values import split_host_port
from streamstate.upstreams import proxy_endpoint

from . import nginx_conf
from .checks_common import (
    FAIL,
    NEEDED_PROTOCOLS,
    OK,
    REDIS_SLOW_MS,
    TIMEOUT,
    WARN,
    Check,
    http_get,
)


def check_redis(settings) -> list[Check]:
    """Reachable and fast, within seconds; persisting the catalogue (AOF or snapshots)."""
    client = redis_for(settings)
    where = redis_where(settings)
    started = time.monotonic()
    try:
        client.ping()
    except redis.RedisError as exc:
        fix = (
            "check redis_sentinels and redis_master_name"
            if settings.redis_sentinels
            else "start redis-server or fix redis_url"
        )
        return [Check(FAIL, "redis", f"{where} does not answer ({redis_error_text(exc, settings)}); {fix}")]
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


# Seconds a Sentinel election takes on top of down-after (measured: about 1.5 s on loopback,
# bench/scale.py); a failover shorter than the fence leaves the hosts unfenced.
ELECTION_MARGIN = 2.0


def check_sentinels(settings) -> list[Check]:
    """Through Sentinel: the sentinels answer and know the master, it has a replica to fail
    over to, and a failover (down-after + the election) ends before the hosts' fence
    (host_timeout/2): else every host would end its streams at every failover."""
    if not settings.redis_sentinels:
        return []
    found = []
    for address in settings.redis_sentinels:
        host, port = split_host_port(address)
        client = redis.Redis(host=host, port=port, socket_connect_timeout=TIMEOUT, socket_timeout=TIMEOUT)
        try:
            answer = client.sentinel_master(settings.redis_master_name)
        except redis.RedisError as exc:
            found.append(
                Check(WARN, f"sentinel {address}", f"does not answer for {settings.redis_master_name!r} ({exc})")
            )
            continue
        finally:
            client.close()
        master = answer if isinstance(answer, dict) else {}
        down_after = float(master.get("down-after-milliseconds", 0)) / 1000
        replicas = int(master.get("num-slaves", 0))
        found.append(Check(OK, f"sentinel {address}", f"master {settings.redis_master_name!r}, {replicas} replica(s)"))
        if replicas == 0:
            found.append(Check(WARN, "redis replica", "the master has no replica: a failover has nothing to promote"))
        if settings.hosts and down_after + ELECTION_MARGIN >= lease.fence_after(settings.host_timeout):
            found.append(
                Check(
                    FAIL,
                    "failover vs fence",
                    f"a failover takes at least down-after-milliseconds ({down_after:g} s) + the election "
                    f"(~{ELECTION_MARGIN:g} s), not less than host_timeout/2 ({lease.fence_after(settings.host_timeout):g} s): "
                    "every host would fence itself (end its streams) at every failover; lower the sentinels' "
                    "down-after-milliseconds or raise host_timeout",
                )
            )
        break  # one sentinel that answers speaks for them
    return found


# -- nginx -------------------------------------------------------------------------------


def check_nginx(settings, conf_file: str | None) -> list[Check]:
    """The /live/ location logs to the file heartbeatd follows, in a format it parses; no
    default_server answers in front of ours; a missing playlist falls back to the address
    the launcher listens on."""
    try:
        text, source = nginx_conf.effective_config(conf_file)
        root = nginx_conf.parse(text)
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return [Check(FAIL, "nginx config", f"cannot read it ({exc}); give --nginx-conf FILE")]
    live = nginx_conf.live_locations(root)
    if not live:
        why = f"no location serves /live/ in {source}: include the snippet `streamctl nginx-config` renders"
        return [Check(FAIL, "nginx config", why)]
    return _access_log_checks(settings, root, live) + _default_server_checks(root) + _fallback_checks(settings, root)


def _access_log_checks(settings, root, live) -> list[Check]:
    logs = list({tuple(d.args): d for location in live for d in location.inherited("access_log")}.values())
    if not logs or any(d.args and d.args[0] == "off" for d in logs):
        why = (
            "access_log off (or none) where /live/ is served: heartbeatd sees no viewer and the reaper stops "
            "watched streams; render the snippet again (`streamctl nginx-config`)"
        )
        return [Check(FAIL, "nginx access log", why)]
    formats = nginx_conf.log_formats(root)
    expected = LogLineParser(settings.log_format).format
    found = []
    for directive in logs:
        path, name = directive.args[0], (directive.args[1] if len(directive.args) > 1 else "combined")
        if path != settings.access_log:
            why = (
                f"/live/ logs to {path}, heartbeatd follows {settings.access_log}: set access_log (the setting) "
                "or the snippet to one file"
            )
            found.append(Check(FAIL, "nginx access log", why))
            continue
        fmt = formats.get(name)
        try:
            parses = fmt is not None and normalise_format(fmt) == expected and LogLineParser(fmt)
        except LogFormatError:
            parses = False
        if parses:
            found.append(
                Check(OK, "nginx access log", f"/live/ logs to {path} in format {name!r}, which heartbeatd parses")
            )
        else:
            why = (
                f"/live/ logs in format {name!r}, not the one heartbeatd parses (log_format setting "
                f"{settings.log_format!r}): render the snippet again"
            )
            found.append(Check(FAIL, "nginx access log", why))
    return found


def _default_server_checks(root) -> list[Check]:
    """Debian's sites-enabled/default, say: a default_server on our port answers /live/."""
    return [
        Check(
            FAIL,
            "nginx server",
            f"the server {names!r} is default_server on port {port}: it answers /live/ instead of ours (Debian's "
            "sites-enabled/default); remove it, or give nginx_listen another port",
        )
        for port, names in nginx_conf.default_servers_in_front(root)
    ]


def _fallback_checks(settings, root) -> list[Check]:
    targets = nginx_conf.fallback_targets(root)
    listen = settings.launcher_listen
    if not targets:
        why = (
            "no fallback for a missing playlist (error_page 404 = @start_stream): a cold channel is a 404; "
            "render the snippet again"
        )
        return [Check(FAIL, "nginx fallback", why)]
    found = []
    for name, address in targets:
        if _same_address(address, listen):
            found.append(Check(OK, "nginx fallback", f"{name} proxies to {address}, where the launcher listens"))
        else:
            why = (
                f"{name} proxies to {address} but the launcher listens on {listen} (launcher_listen): render the "
                "snippet again and reload nginx"
            )
            found.append(Check(FAIL, "nginx fallback", why))
    return found


def check_nginx_answers(settings) -> list[Check]:
    """Something answers HTTP on nginx_listen (from this host): where viewers come in."""
    address = _local_address(settings.nginx_listen)
    if address is None:
        return [
            Check(
                WARN,
                "nginx answers",
                f"cannot check nginx_listen {settings.nginx_listen!r} from here (a unix socket?)",
            )
        ]
    try:
        status, _ = http_get(f"http://{address}/live/")
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
            Check(FAIL, label, f"{redact_url(proxy)}: {problem}; its channels answer 503 'upstream proxy unusable'")
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
            user, password = unquote(parts.username).encode(), unquote(parts.password or "").encode()
            try:
                sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
                if sock.recv(2) != b"\x01\x00":
                    return "rejects the username or password"
            except OSError as exc:
                return f"no answer to the login ({exc})"
    return None
