"""``streamctl start|stop|status``: ask the launcher, read Redis."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

import click
import redis

from streamstate import files, keys, redis_values, runs
from streamstate.cli_options import channel_id_or_exit, settings_options
from streamstate.reaping import Reaper, RedisUnavailable
from streamstate.redact import printable
from streamstate.redis_client import redis_error_text, redis_for, redis_where
from streamstate.streams_view import collect_streams

EXIT_FAILED = 1  # the launcher could not start it (503), or is unreachable
EXIT_INVALID = 2
EXIT_NOT_FOUND = 3


def _launcher_request(settings, path: str, timeout: float) -> tuple[int, dict]:
    url = f"http://{settings.launcher_listen}{path}"
    request = urllib.request.Request(url, data=b"", method="POST", headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, {"error": f"HTTP {exc.code}"}
    except (urllib.error.URLError, OSError) as exc:
        raise click.ClickException(f"launcher at {settings.launcher_listen} is unreachable: {exc}") from None


@click.command("start")
@settings_options
@click.argument("channel_id")
@click.option("--json", "as_json", is_flag=True, help="Print the launcher's JSON answer.")
def start_command(settings_loader, channel_id, as_json):
    """Start CHANNEL_ID now (as the first player would) and wait until it is playable.

    Exit codes: 0 started or already running, 1 it failed (the reason is printed) or the
    launcher is unreachable, 2 invalid id or unusable channel record, 3 no such channel.
    """
    settings = settings_loader()
    status, body = _launcher_request(settings, f"/channel/{channel_id}/start", settings.start_timeout + 10)
    if as_json:
        click.echo(json.dumps(body))
    if status == 200:
        if not as_json:
            click.echo(f"channel {channel_id}: {body['status']} (pid {body.get('pid')}, {body['playlist']})")
        return
    if not as_json:
        cooldown = body.get("cooldown_seconds") if isinstance(body, dict) else None
        note = (
            f" (it failed: starts are refused for {cooldown:g} s more, failed_cooldown; "
            f"`streamctl logs {channel_id}` shows why)"
            if isinstance(cooldown, (int, float))
            else ""
        )
        click.echo(f"error: {body.get('error', status)}{note}", err=True)
    raise SystemExit({400: EXIT_INVALID, 422: EXIT_INVALID, 404: EXIT_NOT_FOUND}.get(status, EXIT_FAILED))


@click.command("stop")
@settings_options
@click.argument("channel_id", required=False)
@click.option(
    "--all",
    "stop_all",
    is_flag=True,
    help="Stop every stream this host's launcher runs (a launcher that exits leaves "
    "them running: this is the explicit way to stop them all).",
)
def stop_command(settings_loader, channel_id, stop_all):
    """Stop CHANNEL_ID now (or every stream, with --all): FFmpeg, its files, its keys, its
    provider slot (the launcher does it; with the launcher down, this host's streams are
    stopped directly by the same stop routine, each proven by pidfd first).

    Exit codes: 0 stopped or not running, 1 Redis unreachable with the launcher down, 2
    invalid id or usage.
    """
    if bool(channel_id) == stop_all:
        click.echo("error: give a CHANNEL_ID or --all", err=True)
        raise SystemExit(EXIT_INVALID)
    if channel_id is not None:
        channel_id_or_exit(channel_id)
    settings = settings_loader()
    path = "/streams/stop" if stop_all else f"/channel/{channel_id}/stop"
    try:
        status, body = _launcher_request(settings, path, settings.stop_grace + 20)
    except click.ClickException as exc:
        # The launcher is gone (stopped alone before the target): its streams run on, so
        # they are stopped here, with the routine every stop uses.

        click.echo(f"{exc.message}; stopping this host's streams directly", err=True)
        try:
            stopped = Reaper(settings).stop_host_streams(
                "stop requested (launcher down)", None if stop_all else channel_id
            )
        except (RedisUnavailable, redis.RedisError) as error:
            click.echo(f"error: {error}", err=True)
            raise SystemExit(EXIT_FAILED) from None
        if stop_all:
            click.echo(f"stopped {len(stopped)} stream(s)" + (f": {', '.join(stopped)}" if stopped else ""))
        else:
            click.echo(f"channel {channel_id}: {'stopped' if stopped else 'not_running'}")
        return
    if status != 200:
        click.echo(f"error: {body.get('error', status)}", err=True)
        raise SystemExit(EXIT_INVALID if status == 400 else EXIT_FAILED)
    if stop_all:
        click.echo(
            f"stopped {len(body['channels'])} stream(s)"
            + (f": {', '.join(body['channels'])}" if body["channels"] else "")
        )
    else:
        click.echo(f"channel {channel_id}: {body['status']}")


@click.command("logs")
@settings_options
@click.argument("channel_id")
@click.option(
    "-n",
    "--lines",
    default=40,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="How many of the last lines to show.",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing lines as FFmpeg writes them (Ctrl-C stops).")
def logs_command(settings_loader, channel_id, lines, follow):
    """FFmpeg's own output for CHANNEL_ID on this host (log_dir/stream_<id>.log; the
    launcher writes a "--- streamkeeper:" line before each start).

    Exit codes: 0 shown, 1 no log for that channel, 2 invalid id.
    """
    channel_id_or_exit(channel_id)
    settings = settings_loader()
    path = files.ffmpeg_log_path(settings.log_dir, channel_id)
    if not os.path.exists(path):
        click.echo(f"channel {channel_id}: no FFmpeg log at {path}", err=True)
        raise SystemExit(EXIT_FAILED)
    for line in files.log_tail(path, lines):
        click.echo(printable(line))
    if follow:
        _follow(path)


def _follow(path: str) -> None:
    """tail -f, through the log's cuts (it is truncated when it passes its cap)."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        try:
            while True:
                line = handle.readline()
                if line:
                    click.echo(printable(line.decode("utf-8", "replace").rstrip("\n")))
                    continue
                if os.path.getsize(path) < handle.tell():
                    handle.seek(0)
                time.sleep(0.2)
        except KeyboardInterrupt:
            return


@click.command("status")
@settings_options
@click.argument("channel_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object: streams and the last reaper pass.")
def status_command(settings_loader, channel_id, as_json):
    """Streams Redis knows (state, pid, idle seconds, viewers, restarts, last error) and the
    last reaper pass of this host. Reads Redis directly: works with the launcher down.

    Exit codes: 0 done, 1 Redis unreachable.
    """
    settings = settings_loader()
    client = redis_for(settings)
    try:
        listing = collect_streams(client, settings, {}, with_hosts=True)
        if channel_id is not None:
            listing["streams"] = [s for s in listing["streams"] if s["id"] == channel_id]
            listing["failed"] = [f for f in listing["failed"] if f["id"] == channel_id]
            listing["providers"] = [p for p in listing["providers"] if channel_id in p["channels"]]
            listing["hosts"] = [h for h in listing["hosts"] if any(s["host"] == h["host"] for s in listing["streams"])]
        last_pass = runs.reaper_last_pass(client, settings.host_id)
    except redis.RedisError as exc:
        click.echo(f"error: {redis_where(settings)} unreachable: {redis_error_text(exc, settings)}", err=True)
        raise SystemExit(EXIT_FAILED) from None
    if as_json:
        click.echo(json.dumps({**listing, "reaper_last_pass": last_pass}, indent=2))
        return
    streams = listing["streams"]
    for s in streams:
        idle = "-" if s["idle_seconds"] is None else f"{s['idle_seconds']:.0f}s"
        # Redis contents are hostile: nothing reaches the terminal unescaped.
        uptime = "-" if s["uptime_seconds"] is None else f"{s['uptime_seconds']:.0f}s"
        click.echo(
            f"{s['id']:>8}  {printable(s['state']):<9} pid {s['pid'] or '-':<8} "
            f"host {printable(s['host'] or '-')} up {uptime:<7} idle {idle:<6} "
            f"viewers {s['viewers']:<4} restarts {s['restarts']}"
            + (f"  source {printable(s['source'])}" if s.get("source") else "")
            + (f"  last error: {printable(s['last_error'])}" if s["last_error"] else "")
        )
    for p in listing["providers"]:
        limit = p["limit"] or "no limit"
        click.echo(
            f"provider {p['provider']}: {len(p['channels'])}/{limit} connections"
            + (f" (channels {', '.join(p['channels'])})" if p["channels"] else "")
        )
    for h in listing["hosts"]:
        click.echo(host_line(h))
    for f in listing["failed"]:
        click.echo(
            f"{f['id']:>8}  failed    {printable(f['reason'])} (starts refused for "
            f"{f['cooldown_seconds']:.0f} s more; host {printable(f['host'])})"
        )
    if last_pass:
        age = time.time() - (redis_values.epoch_seconds(last_pass.get("time")) or 0)
        click.echo(
            f"reaper ({printable(settings.host_id)}): last pass {age:.0f} s ago, "
            f"stopped {printable(last_pass.get('stopped'))}, stale {printable(last_pass.get('stale'))}, "
            f"{printable(last_pass.get('passes'))} passes"
        )
    else:
        click.echo(f"reaper ({settings.host_id}): no pass recorded")
    for member in listing["invalid_members"]:
        click.echo(f"invalid member {member} in {keys.ACTIVE_STREAMS_KEY}: not a channel id (skipped)")
    click.echo(
        f"{len(streams)} stream(s)"
        + (
            f", {len(listing['invalid_members'])} invalid member(s) of {keys.ACTIVE_STREAMS_KEY}"
            if listing["invalid_members"]
            else ""
        )
    )


def host_line(h: dict) -> str:
    """One host of the cluster as `status` shows it (Redis contents: printed escaped)."""
    lease = f"lease renewed {h['lease_age_seconds']:.0f} s ago" if h["alive"] else "not seen (no lease)"
    return (
        f"host {printable(h['host'])}{' (this host)' if h['this_host'] else ''}: "
        f"{'alive' if h['alive'] else 'DEAD'}, {lease}, {h['streams']} stream(s), {h['slots']} provider slot(s)"
    )
