"""Redis through Sentinel (issue 18): Debian's redis-server as master and replica, three of
Debian's redis-sentinel, and our client (streamstate.redis_client.redis_for) following a
failover; heartbeatd holding its heartbeats through one and writing them to the new master."""

from __future__ import annotations

import time

import pytest
import redis

from demo.stack import toml_value
from streamstate import keys
from streamstate.redis_client import redis_for, redis_where
from streamstate.settings import load_settings
from tests.helpers import append, sk_line, wait_for
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


def test_heartbeatd_holds_its_heartbeats_through_a_failover_and_writes_them_to_the_new_master(
    tmp_path, cluster, daemons
):
    log = tmp_path / "streams_access.log"
    log.touch()
    config = sentinel_settings(tmp_path, cluster, access_log=str(log), flush_interval=0.2)
    master = redis.Redis(port=cluster.master.port, decode_responses=True)
    master.set(keys.pid_key(51), "4242")  # a (legacy) running stream: its heartbeats are kept
    master.set(keys.started_key(51), "1000.0")
    wait_for(lambda: cluster.replica.client().get(keys.pid_key(51)) == "4242", message="the record to replicate")
    daemon = daemons("heartbeatd", "--config", config)
    wait_for(lambda: "starting at offset" in daemon.output(), message="heartbeatd to start")
    first = time.time()
    append(log, sk_line(first, "/live/stream_51.m3u8"))
    wait_for(
        lambda: float(master.get(keys.last_access_key(51)) or 0) == pytest.approx(first, abs=0.001),
        message="the first heartbeat on the master",
    )
    wait_for(
        lambda: cluster.replica.client().get(keys.last_access_key(51)) is not None,
        message="the heartbeat to replicate",
    )
    old = cluster.kill_master()
    during = time.time()
    append(log, sk_line(during, "/live/stream_51_7.ts"))  # a viewer watching during the failover
    new = cluster.wait_failover(old.port)
    wait_for(
        lambda: float(new.client().get(keys.last_access_key(51)) or 0) == pytest.approx(during, abs=0.001),
        timeout=30,
        message="the heartbeat from during the failover to land on the new master",
    )
    assert daemon.stop() == 0
