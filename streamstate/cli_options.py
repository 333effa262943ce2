"""The options every command shares, applied by one decorator (rq's cli/helpers.py)."""

from __future__ import annotations

import functools

import click
from click.core import ParameterSource

from . import keys
from .settings import Settings, SettingsError, load_settings

EXIT_BAD_SETTINGS = 2


# The services' --log-level: the least severe line journalctl gets.
log_level_option = click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="The least severe log line written.",
)


def channel_id_or_exit(text: str) -> str:
    """A command's CHANNEL_ID, checked: the canonical id, or one line and exit 2."""
    try:
        return keys.check_channel_id(text)
    except keys.InvalidChannelId as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_BAD_SETTINGS) from None


def settings_options(func):
    """Add --config and --redis-url; the command receives ``settings_loader``.

    Settings are read lazily, when the command asks: ``settings_loader(**flags)``
    returns the effective Settings or exits 2 with one line naming the key.
    """

    @click.option(
        "--config",
        "config_path",
        metavar="PATH",
        envvar="STREAMKEEPER_CONFIG",
        help="Settings file (TOML). Default: $STREAMKEEPER_CONFIG, else "
        "/etc/streamkeeper/streamkeeper.toml if it exists, else built-in defaults.",
    )
    @click.option("--redis-url", metavar="URL", help="Redis URL (overrides redis_url and $STREAMKEEPER_REDIS_URL).")
    @functools.wraps(func)
    def wrapper(*args, config_path=None, redis_url=None, **kwargs):
        # Given on the group (`streamctl --config X status`): the same options, lower
        # precedence than the subcommand's own.
        context = click.get_current_context()
        shared = context.find_root().obj or {}
        if shared.get("config_path") and context.get_parameter_source("config_path") in (
            ParameterSource.ENVIRONMENT,
            ParameterSource.DEFAULT,
            None,
        ):
            config_path = shared["config_path"]  # a flag beats $STREAMKEEPER_CONFIG
        redis_url = redis_url or shared.get("redis_url")

        def settings_loader(**overrides) -> Settings:
            overrides = {k: v for k, v in overrides.items() if v is not None}
            if redis_url:
                overrides["redis_url"] = redis_url
            try:
                return load_settings(config_path, overrides)
            except SettingsError as exc:
                click.echo(f"error: {exc}", err=True)
                raise SystemExit(EXIT_BAD_SETTINGS) from None

        return func(*args, settings_loader=settings_loader, **kwargs)

    return wrapper


def group_settings_options(group):
    """The same --config and --redis-url on a click group, kept for its subcommands."""

    @click.option(
        "--config",
        "config_path",
        metavar="PATH",
        help="Settings file (TOML), for every subcommand (which may give its own).",
    )
    @click.option("--redis-url", metavar="URL", help="Redis URL, for every subcommand.")
    @functools.wraps(group)
    def wrapper(*args, config_path=None, redis_url=None, **kwargs):
        click.get_current_context().obj = {"config_path": config_path, "redis_url": redis_url}
        return group(*args, **kwargs)

    return wrapper
