"""Every host of the cluster in `streamctl status` and doctor (issue 18): alive or not, the
age of its lease, its streams and slots; a real redis-server, hostile keys included."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from demo.stack import toml_value
from streamctl.checks_streams import check_hosts
from streamstate import runs
from streamstate.settings import load_settings
from tests.conftest import REPO


def config(tmp_path, redis_server, **more) -> str:
    values = {"redis_url": redis_server.url, "host_id": "hostB", "host_timeout": 30, **more}
    path = tmp_path / "sk.toml"
    path.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in values.items()))
    return str(path)


def record(client, channel: str, host: str, provider: str = "") -> None:
    runs.record_run(
        client,
        runs.RunRecord(
            channel=channel,
            run_id=f"r{channel}",
            host=host,
            pid=1,
            pid_start=None,
            started=time.time(),
            provider=provider,
        ),
    )


def test_status_and_doctor_show_every_host(tmp_path, redis_server, redis_client):
    runs.refresh_host(redis_client, "hostA", 30)
    runs.refresh_host(redis_client, "hostB", 30)
    record(redis_client, "901", "hostA", provider="acme")
    record(redis_client, "902", "hostC")  # a host whose lease is gone
    redis_client.set("host:\x1b[31mevil", "x", ex=30)  # junk a terminal must not obey
    path = config(tmp_path, redis_server)
    result = subprocess.run(
        [sys.executable, "-m", "streamctl", "status", "--json", "--config", path],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    hosts = {h["host"]: h for h in json.loads(result.stdout)["hosts"]}
    assert hosts["hostA"]["alive"] and hosts["hostA"]["streams"] == 1 and hosts["hostA"]["slots"] == 1
    assert 0 <= hosts["hostA"]["lease_age_seconds"] < 30
    assert hosts["hostB"]["this_host"] and hosts["hostB"]["streams"] == 0
    assert not hosts["hostC"]["alive"] and hosts["hostC"]["lease_age_seconds"] is None
    text = subprocess.run(
        [sys.executable, "-m", "streamctl", "status", "--config", path], cwd=REPO, capture_output=True, text=True
    ).stdout
    assert "host hostC: DEAD, not seen (no lease), 1 stream(s)" in text and "\x1b" not in text
    checks = {c.check: c for c in check_hosts(redis_client, load_settings(path))}
    assert checks["host hostA"].status == "ok" and checks["host hostC"].status == "warn"


def test_doctor_fails_a_multi_host_host_without_its_lease(tmp_path, redis_server, redis_client):
    path = config(tmp_path, redis_server, hosts=["127.0.0.1:1", "127.0.0.1:2"])
    checks = {c.check: c for c in check_hosts(redis_client, load_settings(path))}
    assert checks["host hostB"].status == "FAIL" and "fenced" in checks["host hostB"].detail


def test_doctor_warns_of_other_hosts_without_hosts_set_and_of_a_host_address_not_in_hosts(
    tmp_path, redis_server, redis_client
):
    runs.refresh_host(redis_client, "hostA", 30)
    checks = {c.check: c for c in check_hosts(redis_client, load_settings(config(tmp_path, redis_server)))}
    assert checks["hosts"].status == "warn" and "hostA" in checks["hosts"].detail
    multi = config(tmp_path, redis_server, hosts=["127.0.0.1:1", "127.0.0.1:2"], nginx_listen="127.0.0.1:3")
    checks = {c.check: c for c in check_hosts(redis_client, load_settings(multi))}
    assert checks["host_address"].status == "warn" and "hosts" not in checks
