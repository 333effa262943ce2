"""``streamctl channels``: add, list, remove and import channel records."""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

import click

from streamstate import keys
from streamstate.channel_check import validate
from streamstate.channels import Channel, ChannelError, channel_from_dict, delete_channel, iter_channels, put_channel
from streamstate.cli_options import channel_id_or_exit, settings_options
from streamstate.redact import redact_url
from streamstate.redis_client import redis_for

EXIT_NOT_FOUND = 1
EXIT_INVALID = 2


@click.group("channels")
def channels_group():
    """Channel records (channel:<id> in Redis): what the launcher may start."""


def _client(settings_loader):
    return redis_for(settings_loader())


@channels_group.command("add")
@settings_options
@click.argument("channel_id")
@click.argument("source_url")
@click.option("--quality", default="medium", show_default=True, help="A quality profile name.")
@click.option("--user-agent", help="User-Agent sent upstream (else the user_agent setting).")
@click.option("--referer", help="Referer sent upstream.")
@click.option("--header", "headers", multiple=True, metavar="K:V", help="An extra upstream header; repeatable.")
@click.option(
    "--proxy",
    help="Proxy for this channel: http://, socks5:// or socks5h:// (the proxy "
    "resolves names), user:pass@ allowed (else its provider's, else upstream_proxy).",
)
@click.option(
    "--fallback",
    "fallbacks",
    multiple=True,
    metavar="URL",
    help="A source tried when the ones before it fail; repeatable, in order.",
)
@click.option(
    "--provider",
    help="The [providers.<name>] account it belongs to (else the first whose match prefixes SOURCE_URL).",
)
@click.option(
    "--resolver",
    type=click.Choice(["none", "plain", "cloudscraper"]),
    help="How the source URL is found: none (FFmpeg connects itself), plain (follow "
    "redirects, keep cookies), cloudscraper (a browser-like session).",
)
@click.option(
    "--no-tls-verify",
    "no_tls_verify",
    is_flag=True,
    help="Do not verify an https source's certificate (a provider's self-signed one).",
)
def add_command(
    settings_loader,
    channel_id,
    source_url,
    quality,
    user_agent,
    referer,
    headers,
    proxy,
    fallbacks,
    provider,
    resolver,
    no_tls_verify,
):
    """Add or replace channel CHANNEL_ID with its SOURCE_URL (http or https only).

    Exit codes: 0 added, 2 invalid (the message says what).
    """
    settings = settings_loader()
    parsed_headers = {}
    for header in headers:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            click.echo(f"error: channel {channel_id}: --header expects NAME:VALUE", err=True)
            raise SystemExit(EXIT_INVALID)
        parsed_headers[name.strip()] = value.strip()
    try:
        channel = channel_from_dict(
            channel_id,
            {
                "source_url": source_url,
                "quality": quality,
                "user_agent": user_agent,
                "referer": referer,
                "headers": parsed_headers,
                "proxy": proxy,
                "fallback_urls": list(fallbacks),
                "provider": provider,
                "resolver": resolver,
                "tls_verify": False if no_tls_verify else None,
            },
        )
        validate(channel, settings)  # the launcher's own check: it will start
    except (keys.InvalidChannelId, ChannelError) as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_INVALID) from None
    put_channel(redis_for(settings), channel)
    click.echo(f"channel {channel_id}: added ({channel.quality}, {redact_url(channel.source_url)})")


@channels_group.command("list")
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of channel records.")
@click.option(
    "--show-secrets",
    is_flag=True,
    help="Show source URLs whole (else user info, query and all but the path's last "
    "segment are shown as …, since providers put accounts there).",
)
def list_command(settings_loader, as_json, show_secrets):
    """List every channel record (SCAN, never KEYS); unusable records are shown with why.

    Exit codes: 0 listed (invalid records included), 1 Redis unreachable.
    """
    rows = []
    for channel_id, item in iter_channels(_client(settings_loader)):
        if isinstance(item, ChannelError):
            rows.append({"id": channel_id, "error": str(item)})
        else:
            row = {"id": channel_id, **json.loads(item.as_json())}
            if not show_secrets:
                row["source_url"] = redact_url(row["source_url"])
                if row.get("proxy"):
                    row["proxy"] = redact_url(row["proxy"])
                if row.get("fallback_urls"):
                    row["fallback_urls"] = [redact_url(url) for url in row["fallback_urls"]]
            rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        if "error" in row:
            click.echo(f"{row['id']:>8}  INVALID  {row['error']}")
        else:
            click.echo(
                f"{row['id']:>8}  {row.get('quality', ''):<7}  {row['source_url']}"
                + (f"  ({row['name']})" if row.get("name") else "")
            )
    click.echo(f"{len(rows)} channel(s)", err=True)


@channels_group.command("rm")
@settings_options
@click.argument("channel_id")
def rm_command(settings_loader, channel_id):
    """Remove channel CHANNEL_ID's record (a running stream keeps running until reaped).

    Exit codes: 0 removed, 1 no such channel, 2 invalid id.
    """
    channel_id_or_exit(channel_id)
    if not delete_channel(_client(settings_loader), channel_id):
        click.echo(f"channel {channel_id}: no such channel", err=True)
        raise SystemExit(EXIT_NOT_FOUND)
    click.echo(f"channel {channel_id}: removed")


_ATTR_RE = re.compile(r'([A-Za-z0-9_-]+)="([^"]*)"')
# The path's last segment is the number, with or without an extension: .../71386.ts
_TRAILING_NUMBER_RE = re.compile(r"(?:^|/)(%s)(?:\.[A-Za-z0-9]+)?$" % keys.CHANNEL_ID_PATTERN, re.ASCII)


def parse_m3u(text: str) -> list[dict]:
    """Entries of an M3U playlist: #EXTINF attributes and title, then the URL line."""
    entries, pending = [], None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line == "#EXTM3U":
            continue
        if line.startswith("#EXTINF"):
            head, _, title = line.partition(",")
            pending = {"attrs": dict(_ATTR_RE.findall(head)), "title": title.strip(), "line": number}
        elif line.startswith("#"):
            continue
        else:
            entry = pending or {"attrs": {}, "title": "", "line": number}
            entry["url"] = line
            entries.append(entry)
            pending = None
    return entries


def _channels_of_entries(
    entries: list[dict], settings, quality: str, provider: str | None, start_id: int | None
) -> tuple[list[Channel], list[dict]]:
    """The channels of the M3U entries, each checked on its own (a bad one is skipped with
    why, the rest imported); ids from the URL, the tvg-id, else numbered from start_id."""
    skipped: list[dict] = []
    seen: set[str] = set()
    next_id = start_id
    candidates: list[Channel] = []
    for entry in entries:
        channel_id = channel_id_for(entry)
        if channel_id is None and next_id is not None:
            while str(next_id) in seen:
                next_id += 1
            channel_id, next_id = str(next_id), next_id + 1
        if channel_id is None:
            skipped.append({"line": entry["line"], "why": "no id (use --start-id)"})
            continue
        if channel_id in seen:
            skipped.append({"line": entry["line"], "id": channel_id, "why": "duplicate id in the file"})
            continue
        attrs = entry["attrs"]
        try:
            channel = channel_from_dict(
                channel_id,
                {
                    "source_url": entry["url"],
                    "quality": quality,
                    "provider": provider,
                    "name": attrs.get("tvg-name") or entry["title"] or None,
                    "group": attrs.get("group-title") or None,
                },
            )
            validate(channel, settings)  # a quality and a provider this host has
        except (ChannelError, keys.InvalidChannelId) as exc:
            skipped.append({"line": entry["line"], "why": str(exc)})
            continue
        seen.add(channel_id)
        candidates.append(channel)
    return candidates, skipped


def _write_channels(client, candidates: list[Channel], replace: bool) -> tuple[list[str], list[dict]]:
    """The channels written in one pipeline (those that exist already kept unless
    ``replace``): the ids added, and those kept with why."""
    existing = set()
    if not replace and candidates:
        flags = client.pipeline(transaction=False)
        for channel in candidates:
            flags.exists(keys.channel_key(channel.id))
        existing = {c.id for c, there in zip(candidates, flags.execute()) if there}
    added, kept = [], []
    pipe = client.pipeline(transaction=False)
    for channel in candidates:
        if channel.id in existing:
            kept.append({"id": channel.id, "why": "exists already (use --replace)"})
            continue
        put_channel(client, channel, pipeline=pipe)
        added.append(channel.id)
    pipe.execute()
    return added, kept


def channel_id_for(entry: dict) -> str | None:
    """The old host's rule: the number that ends the URL's path, else a numeric tvg-id."""
    try:
        path = urlsplit(entry["url"]).path
    except ValueError:  # not a URL at all: the record check says why
        path = ""
    match = _TRAILING_NUMBER_RE.search(path)
    if match:
        return match.group(1)
    tvg_id = entry["attrs"].get("tvg-id", "")
    return tvg_id if keys.CHANNEL_ID_RE.fullmatch(tvg_id) else None


@channels_group.command("import")
@settings_options
@click.argument("m3u_file", type=click.File("r", encoding="utf-8", errors="replace"))
@click.option("--quality", default="medium", show_default=True, help="Quality for every imported channel.")
@click.option(
    "--start-id",
    type=click.IntRange(0, 10**keys.MAX_CHANNEL_ID_DIGITS - 1),
    default=None,
    help="Number entries without an id from here (else they are skipped).",
)
@click.option(
    "--replace/--keep", default=False, show_default=True, help="Replace channels that exist already, or keep them."
)
@click.option("--provider", help="The [providers.<name>] account every imported channel belongs to.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def import_command(settings_loader, m3u_file, quality, start_id, replace, provider, as_json):
    """Import an M3U playlist (#EXTINF with tvg-id, tvg-name, group-title).

    A channel's id is the number that ends its URL's path (.../71386.ts is 71386),
    else its tvg-id if numeric, else the next number from --start-id. Every
    entry is written in one pipeline. Prints what it added, skipped and why.
    Exit codes: 0 done (even with skips), 2 unreadable input or settings.
    """
    settings = settings_loader()
    if provider is not None and provider not in settings.providers:
        click.echo(
            f"error: provider {provider[:64]!r} is not configured (no [providers.<name>] of that name)", err=True
        )
        raise SystemExit(EXIT_INVALID)
    client = redis_for(settings)
    entries = parse_m3u(m3u_file.read())  # undecodable bytes arrive as U+FFFD
    candidates, skipped = _channels_of_entries(entries, settings, quality, provider, start_id)
    added, exist = _write_channels(client, candidates, replace)
    skipped += exist
    report = {"entries": len(entries), "added": len(added), "skipped": skipped}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for item in skipped:
        where = f"line {item['line']}" if "line" in item else f"channel {item['id']}"
        click.echo(f"skipped {where}: {item['why']}")
    click.echo(f"{len(entries)} entries: {len(added)} added, {len(skipped)} skipped")
