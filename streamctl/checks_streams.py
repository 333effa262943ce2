"""doctor's checks of the streams: stale records as the reaper would judge them, junk in
streams:active, FFmpegs no record knows, orphan provider slots, this host's streams in
back-off or failed, empty or stale playlists."""

from __future__ import annotations

import os
import re
import stat
import time

from streamstate import files, hls, keys, lease, providers, runs
from streamstate.reap_rules import ActionKind
from streamstate.reaping import Reaper, RedisUnavailable
from streamstate.redact import printable
from streamstate.runs import RunState
from streamstate.streams_view import collect_streams, hosts_view

from .checks_common import (
    FAIL,
    OK,
    WARN,
    Check,
)


def _streams_not_playing(client, settings) -> list[Check]:
    """This host's streams that are waiting to start their next FFmpeg (back-off), and
    channels that failed here and answer 503 for failed_cooldown: each with its last error."""
    found = []
    active = runs.active_channels(client)
    for channel, (record, *_rest) in zip(active, runs.read_batch(client, active) if active else []):
        if record is None or record.host != settings.host_id:
            continue
        if record.state is RunState.BACKOFF:
            found.append(
                Check(
                    FAIL,
                    f"channel {channel}",
                    f"not playing: waiting to restart FFmpeg (restart "
                    f"{record.restarts}); last error: {record.last_error or 'none recorded'}; "
                    f"`streamctl logs {channel}` shows FFmpeg's own lines",
                )
            )
        elif record.state is RunState.STARTING and record.restarts:
            found.append(
                Check(
                    WARN,
                    f"channel {channel}",
                    f"being replaced (restart {record.restarts}); "
                    f"last error: {record.last_error or 'none recorded'}",
                )
            )
    for failed in runs.failed_channels(client):
        if failed["host"] == settings.host_id:
            found.append(
                Check(
                    FAIL,
                    f"channel {failed['id']}",
                    f"failed: {failed['reason']}; starts answer 503 "
                    f"for {failed['cooldown_seconds']:g} s more (failed_cooldown); "
                    f"`streamctl logs {failed['id']}` shows why",
                )
            )
    return found


def _records_without_channels(client, settings) -> list[Check]:
    """This host's running streams whose channel record is gone (a Redis that lost its data
    keeps the streams, not the catalogue): they play on, but are never restarted."""
    active = runs.active_channels(client)
    if not active:
        return []
    present = client.mget([keys.channel_key(c) for c in active])
    found = []
    for channel, (record, *_rest), raw in zip(active, runs.read_batch(client, active), present):
        if raw is None and record is not None and record.host in ("", settings.host_id):
            found.append(
                Check(
                    WARN,
                    f"channel {channel}",
                    f"runs, but its channel record (channel:{channel}) "
                    "is gone (a Redis restarted without its data?): it will not be restarted if "
                    "its FFmpeg ends; add it again (`streamctl channels add` or `import`)",
                )
            )
    return found


def check_streams(client, settings) -> list[Check]:
    """Every stale record, as the reaper's next pass would judge it (its run record, or the
    old host's keys alone: stream:<id>:pid, :started, :last_access), junk in streams:active,
    provider slots no running stream holds, FFmpegs no record knows; empty or stale
    playlists in hls_dir."""
    try:
        summary = Reaper(settings, client, dry_run=True).run_pass()
    except RedisUnavailable as exc:
        return [Check(FAIL, "streams", str(exc))]
    problems = _records_checks(client, settings, summary)
    problems += _streams_not_playing(client, settings) + _records_without_channels(client, settings)
    slots = _slot_checks(client, settings)
    try:
        problems += _playlist_checks(settings)
    except OSError as exc:
        return problems + slots + [Check(FAIL, "hls_dir", f"{settings.hls_dir}: {exc}")]
    if not problems:
        problems.append(Check(OK, "streams", f"{summary.streams} record(s), none stale; no empty or stale playlist"))
    return problems + slots


def _records_checks(client, settings, summary) -> list[Check]:
    """What the dry pass found stale (this host's), junk in streams:active, orphan FFmpegs."""
    found = []
    for action in summary.actions:
        if action.kind is ActionKind.STALE and action.host is None:  # another host's: its own doctor
            kind = "its run record" if action.run_id else "the old host's keys (no run record)"
            why = f"stale record ({kind}): {action.why}; `streamctl reap` clears it (the reaper does at its next pass)"
            found.append(Check(FAIL, f"channel {action.channel}", why))
    for member in runs.read_active(client).invalid:
        why = f"holds {runs.shown_member(member)}, no channel id: `streamctl reap` removes it"
        found.append(Check(FAIL, "streams:active", why))
    if summary.orphan_processes:
        why = (
            f"{summary.orphan_processes} FFmpeg(s) writing into {settings.hls_dir} that no record knows: "
            "`streamctl reap` stops them"
        )
        found.append(Check(FAIL, "streams", why))
    return found


def _slot_checks(client, settings) -> list[Check]:
    """Provider slots held by no running stream (the next start on the account reclaims them)."""
    found = []
    grace = settings.start_timeout + 10
    for name in sorted(settings.providers):
        stale = providers.stale_slots(client, name, grace)
        if stale:
            shown = ", ".join(runs.shown_member(c) if not keys.CHANNEL_ID_RE.fullmatch(c) else c for c in stale)
            why = f"slot(s) held by no running stream: {shown}; the next start on the account reclaims them"
            found.append(Check(WARN, f"provider {name}", why))
    return found


def _playlist_checks(settings) -> list[Check]:
    """Each viewers' playlist in hls_dir: a regular file, listing a segment, not frozen past
    the freeze limit.  OSError when hls_dir cannot be listed."""
    stale_after = hls.freeze_limit(settings.hls_time, settings.start_timeout)
    now = time.time()
    found = []
    for name in sorted(os.listdir(settings.hls_dir)):
        match = re.fullmatch(r"stream_(%s)\.m3u8" % keys.CHANNEL_ID_PATTERN, name)
        if not match:
            continue
        path, channel = os.path.join(settings.hls_dir, name), match.group(1)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read below
            found.append(Check(FAIL, f"channel {channel}", f"{name} is not a regular file; remove it"))
            continue
        age = now - info.st_mtime
        media = files.playlist_media(path)
        fix = (
            f"`streamctl stop {channel}` if it runs, else delete {path} (the reaper does after "
            f"orphan_age, {settings.orphan_age:g} s)"
        )
        if media is not None and not media[1]:
            why = f"{name} lists no segment: nginx serves an empty playlist; {fix}"
            found.append(Check(FAIL, f"channel {channel}", why))
        elif age > stale_after:
            why = (
                f"{name} not updated for {age:.0f} s: players see a frozen stream; the launcher publishes it: "
                f"if the launcher is down (its check above), start it; else {fix}"
            )
            found.append(Check(FAIL, f"channel {channel}", why))
    return found


def check_hosts(client, settings) -> list[Check]:
    """Every host of the cluster: alive (its lease standing) and how fresh its lease is, its
    streams and slots.  This host without a lease in a multi-host set-up fails (it is fenced:
    it pulls nothing); another host gone with streams recorded is a warning (the reapers
    clear them once its lease has expired; its channels start elsewhere meanwhile)."""
    view = hosts_view(client, settings, collect_streams(client, settings, {})["streams"])
    found = _cluster_warnings(view, settings)
    for host in view:
        name, label = printable(host["host"]), f"host {printable(host['host'])}"
        what = f"{host['streams']} stream(s), {host['slots']} provider slot(s)"
        address = runs.host_address(client, host["host"]) if settings.hosts and not host["this_host"] else None
        if host["alive"] and settings.hosts and not host["this_host"] and address not in settings.hosts:
            found.append(
                Check(
                    WARN,
                    label,
                    f"alive, but its address ({printable(address or 'none said')}) is not one of `hosts`: a channel "
                    "it runs cannot be forwarded to it; give it the same `hosts` and its host_address",
                )
            )
        elif host["alive"]:
            age = host["lease_age_seconds"]
            renewed = f"lease renewed {age:.0f} s ago" if age is not None else "its key has no expiry"
            found.append(Check(OK, label, f"alive, {renewed}; {what}"))
        elif host["this_host"] and lease.fencing_on(settings):
            found.append(
                Check(
                    FAIL,
                    label,
                    f"this host holds no lease (host:{name} is gone): it is fenced and pulls nothing; "
                    "are its launcher and relay running, and do they reach Redis?",
                )
            )
        elif host["streams"]:
            found.append(
                Check(
                    WARN,
                    label,
                    f"not seen for host_timeout ({settings.host_timeout:g} s); {what} recorded: the reapers "
                    "clear them, and its channels start on another host at their next request",
                )
            )
    return found


def _cluster_warnings(view: list[dict], settings) -> list[Check]:
    """Other hosts sharing this Redis without `hosts` set here (no fencing); this host's
    address not one of `hosts` (nothing can be forwarded to it)."""
    found = []
    others = [h["host"] for h in view if h["alive"] and not h["this_host"]]
    if others and not settings.hosts:
        found.append(
            Check(
                WARN,
                "hosts",
                f"other hosts share this Redis ({printable(', '.join(others))}) but `hosts` is not set here: no "
                "fencing (a host cut off from Redis keeps pulling while another takes its slots); set `hosts`",
            )
        )
    if settings.hosts and settings.host_address not in settings.hosts:
        found.append(
            Check(
                WARN,
                "host_address",
                f"this host's address {settings.host_address or '(none)'} is not one of `hosts`: other hosts "
                "cannot forward a channel it runs to it; set host_address to its entry of `hosts`",
            )
        )
    return found
