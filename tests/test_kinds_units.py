"""Issue 17: run states, reaper actions, refusal and failure kinds are enums; decisions read
the kind, never the text a player or an operator sees.  Pure logic, no process started."""

import json
import os

import pytest

from launcher.ffmpeg import classify_failure
from streamstate import egress
from streamstate.egress import RefusalKind
from streamstate.reap_rules import ActionKind
from streamstate.runs import TRANSITIONS, RunRecord, RunState
from streamstate.stream_end import NOT_THE_SOURCE, Cause

pytestmark = pytest.mark.unit


def test_every_state_has_its_moves_and_an_ended_run_never_starts_again():
    assert set(TRANSITIONS) == set(RunState)
    assert RunState.BACKOFF.can_become(RunState.STARTING) and RunState.RUNNING.can_become(RunState.RUNNING)
    for ended in (RunState.STOPPING, RunState.FAILED, RunState.STOPPED):
        assert ended.ended and not ended.can_become(RunState.STARTING) and not ended.can_become(RunState.RUNNING)
    assert not RunState.RUNNING.can_become(RunState.STARTING)  # only through backoff


def test_a_state_from_redis_that_is_none_of_ours_is_no_state():
    record = RunRecord.from_hash("5", {b"run_id": b"r1", b"state": b"\x1b]0;pwned\x07", b"pid": b"12"})
    assert record is not None and record.state is None and not record.vouched(0.0)
    assert RunRecord.from_hash("5", {"run_id": "r1", "state": "backoff"}).state is RunState.BACKOFF


def test_a_refusal_note_reads_as_its_kind_and_junk_fails_closed(tmp_path):
    os.makedirs(egress.ticket_dir(str(tmp_path)))
    egress.record_refusal(str(tmp_path), "9", RefusalKind.ADDRESS, "169.254.169.254:80 is in upstream_deny")
    refusal = egress.read_refusal(str(tmp_path), "9", 0)
    assert refusal.kind is RefusalKind.ADDRESS and refusal.kind.text == "upstream address not allowed"
    with open(egress.refusal_path(str(tmp_path), "9"), "w") as handle:
        json.dump({"kind": "something else", "reason": "x", "at": 1e12}, handle)
    assert egress.read_refusal(str(tmp_path), "9", 0).kind is RefusalKind.PROXY
    assert RefusalKind.PROXY.text == "upstream proxy unusable"


def test_a_proxy_that_cannot_be_used_is_not_the_source_s_fault():
    assert Cause.PROXY in NOT_THE_SOURCE and Cause.REFUSED not in NOT_THE_SOURCE


def test_a_relay_fenced_by_the_lease_is_the_host_s_problem_not_the_source_s(tmp_path):
    """Attack finding: the relay's FENCED refusal was read as the source refusing (cooldowns,
    a failed channel).  It is the host's problem: wait, blame nothing."""
    from launcher.diagnosis import diagnose

    os.makedirs(egress.ticket_dir(str(tmp_path)))
    egress.record_refusal(str(tmp_path), "9", RefusalKind.FENCED, "this host is fenced")
    found = diagnose(str(tmp_path), "9", 0, None, "http://x/a.ts", "FFmpeg exited", Cause.SOURCE)
    assert found.cause is Cause.FENCED and Cause.FENCED in NOT_THE_SOURCE
    assert found.failure == RefusalKind.FENCED.text


def test_a_full_disk_is_known_by_its_kind_not_its_text():
    found = classify_failure(["[segment @ 0x1] Failed to write: No space left on device"])
    assert found.disk_full and found.text == Cause.DISK_FULL.text
    other = classify_failure(["[http @ 0x2] HTTP error 403 Forbidden"])
    assert not other.disk_full and other.text == "upstream refused: HTTP 403"


def test_a_reaper_action_says_what_a_dry_run_would_do():
    assert [kind.verb for kind in ActionKind] == ["stop", "clear", "leave", "leave"]
    assert json.dumps({"kind": ActionKind.STALE}) == '{"kind": "stale"}'
