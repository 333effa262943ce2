"""Provider slots in a real Redis (streamstate.providers): a channel's slot is its run's."""

from __future__ import annotations

import json
import time

from streamstate import keys, providers, runs


def record(client, channel: str, run_id: str, host: str) -> None:
    runs.record_run(
        client, runs.RunRecord(channel=channel, run_id=run_id, host=host, pid=1, pid_start=None, started=time.time())
    )


def test_a_slot_another_run_of_the_channel_holds_is_not_taken_over(redis_client):
    """Attack finding (issue 18): taking a slot granted it whenever the channel had one, so a
    run that lost its slot with a failover overwrote the slot of the run that took the
    channel meanwhile, and ending then released that run's slot."""
    record(redis_client, "830", "run-b", "hostB")
    assert providers.acquire_slot(redis_client, "acme", 1, "830", "run-b", "hostB", 60)
    # The run that lost its slot (run-a) tries to take it again: it is run-b's.
    assert not providers.acquire_slot(redis_client, "acme", 1, "830", "run-a", "hostA", 60)
    held = json.loads(redis_client.hget(keys.provider_slots_key("acme"), "830"))
    assert held["run_id"] == "run-b"
    # run-b taking its own slot again (a record written again after a Redis restart) works.
    assert providers.acquire_slot(redis_client, "acme", 1, "830", "run-b", "hostB", 60)
