"""The URL paths nginx, the launcher and heartbeatd agree on."""

from __future__ import annotations

# Where the launcher's X-Accel-Redirect sends nginx for a cold start's answer: an
# `internal` location of the rendered snippet that serves the playlist file.  A viewer
# asking for it gets 404; a 200 logged under it is a first viewer's playlist.
ACCEL_PREFIX = "/_streamkeeper/playlist/"

# Where a host's nginx forwards a request for a channel another host runs: an `internal`
# location that proxies /live/<file> to that host's nginx, PEER_PREFIX<ip:port>/<file>.
PEER_PREFIX = "/_streamkeeper/host/"
# Set by a host on a request it forwards: the peer never forwards it again (no loop).
FORWARDED_HEADER = "X-Streamkeeper-Forwarded"

# The start route's answer to an id that is not one, as a script reads it (JSON "kind"):
# doctor tells the launcher from whatever else might listen on launcher_listen by it.
INVALID_CHANNEL_ID_KIND = "invalid_channel_id"
