"""doctor's checks of the streams: stale records as the reaper would judge them, junk in
streams:active, FFmpegs no record knows, orphan provider slots, this host's streams in
back-off or failed, empty or stale playlists."""

from __future__ import annotations

import os
import re
import stat
import time

from streamstate import files, hls, keys, providers, runs
from streamstate.reaping import ActionKind, Reaper, RedisUnavailable
from streamstate.runs import RunState

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
    playlists in hls_dir; free space."""

    found = []
    try:
        summary = Reaper(settings, client, dry_run=True).run_pass()
    except RedisUnavailable as exc:
        return [Check(FAIL, "streams", str(exc))]
    channels = summary.streams
    for action in summary.actions:
        if action.kind is ActionKind.STALE and action.host is None:  # another host's: its own doctor
            kind = "its run record" if action.run_id else "the old host's keys (no run record)"
            found.append(
                Check(
                    FAIL,
                    f"channel {action.channel}",
                    f"stale record ({kind}): {action.why}; `streamctl reap` clears it "
                    "(the reaper does at its next pass)",
                )
            )
    for member in runs.read_active(client).invalid:
        found.append(
            Check(
                FAIL,
                "streams:active",
                f"holds {runs.shown_member(member)}, no channel id: " "`streamctl reap` removes it",
            )
        )
    if summary.orphan_processes:
        found.append(
            Check(
                FAIL,
                "streams",
                f"{summary.orphan_processes} FFmpeg(s) writing into "
                f"{settings.hls_dir} that no record knows: `streamctl reap` stops them",
            )
        )
    found += _streams_not_playing(client, settings) + _records_without_channels(client, settings)
    grace = settings.start_timeout + 10
    for name in sorted(settings.providers):
        stale = providers.stale_slots(client, name, grace)
        if stale:
            shown = ", ".join(runs.shown_member(c) if not keys.CHANNEL_ID_RE.fullmatch(c) else c for c in stale)
            found.append(
                Check(
                    WARN,
                    f"provider {name}",
                    f"slot(s) held by no running stream: {shown}; " "the next start on the account reclaims them",
                )
            )
    stale_after = hls.freeze_limit(settings.hls_time, settings.start_timeout)
    now = time.time()
    try:
        names = sorted(os.listdir(settings.hls_dir))
    except OSError as exc:
        return found + [Check(FAIL, "hls_dir", f"{settings.hls_dir}: {exc}")]
    for name in names:
        match = re.fullmatch(r"stream_(%s)\.m3u8" % keys.CHANNEL_ID_PATTERN, name)
        if not match:
            continue
        path = os.path.join(settings.hls_dir, name)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read below
            found.append(Check(FAIL, f"channel {match.group(1)}", f"{name} is not a regular file; remove it"))
            continue
        age = now - info.st_mtime
        media = files.playlist_media(path)
        channel = match.group(1)
        fix = (
            f"`streamctl stop {channel}` if it runs, else delete {path} (the reaper does after "
            f"orphan_age, {settings.orphan_age:g} s)"
        )
        if media is not None and not media[1]:
            found.append(
                Check(FAIL, f"channel {channel}", f"{name} lists no segment: nginx serves an empty playlist; {fix}")
            )
        elif age > stale_after:
            found.append(
                Check(
                    FAIL,
                    f"channel {channel}",
                    f"{name} not updated for {age:.0f} s: players see "
                    f"a frozen stream; the launcher publishes it: if the launcher is down (its "
                    f"check above), start it; else {fix}",
                )
            )
    if not [c for c in found if c.check.startswith(("channel ", "streams"))]:
        found.append(Check(OK, "streams", f"{channels} record(s), none stale; no empty or stale playlist"))
    return found
