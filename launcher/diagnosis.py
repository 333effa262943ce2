"""Why a run's FFmpeg failed: the egress relay's refusal if it refused one of its connections
(an address not allowed, a proxy that cannot be used), else FFmpeg's own output.  The class
of failure a player may see, the line that says so (redacted) for operators, and the cause
the next step is decided on (streamstate.stream_end)."""

from __future__ import annotations

import dataclasses

from streamstate import egress, files
from streamstate.egress import RefusalKind
from streamstate.stream_end import Cause

from .ffmpeg import classify_failure

STDERR_LINES = 40  # lines of FFmpeg's log read for the reason of a failure
LOG_MARK = "--- streamkeeper: "  # the line the launcher writes before each FFmpeg start


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    cause: Cause
    failure: str  # the class of failure, what a player may see (never a URL)
    last_error: str  # the class and the line that says so, redacted, for operators


# What a relay's refusal says about the source: a proxy that cannot be used, or a host that
# is fenced, is not the source's fault (another source would fare no better).
_REFUSAL_CAUSE = {RefusalKind.PROXY: Cause.PROXY, RefusalKind.FENCED: Cause.FENCED}


def relay_refused(state_dir: str, channel_id: str, since: float) -> bool:
    """The relay refused one of the run's connections since it started (an address, a
    proxy): the run ends with that reason, even where FFmpeg would carry on (its HLS demuxer
    skips a segment it cannot fetch and tries the next)."""
    refusal = egress.read_refusal(state_dir, channel_id, since)
    return refusal is not None and refusal.kind is not RefusalKind.UNREACHABLE


def diagnose(
    state_dir: str,
    channel_id: str,
    since: float,
    log_path: str | None,
    source: str,
    otherwise: str,
    cause: Cause,
) -> Diagnosis:
    """``otherwise``: the class when the output says nothing useful (``log_path`` None: the
    failure was not FFmpeg's, ``otherwise`` is the whole story, unless the relay refused);
    ``cause``: what it was, unless the output says the disk is full or the relay refused."""
    refusal = egress.read_refusal(state_dir, channel_id, since)
    if refusal is not None:
        failure = refusal.kind.text
        return Diagnosis(_REFUSAL_CAUSE.get(refusal.kind, Cause.REFUSED), failure, f"{failure}: {refusal.reason}")
    if log_path is None:
        return Diagnosis(cause, otherwise, otherwise)
    found = classify_failure(files.log_tail(log_path, STDERR_LINES, since=LOG_MARK), source)
    failure = found.text or otherwise
    return Diagnosis(
        Cause.DISK_FULL if found.disk_full else cause,
        failure,
        f"{failure}: {found.detail}" if found.detail else failure,
    )
