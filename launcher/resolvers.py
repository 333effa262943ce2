"""Resolvers: the URL and cookies FFmpeg should start from, found before it starts.

``none``: FFmpeg connects to the source itself (the default).
``plain``: follow the source's redirects with the channel's headers, through the egress
relay (so through the channel's proxy, with every address checked), keep the cookies,
and hand FFmpeg the final URL and the cookies.
``cloudscraper``: the same with a cloudscraper session (browser-like headers and TLS),
for upstreams that want a browser before they hand out a stream (an optional extra:
``pip install streamkeeper[cloudscraper]``).

A resolver closes its connection as soon as it has the response headers: it never reads
the stream, so it never holds a provider connection while FFmpeg starts.
"""

from __future__ import annotations

import http.cookiejar
import ssl
import urllib.error
import urllib.request

from streamstate.channels import ChannelError, check_source_url
from streamstate.upstreams import Upstream

RESOLVE_TIMEOUT = 10.0  # seconds for the whole chain of redirects
MAX_REDIRECTS = 10


class ResolveFailed(Exception):
    """The message is the class of failure a player may see (never a URL)."""


def resolve(upstream: Upstream, source: str, relay_url: str, ca_file: str) -> tuple[str, list[str]]:
    """(URL for FFmpeg, cookies as Set-Cookie values) for the channel's source."""
    if upstream.resolver == "none":
        return source, []
    if upstream.resolver == "cloudscraper":
        final, cookies = _resolve_cloudscraper(upstream, source, relay_url, ca_file)
    else:
        final, cookies = _resolve_plain(upstream, source, relay_url, ca_file)
    try:
        final = check_source_url(upstream.channel.id, final)  # a redirect is hostile input
    except ChannelError:
        raise ResolveFailed("upstream redirected to a refused URL") from None
    return final, cookies


def _headers(upstream: Upstream) -> dict[str, str]:
    headers = {"User-Agent": upstream.user_agent, **upstream.headers}
    if upstream.referer:
        headers["Referer"] = upstream.referer
    return headers


def _tls_context(upstream: Upstream, ca_file: str) -> ssl.SSLContext:
    if not upstream.tls_verify:
        return ssl._create_unverified_context()  # the channel's (or provider's) choice
    return ssl.create_default_context(cafile=ca_file)


def _resolve_plain(upstream: Upstream, source: str, relay_url: str, ca_file: str):
    jar = http.cookiejar.CookieJar()

    class Redirects(urllib.request.HTTPRedirectHandler):
        max_redirections = MAX_REDIRECTS

    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"http": relay_url, "https": relay_url}),
        urllib.request.HTTPCookieProcessor(jar),
        Redirects(),
        urllib.request.HTTPSHandler(context=_tls_context(upstream, ca_file)),
    )
    request = urllib.request.Request(source, headers=_headers(upstream))
    try:
        response = opener.open(request, timeout=RESOLVE_TIMEOUT)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise ResolveFailed(f"upstream refused: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ResolveFailed(_unreachable(exc)) from None
    final = response.geturl()
    response.close()  # headers only: no provider slot held
    return final, [_set_cookie(c) for c in jar]


def _resolve_cloudscraper(upstream: Upstream, source: str, relay_url: str, ca_file: str):
    try:
        import cloudscraper
        import requests
    except ImportError:
        raise ResolveFailed("resolver cloudscraper is not installed (pip install streamkeeper[cloudscraper])") from None
    session = cloudscraper.create_scraper()
    session.trust_env = False  # only the relay: no proxy from the environment
    session.proxies = {"http": relay_url, "https": relay_url}
    if upstream.user_agent:
        session.headers["User-Agent"] = upstream.user_agent
    session.headers.update({k: v for k, v in _headers(upstream).items() if k != "User-Agent"})
    session.max_redirects = MAX_REDIRECTS
    try:
        response = session.get(
            source,
            stream=True,
            timeout=RESOLVE_TIMEOUT,
            allow_redirects=True,
            verify=ca_file if upstream.tls_verify else False,
        )
    except requests.RequestException as exc:
        raise ResolveFailed(_unreachable(exc)) from None
    except Exception as exc:  # noqa: BLE001 - cloudscraper raises its own kinds (challenges)
        raise ResolveFailed(f"resolver cloudscraper failed ({type(exc).__name__})") from None
    try:
        if response.status_code >= 400:
            raise ResolveFailed(f"upstream refused: HTTP {response.status_code}")
        return response.url, [_set_cookie(c) for c in session.cookies]
    finally:
        response.close()
        session.close()


def _unreachable(exc: Exception) -> str:
    text = str(exc)
    if "407" in text or "ProxyError" in type(exc).__name__ or "Tunnel connection failed" in text:
        return "upstream unreachable (through the egress relay)"
    return "upstream unreachable"


def _set_cookie(cookie: http.cookiejar.Cookie) -> str:
    """``name=value``, for the Cookie header FFmpeg sends on each of the stream's requests."""
    return f"{cookie.name}={cookie.value or ''}"
