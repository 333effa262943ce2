"""Several hosts (issue 18), on loopback: three hosts (each its own hls_dir, launcher, relay,
nginx, heartbeatd, reaper, host_id), Debian's redis-server as master and replica with three
redis-sentinels, an edge nginx in front; real players watching through the edge."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import pytest
import redis

from streamstate import keys, runs
from tests.helpers import first_request, wait_for
from tests.multihost import HOST_TIMEOUT, Cluster
from tests.sentinels import MASTER_NAME, SentinelCluster
from tests.viewing import Watchers

pytestmark = pytest.mark.e2e

FPS = 25  # the demo upstream's
PLAYED_AFTER_FAULT = 10  # seconds of new pictures every player must show after a fault


@pytest.fixture(scope="module")
def sentinel_cluster():
    work = tempfile.mkdtemp(prefix="sk-cluster-")
    sentinels = SentinelCluster(os.path.join(work, "redis"))
    cluster = None
    try:
        cluster = Cluster(work, 3, {"redis_sentinels": sentinels.addresses, "redis_master_name": MASTER_NAME})
        yield cluster, sentinels
    finally:
        if cluster is not None:
            cluster.stop()
        sentinels.stop()
        shutil.rmtree(work, ignore_errors=True)


def master(sentinels: SentinelCluster) -> redis.Redis:
    return redis.Redis(port=sentinels.master_port(), decode_responses=True)


def add_channel(cluster: Cluster, sentinels: SentinelCluster, channel: str) -> None:
    """A channel record, on the master and on a replica if it has one (a failover keeps it)."""
    client = master(sentinels)
    client.set(keys.channel_key(channel), json.dumps({"source_url": cluster.source(f"ch{channel}"), "quality": "copy"}))
    if int(client.info("replication").get("connected_slaves", 0)):
        assert client.wait(1, 5000) == 1


def test_a_master_failover_stops_no_watched_stream(sentinel_cluster):
    cluster, sentinels = sentinel_cluster
    channel = "800"
    add_channel(cluster, sentinels, channel)
    watchers = Watchers(cluster.url(channel, "?token=viewers"), players=("hlsjs", "shaka")).start()
    try:
        wait_for(lambda: watchers.playing(FPS * 3) or watchers.fatal(), timeout=60, message="both players to play")
        assert watchers.fatal() == {}
        host = cluster.host_running(channel)
        assert host is not None
        pids = cluster.ffmpegs_of(channel)
        old = sentinels.kill_master()
        new = sentinels.wait_failover(old.port)
        failed_over = time.time()
        before = {p: watchers.frames(p) for p in watchers.players}
        # A new channel starts through the edge once the new master answers.
        add_channel(cluster, sentinels, "801")
        wait_for(lambda: first_request(cluster.url("801"))[0] == 200, timeout=60, message="a start after the failover")
        wait_for(
            lambda: all(watchers.frames(p) - before[p] >= PLAYED_AFTER_FAULT * FPS for p in watchers.players),
            timeout=60,
            message="every player to show 10 s of new pictures after the failover",
        )
        assert watchers.fatal() == {}
        # No watched stream was stopped: the same FFmpeg, on the same host, all along.
        assert cluster.ffmpegs_of(channel) == pids and cluster.host_running(channel) == host, cluster.hosts[host].log(
            "launcher"
        )[-3000:]
        # heartbeatd's heartbeats land on the new master.
        wait_for(
            lambda: float(new.client().get(keys.last_access_key(channel)) or 0) > failed_over,
            timeout=30,
            message="a heartbeat on the new master",
        )
    finally:
        watchers.stop()


def test_a_killed_host_s_channels_play_from_another_host_and_its_records_are_cleared(sentinel_cluster):
    cluster, sentinels = sentinel_cluster
    channel = "802"
    add_channel(cluster, sentinels, channel)
    assert first_request(cluster.url(channel))[0] == 200
    dead = cluster.host_running(channel)
    assert dead is not None
    cluster.kill_host(dead)
    # Its channel plays from another host at a request once the dead host's lease has gone.
    wait_for(
        lambda: first_request(cluster.url(channel))[0] == 200,
        timeout=3 * HOST_TIMEOUT + 30,
        interval=1,
        message="the channel to play from another host",
    )
    now_on = cluster.host_running(channel)
    assert now_on not in (None, dead)
    # Cleared by the start that took it over, or by a reaper's pass first: either way once
    # the dead host's lease had expired.
    assert f"channel {channel}: took it over from host host{dead}" in cluster.hosts[now_on].log("launcher") or any(
        f"host host{dead} not seen" in h.log("reaper") for i, h in enumerate(cluster.hosts) if i != dead
    )

    def dead_host_s_records() -> list[str]:
        client = master(sentinels)
        return [c for c in runs.active_channels(client) if (r := runs.get_run(client, c)) and r.host == f"host{dead}"]

    wait_for(lambda: dead_host_s_records() == [], timeout=3 * HOST_TIMEOUT, message="the dead host's records cleared")


def test_a_partitioned_host_stops_pulling_and_another_serves_its_channel(tmp_path):
    """Host 1 reaches Redis through a forwarder the test cuts.  Its FFmpeg stops within its
    lease; host 0 serves the channel at a request once the lease has expired; a provider
    emulator never counts more connections than the account allows, during the partition or
    after it heals; healed, host 1 starts nothing of its own accord."""
    from tests.conftest import RedisServer
    from tests.fakes.provider_emulator import ProviderEmulator
    from tests.fakes.tcp_forwarder import TcpForwarder

    server = RedisServer(str(tmp_path / "redis"))
    (tmp_path / "redis").mkdir()
    server.start()
    forwarder = TcpForwarder(server.port)
    provider = ProviderEmulator(limit=1).start()
    cluster = None
    try:
        match = f"http://127.0.0.1:{provider.port}/live/acct/"
        shared = {"redis_url": server.url, "providers": {"acme": {"match": match, "max_streams": 1}}}
        cluster = Cluster(str(tmp_path), 2, shared, redis_for_host={1: f"redis://127.0.0.1:{forwarder.port}/0"})
        client = server.client()
        channel = "810"
        client.set(
            keys.channel_key(channel),
            json.dumps({"source_url": provider.url("acct", name="p"), "quality": "copy", "provider": "acme"}),
        )
        partitioned = cluster.hosts[1]
        assert first_request(partitioned.playlist_url(channel))[0] == 200  # it runs on host 1
        wait_for(lambda: provider.open_count("acct") == 1, message="host 1's provider connection")
        forwarder.cut()
        closed_while_leased = []

        def closed() -> bool:
            if provider.open_count("acct"):
                return False
            closed_while_leased.append(bool(client.exists(keys.host_key("host1"))))
            return True

        wait_for(closed, timeout=2 * HOST_TIMEOUT, message="host 1's connection to close")
        assert closed_while_leased == [True]  # before any other host could take the slot
        # Through the edge: host 1 closes a fenced start, host 0 answers, and plays it once
        # host 1's lease has expired.
        wait_for(
            lambda: first_request(cluster.url(channel))[0] == 200 and cluster.host_running(channel) == 0,
            timeout=3 * HOST_TIMEOUT + 30,
            interval=1,
            message="host 0 to serve the channel",
        )
        unfenced = partitioned.log("launcher").count("no longer fenced")
        forwarder.heal()
        wait_for(lambda: partitioned.log("launcher").count("no longer fenced") > unfenced, timeout=30, message="healed")
        assert cluster.host_running(channel) == 0 and len(cluster.ffmpegs_of(channel)) == 1
        assert provider.violations == [] and provider.max_concurrent.get("acct", 0) == 1
    finally:
        if cluster is not None:
            cluster.stop()
        provider.stop()
        forwarder.close()
        server.stop()


def test_a_host_forwards_a_channel_another_host_runs(tmp_path):
    """When the edge's ring moves (a host back in it, a host taken out a moment), a channel's
    requests reach a host that does not run it: that host's nginx fetches its playlist and
    segments from the host that does, so its viewers keep playing and one FFmpeg runs."""
    import urllib.request

    from tests.conftest import RedisServer

    (tmp_path / "redis").mkdir()
    server = RedisServer(str(tmp_path / "redis"))
    server.start()
    cluster = None
    try:
        cluster = Cluster(str(tmp_path), 2, {"redis_url": server.url})
        client = server.client()
        channel = "820"
        client.set(keys.channel_key(channel), json.dumps({"source_url": cluster.source("ch820"), "quality": "copy"}))
        runner, other = cluster.hosts
        assert first_request(runner.playlist_url(channel, "?token=t"))[0] == 200
        status, headers, body = first_request(other.playlist_url(channel, "?token=t"))
        assert status == 200 and b"#EXTINF" in body
        segment = next(line for line in body.decode().splitlines() if line.endswith(".ts"))
        with open(os.path.join(runner.hls_dir, segment), "rb") as handle:
            on_disk = handle.read()
        with urllib.request.urlopen(other.nginx_url(f"/live/{segment}?token=t"), timeout=20) as answer:
            assert answer.read() == on_disk
            assert answer.headers.get_all("Access-Control-Allow-Origin") == ["*"]  # once, not twice
        assert cluster.ffmpegs_of(channel) == runner_pids(cluster, 0, channel)  # one FFmpeg, the runner's
        assert "forwarded to" in other.log("launcher")
        # A request another host forwarded is never forwarded again.
        forwarded = {"X-Streamkeeper-Forwarded": "1"}
        assert first_request(other.playlist_url(channel), headers=forwarded)[0] == 503
        assert first_request(other.nginx_url(f"/live/{segment}"), headers=forwarded)[0] == 404
    finally:
        if cluster is not None:
            cluster.stop()
        server.stop()


def runner_pids(cluster: Cluster, index: int, channel: str) -> list[int]:
    host = cluster.hosts[index]
    return [pid for pid in cluster.ffmpegs_of(channel) if pid in {p for p, _ in host_ffmpegs(host)}]


def host_ffmpegs(host) -> list[tuple[int, list[str]]]:
    from tests.helpers import ffmpeg_processes

    return [(pid, argv) for pid, argv in ffmpeg_processes() if argv and argv[-1].startswith(host.hls_dir)]
