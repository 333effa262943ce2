"""Settings: one TOML file, overridden by STREAMKEEPER_<KEY> and by flags.

Every service and the CLI read the same keys through :func:`load_settings`.
Precedence, lowest first: built-in default, the TOML file, the environment,
command-line flags.  Where each effective value came from is kept, so
``streamctl config`` can show it.

The file is found as: ``--config PATH``, else ``$STREAMKEEPER_CONFIG``, else
``/etc/streamkeeper/streamkeeper.toml`` if it exists, else none.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from typing import Any, Callable, Mapping

from .address_policy import DEFAULT_UPSTREAM_DENY, Network, parse_networks
from .setting_values import (
    DEFAULT_QUALITY_PROFILES,
    DEFAULT_USER_AGENT,
    is_loopback_host,
    parse_abs_path,
    parse_auth_url,
    parse_bool,
    parse_command,
    parse_count,
    parse_header_text,
    parse_host_port,
    parse_host_ports,
    parse_ip_port_or_off,
    parse_ip_ports,
    parse_listen_or_off,
    parse_loopback_host_port,
    parse_nginx_listen,
    parse_nonempty_str,
    parse_number,
    parse_profiles,
    parse_proxy,
    parse_redis_url,
    positive_seconds,
    seconds_or_off,
)
from .upstreams import Provider, parse_providers

DEFAULT_CONFIG_PATH = "/etc/streamkeeper/streamkeeper.toml"
CONFIG_ENV = "STREAMKEEPER_CONFIG"
ENV_PREFIX = "STREAMKEEPER_"


class SettingsError(ValueError):
    """An invalid setting; the message names the key and the problem."""


@dataclasses.dataclass(frozen=True)
class SettingSpec:
    key: str
    default: Callable[[], Any]
    parse: Callable[[Any], Any]
    help: str


def setting(default: Callable[[], Any], parse: Callable[[Any], Any], help: str) -> Any:
    """One setting of the table below: its default (a value as the file would give it),
    its parser (raises ValueError naming the problem) and its line of help."""
    return dataclasses.field(metadata={"spec": (default, parse, help)})


@dataclasses.dataclass(frozen=True)
class Settings:
    """The effective settings: the one table of every key (its type, default, parser and
    help), then where each value came from.  Built by :func:`load_settings` only."""

    redis_url: str = setting(
        lambda: "redis://127.0.0.1:6379/0",
        parse_redis_url,
        "shared state (with redis_sentinels: only its password and database number are used)",
    )
    redis_sentinels: tuple[str, ...] = setting(
        lambda: (),
        parse_host_ports,
        "host:port of each Redis Sentinel; when set, every service and streamctl reach the master "
        "they name instead of redis_url's host",
    )
    redis_master_name: str = setting(
        lambda: "streamkeeper", parse_nonempty_str, "the master's name in the sentinels' configuration"
    )
    hls_dir: str = setting(lambda: "/var/www/hls", parse_abs_path, "where playlists and segments live")
    access_log: str = setting(
        lambda: "/var/log/nginx/streams_access.log", parse_abs_path, "the nginx access log heartbeatd follows"
    )
    log_format: str = setting(
        lambda: "streamkeeper", parse_nonempty_str, "'streamkeeper' (ours) or a full nginx log_format string"
    )
    state_dir: str = setting(lambda: "/var/lib/streamkeeper", parse_abs_path, "checkpoints and other local state")
    log_dir: str = setting(
        lambda: "/var/log/streamkeeper",
        parse_abs_path,
        "FFmpeg's own output, one capped file per channel (streamctl logs ID)",
    )
    idle_timeout: float = setting(
        lambda: 300.0, lambda v: parse_number(v, minimum=1), "seconds without a viewer before a stream is stopped"
    )
    flush_interval: float = setting(lambda: 1.0, positive_seconds, "seconds between heartbeat writes")
    viewer_window: float = setting(
        lambda: 30.0,
        seconds_or_off,
        "seconds a viewer counts as watching after its last request (0: no viewer counting)",
    )
    host_id: str = setting(socket.gethostname, parse_nonempty_str, "which streaming host this is")
    parse_workers: int = setting(
        lambda: 0,
        parse_count,
        "processes that parse a backlog of the access log in parallel (0: one per core, "
        "at most 4; 1: parse in heartbeatd itself)",
    )
    launcher_listen: str = setting(
        lambda: "127.0.0.1:5000", parse_host_port, "host:port the launcher listens on (nginx's fallback calls it)"
    )
    launcher_allow_remote: bool = setting(lambda: False, parse_bool, "allow a non-loopback launcher_listen")
    nginx_listen: str = setting(lambda: "80", parse_nginx_listen, "what the rendered nginx server block listens on")
    ffmpeg: str = setting(lambda: "ffmpeg", parse_command, "the ffmpeg binary")
    hls_time: float = setting(lambda: 4.0, lambda v: parse_number(v, minimum=0.5), "target segment length, seconds")
    hls_init_time: float = setting(
        lambda: 1.0,
        lambda v: parse_number(v, minimum=0.5),
        "length of the first segments, seconds (a faster first picture)",
    )
    hls_list_size: int = setting(
        lambda: 6, lambda v: int(parse_number(v, minimum=2)), "segments listed in the playlist"
    )
    start_timeout: float = setting(
        lambda: 20.0, lambda v: parse_number(v, minimum=1), "seconds a start may take before the player gets a 503"
    )
    min_segments: int = setting(
        lambda: 1,
        lambda v: int(parse_number(v, minimum=1)),
        "segments the playlist must list before the first player is sent to it",
    )
    quality_profiles: dict[str, dict[str, Any]] = setting(
        lambda: DEFAULT_QUALITY_PROFILES, parse_profiles, "FFmpeg video/audio options and probe settings per quality"
    )
    upstream_proxy: str = setting(
        lambda: "",
        parse_proxy,
        "proxy for every upstream connection: http://, socks5:// or socks5h:// (the "
        "proxy resolves names), user:pass allowed ('' for none); a provider's or "
        "channel's proxy wins",
    )
    egress_listen: str = setting(
        lambda: "127.0.0.1:5001",
        parse_loopback_host_port,
        "loopback host:port of the egress relay every upstream connection goes through",
    )
    upstream_allow: tuple[Network, ...] = setting(
        lambda: (),
        parse_networks,
        "networks a source may connect to even though upstream_deny lists them "
        "(tests and the demo: their loopback upstreams)",
    )
    upstream_deny: tuple[Network, ...] = setting(
        lambda: DEFAULT_UPSTREAM_DENY,
        parse_networks,
        "networks no upstream connection may reach (default: loopback, link-local, "
        "unspecified, multicast); Redis and our own services are always refused",
    )
    providers: dict[str, Provider] = setting(
        lambda: {},
        parse_providers,
        "[providers.<name>]: match (URL prefix), max_streams (connections the account "
        "allows, 0: no limit), and defaults for user_agent, referer, headers, proxy, "
        "resolver, tls_verify",
    )
    auth_url: str = setting(
        lambda: "",
        parse_auth_url,
        "the operator's viewer validator: nginx asks it (auth_request, with the token and the "
        "channel) before a playlist or a cold start; '' lets everyone in",
    )
    auth_cache_seconds: int = setting(
        lambda: 10, parse_count, "seconds nginx keeps the validator's answer per token and channel (0: ask every time)"
    )
    auth_cache_dir: str = setting(
        lambda: "/var/lib/nginx/streamkeeper-auth",
        parse_abs_path,
        "where nginx keeps those answers (nginx creates the directory; its parent must exist: "
        "/var/lib/nginx does on Debian)",
    )
    source_cooldown: float = setting(
        lambda: 60.0,
        lambda v: parse_number(v, minimum=0),
        "seconds a source that failed is skipped while a channel has other sources",
    )
    user_agent: str = setting(
        lambda: DEFAULT_USER_AGENT, parse_header_text, "User-Agent sent upstream unless the channel sets one"
    )
    tls_ca_file: str = setting(
        lambda: "/etc/ssl/certs/ca-certificates.crt",
        parse_abs_path,
        "CA certificates an https source's certificate is verified against",
    )
    max_streams: int = setting(
        lambda: 0,
        parse_count,
        "FFmpegs this host runs at most (0: 2 per CPU core); a start beyond it preempts "
        "the stream longest without a request, else gets 503",
    )
    preempt_idle: float = setting(
        lambda: 15.0,
        lambda v: parse_number(v, minimum=1),
        "seconds without any request before a stream may be preempted by a new start",
    )
    start_rate_limit: int = setting(
        lambda: 30, parse_count, "cold starts per minute per client address, in nginx (burst 10; 0: no limit)"
    )
    min_free_mb: int = setting(lambda: 256, parse_count, "MB that must be free in hls_dir for a start (0: no check)")
    reaper_interval: float = setting(
        lambda: 60.0, lambda v: parse_number(v, minimum=0.1), "seconds between reaper passes"
    )
    stop_grace: float = setting(
        lambda: 10.0,
        lambda v: parse_number(v, minimum=0.1),
        "seconds between SIGTERM and SIGKILL when a stream is stopped",
    )
    max_restarts: int = setting(lambda: 5, parse_count, "restarts within restart_window after which a stream is failed")
    restart_window: float = setting(
        lambda: 300.0, lambda v: parse_number(v, minimum=1), "seconds over which max_restarts is counted"
    )
    failed_cooldown: float = setting(
        lambda: 60.0,
        lambda v: parse_number(v, minimum=0),
        "seconds a failed channel's starts get 503 with the reason, and no FFmpeg runs",
    )
    orphan_age: float = setting(
        lambda: 0.0,
        lambda v: parse_number(v, minimum=1, allow_zero=True),
        "seconds before files of no running stream are deleted (0: 2 x idle_timeout)",
    )
    host_timeout: float = setting(
        lambda: 0.0,
        lambda v: parse_number(v, minimum=1, allow_zero=True),
        "seconds before another host's records count as stale (0: 5 x reaper_interval)",
    )
    hosts: tuple[str, ...] = setting(
        lambda: (),
        parse_ip_ports,
        "every streaming host's nginx (IP:port) in a multi-host set-up: the edge routes each channel "
        "to one of them (streamctl nginx-config --edge); set on every host, it turns fencing on "
        "(a host that cannot renew its Redis lease stops pulling)",
    )
    host_address: str = setting(
        lambda: "",
        parse_ip_port_or_off,
        "this host's nginx as the edge and the other hosts reach it, an IP:port of `hosts` (default: "
        "nginx_listen if it is one of them); another host forwards a request for a channel this host "
        "runs to it",
    )
    edge_from: tuple[Network, ...] = setting(
        lambda: (),
        parse_networks,
        "networks of the edge nginx (a multi-host set-up): a host's nginx takes the viewer's address "
        "from X-Forwarded-For only on requests from these",
    )
    metrics_listen: str = setting(
        lambda: "", parse_listen_or_off, "host:port for heartbeatd's Prometheus metrics ('' or 'off': none)"
    )
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)  # key -> where from
    config_path: str | None = None

    @property
    def values(self) -> dict[str, Any]:
        """Every setting by key, in the table's order."""
        return {spec.key: getattr(self, spec.key) for spec in SPECS}

    def as_dict(self) -> dict[str, Any]:
        return self.values

    def shown(self, key: str) -> Any:
        """A value as `streamctl config` prints it: JSON types, proxies' passwords redacted."""
        return shown_value(key, getattr(self, key))


SPECS: tuple[SettingSpec, ...] = tuple(
    SettingSpec(field.name, *field.metadata["spec"])
    for field in dataclasses.fields(Settings)
    if "spec" in field.metadata
)
SPEC_BY_KEY = {spec.key: spec for spec in SPECS}


def _shown_provider_field(field: str, value: Any) -> Any:
    from urllib.parse import urlsplit

    from .redact import ELLIPSIS, redact_url

    if field == "proxy":
        return redact_url(value)
    if field == "match":
        parts = urlsplit(value)
        return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}/{ELLIPSIS}"
    if field == "headers":
        return {name: ELLIPSIS for name in value}
    return value


def shown_value(key: str, value: Any) -> Any:
    from .redact import redact_url

    if key == "upstream_proxy":
        return redact_url(value) if value else ""
    if key in ("upstream_allow", "upstream_deny", "edge_from"):
        return [str(network) for network in value]
    if key == "providers":  # an account is in match's path, a token may be in a header
        return {
            name: {
                field: _shown_provider_field(field, v)
                for field, v in dataclasses.asdict(provider).items()
                if field != "name" and v not in (None, {}, "")
            }
            for name, provider in value.items()
        }
    return value


def find_config_path(explicit: str | None, environ: Mapping[str, str]) -> tuple[str | None, str]:
    """Return (path or None, how it was found)."""
    if explicit:
        return explicit, "--config"
    if environ.get(CONFIG_ENV):
        return environ[CONFIG_ENV], CONFIG_ENV
    if os.path.exists(DEFAULT_CONFIG_PATH):
        return DEFAULT_CONFIG_PATH, "default path"
    return None, "none"


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsError(f"config file {path}: not found") from None
    except PermissionError:
        raise SettingsError(f"config file {path}: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path}: invalid TOML: {exc}") from None
    # Allow either top-level keys or a [streamkeeper] table.
    if isinstance(data.get("streamkeeper"), dict):
        data = {**{k: v for k, v in data.items() if k != "streamkeeper"}, **data["streamkeeper"]}
    return data


def load_settings(
    config_path: str | None = None, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build the effective settings; raise SettingsError naming the bad key."""
    environ = os.environ if environ is None else environ
    path, _found_by = find_config_path(config_path, environ)
    file_values = _read_toml(path) if path else {}
    unknown = sorted(set(file_values) - set(SPEC_BY_KEY))
    if unknown:
        raise SettingsError(f"config file {path}: unknown key(s): {', '.join(unknown)}")

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for spec in SPECS:
        env_name = ENV_PREFIX + spec.key.upper()
        if overrides and overrides.get(spec.key) is not None:
            raw, source = overrides[spec.key], "flag"
        elif env_name in environ:
            raw, source = environ[env_name], f"env {env_name}"
        elif spec.key in file_values:
            raw, source = file_values[spec.key], f"file {path}"
        else:
            raw, source = spec.default(), "default"
        try:
            values[spec.key] = spec.parse(raw)
        except ValueError as exc:
            raise SettingsError(f"setting {spec.key} ({source}): {exc}") from None
        sources[spec.key] = source
    _check_launcher_listen(values)
    _derive_defaults(values, sources)
    return Settings(**values, sources=sources, config_path=path)


def _derive_defaults(values: dict, sources: dict) -> None:
    """Settings whose default is a multiple of another (0 means 'derive it')."""
    if not values["orphan_age"]:
        values["orphan_age"] = 2 * values["idle_timeout"]
        sources["orphan_age"] += " (2 x idle_timeout)"
    if not values["host_timeout"]:
        values["host_timeout"] = 5 * values["reaper_interval"]
        sources["host_timeout"] += " (5 x reaper_interval)"
    if not values["host_address"] and values["nginx_listen"] in values["hosts"]:
        values["host_address"] = values["nginx_listen"]
        sources["host_address"] += " (nginx_listen, one of hosts)"
    elif values["host_address"] and values["host_address"] not in values["hosts"]:
        raise SettingsError(
            f"setting host_address ({sources['host_address']}): {values['host_address']!r} is not one of "
            "hosts; it must be this host's entry there"
        )
    if not values["max_streams"]:
        values["max_streams"] = STREAMS_PER_CORE * (os.cpu_count() or 1)
        sources["max_streams"] += f" ({STREAMS_PER_CORE} per CPU core)"


# max_streams' default: what a core sustains of the default quality (medium, 720p x264
# veryfast) at real time, with headroom (bench/capacity.py measures it).
STREAMS_PER_CORE = 2


def _check_launcher_listen(values: dict) -> None:
    host = values["launcher_listen"].rpartition(":")[0]
    if not is_loopback_host(host) and not values["launcher_allow_remote"]:
        raise SettingsError(
            f"setting launcher_listen: {values['launcher_listen']!r} is not a loopback "
            "address; the launcher starts processes on request, so set "
            "launcher_allow_remote = true if you really mean it"
        )
