"""What ships in streamstate/nginx/ agrees with the code, nginx accepts it, and an installed
wheel carries it."""
import os
import shutil
import subprocess
import sys

import pytest

from demo.stack import write_nginx_conf
from heartbeatd.logformat import STREAMKEEPER_LOG_FORMAT, LogLineParser, normalise_format
from tests.conftest import REPO

LOG_FORMAT_FILE = os.path.join(REPO, "streamstate", "nginx", "streamkeeper-log-format.conf")


def shipped_directive() -> str:
    lines = [line for line in open(LOG_FORMAT_FILE) if line.startswith("log_format")]
    assert len(lines) == 1
    return lines[0]


def test_shipped_log_format_is_the_one_heartbeatd_parses():
    assert normalise_format(shipped_directive()) == STREAMKEEPER_LOG_FORMAT
    assert LogLineParser(shipped_directive()).format == LogLineParser("streamkeeper").format


def test_nginx_accepts_the_log_format(tmp_path):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        pytest.fail("nginx is not installed (make test installs it)")
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{}}
http {{
    include {LOG_FORMAT_FILE};
    access_log {tmp_path}/access.log streamkeeper buffer=32k flush=1s;
}}
""")
    result = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(conf)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_an_installed_wheel_renders_the_nginx_snippet(tmp_path):
    """As a host gets it: a wheel installed outside the checkout renders a snippet nginx accepts."""
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                            "--no-build-isolation", "--wheel-dir", str(wheels), REPO],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = list(wheels.glob("streamkeeper-*.whl"))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                              "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    # The installed copy, not the checkout, answers (dependencies come from this venv).
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import launcher; print(launcher.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr

    config = tmp_path / "streamkeeper.toml"
    config.write_text(f'hls_dir = "{tmp_path}/hls"\naccess_log = "{tmp_path}/logs/streams.log"\n'
                      'nginx_listen = "127.0.0.1:8089"\n')
    snippet = tmp_path / "streamkeeper.conf"
    render = subprocess.run([sys.executable, "-m", "streamctl", "nginx-config", "--config", str(config),
                             "--output", str(snippet)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert render.returncode == 0, render.stderr
    text = snippet.read_text()
    assert "X-Accel-Redirect" in text and "log_format streamkeeper" in text and "{{" not in text
    (tmp_path / "logs").mkdir()
    conf = write_nginx_conf(str(tmp_path), f"include {snippet};")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    check = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", conf], capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0, check.stderr
