"""A strict check of live HLS media playlists, written from RFC 8216 (not from our code).

Given every version of one playlist URL a client fetched, in fetch order, it reports
each rule broken:

* 4.3.3.1  EXT-X-TARGETDURATION is present, and every EXTINF duration rounded to the
           nearest integer is at most it; 6.2.1: it never changes.
* 6.2.1    a playlist changes only by appending segments, removing them from the start
           (the media sequence rises by the number removed), and adding EXT-X-ENDLIST:
           a segment keeps its URI, its duration and its discontinuity sequence number
           in every version that lists it; the media sequence never goes down.
* 6.2.2    a live playlist from which segments were removed is at least three target
           durations long.
* 6.2.1    EXT-X-DISCONTINUITY-SEQUENCE rises when a segment with EXT-X-DISCONTINUITY
           leaves (checked through each segment's discontinuity sequence number).
* 6.2.1    a URI is never reused for another media sequence number (a segment name reused
           with other content).
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class Entry:
    msn: int
    dsn: int  # discontinuity sequence number
    uri: str
    duration: float


@dataclasses.dataclass
class Version:
    target: int | None
    msn: int
    ended: bool
    entries: list[Entry]

    @property
    def duration(self) -> float:
        return sum(e.duration for e in self.entries)


def parse(text: str) -> Version:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or lines[0] != "#EXTM3U":
        raise ValueError("does not start with #EXTM3U")
    target = None
    msn = dsn_base = 0
    ended = False
    raw: list[tuple[bool, float, str]] = []
    duration = None
    discontinuity = False
    for line in lines[1:]:
        if line.startswith("#EXT-X-TARGETDURATION:"):
            target = int(line.split(":", 1)[1])
        elif line.startswith("#EXT-X-MEDIA-SEQUENCE:"):
            msn = int(line.split(":", 1)[1])
        elif line.startswith("#EXT-X-DISCONTINUITY-SEQUENCE:"):
            dsn_base = int(line.split(":", 1)[1])
        elif line == "#EXT-X-DISCONTINUITY":
            discontinuity = True
        elif line == "#EXT-X-ENDLIST":
            ended = True
        elif line.startswith("#EXTINF:"):
            duration = float(line[8:].split(",", 1)[0])
        elif not line.startswith("#"):
            if duration is None:
                raise ValueError(f"URI {line!r} without #EXTINF")
            raw.append((discontinuity, duration, line))
            duration, discontinuity = None, False
    entries = []
    dsn = dsn_base
    for index, (tagged, seconds, uri) in enumerate(raw):
        if tagged:
            dsn += 1
        entries.append(Entry(msn + index, dsn, uri, seconds))
    return Version(target, msn, ended, entries)


def check(texts: list[str]) -> list[str]:
    """Every rule broken across the versions ``texts`` (fetch order); [] when none."""
    problems: list[str] = []
    by_msn: dict[int, Entry] = {}
    msn_of_uri: dict[str, int] = {}
    previous: Version | None = None
    target: int | None = None
    for number, text in enumerate(texts):
        where = f"version {number}"
        try:
            version = parse(text)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if version.target is None:
            problems.append(f"{where}: no EXT-X-TARGETDURATION")
            continue
        if target is None:
            target = version.target
        elif version.target != target:
            problems.append(f"{where}: EXT-X-TARGETDURATION changed from {target} to {version.target}")
        uris = [e.uri for e in version.entries]
        if len(set(uris)) != len(uris):
            problems.append(f"{where}: a URI listed twice")
        for entry in version.entries:
            if math.floor(entry.duration + 0.5) > version.target:
                problems.append(
                    f"{where}: {entry.uri} lasts {entry.duration:g} s, over the target duration {version.target}"
                )
            known = by_msn.get(entry.msn)
            if known is not None and (known.uri, known.dsn) != (entry.uri, entry.dsn):
                problems.append(
                    f"{where}: media sequence {entry.msn} was {known.uri} (discontinuity "
                    f"sequence {known.dsn}), now {entry.uri} ({entry.dsn})"
                )
            elif known is not None and abs(known.duration - entry.duration) > 1e-3:
                problems.append(f"{where}: {entry.uri} changed its duration")
            by_msn.setdefault(entry.msn, entry)
            first_msn = msn_of_uri.setdefault(entry.uri, entry.msn)
            if first_msn != entry.msn:
                problems.append(f"{where}: {entry.uri} reused: media sequence {first_msn}, then {entry.msn}")
        if previous is not None:
            if version.msn < previous.msn:
                problems.append(f"{where}: media sequence went down from {previous.msn} to {version.msn}")
            elif version.msn > previous.msn and not version.ended and version.duration < 3 * version.target:
                problems.append(
                    f"{where}: segments removed leaving {version.duration:g} s, under three "
                    f"target durations ({3 * version.target} s)"
                )
            if previous.entries and version.entries and version.msn > previous.entries[-1].msn + 1:
                # Nothing in common: the client missed versions, allowed; the numbers still rise.
                pass
        previous = version
    return problems
