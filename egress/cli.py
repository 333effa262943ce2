"""``stream-egress``: the relay every upstream connection of this host's streams goes through."""

from __future__ import annotations

from streamstate import early_signals  # first: signals from the first instant

# isort: split

import asyncio
import logging

import click

from streamstate import lease
from streamstate.cli_options import log_level_option, settings_options
from streamstate.daemon import configure_logging, notify_until_stopped, sd_notify
from streamstate.redis_client import redis_for

log = logging.getLogger("streamkeeper.egress")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@settings_options
@click.option("--listen", metavar="HOST:PORT", help="Loopback address to listen on (overrides egress_listen).")
@log_level_option
def main(settings_loader, listen, log_level):
    """Relay FFmpeg's and the resolvers' upstream connections, and police them.

    FFmpeg gets this relay as its http_proxy (with a per-stream ticket the launcher
    writes under state_dir/egress/); the relay connects directly or through the
    channel's proxy (http://, socks5://, socks5h://), refuses addresses in
    upstream_deny and this host's own services (403), and refuses to connect at
    all when a configured proxy cannot be used (502, fail closed).

    Run it beside the launcher, as its own service: a launcher restart leaves every
    stream and its connections running. GET /connections shows the open upstream
    connections per channel.
    Exit codes: 0 stopped, 1 cannot listen, 2 bad settings.
    """
    settings = settings_loader(egress_listen=listen)
    configure_logging(log_level.upper())
    raise SystemExit(asyncio.run(serve(settings)))


# An error the event loop reports on its own (out of descriptors at accept, say) comes back
# on every retry; one line per this many seconds says it without flooding the journal.
LOOP_ERROR_EVERY = 60.0


class _RateLimitedLoopErrors:
    """The loop's exception handler: one log line per kind of error per LOOP_ERROR_EVERY
    seconds, with how many were not shown."""

    def __init__(self):
        self.last: dict[str, tuple[float, int]] = {}

    def __call__(self, loop, context) -> None:
        message = context.get("message") or "event loop error"
        exc = context.get("exception")
        kind = f"{message}: {exc}" if exc else message
        now = loop.time()
        shown_at, hidden = self.last.get(kind, (None, 0))
        if shown_at is not None and now - shown_at < LOOP_ERROR_EVERY:
            self.last[kind] = (shown_at, hidden + 1)
            return
        self.last[kind] = (now, 0)
        log.error("%s%s", kind, f" ({hidden} more like it not shown)" if hidden else "")


async def serve(settings) -> int:
    from .connect import CHUNK
    from .relay import EgressRelay

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in early_signals.STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)  # only a flag; the work is below
    if early_signals.received():
        log.info("%s during start-up: exiting", early_signals.received())
        return 0
    loop.set_exception_handler(_RateLimitedLoopErrors())
    relay = EgressRelay(settings)
    host, _, port = settings.egress_listen.rpartition(":")
    try:
        server = await asyncio.start_server(
            relay.handle, host.strip("[]"), int(port), limit=CHUNK, backlog=1024, reuse_address=True
        )
    except OSError as exc:
        log.error("cannot listen on %s: %s", settings.egress_listen, exc)
        return 1
    log.info(
        "listening on %s (allow %s; deny %s)",
        settings.egress_listen,
        ", ".join(map(str, settings.upstream_allow)) or "nothing extra",
        ", ".join(map(str, settings.upstream_deny)) or "nothing",
    )
    lease_keeper = asyncio.create_task(_hold_lease(relay, settings, stop)) if lease.fencing_on(settings) else None
    sd_notify("READY=1\nSTATUS=listening on " + settings.egress_listen)
    await notify_until_stopped(
        stop,
        lambda: (
            f"{sum(relay.open.values())} upstream connection(s) of {len(relay.open)} channel(s); refused "
            f"{relay.counters['refused_address']} address(es), {relay.counters['refused_proxy']} for the proxy"
        ),
    )
    if lease_keeper is not None:
        await lease_keeper
    log.info("exiting: %d upstream connection(s) are cut", sum(relay.open.values()))
    sd_notify("STOPPING=1")
    server.close()
    return 0


async def _hold_lease(relay, settings, stop: asyncio.Event) -> None:
    """This host's lease (streamstate.lease): the relay holds every upstream connection, so it
    cuts them all when the lease lapses, before another host may take their slots."""
    held = lease.HostLease(redis_for(settings, once=True), settings.host_id, settings.host_timeout)

    def fence(age: float | None) -> None:
        cut = relay.fence()
        log.error(
            "fenced: this host's Redis lease was not renewed for %s (fence after %g s, host_timeout %g s); "
            "cut %d upstream connection(s), refusing new ones until it is renewed",
            "its whole start" if age is None else f"{age:.1f} s",
            lease.fence_after(settings.host_timeout),
            settings.host_timeout,
            cut,
        )

    def unfence(lapsed: bool, began: float) -> None:
        relay.unfence(began)
        log.warning(
            "lease %s: no longer fenced; upstream connections are taken again%s",
            "held anew" if lapsed else "renewed",
            " (tickets written before it began are void)" if lapsed else "",
        )

    await lease.keep_lease(held, stop, fence, unfence)
