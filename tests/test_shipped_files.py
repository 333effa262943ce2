"""What ships in streamstate/nginx/ agrees with the code, nginx accepts it, and an installed
wheel carries it."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from demo.stack import write_nginx_conf
from streamstate.logformat import STREAMKEEPER_LOG_FORMAT, LogLineParser, normalise_format
from streamstate.nginx_config import log_format_directive, render_nginx_config
from streamstate.settings import load_settings
from tests.conftest import REPO


def shipped_directive() -> str:
    """The log_format the rendered snippet carries (written once, in streamstate.logformat)."""
    return log_format_directive()


def test_shipped_log_format_is_the_one_heartbeatd_parses():
    assert normalise_format(shipped_directive()) == STREAMKEEPER_LOG_FORMAT
    assert LogLineParser(shipped_directive()).format == LogLineParser("streamkeeper").format
    assert shipped_directive() in render_nginx_config(load_settings(None, environ={}))


def test_nginx_accepts_the_log_format(tmp_path):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        pytest.fail("nginx is not installed (make test installs it)")
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{}}
http {{
    {shipped_directive()}
    access_log {tmp_path}/access.log streamkeeper buffer=32k flush=1s;
}}
""")
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


def build_wheel(directory) -> pathlib.Path:
    """The wheel as a host gets it, built from a copy of the checkout's tracked files: a
    stale build/ in the checkout (setuptools never empties it) never leaks into it."""
    source = directory / "source"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=60)
    for name in filter(None, listed.stdout.decode().split("\0")):
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(REPO, name), target, follow_symlinks=False)
    wheels = directory / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["--wheel-dir", str(wheels), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = list(wheels.glob("streamkeeper-*.whl"))
    return wheel


def test_the_wheel_holds_what_a_host_needs_and_nothing_of_the_demo(tmp_path):
    """Issue 17: the demo's stack (a test helper) is not shipped; the packages are the shared
    layer, the four services and streamctl, with their templates."""
    import zipfile

    names = zipfile.ZipFile(build_wheel(tmp_path)).namelist()
    packages = {name.split("/")[0] for name in names if "/" in name and ".dist-info" not in name}
    assert packages == {"streamstate", "heartbeatd", "launcher", "egress", "reaper", "streamctl"}
    assert "streamstate/nginx/streamkeeper.conf.template" in names
    assert "streamstate/systemd/_hardening.conf" in names and "launcher/status.html" in names


def test_an_installed_wheel_renders_the_nginx_snippet(tmp_path):
    """As a host gets it: a wheel installed outside the checkout renders a snippet nginx accepts."""
    site = tmp_path / "site"
    wheel = build_wheel(tmp_path)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    # The installed copy, not the checkout, answers (dependencies come from this venv).
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import launcher; print(launcher.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr

    config = tmp_path / "streamkeeper.toml"
    config.write_text(
        f'hls_dir = "{tmp_path}/hls"\naccess_log = "{tmp_path}/logs/streams.log"\nnginx_listen = "127.0.0.1:8089"\n'
    )
    snippet = tmp_path / "streamkeeper.conf"
    render = subprocess.run(
        [sys.executable, "-m", "streamctl", "nginx-config", "--config", str(config), "--output", str(snippet)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert render.returncode == 0, render.stderr
    text = snippet.read_text()
    assert "X-Accel-Redirect" in text and "log_format streamkeeper" in text and "{{" not in text
    (tmp_path / "logs").mkdir()
    conf = write_nginx_conf(str(tmp_path), f"include {snippet};")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    check = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", conf], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


MAX_EXPOSURE = 2.5


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory):
    """The wheel installed into a fresh venv outside the checkout, as a host gets it (its
    dependencies come from the test venv through a .pth file: no network needed)."""
    base = tmp_path_factory.mktemp("wheel")
    venv = base / "venv"
    wheel = build_wheel(base)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    # Only now (pip must not see, nor uninstall, the checkout's editable install): the
    # dependencies' directory, as a plain path (its .pth files, the editable one among
    # them, are not run), after the venv's own site-packages.
    import sysconfig

    [site] = list(venv.glob("lib/python3*/site-packages"))
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import streamctl; print(streamctl.__file__)"],
        cwd=base,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
    return venv


@pytest.mark.parametrize(
    "command",
    [
        "stream-launcher",
        "stream-egress",
        "stream-reaper",
        "heartbeatd",
        "streamctl",
        "streamctl doctor",
        "streamctl install",
    ],
)
def test_every_command_of_the_installed_package_answers_help(installed_venv, command, tmp_path):
    program, *sub = command.split()
    result = subprocess.run(
        [str(installed_venv / "bin" / program), *sub, "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "Usage:" in result.stdout, result.stderr


def test_install_puts_everything_under_the_prefix_and_the_units_pass_systemd(installed_venv, tmp_path):
    """`streamctl install --prefix`: units rendered with the settings' paths, each verified by
    systemd-analyze and at most 2.5 in `systemd-analyze security`; an example settings file
    with every key; the nginx conf.d file nginx accepts; the logrotate file."""
    prefix, config = tmp_path / "root", tmp_path / "streamkeeper.toml"
    config.write_text('hls_dir = "/srv/hls"\nstate_dir = "/var/lib/sk"\nlog_dir = "/var/log/sk"\n')
    result = subprocess.run(
        [str(installed_venv / "bin" / "streamctl"), "install", "--prefix", str(prefix), "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    written = [line.split(" ", 2)[2] for line in result.stdout.splitlines() if line.startswith("did ")]
    assert written and all(path.startswith(str(prefix)) for path in written)
    assert "systemctl enable --now streamkeeper.target" in result.stdout
    units = prefix / "etc" / "systemd" / "system"
    launcher = (units / "streamkeeper-launcher.service").read_text()
    assert "ReadWritePaths=/srv/hls /var/lib/sk /var/log/sk" in launcher and "KillMode=process" in launcher
    assert f"ExecStart={installed_venv}/bin/stream-launcher --config {config}" in launcher
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is not installed (make test installs systemd)"
    names = sorted(p.name for p in units.iterdir())
    verify = subprocess.run(
        [analyze, "verify", *names],
        cwd=units,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"},
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    for name in names:
        if not name.endswith(".service"):
            continue
        security = subprocess.run(
            [analyze, "security", "--offline=yes", name], cwd=units, capture_output=True, text=True, timeout=120
        )
        print(security.stdout.splitlines()[-1])  # shown in the CI log
        exposure = float(security.stdout.split("Overall exposure level for")[1].split(":")[1].split()[0])
        assert exposure <= MAX_EXPOSURE, (name, security.stdout[-3000:])
    example = (prefix / str(config).lstrip("/")).read_text()
    from streamstate.settings import SPECS

    assert all(f"# {spec.key} = " in example for spec in SPECS if spec.key not in ("providers", "quality_profiles"))
    assert "create" in (prefix / "etc" / "logrotate.d" / "streamkeeper").read_text()


def test_logrotate_rotates_the_access_log_under_nginx_and_heartbeatd_loses_no_line(stack, rendered_nginx, tmp_path):
    """Debian's real logrotate with the rendered file (rename, create, nginx's USR1) while
    nginx writes and heartbeatd follows: every request is in a log, and heartbeatd reads
    every line."""
    import threading
    import urllib.request

    from streamstate.nginx_config import render_logrotate
    from streamstate.settings import load_settings
    from tests.helpers import add_channel, first_request, free_port, wait_for

    logrotate = shutil.which("logrotate") or "/usr/sbin/logrotate"
    assert os.path.exists(logrotate), "logrotate is not installed (make test installs it)"
    nginx = rendered_nginx(
        {"launcher_listen": stack.settings["launcher_listen"], "hls_dir": stack.hls_dir, "start_rate_limit": 0}
    )
    access_log = os.path.join(nginx.directory, "logs", "streams_access.log")
    metrics = free_port()
    config = tmp_path / "heartbeatd.toml"
    config.write_text(
        f'redis_url = "{stack.settings["redis_url"]}"\naccess_log = "{access_log}"\n'
        f'state_dir = "{tmp_path / "state"}"\nmetrics_listen = "127.0.0.1:{metrics}"\n'
        'flush_interval = 0.2\n'
    )
    follower = subprocess.Popen(
        [sys.executable, "-m", "heartbeatd", "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rotate_conf = tmp_path / "logrotate.conf"
    rotate_conf.write_text(render_logrotate(load_settings(str(config)), os.path.join(nginx.directory, "nginx.pid")))
    rotate_conf.chmod(0o644)

    def lines_read() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return -1  # not listening yet
        for line in text.splitlines():
            if line.startswith("streamkeeper_heartbeat_lines_read_total "):
                return int(float(line.split()[1]))
        return -1

    try:
        add_channel(stack, 796)
        url = f"http://127.0.0.1:{nginx.port}/live/stream_796.m3u8?token=rotate"
        wait_for(lambda: follower.poll() is None and lines_read() >= 0, 20, message="heartbeatd's metrics")
        requests = []

        def watch(count):
            for _ in range(count):
                requests.append(first_request(url)[0])

        watcher = threading.Thread(target=watch, args=(300,))
        watcher.start()
        wait_for(
            lambda: len(requests) >= 100 and os.path.getsize(access_log) > 0,
            60,
            message="100 requests, some of them logged (nginx flushes its buffer each second)",
        )
        rotated = subprocess.run(
            [logrotate, "-v", "-f", "-s", str(tmp_path / "logrotate.state"), str(rotate_conf)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert rotated.returncode == 0, rotated.stderr + rotated.stdout
        watcher.join(timeout=120)
        assert len(requests) == 300 and set(requests) == {200}
        assert os.path.exists(access_log + ".1"), (
            rotated.stderr + rotated.stdout
        )  # renamed, uncompressed (delaycompress)

        def logged() -> int:
            total = 0
            for path in (access_log + ".1", access_log):
                with open(path, "rb") as handle:
                    total += handle.read().count(b"stream_796")
            return total

        wait_for(lambda: logged() == 300, 20, message="nginx to write every request (buffer flushes each second)")
        wait_for(lambda: lines_read() >= 300, 20, message="heartbeatd to read every line, across the rotation")
        assert lines_read() == 300
    finally:
        follower.terminate()
        follower.wait(timeout=30)
        stack.launcher_json("/channel/796/stop", "POST")


def test_a_launcher_restart_does_not_reach_the_streams_unit(tmp_path):
    """streamkeeper-streams.service stops every stream on its stop: nothing but the target may
    stop it. Requires= or BindsTo= on the launcher would pass a launcher restart on to it."""
    from streamctl.install import render_unit

    values = {
        "bin_dir": "/opt/sk/bin",
        "config_path": "/etc/sk.toml",
        "user": "sk",
        "group": "sk",
        "hls_dir": "/srv/hls",
        "state_dir": "/var/lib/sk",
        "log_dir": "/var/log/sk",
    }
    streams = render_unit("streamkeeper-streams.service", values)
    directives = [line.split("=", 1)[0] for line in streams.splitlines() if "=" in line and not line.startswith("#")]
    assert "Requires" not in directives and "BindsTo" not in directives and "PartOf=streamkeeper.target" in streams
    assert "ExecStop=/opt/sk/bin/streamctl stop --all --config /etc/sk.toml" in streams


@pytest.mark.parametrize(
    "setting, value",
    [
        ("STREAMKEEPER_STATE_DIR", "/var/lib/sk\nExecStartPre=/bin/sh -c id"),
        ("STREAMKEEPER_HLS_DIR", "/srv/my hls"),
        ("STREAMKEEPER_LOG_DIR", "/var/log/%h"),
    ],
)
def test_install_refuses_what_a_unit_file_would_read_otherwise(tmp_path, setting, value):
    result = subprocess.run(
        [sys.executable, "-m", "streamctl", "install", "--prefix", str(tmp_path / "root")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "STREAMKEEPER_CONFIG": os.devnull, setting: value},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "root").exists()


def test_install_refuses_a_venv_the_units_sandbox_would_hide(tmp_path):
    """Without --prefix (a host): a Python under /root, /home or /tmp cannot run under
    ProtectHome=/PrivateTmp= (it would fail with 203/EXEC); --dry-run changes nothing."""
    result = subprocess.run(
        [sys.executable, "-m", "streamctl", "install", "--dry-run", "--bin-dir", "/tmp/venv/bin"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "STREAMKEEPER_CONFIG": os.devnull},
    )
    assert result.returncode == 2 and "sandbox hides" in result.stderr, result.stderr + result.stdout


def test_the_auth_cache_is_keyed_by_token_channel_and_address():
    from streamstate.nginx_config import viewer_auth
    from streamstate.settings import load_settings

    settings = load_settings(None, {"auth_url": "http://127.0.0.1:9/validate"}, environ={})
    rendered = "\n".join(viewer_auth(settings)["auth_location"])
    assert 'proxy_cache_key "$streamkeeper_token $streamkeeper_channel $remote_addr";' in rendered


@pytest.mark.parametrize(
    "content",
    [
        "[]",
        '{"log": "/x.log", "file": {}, "offset": 1e400}',
        '{"log": "/x.log", "file": {"dev": 1, "ino": 2}, "offset": -5}',
    ],
)
def test_a_junk_checkpoint_is_ignored_not_fatal(tmp_path, content):
    from streamstate.checkpoint import load_checkpoint

    path = tmp_path / "checkpoint.json"
    path.write_text(content)
    assert load_checkpoint(str(path), "/x.log") is None
