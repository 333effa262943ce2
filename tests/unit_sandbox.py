"""A rendered unit's file-system sandbox, applied to a command without systemd (this machine
runs none): ``ProtectSystem=strict`` makes every mount read-only but the unit's
``ReadWritePaths=``, in a mount namespace of the command's own (util-linux ``unshare``, as
root).  /proc, /sys, /dev and /run stay as they are (the processes to signal, the devices
every program opens, sd_notify)."""

from __future__ import annotations

import shutil
import subprocess

KEPT = ("/proc", "/sys", "/dev", "/run")

# $1: the read-write paths, colon-separated; the rest: the command.
_SCRIPT = r"""
set -e
rw="$1"; shift
IFS=:
for path in $rw; do mount --bind "$path" "$path"; done
unset IFS
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r mount_point; do
  case ":$rw:" in *":$mount_point:"*) continue ;; esac
  case "$mount_point" in /proc*|/sys*|/dev*|/run*) continue ;; esac
  mount -o remount,bind,ro "$mount_point" 2>/dev/null || true
done
exec "$@"
"""


def directives(unit_text: str, name: str) -> list[str]:
    return [
        line.split("=", 1)[1].strip()
        for line in unit_text.splitlines()
        if line.startswith(f"{name}=") and not line.startswith("#")
    ]


def run_sandboxed(unit_text: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``argv`` under the unit's ProtectSystem=strict and ReadWritePaths=."""
    assert directives(unit_text, "ProtectSystem") == ["strict"], "only ProtectSystem=strict is emulated"
    paths = [p for line in directives(unit_text, "ReadWritePaths") for p in line.split()]
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is missing"
    return subprocess.run(
        [unshare, "--mount", "--propagation", "private", "sh", "-c", _SCRIPT, "sandbox", ":".join(paths), *argv],
        **kwargs,
    )
