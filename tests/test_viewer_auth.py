"""Viewers who are not allowed (issue: shipping): with auth_url set, nginx asks the operator's
validator (auth_request) about every playlist request before serving the file or starting
the channel; an unauthorised viewer gets 401/403 and starts nothing; answers are cached."""

import pytest

from streamstate import keys
from tests.fakes.validator import Validator
from tests.helpers import add_channel, ffmpegs_writing, first_request

pytestmark = pytest.mark.e2e

GOOD = "t0k3n-good"


@pytest.fixture
def guarded(stack, rendered_nginx, tmp_path):
    validator = Validator({"770", "771"}, GOOD)
    nginx = rendered_nginx(
        {
            "launcher_listen": stack.settings["launcher_listen"],
            "hls_dir": stack.hls_dir,
            "start_rate_limit": 0,
            "auth_url": validator.url,
            "auth_cache_dir": str(tmp_path / "auth-cache"),
        }
    )
    yield nginx, validator
    validator.close()


def playlist(nginx, channel, query=""):
    return f"http://127.0.0.1:{nginx.port}/live/stream_{channel}.m3u8{query}"


def test_a_viewer_without_a_valid_token_gets_401_or_403_and_starts_nothing(stack, guarded):
    nginx, validator = guarded
    for channel in (770, 772):
        add_channel(stack, channel)
    status, headers, _ = first_request(playlist(nginx, 770))
    assert status == 401 and headers.get("Access-Control-Allow-Origin") == "*"
    assert first_request(playlist(nginx, 770, "?token=stolen"))[0] == 403
    assert first_request(playlist(nginx, 772, f"?token={GOOD}"))[0] == 403  # not this channel
    assert not ffmpegs_writing(stack, 770) and not ffmpegs_writing(stack, 772)
    assert not stack.redis.exists(keys.run_key(770)) and not stack.redis.exists(keys.run_key(772))
    assert ("stolen", "770", "/live/stream_770.m3u8?token=stolen") in validator.calls


def test_a_valid_viewer_cold_starts_the_channel_and_the_answer_is_cached(stack, guarded):
    nginx, validator = guarded
    channel_id = "771"  # one of the channels the validator allows (the fixture)
    add_channel(stack, channel_id)
    status, headers, body = first_request(playlist(nginx, channel_id, f"?token={GOOD}"))
    assert status == 200 and body.startswith(b"#EXTM3U")
    asked = len(validator.calls)
    for _ in range(5):  # the player's next playlist requests
        assert first_request(playlist(nginx, channel_id, f"?token={GOOD}"))[0] == 200
    assert len(validator.calls) == asked  # within auth_cache_seconds: not asked again
    assert first_request(playlist(nginx, channel_id, "?token=other"))[0] == 403  # cached per token
    stack.launcher_json(f"/channel/{channel_id}/stop", "POST")
