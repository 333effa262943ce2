"""The reaper's decision for one stream (streamstate.reap_rules.decide), as pure logic: the
clock, the live hosts and the process proof are the test's."""

import pytest

from streamstate.reap_rules import ActionKind, StreamView, decide
from streamstate.runs import RunRecord, RunState
from streamstate.settings import load_settings

pytestmark = pytest.mark.unit

NOW = 1_800_000_000.0
IDLE_TIMEOUT = 300


class Decider:
    """decide() with this test's settings and its own process proof."""

    def __init__(self):
        self.settings = load_settings(None, {"host_id": "here", "idle_timeout": IDLE_TIMEOUT}, environ={})
        self.proven: set[str] = set()  # the channels whose pid the test says is their FFmpeg

    def _decide(self, view, now, live_hosts):
        return decide(view, now, live_hosts, "here", self.settings, lambda v: v.channel in self.proven)


@pytest.fixture
def reaper():
    return Decider()


def view(channel="7", *, host="here", state=RunState.RUNNING, until=None, pid=1234, idle=10.0, legacy=False):
    run = (
        None
        if legacy
        else RunRecord(
            channel=channel, run_id="r", host=host, pid=pid, pid_start=1, started=NOW - 1000, state=state, until=until
        )
    )
    return StreamView(
        channel=channel,
        run=run,
        pid_raw=str(pid) if legacy else None,
        started=NOW - 1000,
        last_access=None if idle is None else NOW - idle,
    )


def test_a_watched_stream_proven_ours_is_kept(reaper):
    reaper.proven.add("7")
    action = reaper._decide(view(), NOW, set())
    assert (action.kind, action.why) == (ActionKind.KEEP, "watched")


def test_an_idle_stream_is_stopped_and_says_how_idle(reaper):
    reaper.proven.add("7")
    action = reaper._decide(view(idle=400), NOW, set())
    assert action.kind is ActionKind.STOP and action.why == f"idle 400 s > idle_timeout {IDLE_TIMEOUT} s"


def test_a_stream_whose_pid_is_not_its_ffmpeg_is_stale_never_stopped(reaper):
    action = reaper._decide(view(), NOW, set())
    assert action.kind is ActionKind.STALE and "pid 1234 is not this stream's FFmpeg" in action.why
    assert reaper._decide(view(pid=0), NOW, set()).why == "no pid"


def test_a_run_its_launcher_vouches_for_is_kept_whatever_its_pid(reaper):
    action = reaper._decide(view(state=RunState.BACKOFF, until=NOW + 5), NOW, set())
    assert action.kind is ActionKind.KEEP and "vouches" in action.why and "backoff" in action.why
    # A promise further ahead than any launcher makes is junk: not vouched, judged by its pid.
    assert reaper._decide(view(state=RunState.BACKOFF, until=NOW + 10**6), NOW, set()).kind is ActionKind.STALE


def test_another_host_s_stream_is_left_to_it_while_it_lives(reaper):
    assert reaper._decide(view(host="there"), NOW, {"there"}).kind is ActionKind.FOREIGN
    gone = reaper._decide(view(host="there"), NOW, set())
    assert gone.kind is ActionKind.STALE and gone.host == "there" and "host there not seen" in gone.why


def test_a_legacy_record_is_judged_by_its_pid_key(reaper):
    reaper.proven.add("9")
    assert reaper._decide(view("9", legacy=True, idle=None), NOW, set()).kind is ActionKind.STOP
    assert reaper._decide(view("9", legacy=True), NOW, set()).kind is ActionKind.KEEP
