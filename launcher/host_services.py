"""What a stream's supervisor uses of its host, handed to it (no back-pointer to the Launcher)."""

from __future__ import annotations

import dataclasses
from typing import Any, Awaitable, Callable

from streamstate.process import StreamProcess
from streamstate.settings import Settings


@dataclasses.dataclass(frozen=True)
class HostServices:
    """Redis (its client, and calls in the launcher's Redis threads), the counters the
    metrics show, and what proves a pid is a channel's FFmpeg."""

    settings: Settings
    redis: Any
    redis_call: Callable[..., Awaitable[Any]]
    counters: dict[str, int]
    ffmpeg_executable: str | None
    identity: Callable[[str, int | None], StreamProcess]
