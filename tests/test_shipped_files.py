"""What ships in nginx/ agrees with the code, and nginx accepts it."""
import os
import shutil
import subprocess

import pytest

from heartbeatd.logformat import STREAMKEEPER_LOG_FORMAT, LogLineParser, normalise_format
from tests.conftest import REPO

LOG_FORMAT_FILE = os.path.join(REPO, "nginx", "streamkeeper-log-format.conf")


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
