"""``streamctl install``: put a host's files in place, from the installed package.

What it writes (under ``--prefix`` when given; nothing outside it then):

* ``/etc/systemd/system/``: streamkeeper.target and its services, rendered with the
  paths of the settings (hls_dir, state_dir, log_dir), the settings file and the
  directory of the installed console scripts;
* ``/etc/streamkeeper/streamkeeper.toml``: an example settings file, every key commented
  with its default (only when there is none: an operator's file is never replaced);
* ``/etc/nginx/conf.d/streamkeeper.conf``: what ``streamctl nginx-config`` renders;
* ``/etc/logrotate.d/streamkeeper``: the logrotate file for the streams access log.

Without ``--prefix`` it also creates the system user and the directories (owned by that
user).  ``--dry-run`` prints all of it and changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import re
import shutil
import subprocess
import sys

import click

from streamstate.cli_options import settings_options
from streamstate.files import write_atomic
from streamstate.nginx_config import render_logrotate, render_nginx_config
from streamstate.settings import SPECS, shown_value
from streamstate.templates import fill, package_file

SYSTEMD_DIR = "systemd"
UNITS = (
    "streamkeeper.target",
    "streamkeeper-egress.service",
    "streamkeeper-launcher.service",
    "streamkeeper-heartbeatd.service",
    "streamkeeper-reaper.service",
    "streamkeeper-streams.service",
)
DEFAULT_USER = "streamkeeper"


def render_unit(name: str, values: dict) -> str:
    """One unit from its template (streamstate.templates, as the nginx snippet): {{key}}
    replaced, the shared sandbox block inserted."""
    hardening = package_file(SYSTEMD_DIR, "_hardening.conf").rstrip()
    try:
        return fill(package_file(SYSTEMD_DIR, name), {**values, "hardening": hardening})
    except KeyError as exc:
        raise ValueError(f"{name}: {exc.args[0]}") from None


def example_settings() -> str:
    """Every key, commented out with its default and what it means."""
    lines = [
        "# streamkeeper settings: every key with its default (uncomment to change).",
        "# Precedence: default < this file < STREAMKEEPER_<KEY> < command-line flags.",
        "",
    ]
    for spec in SPECS:
        if spec.key in ("providers", "quality_profiles", "host_id"):
            continue
        default = shown_value(spec.key, spec.parse(spec.default()))
        lines += [f"# {spec.help}", f"# {spec.key} = {json.dumps(default)}", ""]
    lines += [
        "# host_id: default the hostname",
        '# host_id = "stream-1"',
        "",
        "# Provider accounts: defaults for their channels and a connection limit.",
        "# [providers.acme]",
        '# match = "http://provider.example:8080/live/USER/"',
        "# max_streams = 2",
        '# proxy = "socks5h://127.0.0.1:40000"',
        "",
        "# Quality profiles: each replaces the built-in one of its name (copy, low, medium, high).",
        "# [quality_profiles.low]",
        '# video = ["-c:v", "libx264", "-preset", "veryfast", "-vf", "scale=-2:480", "-b:v", "800k"]',
        '# audio = ["-c:a", "aac", "-b:a", "96k"]',
        "",
    ]
    return "\n".join(lines)


@dataclasses.dataclass
class Plan:
    """What install does, in order: files to write and commands to run."""

    files: list[tuple[str, str, int]] = dataclasses.field(default_factory=list)  # path, text, mode
    directories: list[str] = dataclasses.field(default_factory=list)
    kept: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # path, why
    user: str = DEFAULT_USER


# What a unit file may hold as a path or a name, as it is: no space (ExecStart= splits
# there), no % (a systemd specifier), no quote, backslash or control character.
_UNIT_SAFE_RE = re.compile(r"[A-Za-z0-9_./+@:=,-]+")
# Hidden from the services by their sandbox (ProtectHome=, PrivateTmp=).
_SANDBOXED_AWAY = ("/home/", "/root/", "/run/user/", "/tmp/", "/var/tmp/")


class InstallError(ValueError):
    """A value that cannot go into a unit as it is; the message names it."""


def check_unit_values(values: dict, *, sandbox: bool = True) -> None:
    for name, value in values.items():
        if not _UNIT_SAFE_RE.fullmatch(str(value)):
            raise InstallError(
                f"{name} {str(value)[:120]!r}: a unit file takes letters, digits and "
                "_ . / + @ : = , - only here (no space, %, quote or control character)"
            )
    if not sandbox:
        return
    paths = {
        **{k: values[k] for k in ("hls_dir", "state_dir", "log_dir", "bin_dir")},
        "python": os.path.join(values["bin_dir"], "python"),
    }  # a venv's python links to the real one
    for name, path in paths.items():
        real = os.path.realpath(str(path)) + "/"
        if real.startswith(_SANDBOXED_AWAY):
            raise InstallError(
                f"{name} {path} (really {real.rstrip('/')}) is under "
                f"{', '.join(p.rstrip('/') for p in _SANDBOXED_AWAY)}, which the units' "
                "sandbox hides (ProtectHome=, PrivateTmp=): install the venv under /opt "
                "with a system Python, and keep the directories out of them"
            )


def build_plan(settings, prefix: str, bin_dir: str, user: str, config_path: str) -> Plan:
    def under(path: str) -> str:
        return os.path.join(prefix, path.lstrip("/")) if prefix else path

    values = {
        "bin_dir": bin_dir,
        "config_path": config_path,
        "user": user,
        "group": user,
        "hls_dir": settings.hls_dir,
        "state_dir": settings.state_dir,
        "log_dir": settings.log_dir,
    }
    check_unit_values(values, sandbox=not prefix)  # a packager's prefix may be anywhere
    plan = Plan(user=user)
    for name in UNITS:
        plan.files.append((under(f"/etc/systemd/system/{name}"), render_unit(name, values), 0o644))
    settings_file = under(config_path)
    if os.path.exists(settings_file):
        plan.kept.append((settings_file, "exists; `streamctl config` shows the effective settings"))
    else:
        plan.files.append((settings_file, example_settings(), 0o640))
    plan.files.append((under("/etc/nginx/conf.d/streamkeeper.conf"), render_nginx_config(settings), 0o644))
    debian_rotates = "/etc/logrotate.d/nginx"
    if not prefix and settings.access_log.startswith("/var/log/nginx/") and os.path.exists(debian_rotates):
        # Debian's nginx file rotates /var/log/nginx/*.log already (create, then nginx reopens
        # on USR1): a second entry for the same file is an error to logrotate.
        plan.kept.append((debian_rotates, f"it rotates {settings.access_log}: no logrotate file of ours"))
    else:
        plan.files.append((under("/etc/logrotate.d/streamkeeper"), render_logrotate(settings), 0o644))
    plan.directories = [under(d) for d in (settings.hls_dir, settings.state_dir, settings.log_dir)]
    return plan


@click.command("install")
@settings_options
@click.option(
    "--prefix",
    metavar="DIR",
    default="",
    help="Install under DIR (for packagers and tests): touches nothing outside it, creates no user.",
)
@click.option("--dry-run", is_flag=True, help="Print what would be done; change nothing.")
@click.option("--user", "user", default=DEFAULT_USER, show_default=True, help="The system user the services run as.")
@click.option(
    "--bin-dir",
    metavar="DIR",
    default=os.path.dirname(os.path.abspath(sys.argv[0])),
    show_default="the directory of this streamctl",
    help="Where the console scripts (stream-launcher, ...) are installed.",
)
def install_command(settings_loader, prefix, dry_run, user, bin_dir):
    """Install this host's systemd units, example settings, nginx conf.d file and logrotate
    file, from the installed package; create the user and the directories.

    Prints what it did and what to run next. Exit codes: 0 done, 1 a step failed (the
    line says which), 2 bad settings.
    """
    settings = settings_loader()
    config_path = settings.config_path or "/etc/streamkeeper/streamkeeper.toml"
    try:
        plan = build_plan(settings, prefix, bin_dir, user, os.path.abspath(config_path))
    except InstallError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    act = "would" if dry_run else "did"
    if not prefix:
        _ensure_user(user, dry_run)
    for directory in plan.directories:
        if not dry_run:
            os.makedirs(directory, mode=0o755, exist_ok=True)
            os.chmod(directory, 0o755)  # whatever the umask: nginx reads hls_dir
            if not prefix and os.geteuid() == 0:
                shutil.chown(directory, user, user)
        click.echo(f"{act} create {directory}" + ("" if prefix else f" (owner {user})"))
    for path, text, mode in plan.files:
        if not dry_run:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_atomic(path, text.encode(), mode)
        click.echo(f"{act} write {path}")
    for path, why in plan.kept:
        click.echo(f"kept {path} ({why})")
    if not prefix and os.path.exists("/etc/nginx/sites-enabled/default"):
        click.echo(
            "note: /etc/nginx/sites-enabled/default is nginx's default_server and would answer "
            "/live/ itself on the same port: remove it (or set nginx_listen to another port)"
        )
    click.echo("next:")
    if prefix:
        click.echo(f"  systemd-analyze verify {prefix}/etc/systemd/system/streamkeeper-*.service")
    click.echo("  systemctl daemon-reload && systemctl enable --now streamkeeper.target")
    click.echo("  nginx -t && nginx -s reload")
    click.echo("  streamctl doctor")


def _ensure_user(user: str, dry_run: bool) -> None:
    try:
        pwd.getpwnam(user)
        click.echo(f"user {user} exists")
        return
    except KeyError:
        pass
    argv = [
        "useradd",
        "--system",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        "/usr/sbin/nologin",
        user,
    ]
    if dry_run:
        click.echo(f"would run {' '.join(argv)}")
        return
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        click.echo(f"error: cannot create user {user}: {getattr(exc, 'stderr', '') or exc}", err=True)
        raise SystemExit(1) from None
    click.echo(f"did create user {user}")
