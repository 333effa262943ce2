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

import click

from streamstate.cli_options import settings_options
from streamstate.redis_client import redis_for

from .checks_channel import check_channel
from .checks_common import FAIL
from .checks_host import (
    check_ffmpeg,
    check_nginx,
    check_nginx_answers,
    check_proxies,
    check_redis,
    check_sentinels,
    check_space,
)
from .checks_services import check_heartbeatd, check_launcher, check_reaper, check_validator
from .checks_streams import check_hosts, check_streams


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
    or stale playlists; every host of the cluster (alive, its lease's age, its streams and
    slots); FFmpeg and its protocols; every proxy; free space. --channel ID adds
    the channel's record and its source's answer.
    Exit codes: 0 no check failed, 1 a check failed, 2 bad settings.
    """
    settings = settings_loader()
    checks = check_redis(settings)
    redis_up = checks[0].status != FAIL
    checks += check_sentinels(settings)
    client = redis_for(settings)
    checks += (
        check_nginx(settings, nginx_conf_file)
        + check_nginx_answers(settings)
        + check_launcher(settings)
        + check_validator(settings)
        + check_heartbeatd(settings)
    )
    if redis_up:
        checks += check_reaper(client, settings) + check_streams(client, settings) + check_hosts(client, settings)
    checks += check_space(settings) + check_ffmpeg(settings) + check_proxies(settings)
    if channel_id is not None and redis_up:
        checks += check_channel(client, settings, channel_id)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(c) for c in checks], indent=2))
    else:
        for c in checks:
            click.echo(f"{c.status:<4}  {c.check}: {c.detail}")
    raise SystemExit(1 if any(c.status == FAIL for c in checks) else 0)
