"""streamctl against a real redis-server: channels, M3U import, the nginx snippet."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from streamstate import keys
from tests.conftest import REPO


def streamctl(redis_server, *args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "streamctl", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "STREAMKEEPER_CONFIG": os.devnull,
            "STREAMKEEPER_REDIS_URL": redis_server.url,
            **(env or {}),
        },
    )


def test_channels_add_list_rm(redis_server, redis_client):
    result = streamctl(
        redis_server,
        "channels",
        "add",
        "71386",
        "https://up.example/live/71386.ts",
        "--quality",
        "low",
        "--user-agent",
        "UA/1",
        "--referer",
        "https://ref.example/",
        "--header",
        "X-Key: v1",
        "--proxy",
        "http://127.0.0.1:3128",
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(redis_client.get(keys.channel_key(71386)))
    assert record == {
        "source_url": "https://up.example/live/71386.ts",
        "quality": "low",
        "user_agent": "UA/1",
        "referer": "https://ref.example/",
        "headers": {"X-Key": "v1"},
        "proxy": "http://127.0.0.1:3128",
    }
    redis_client.set(keys.channel_key(5), "{broken")
    listed = json.loads(streamctl(redis_server, "channels", "list", "--json").stdout)
    assert [row["id"] for row in listed] == ["5", "71386"]
    assert "not valid JSON" in listed[0]["error"]
    assert streamctl(redis_server, "channels", "rm", "71386").returncode == 0
    assert streamctl(redis_server, "channels", "rm", "71386").returncode == 1
    assert redis_client.exists(keys.channel_key(71386)) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["abc", "http://x/1.ts"], "invalid channel id"),
        (["7", "file:///etc/passwd"], "only http:// and https://"),
        (["7", "http://x/1.ts", "--proxy", "socks4://127.0.0.1:9050"], "proxy refused"),
        (["7", "http://x/1.ts", "--fallback", "file:///etc/passwd"], "fallback_urls refused"),
        (["7", "http://x/1.ts", "--quality", "ultra"], "unknown quality"),
    ],
)
def test_channels_add_refuses_bad_input(redis_server, redis_client, args, message):
    result = streamctl(redis_server, "channels", "add", *args)
    assert result.returncode == 2 and message in result.stderr
    assert redis_client.dbsize() == 0


def test_m3u_import_of_four_thousand_entries(redis_server, redis_client, tmp_path):
    lines = ["#EXTM3U"]
    for n in range(4000):
        if n % 4 == 0:  # id from the number that ends the URL's path
            lines += [
                f'#EXTINF:-1 tvg-id="x{n}" tvg-name="Chan {n}" group-title="News",Chan {n}',
                f"http://up.example/live/user/pass/{100000 + n}.ts",
            ]
        elif n % 4 == 1:  # no number in the path: numeric tvg-id
            lines += [
                f'#EXTINF:-1 tvg-id="{200000 + n}" tvg-name="T {n}" group-title="Sport",T {n}',
                f"https://up.example/play?c=abc{n}",
            ]
        elif n % 4 == 2:  # neither: numbered from --start-id
            lines += [f'#EXTINF:-1 tvg-name="S {n}",S {n}', f"https://up.example/stream/name{n}"]
        else:  # refused source
            lines += [f'#EXTINF:-1 tvg-id="{300000 + n}",Bad {n}', f"rtmp://up.example/live/{n}"]
    lines += ["#EXTINF:-1,duplicate", "http://up.example/live/100000.ts"]
    playlist = tmp_path / "channels.m3u"
    playlist.write_text("\n".join(lines) + "\n")
    result = streamctl(
        redis_server, "channels", "import", str(playlist), "--quality", "copy", "--start-id", "900000", "--json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["entries"] == 4001 and report["added"] == 3000
    reasons = [item["why"] for item in report["skipped"]]
    assert sum("only http:// and https://" in r for r in reasons) == 1000
    assert sum("duplicate" in r for r in reasons) == 1
    first = json.loads(redis_client.get(keys.channel_key(100000)))
    assert first == {
        "source_url": "http://up.example/live/user/pass/100000.ts",
        "quality": "copy",
        "name": "Chan 0",
        "group": "News",
    }
    assert json.loads(redis_client.get(keys.channel_key(200001)))["group"] == "Sport"
    assert redis_client.exists(keys.channel_key(900000), keys.channel_key(900999)) == 2
    again = json.loads(streamctl(redis_server, "channels", "import", str(playlist), "--json").stdout)
    assert again["added"] == 0


def test_rendered_nginx_config_passes_nginx_t(redis_server, tmp_path):
    env = {
        "STREAMKEEPER_NGINX_LISTEN": "127.0.0.1:18123",
        "STREAMKEEPER_LAUNCHER_LISTEN": "127.0.0.1:15123",
        "STREAMKEEPER_HLS_DIR": str(tmp_path / "hls"),
        "STREAMKEEPER_ACCESS_LOG": str(tmp_path / "a.log"),
        "STREAMKEEPER_START_TIMEOUT": "25",
    }
    result = streamctl(redis_server, "nginx-config", env=env)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "listen 127.0.0.1:18123;" in text and "server 127.0.0.1:15123;" in text
    assert "proxy_read_timeout 35s;" in text and f"alias {tmp_path / 'hls'}/$1;" in text
    assert f"access_log {tmp_path / 'a.log'} streamkeeper buffer=32k flush=1s;" in text
    (tmp_path / "sk.conf").write_text(text)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
        f"events {{}}\nhttp {{ include {tmp_path}/sk.conf; }}\n"
    )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    check = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stderr


def test_a_non_loopback_launcher_listen_is_refused(redis_server):
    result = streamctl(redis_server, "config", env={"STREAMKEEPER_LAUNCHER_LISTEN": "0.0.0.0:5000"})
    assert result.returncode == 2 and "launcher_listen" in result.stderr
    allowed = streamctl(
        redis_server,
        "config",
        env={"STREAMKEEPER_LAUNCHER_LISTEN": "0.0.0.0:5000", "STREAMKEEPER_LAUNCHER_ALLOW_REMOTE": "true"},
    )
    assert allowed.returncode == 0


@pytest.mark.parametrize(
    "args",
    [["channels", "list"], ["channels", "add", "5", "http://up.example/5.ts"], ["channels", "rm", "5"], ["status"]],
)
def test_redis_down_is_one_line_and_exit_1(args):
    result = subprocess.run(
        [sys.executable, "-m", "streamctl", "--redis-url", "redis://127.0.0.1:1/0", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "STREAMKEEPER_CONFIG": os.devnull},
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "unreachable" in result.stderr


def test_shared_options_are_accepted_on_the_group_too(redis_server, redis_client, tmp_path):
    """`streamctl --config X status`: the group's flag, for every subcommand; it beats the
    environment, and a subcommand's own flag beats it."""
    config = tmp_path / "sk.toml"
    config.write_text(f'redis_url = "{redis_server.url}"\nhost_id = "from-file"\n')

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "streamctl", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "STREAMKEEPER_CONFIG": "/nonexistent"},
        )

    shown = run("--config", str(config), "config", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["settings"]["host_id"]["value"] == "from-file"
    status = run("--config", str(config), "status")
    assert status.returncode == 0 and "0 stream(s)" in status.stdout  # the summary on stdout
    own = run("--config", "/nonexistent", "config", "--config", str(config))
    assert own.returncode == 0
