"""Redis connections, made lazily, with timeouts so an unreachable Redis is an error, not a hang:
to redis_url's server, or, with redis_sentinels, to whichever server the sentinels name master."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from .redact import redact_url
from .setting_values import split_host_port

CONNECT_TIMEOUT = 2.0
SOCKET_TIMEOUT = 5.0


def registered_script(client, name: str, source: str):
    """A Lua script registered once per client (redis-py reloads it after NOSCRIPT)."""
    cache = client.__dict__.setdefault("_streamkeeper_scripts", {})
    if name not in cache:
        cache[name] = client.register_script(source)
    return cache[name]


def redis_from_url(url: str, *, once: bool = False) -> redis.Redis:
    """A client for ``url``; no connection is made until the first command.  ``once``: each
    command is tried once (no retries with back-off inside a call): for a caller that keeps
    its own cadence and must know at once (the host's lease)."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=SOCKET_TIMEOUT,
        health_check_interval=30,
        **_retries(once),
    )


def _retries(once: bool) -> dict:
    return {"retry": Retry(NoBackoff(), 0)} if once else {}


def redis_for(settings, *, once: bool = False) -> redis.Redis:
    """The client every service and streamctl use (``once``: see redis_from_url).  With redis_sentinels, redis-py's Sentinel
    client: the master is asked of the sentinels at each new connection, so after a failover
    (the old master gone, or demoted: READONLY) the next command reaches the new one;
    redis_url gives only the password and the database number then."""
    if not settings.redis_sentinels:
        return redis_from_url(settings.redis_url, once=once)
    sentinel = Sentinel(
        [split_host_port(address) for address in settings.redis_sentinels],
        sentinel_kwargs={"socket_connect_timeout": CONNECT_TIMEOUT, "socket_timeout": SOCKET_TIMEOUT},
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=SOCKET_TIMEOUT,
    )
    parts = urlsplit(settings.redis_url)
    database = parts.path.strip("/")
    return sentinel.master_for(
        settings.redis_master_name,
        db=int(database) if database.isdigit() else 0,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        ssl=parts.scheme == "rediss",
        health_check_interval=30,
        **_retries(once),
    )


def redis_where(settings) -> str:
    """Where the shared state is, for messages (no password)."""
    if settings.redis_sentinels:
        return f"Redis master {settings.redis_master_name!r} of sentinels {', '.join(settings.redis_sentinels)}"
    return redact_url(settings.redis_url)


# Milliseconds a write that must survive a failover (a provider slot) waits for a replica.
REPLICA_WAIT_MS = 1000


def redis_error_text(exc: Exception, settings) -> str:
    """A Redis failure as one line an operator can act on.  Through Sentinel, a master that
    cannot be found is told apart: no sentinel answered, or they know no master of that name."""
    if settings.redis_sentinels and isinstance(exc, MasterNotFoundError):
        known: set[str] = set()
        answered = []
        for address in settings.redis_sentinels:
            host, port = split_host_port(address)
            client = redis.Redis(
                host=host, port=port, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=SOCKET_TIMEOUT
            )
            try:
                known |= {str(name) for name in client.sentinel_masters()}
            except redis.RedisError:
                continue
            finally:
                client.close()
            answered.append(address)
        if not answered:
            return (
                f"no sentinel answered ({', '.join(settings.redis_sentinels)}): check redis_sentinels and that "
                "redis-sentinel runs there"
            )
        return (
            f"the sentinels ({', '.join(answered)}) know no master named {settings.redis_master_name!r} "
            f"(they know: {', '.join(sorted(known)) or 'none'}): check redis_master_name"
        )
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:300] + "..."
