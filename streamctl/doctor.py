"""``streamctl doctor``: checks of this host, each one line: ok, warn or FAIL, and why.

So far: Redis answers, and Redis persists (AOF), since the channel catalogue lives only
there; the egress relay answers; every configured proxy accepts connections.  (The
shipping issue adds the rest of the old host's failures.)
"""
from __future__ import annotations

import asyncio
import json
import socket
from urllib.parse import urlsplit

import click
import redis

from streamstate import egress

from streamstate.cli_options import settings_options
from streamstate.redact import redact_url
from streamstate.redis_client import redis_from_url

OK, WARN, FAIL = "ok", "warn", "FAIL"


def check_redis(settings) -> list[tuple[str, str, str]]:
    """(status, check, detail) for Redis: reachable, and persisting the catalogue."""
    client = redis_from_url(settings.redis_url)
    where = redact_url(settings.redis_url)
    try:
        client.ping()
    except redis.RedisError as exc:
        return [(FAIL, "redis", f"{where} does not answer: {exc}")]
    found = [(OK, "redis", f"{where} answers")]
    try:
        appendonly = client.config_get("appendonly").get("appendonly")
        save = client.config_get("save").get("save")
    except redis.RedisError as exc:                  # CONFIG renamed or refused: cannot tell
        return found + [(WARN, "redis persistence", f"cannot read Redis's config ({exc}); make sure "
                         "appendonly is yes: the channel catalogue lives only in Redis")]
    if appendonly == "yes":
        found.append((OK, "redis persistence", "appendonly yes (AOF)"))
    elif save:
        found.append((WARN, "redis persistence", f"snapshots only (save {save!r}): channels added "
                      "since the last snapshot are lost with a restart; set appendonly yes"))
    else:
        found.append((FAIL, "redis persistence", "no AOF and no snapshots: a Redis restart loses "
                      "every channel record (running streams survive it); set appendonly yes"))
    return found


PROXY_TIMEOUT = 3.0


def check_upstreams(settings) -> list[tuple[str, str, str]]:
    """The egress relay answers (no FFmpeg reaches anything without it), and each proxy
    configured (upstream_proxy, each provider's) accepts a connection."""
    found = []
    counts = asyncio.run(egress.open_connections(settings.egress_listen, timeout=PROXY_TIMEOUT))
    if counts is None:
        found.append((FAIL, "egress relay", f"nothing answers on {settings.egress_listen}: every start "
                      "fails with 'egress relay unavailable'; start stream-egress"))
    else:
        found.append((OK, "egress relay", f"answers on {settings.egress_listen} "
                      f"({sum(counts.values())} upstream connection(s) open)"))
    proxies = [("upstream_proxy", settings.upstream_proxy)] + [
        (f"provider {name} proxy", provider.proxy) for name, provider in settings.providers.items()]
    for label, proxy in proxies:
        if not proxy:
            continue
        parts = urlsplit(proxy)
        try:
            socket.create_connection((parts.hostname, parts.port), timeout=PROXY_TIMEOUT).close()
        except OSError as exc:
            found.append((FAIL, label, f"{redact_url(proxy)} does not accept connections ({exc}): "
                          "its channels answer 503 'upstream proxy unusable'"))
        else:
            found.append((OK, label, f"{redact_url(proxy)} accepts connections"))
    return found


@click.command("doctor")
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Print the checks as a JSON list.")
def doctor_command(settings_loader, as_json):
    """Check this host's streamkeeper set-up; one line per check: ok, warn or FAIL, and why.

    Exit codes: 0 no check failed, 1 a check failed, 2 bad settings.
    """
    settings = settings_loader()
    checks = check_redis(settings) + check_upstreams(settings)
    if as_json:
        click.echo(json.dumps([{"status": s, "check": c, "detail": d} for s, c, d in checks], indent=2))
    else:
        for status, check, detail in checks:
            click.echo(f"{status:<4}  {check}: {detail}")
    raise SystemExit(1 if any(status == FAIL for status, _, _ in checks) else 0)
