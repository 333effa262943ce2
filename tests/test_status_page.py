"""The operators' status page (GET /status on the launcher), opened in headless Chromium, and
the Grafana dashboard shipped in contrib/: every metric it names is exported."""

import json
import os
import re
import subprocess
import time
import urllib.request

import pytest

from streamstate import keys
from tests.conftest import REPO
from tests.helpers import add_channel, first_request, free_port, wait_for

pytestmark = pytest.mark.e2e

PLAYERS = os.path.join(REPO, "tests", "players")
ARTIFACTS = os.environ.get("STREAMKEEPER_TEST_ARTIFACTS", os.path.join(REPO, "test-artifacts"))
HOSTILE = "<img src=x onerror=alert(1)>"


def test_the_status_page_shows_every_stream_as_text_and_no_token(stack, channel_id):
    """A running channel (started with a token), a failed one whose reason is markup, and the
    chart's samples: the page shows them, runs no markup from Redis, shows no token, and is
    not on nginx's public port.  Its screenshot stays in test-artifacts/status-page.png."""
    add_channel(stack, channel_id)
    assert first_request(stack.playlist_url(channel_id, "?token=s3cr3t-viewer"))[0] == 200
    stack.redis.set(keys.failed_key(1702), json.dumps({"reason": HOSTILE, "host": "h", "at": time.time()}), ex=120)
    os.makedirs(ARTIFACTS, exist_ok=True)
    screenshot = os.path.join(ARTIFACTS, "status-page.png")
    try:
        result = subprocess.run(
            [
                "node",
                os.path.join(PLAYERS, "page_shot.mjs"),
                stack.launcher_url("/status"),
                "--wait-for",
                channel_id,
                "--screenshot",
                screenshot,
                "--timeout",
                "30",
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        page = json.loads(result.stdout)
        assert page["errors"] == []
        text = page["text"]
        assert re.search(rf"{channel_id}\s+running", text) and "1702" in text
        assert HOSTILE in text  # shown as text, never run as markup
        assert "s3cr3t" not in text and stack.upstream_url(f"ch{channel_id}") not in text
        assert os.path.getsize(screenshot) > 0
        data = json.loads(urllib.request.urlopen(stack.launcher_url("/status.json"), timeout=10).read())
        assert data["history"] and {"t", "streams", "viewers"} <= set(data["history"][-1])
        assert "s3cr3t" not in json.dumps(data)
        assert first_request(stack.nginx_url("/status"))[0] == 404  # not on the public port
    finally:
        stack.launcher_json(f"/channel/{channel_id}/stop", "POST")
        stack.redis.delete(keys.failed_key(1702))


def exported(url: str) -> set[str]:
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    return {line.split("{", 1)[0].split(" ", 1)[0] for line in body.splitlines() if line and not line.startswith("#")}


def test_every_metric_the_grafana_dashboard_names_is_exported(stack, daemons, tmp_path):
    with open(os.path.join(REPO, "contrib", "grafana", "streamkeeper.json")) as handle:
        dashboard = json.load(handle)
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    named = {name for expr in exprs for name in re.findall(r"\bstreamkeeper_[a-z_]+", expr)}
    assert len(named) >= 15
    port = free_port()
    access_log = tmp_path / "access.log"
    access_log.write_text("")
    config = tmp_path / "heartbeatd.toml"
    config.write_text(
        f'redis_url = "{stack.settings["redis_url"]}"\naccess_log = "{access_log}"\n'
        f'state_dir = "{tmp_path}/state"\nmetrics_listen = "127.0.0.1:{port}"\n'
    )
    daemon = daemons("heartbeatd", "--config", str(config))
    heartbeat = wait_for(
        lambda: _scrape(f"http://127.0.0.1:{port}/metrics"), timeout=20, message="heartbeatd's metrics"
    )
    launcher = exported(stack.launcher_url("/metrics"))
    missing = named - launcher - heartbeat
    assert not missing, f"named by the dashboard, exported by nobody: {sorted(missing)}"
    assert daemon.stop() == 0


def _scrape(url: str) -> set[str] | None:
    try:
        return exported(url)
    except OSError:
        return None
