"""heartbeatd's read position in the access log, kept on disk (written atomically, only
after Redis acknowledged): heartbeatd writes it, `streamctl doctor` reads its lag."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

from .files import write_atomic

log = logging.getLogger("streamkeeper.heartbeatd")


@dataclasses.dataclass(frozen=True)
class FileIdentity:
    """Which file this is: device, inode and its first bytes."""

    dev: int
    ino: int
    fingerprint: bytes

    def as_dict(self) -> dict:
        return {"dev": self.dev, "ino": self.ino, "fingerprint": self.fingerprint.hex()}

    @classmethod
    def from_dict(cls, data: dict) -> "FileIdentity":
        return cls(int(data["dev"]), int(data["ino"]), bytes.fromhex(data["fingerprint"]))


@dataclasses.dataclass(frozen=True)
class Position:
    """A place in a file: the end of the last complete line handed out."""

    identity: FileIdentity
    offset: int


def checkpoint_path(state_dir: str, log_path: str) -> str:
    """One checkpoint per followed log, named after the log's path."""
    digest = hashlib.sha1(log_path.encode()).hexdigest()[:12]
    return os.path.join(state_dir, f"heartbeatd-{digest}.checkpoint.json")


def load_checkpoint(path: str, log_path: str) -> Position | None:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if data.get("log") != log_path:
            log.warning("checkpoint %s is for %s, not %s; ignoring it", path, data.get("log"), log_path)
            return None
        offset = int(data["offset"])
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        return Position(FileIdentity.from_dict(data["file"]), offset)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        log.warning("checkpoint %s is unreadable (%s); ignoring it", path, exc)
        return None


def save_checkpoint(path: str, log_path: str, position: Position) -> None:
    """Temp file, fsync, rename, fsync the directory."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    payload = json.dumps({"log": log_path, "file": position.identity.as_dict(), "offset": position.offset}).encode()
    write_atomic(path, payload, durable=True)
