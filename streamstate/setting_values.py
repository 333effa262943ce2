"""How each setting's value is read (settings.py holds the one table that names them): a
parser per kind of value, each raising ValueError that names the problem, and the defaults
that take code to write (the quality profiles, the User-Agent)."""

from __future__ import annotations

import ipaddress
import json
import os
import re
from typing import Any

from .channels import CONTROL_RE, ChannelError, check_proxy


def parse_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value


def parse_nonempty_str(value: Any) -> str:
    text = parse_str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def parse_number(value: Any, *, minimum: float, allow_zero: bool = False) -> float:
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


def positive_seconds(value: Any) -> float:
    return parse_number(value, minimum=0.05)


def seconds_or_off(value: Any) -> float:
    return parse_number(value, minimum=1, allow_zero=True)


def parse_count(value: Any) -> int:
    number = parse_number(value, minimum=0)
    if number != int(number):
        raise ValueError(f"expected a whole number, got {value!r}")
    return int(number)


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def parse_host_port(value: Any) -> str:
    text = parse_nonempty_str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {text!r}")
    return text


def parse_host_ports(value: Any) -> tuple[str, ...]:
    """A list of host:port (a TOML list, or text separated by commas or spaces)."""
    if isinstance(value, str):
        value = [part for part in value.replace(",", " ").split() if part]
    if not isinstance(value, (list, tuple)):
        raise ValueError('expected a list of host:port, e.g. ["10.0.0.1:26379", "10.0.0.2:26379"]')
    return tuple(parse_host_port(item) for item in value)


def parse_ip_ports(value: Any) -> tuple[str, ...]:
    """A list of IP:port ([v6]:port): the hosts forward requests to each other by these, and
    nginx proxies to an address literal without a resolver."""
    found = parse_host_ports(value)
    for text in found:
        if not _is_ip(split_host_port(text)[0]):
            raise ValueError(f"expected IP:port (an address, not a name), got {text!r}")
    return found


def parse_ip_port_or_off(value: Any) -> str:
    text = parse_listen_or_off(value)
    if text and not _is_ip(split_host_port(text)[0]):
        raise ValueError(f"expected IP:port (an address, not a name), got {text!r}")
    return text


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def split_host_port(text: str) -> tuple[str, int]:
    """(host, port) of a checked host:port; an IPv6 host loses its brackets."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def parse_nginx_listen(value: Any) -> str:
    text = str(value).strip() if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    if not text or any(c in text for c in ";{}\n\"'"):
        raise ValueError(f"expected what nginx's listen takes (80, 127.0.0.1:8080), got {value!r}")
    return text


def parse_proxy(value: Any) -> str:
    text = parse_str(value).strip()
    if text in ("", "none", "off"):
        return ""
    try:
        return check_proxy("upstream_proxy", text) or ""
    except ChannelError as exc:
        raise ValueError(str(exc).replace("channel upstream_proxy: proxy", "expected a proxy URL:")) from None


def parse_auth_url(value: Any) -> str:
    """The operator's token validator nginx asks (auth_request): an http(s) URL, '' for none."""
    text = parse_str(value).strip()
    if text in ("", "none", "off"):
        return ""
    if not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~!$&'()*+,;=:@%/\-]*)?", text):
        raise ValueError(f"expected an http:// or https:// URL (no query, no spaces), got {text[:80]!r}")
    return text


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 (bracketed or not) or localhost: the one loopback test of a listen address."""
    host = host.strip("[]")
    return host.startswith("127.") or host in ("::1", "localhost")


def parse_loopback_host_port(value: Any) -> str:
    text = parse_host_port(value)
    if not is_loopback_host(text.rpartition(":")[0]):
        raise ValueError(f"must be a loopback address (it carries every upstream connection), got {text!r}")
    return text


PROFILE_KEYS = {"video", "audio", "analyzeduration", "probesize"}
PROFILE_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")


def parse_profiles(value: Any) -> dict:
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
        if not isinstance(name, str) or not PROFILE_NAME_RE.fullmatch(name):
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
                    f"profile {name!r}: {key} has an argument with a control character or over 1024 characters"
                )
            clean[key] = list(args)
        for key in ("analyzeduration", "probesize"):
            if key in profile:
                clean[key] = int(parse_number(profile[key], minimum=32))
        profiles[name] = clean
    return profiles


# Probing: FFmpeg's default (analyzeduration 5 s) holds the first segment back
# about 4 s on a live source; 1 s / 1 MB still finds audio and video.
DEFAULT_PROFILE_PROBE = {"analyzeduration": 1_000_000, "probesize": 1_000_000}


def x264(height: int, bitrate_k: int, audio_k: int) -> dict:
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
    "low": x264(480, 800, 96),
    "medium": x264(720, 2000, 128),
    "high": x264(1080, 4500, 160),
}

DEFAULT_USER_AGENT = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0 Safari/537.36 VLC/3.0.20"
)


def parse_header_text(value: Any) -> str:
    """A value FFmpeg sends in a request header: no control characters (CR/LF injection)."""
    text = parse_nonempty_str(value)
    if CONTROL_RE.search(text) or len(text) > 512:
        raise ValueError("must be at most 512 characters, without control characters")
    return text


def parse_command(value: Any) -> str:
    text = parse_nonempty_str(value)
    if CONTROL_RE.search(text):
        raise ValueError("must not contain control characters")
    return text


def parse_redis_url(value: Any) -> str:
    url = parse_nonempty_str(value)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"must start with redis://, rediss:// or unix://, got {url!r}")
    return url


def parse_abs_path(value: Any) -> str:
    path = parse_nonempty_str(value)
    if CONTROL_RE.search(path):
        raise ValueError("must not contain control characters (a newline, a tab, ...)")
    if not os.path.isabs(path):
        raise ValueError(f"must be an absolute path, got {path!r}")
    return os.path.normpath(path)


def parse_listen_or_off(value: Any) -> str:
    text = parse_str(value).strip()
    if text in ("", "off", "none"):
        return ""
    return parse_host_port(text)
