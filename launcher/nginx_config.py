"""Render the nginx snippet from the settings (template: nginx/streamkeeper.conf.template)."""
from __future__ import annotations

import math
import os
import re

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(REPO_ROOT, "nginx", "streamkeeper.conf.template")
LOG_FORMAT_FILE = os.path.join(REPO_ROOT, "nginx", "streamkeeper-log-format.conf")


def log_format_directive() -> str:
    with open(LOG_FORMAT_FILE, encoding="utf-8") as handle:
        return next(line.rstrip("\n") for line in handle if line.startswith("log_format"))


def render_nginx_config(settings) -> str:
    with open(TEMPLATE, encoding="utf-8") as handle:
        template = handle.read()
    return fill(template, dict(
        config_source=settings.config_path or "built-in defaults",
        log_format_directive=log_format_directive(),
        launcher_listen=settings.launcher_listen,
        nginx_listen=settings.nginx_listen,
        access_log=settings.access_log,
        hls_dir=settings.hls_dir.rstrip("/") or "/",
        segment_max_age=int(max(60, float(settings.hls_time) * int(settings.hls_list_size) * 2)),
        start_timeout=f"{float(settings.start_timeout):g}",
        proxy_read_timeout=int(math.ceil(float(settings.start_timeout))) + 10,
    ))


def fill(template: str, values: dict) -> str:
    """Replace {{name}} placeholders (nginx's own $variables are left alone)."""
    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"nginx template: no value for {{{{{name}}}}}")
        return str(values[name])
    return re.sub(r"\{\{([a-z_]+)\}\}", value, template)
