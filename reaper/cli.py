"""``stream-reaper``: arrives with the reaper issue."""
import sys


def main():
    sys.stderr.write("stream-reaper: not yet implemented (the reaper arrives with its own issue)\n")
    raise SystemExit(1)
