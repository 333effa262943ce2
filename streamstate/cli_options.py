"""The options every command shares, applied by one decorator (rq's cli/helpers.py)."""
from __future__ import annotations

import functools

import click

from .settings import Settings, SettingsError, load_settings

EXIT_BAD_SETTINGS = 2


def settings_options(func):
    """Add --config and --redis-url; the command receives ``settings_loader``.

    Settings are read lazily, when the command asks: ``settings_loader(**flags)``
    returns the effective Settings or exits 2 with one line naming the key.
    """
    @click.option("--config", "config_path", metavar="PATH", envvar="STREAMKEEPER_CONFIG",
                  help="Settings file (TOML). Default: $STREAMKEEPER_CONFIG, else "
                       "/etc/streamkeeper/streamkeeper.toml if it exists, else built-in defaults.")
    @click.option("--redis-url", metavar="URL",
                  help="Redis URL (overrides redis_url and $STREAMKEEPER_REDIS_URL).")
    @functools.wraps(func)
    def wrapper(*args, config_path=None, redis_url=None, **kwargs):
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
