"""``streamctl doctor``: checks of this host, each one line: ok, warn or FAIL, and why.

So far: Redis answers, and Redis persists (AOF), since the channel catalogue lives only
there.  (The shipping issue adds the rest of the old host's failures.)
"""
from __future__ import annotations

import json

import click
import redis

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


@click.command("doctor")
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Print the checks as a JSON list.")
def doctor_command(settings_loader, as_json):
    """Check this host's streamkeeper set-up; one line per check: ok, warn or FAIL, and why.

    Exit codes: 0 no check failed, 1 a check failed, 2 bad settings.
    """
    checks = check_redis(settings_loader())
    if as_json:
        click.echo(json.dumps([{"status": s, "check": c, "detail": d} for s, c, d in checks], indent=2))
    else:
        for status, check, detail in checks:
            click.echo(f"{status:<4}  {check}: {detail}")
    raise SystemExit(1 if any(status == FAIL for status, _, _ in checks) else 0)
