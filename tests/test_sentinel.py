"""Redis through Sentinel (issue 18): Debian's redis-server as master and replica, three of
Debian's redis-sentinel, and our client (streamstate.redis_client.redis_for) following a
failover.  The services through a failover, heartbeatd's heartbeats on the new master
included: tests/test_scale_out.py."""

from __future__ import annotations

import time

import pytest
import redis

from demo.stack import toml_value
from streamstate.redis_client import redis_for, redis_where
from streamstate.settings import load_settings
from tests.helpers import wait_for
from tests.sentinels import MASTER_NAME, SentinelCluster


@pytest.fixture
def cluster(tmp_path):
    cluster = SentinelCluster(str(tmp_path / "redis"))
    yield cluster
    cluster.stop()


def sentinel_settings(tmp_path, cluster, **more):
    values = {
        "redis_sentinels": cluster.addresses,
        "redis_master_name": MASTER_NAME,
        "state_dir": str(tmp_path / "state"),
        **more,
    }
    config = tmp_path / "sk.toml"
    config.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in values.items()))
    return str(config)


def test_the_client_follows_a_failover_to_the_new_master(tmp_path, cluster):
    settings = load_settings(sentinel_settings(tmp_path, cluster))
    assert "sentinels" in redis_where(settings) and MASTER_NAME in redis_where(settings)
    client = redis_for(settings)
    client.set("before", "1")
    old = cluster.kill_master()
    new = cluster.wait_failover(old.port)

    def written_after_failover() -> bool:
        try:
            client.set("after", "2")
        except redis.RedisError:
            return False  # the old master is gone and the sentinels not asked again yet
        return True

    wait_for(written_after_failover, timeout=20, message="a write through the Sentinel client to succeed")
    # It landed on the new master, which kept what was replicated before.
    assert new.client().get("after") == "2" and new.client().get("before") == "1"


def test_a_missing_master_name_is_a_redis_error_not_a_hang(tmp_path, cluster):
    settings = load_settings(sentinel_settings(tmp_path, cluster, redis_master_name="nosuchmaster"))
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):  # MasterNotFoundError: what every service treats as Redis down
        redis_for(settings).ping()
    assert time.monotonic() - started < 30


def test_doctor_fails_a_failover_longer_than_the_fence_and_names_a_wrong_master(tmp_path, cluster):
    """Operator finding: with Debian's default down-after (30 s) a failover outlasts a
    host_timeout of 30 s's fence (15 s): every host would end its streams at every failover."""
    from streamctl.checks_host import check_sentinels
    from streamstate.redis_client import redis_error_text

    fast = load_settings(sentinel_settings(tmp_path, cluster, hosts=["127.0.0.1:1"], host_timeout=30))
    assert {c.check: c.status for c in check_sentinels(fast)}.get("failover vs fence") is None  # 1 s + 2 < 15
    tight = load_settings(sentinel_settings(tmp_path, cluster, hosts=["127.0.0.1:1"], host_timeout=4))
    assert {c.check: c.status for c in check_sentinels(tight)}["failover vs fence"] == "FAIL"
    wrong = load_settings(sentinel_settings(tmp_path, cluster, redis_master_name="nosuchmaster"))
    with pytest.raises(redis.ConnectionError) as raised:
        redis_for(wrong).ping()
    text = redis_error_text(raised.value, wrong)
    assert "know no master named 'nosuchmaster'" in text and MASTER_NAME in text
