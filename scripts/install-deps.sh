#!/bin/sh
# Install what streamkeeper's tests and demo need and the machine lacks, from Debian's
# packages: redis-server, nginx, ffmpeg, Python 3.11+ with venv, and the real players the
# tests open cold channels with: VLC (headless cvlc), Chromium (for hls.js) and Node.js
# with npm (which installs hls.js and playwright-core from tests/players/package-lock.json);
# systemd (systemd-analyze, for the units) and logrotate.
# Run as root (or with sudo available); does nothing when all are present.
set -eu

missing=""
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
# Debian's redis-sentinel: the multi-host tests run one master, one replica and three sentinels.
command -v redis-sentinel >/dev/null 2>&1 || missing="$missing redis-sentinel"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx"
command -v ffmpeg >/dev/null 2>&1 || missing="$missing ffmpeg"
command -v cvlc >/dev/null 2>&1 || missing="$missing vlc-bin vlc-plugin-base"
[ -x /usr/bin/chromium ] || missing="$missing chromium"
command -v node >/dev/null 2>&1 || missing="$missing nodejs"
command -v npm >/dev/null 2>&1 || missing="$missing npm"
# systemd-analyze checks the shipped units; logrotate rotates the access log in a test.
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
command -v logrotate >/dev/null 2>&1 || [ -x /usr/sbin/logrotate ] || missing="$missing logrotate"
if ! command -v python3 >/dev/null 2>&1; then
    missing="$missing python3 python3-venv"
elif ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing="$missing python3-venv"
fi

if [ -z "$missing" ]; then
    exit 0
fi

echo "install-deps: installing:$missing"
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "install-deps: missing:$missing and not root; run: apt-get install$missing" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing
