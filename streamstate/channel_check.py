"""The one channel check: a channel record fit to run on this host's settings, and the
upstream the launcher uses for it.  `streamctl channels add` and `import`, the legacy start
route, the launcher (before a start and at adoption) and `streamctl doctor` all call it."""

from __future__ import annotations

import re

from .channels import Channel, ChannelError, check_source_url, recheck
from .upstreams import Upstream, upstream_of


def validate(channel: Channel, settings) -> Upstream:
    """Every field checked again (Redis contents are hostile), every source a URL FFmpeg may
    read, a quality this host has a profile for, a configured provider; the channel's
    upstream.  ChannelError names the channel and the field."""
    channel = recheck(channel)
    for source in channel.sources:
        check_source_url(channel.id, source)
    profiles = settings.quality_profiles
    if channel.quality not in profiles:
        shown = channel.quality if re.fullmatch(r"[A-Za-z0-9_-]{1,32}", channel.quality) else "?"
        raise ChannelError(f"channel {channel.id}: unknown quality {shown!r} (profiles: {', '.join(sorted(profiles))})")
    return upstream_of(channel, settings)
