"""``streamctl``: the operators' command line."""

from __future__ import annotations

import json

import click
import redis

from streamstate.cli_options import group_settings_options, settings_options
from streamstate.daemon import configure_logging
from streamstate.files import write_atomic
from streamstate.nginx_config import render_edge_config, render_nginx_config
from streamstate.reaping import Reaper, run_one
from streamstate.settings import SPEC_BY_KEY

from .channels import channels_group
from .doctor import doctor_command
from .install import install_command
from .streams import logs_command, start_command, status_command, stop_command


class StreamctlGroup(click.Group):
    """Expected failures are one line, never a traceback: Redis unreachable (exit 1)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except redis.RedisError as exc:
            click.echo(f"error: redis unreachable: {exc}", err=True)
            raise SystemExit(1) from None


@click.group(cls=StreamctlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@group_settings_options
def main():
    """Operate streamkeeper: settings, channels, streams, diagnosis.

    Every command reads the same settings as the services: --config PATH (or
    $STREAMKEEPER_CONFIG, else /etc/streamkeeper/streamkeeper.toml), then
    STREAMKEEPER_<KEY> environment variables, then flags.
    """


main.add_command(channels_group)
main.add_command(start_command)
main.add_command(stop_command)
main.add_command(status_command)
main.add_command(logs_command)
main.add_command(doctor_command)
main.add_command(install_command)


@main.command("config")
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON: {key: {value, source}}.")
def config_command(settings_loader, as_json):
    """Print the effective settings and where each value came from.

    Exit codes: 0 valid, 2 a setting is invalid (the line names it).
    """
    settings = settings_loader()
    if as_json:
        payload = {key: {"value": settings.shown(key), "source": settings.sources[key]} for key in settings.values}
        click.echo(json.dumps({"config_file": settings.config_path, "settings": payload}, indent=2))
        return
    click.echo(f"# config file: {settings.config_path or '(none: built-in defaults)'}")
    width = max(len(key) for key in settings.values)
    for key in settings.values:
        click.echo(
            f"{key:<{width}} = {json.dumps(settings.shown(key)):<40} # {settings.sources[key]}"
            f" - {SPEC_BY_KEY[key].help}"
        )


@main.command("nginx-config")
@settings_options
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True),
    help="Write to this file (atomically) instead of standard output.",
)
@click.option(
    "--edge",
    is_flag=True,
    help="Render the edge's snippet instead (a multi-host set-up): /live/ to one of `hosts` by channel id.",
)
@click.option(
    "--listen",
    metavar="ADDRESS",
    help="With --edge: where the edge listens (overrides nginx_listen, which on a host is its own).",
)
def nginx_config_command(settings_loader, output, edge, listen):
    """Print the nginx conf.d snippet rendered from the settings.

    Exit codes: 0 rendered, 2 a setting cannot be rendered (the line says which).

    A streaming host's snippet holds the log_format heartbeatd parses and a server block
    on nginx_listen whose /live/ location logs to access_log and falls back to the
    launcher at launcher_listen. --edge renders the edge's instead: a server block on
    nginx_listen that sends each channel's requests to one of `hosts`, by a consistent
    hash of the channel id. Include it in nginx's http {} block, then
    `nginx -t && nginx -s reload`.
    """

    try:
        settings = settings_loader(nginx_listen=listen) if listen else settings_loader()
        text = render_edge_config(settings) if edge else render_nginx_config(settings)
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    if not output:
        click.echo(text, nl=False)
        return

    write_atomic(output, text.encode())
    click.echo(f"wrote {output}", err=True)


@main.command("reap")
@settings_options
@click.option("--dry-run", is_flag=True, help="Print what the pass would do; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the pass summary as JSON.")
def reap_command(settings_loader, dry_run, as_json):
    """Run one reaper pass now (the same pass stream-reaper runs every reaper_interval).

    Exit codes: 0 done, 1 Redis unreachable (nothing stopped), 2 bad settings.
    """

    configure_logging("INFO")
    raise SystemExit(run_one(Reaper(settings_loader(), dry_run=dry_run), as_json))
