"""Redis connections, made lazily, with timeouts so an unreachable Redis is an error, not a hang."""

from __future__ import annotations

import redis

CONNECT_TIMEOUT = 2.0
SOCKET_TIMEOUT = 5.0


def registered_script(client, name: str, source: str):
    """A Lua script registered once per client (redis-py reloads it after NOSCRIPT)."""
    cache = client.__dict__.setdefault("_streamkeeper_scripts", {})
    if name not in cache:
        cache[name] = client.register_script(source)
    return cache[name]


def redis_from_url(url: str) -> redis.Redis:
    """A client for ``url``; no connection is made until the first command."""
    return redis.Redis.from_url(
        url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=SOCKET_TIMEOUT, health_check_interval=30
    )
