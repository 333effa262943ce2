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
import json
import os
import re
import socket
import tomllib
from typing import Any, Callable, Mapping

from .channels import CONTROL_RE, ChannelError, check_proxy
from .upstreams import DEFAULT_UPSTREAM_DENY, Network, Provider, parse_networks, parse_providers

DEFAULT_CONFIG_PATH = "/etc/streamkeeper/streamkeeper.toml"
CONFIG_ENV = "STREAMKEEPER_CONFIG"
ENV_PREFIX = "STREAMKEEPER_"


class SettingsError(ValueError):
    """An invalid setting; the message names the key and the problem."""


def _parse_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value


def _parse_nonempty_str(value: Any) -> str:
    text = _parse_str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def _parse_number(value: Any, *, minimum: float, allow_zero: bool = False) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {type(value).__name__}")
    number = float(value)
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError("must be a finite number")
    if allow_zero and number == 0:
        return number
    if number < minimum:
        raise ValueError(f"must be at least {minimum:g}" + (" (or 0 to turn it off)" if allow_zero else ""))
    return number


def _positive_seconds(value: Any) -> float:
    return _parse_number(value, minimum=0.05)


def _seconds_or_off(value: Any) -> float:
    return _parse_number(value, minimum=1, allow_zero=True)


def _parse_count(value: Any) -> int:
    number = _parse_number(value, minimum=0)
    if number != int(number):
        raise ValueError(f"expected a whole number, got {value!r}")
    return int(number)


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _parse_host_port(value: Any) -> str:
    text = _parse_nonempty_str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {text!r}")
    return text


def _parse_nginx_listen(value: Any) -> str:
    text = str(value).strip() if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    if not text or any(c in text for c in ";{}\n\"'"):
        raise ValueError(f"expected what nginx's listen takes (80, 127.0.0.1:8080), got {value!r}")
    return text


def _parse_proxy(value: Any) -> str:
    text = _parse_str(value).strip()
    if text in ("", "none", "off"):
        return ""
    try:
        return check_proxy("upstream_proxy", text) or ""
    except ChannelError as exc:
        raise ValueError(str(exc).replace("channel upstream_proxy: proxy", "expected a proxy URL:")) from None


def _parse_auth_url(value: Any) -> str:
    """The operator's token validator nginx asks (auth_request): an http(s) URL, '' for none."""
    text = _parse_str(value).strip()
    if text in ("", "none", "off"):
        return ""
    if not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~!$&'()*+,;=:@%/\-]*)?", text):
        raise ValueError(f"expected an http:// or https:// URL (no query, no spaces), got {text[:80]!r}")
    return text


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 (bracketed or not) or localhost: the one loopback test of a listen address."""
    host = host.strip("[]")
    return host.startswith("127.") or host in ("::1", "localhost")


def _parse_loopback_host_port(value: Any) -> str:
    text = _parse_host_port(value)
    if not is_loopback_host(text.rpartition(":")[0]):
        raise ValueError(f"must be a loopback address (it carries every upstream connection), got {text!r}")
    return text


PROFILE_KEYS = {"video", "audio", "analyzeduration", "probesize"}
_PROFILE_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")


def _parse_profiles(value: Any) -> dict:
    """The built-in profiles, each replaced by the file's profile of the same name (a file
    defining only [quality_profiles.low] keeps copy, medium and high).  Every value is
    checked here, at load, not at the first start."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"expected a table (or JSON object): {exc}") from None
    if not isinstance(value, dict) or not value:
        raise ValueError("expected a table of profiles: name = {video = [...], audio = [...]}")
    profiles = {
        name: dict(profile, **{k: v for k, v in DEFAULT_PROFILE_PROBE.items() if k not in profile})
        for name, profile in DEFAULT_QUALITY_PROFILES.items()
    }
    for name, profile in value.items():
        if not isinstance(name, str) or not _PROFILE_NAME_RE.fullmatch(name):
            raise ValueError(f"profile name {str(name)[:40]!r}: letters, digits, _ and - only")
        if not isinstance(profile, dict) or not set(profile) <= PROFILE_KEYS:
            raise ValueError(f"profile {name!r}: expected keys among {sorted(PROFILE_KEYS)}")
        clean: dict[str, Any] = dict(DEFAULT_PROFILE_PROBE)
        for key in ("video", "audio"):
            args = profile.get(key, [])
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                raise ValueError(f"profile {name!r}: {key} must be a list of ffmpeg arguments (strings)")
            if any(CONTROL_RE.search(a) or len(a) > 1024 for a in args):
                raise ValueError(
                    f"profile {name!r}: {key} has an argument with a control " "character or over 1024 characters"
                )
            clean[key] = list(args)
        for key in ("analyzeduration", "probesize"):
            if key in profile:
                clean[key] = int(_parse_number(profile[key], minimum=32))
        profiles[name] = clean
    return profiles


# Probing: FFmpeg's default (analyzeduration 5 s) holds the first segment back
# about 4 s on a live source; 1 s / 1 MB still finds audio and video.
DEFAULT_PROFILE_PROBE = {"analyzeduration": 1_000_000, "probesize": 1_000_000}


def _x264(height: int, bitrate_k: int, audio_k: int) -> dict:
    return {
        "video": [
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-profile:v",
            "main",
            "-vf",
            f"scale=-2:{height}",
            "-b:v",
            f"{bitrate_k}k",
            "-maxrate",
            f"{bitrate_k * 11 // 10}k",
            "-bufsize",
            f"{bitrate_k * 2}k",
            "-pix_fmt",
            "yuv420p",
        ],
        "audio": ["-c:a", "aac", "-b:a", f"{audio_k}k", "-ac", "2"],
    }


DEFAULT_QUALITY_PROFILES = {
    "copy": {"video": ["-c:v", "copy"], "audio": ["-c:a", "copy"]},
    "low": _x264(480, 800, 96),
    "medium": _x264(720, 2000, 128),
    "high": _x264(1080, 4500, 160),
}

DEFAULT_USER_AGENT = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0 Safari/537.36 VLC/3.0.20"
)


def _parse_header_text(value: Any) -> str:
    """A value FFmpeg sends in a request header: no control characters (CR/LF injection)."""
    text = _parse_nonempty_str(value)
    if CONTROL_RE.search(text) or len(text) > 512:
        raise ValueError("must be at most 512 characters, without control characters")
    return text


def _parse_command(value: Any) -> str:
    text = _parse_nonempty_str(value)
    if CONTROL_RE.search(text):
        raise ValueError("must not contain control characters")
    return text


def _parse_redis_url(value: Any) -> str:
    url = _parse_nonempty_str(value)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"must start with redis://, rediss:// or unix://, got {url!r}")
    return url


def _parse_abs_path(value: Any) -> str:
    path = _parse_nonempty_str(value)
    if CONTROL_RE.search(path):
        raise ValueError("must not contain control characters (a newline, a tab, ...)")
    if not os.path.isabs(path):
        raise ValueError(f"must be an absolute path, got {path!r}")
    return os.path.normpath(path)


def _parse_listen_or_off(value: Any) -> str:
    text = _parse_str(value).strip()
    if text in ("", "off", "none"):
        return ""
    return _parse_host_port(text)


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

    redis_url: str = setting(lambda: "redis://127.0.0.1:6379/0", _parse_redis_url, "shared state")
    hls_dir: str = setting(lambda: "/var/www/hls", _parse_abs_path, "where playlists and segments live")
    access_log: str = setting(
        lambda: "/var/log/nginx/streams_access.log", _parse_abs_path, "the nginx access log heartbeatd follows"
    )
    log_format: str = setting(
        lambda: "streamkeeper", _parse_nonempty_str, "'streamkeeper' (ours) or a full nginx log_format string"
    )
    state_dir: str = setting(lambda: "/var/lib/streamkeeper", _parse_abs_path, "checkpoints and other local state")
    log_dir: str = setting(
        lambda: "/var/log/streamkeeper",
        _parse_abs_path,
        "FFmpeg's own output, one capped file per channel (streamctl logs ID)",
    )
    idle_timeout: float = setting(
        lambda: 300.0, lambda v: _parse_number(v, minimum=1), "seconds without a viewer before a stream is stopped"
    )
    flush_interval: float = setting(lambda: 1.0, _positive_seconds, "seconds between heartbeat writes")
    viewer_window: float = setting(
        lambda: 30.0,
        _seconds_or_off,
        "seconds a viewer counts as watching after its last request (0: no viewer counting)",
    )
    host_id: str = setting(socket.gethostname, _parse_nonempty_str, "which streaming host this is")
    parse_workers: int = setting(
        lambda: 0,
        _parse_count,
        "processes that parse a backlog of the access log in parallel (0: one per core, "
        "at most 4; 1: parse in heartbeatd itself)",
    )
    launcher_listen: str = setting(
        lambda: "127.0.0.1:5000", _parse_host_port, "host:port the launcher listens on (nginx's fallback calls it)"
    )
    launcher_allow_remote: bool = setting(lambda: False, _parse_bool, "allow a non-loopback launcher_listen")
    nginx_listen: str = setting(lambda: "80", _parse_nginx_listen, "what the rendered nginx server block listens on")
    ffmpeg: str = setting(lambda: "ffmpeg", _parse_command, "the ffmpeg binary")
    hls_time: float = setting(lambda: 4.0, lambda v: _parse_number(v, minimum=0.5), "target segment length, seconds")
    hls_init_time: float = setting(
        lambda: 1.0,
        lambda v: _parse_number(v, minimum=0.5),
        "length of the first segments, seconds (a faster first picture)",
    )
    hls_list_size: int = setting(
        lambda: 6, lambda v: int(_parse_number(v, minimum=2)), "segments listed in the playlist"
    )
    start_timeout: float = setting(
        lambda: 20.0, lambda v: _parse_number(v, minimum=1), "seconds a start may take before the player gets a 503"
    )
    min_segments: int = setting(
        lambda: 1,
        lambda v: int(_parse_number(v, minimum=1)),
        "segments the playlist must list before the first player is sent to it",
    )
    quality_profiles: dict[str, dict[str, Any]] = setting(
        lambda: DEFAULT_QUALITY_PROFILES, _parse_profiles, "FFmpeg video/audio options and probe settings per quality"
    )
    upstream_proxy: str = setting(
        lambda: "",
        _parse_proxy,
        "proxy for every upstream connection: http://, socks5:// or socks5h:// (the "
        "proxy resolves names), user:pass allowed ('' for none); a provider's or "
        "channel's proxy wins",
    )
    egress_listen: str = setting(
        lambda: "127.0.0.1:5001",
        _parse_loopback_host_port,
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
        _parse_auth_url,
        "the operator's viewer validator: nginx asks it (auth_request, with the token and the "
        "channel) before a playlist or a cold start; '' lets everyone in",
    )
    auth_cache_seconds: int = setting(
        lambda: 10, _parse_count, "seconds nginx keeps the validator's answer per token and channel (0: ask every time)"
    )
    auth_cache_dir: str = setting(
        lambda: "/var/lib/nginx/streamkeeper-auth",
        _parse_abs_path,
        "where nginx keeps those answers (nginx creates the directory; its parent must exist: "
        "/var/lib/nginx does on Debian)",
    )
    source_cooldown: float = setting(
        lambda: 60.0,
        lambda v: _parse_number(v, minimum=0),
        "seconds a source that failed is skipped while a channel has other sources",
    )
    user_agent: str = setting(
        lambda: DEFAULT_USER_AGENT, _parse_header_text, "User-Agent sent upstream unless the channel sets one"
    )
    tls_ca_file: str = setting(
        lambda: "/etc/ssl/certs/ca-certificates.crt",
        _parse_abs_path,
        "CA certificates an https source's certificate is verified against",
    )
    max_streams: int = setting(
        lambda: 0,
        _parse_count,
        "FFmpegs this host runs at most (0: 2 per CPU core); a start beyond it preempts "
        "the stream longest without a request, else gets 503",
    )
    preempt_idle: float = setting(
        lambda: 15.0,
        lambda v: _parse_number(v, minimum=1),
        "seconds without any request before a stream may be preempted by a new start",
    )
    start_rate_limit: int = setting(
        lambda: 30, _parse_count, "cold starts per minute per client address, in nginx (burst 10; 0: no limit)"
    )
    min_free_mb: int = setting(lambda: 256, _parse_count, "MB that must be free in hls_dir for a start (0: no check)")
    reaper_interval: float = setting(
        lambda: 60.0, lambda v: _parse_number(v, minimum=0.1), "seconds between reaper passes"
    )
    stop_grace: float = setting(
        lambda: 10.0,
        lambda v: _parse_number(v, minimum=0.1),
        "seconds between SIGTERM and SIGKILL when a stream is stopped",
    )
    max_restarts: int = setting(
        lambda: 5, _parse_count, "restarts within restart_window after which a stream is failed"
    )
    restart_window: float = setting(
        lambda: 300.0, lambda v: _parse_number(v, minimum=1), "seconds over which max_restarts is counted"
    )
    failed_cooldown: float = setting(
        lambda: 60.0,
        lambda v: _parse_number(v, minimum=0),
        "seconds a failed channel's starts get 503 with the reason, and no FFmpeg runs",
    )
    orphan_age: float = setting(
        lambda: 0.0,
        lambda v: _parse_number(v, minimum=1, allow_zero=True),
        "seconds before files of no running stream are deleted (0: 2 x idle_timeout)",
    )
    host_timeout: float = setting(
        lambda: 0.0,
        lambda v: _parse_number(v, minimum=1, allow_zero=True),
        "seconds before another host's records count as stale (0: 5 x reaper_interval)",
    )
    metrics_listen: str = setting(
        lambda: "", _parse_listen_or_off, "host:port for heartbeatd's Prometheus metrics ('' or 'off': none)"
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
    if key in ("upstream_allow", "upstream_deny"):
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
