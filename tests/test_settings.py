import json
import subprocess
import sys

import pytest

from streamstate.settings import SettingsError, load_settings
from tests.conftest import REPO


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.unit
def test_defaults_without_a_file():
    settings = load_settings(None, environ={})
    assert settings.idle_timeout == 300
    assert settings.flush_interval == 1.0
    assert settings.viewer_window == 30
    assert settings.log_format == "streamkeeper"
    assert settings.sources["redis_url"] == "default"


@pytest.mark.unit
def test_precedence_file_then_env_then_flag(tmp_path):
    config = write(tmp_path / "sk.toml", 'idle_timeout = 120\nhls_dir = "/srv/hls"\nflush_interval = 2\n')
    env = {"STREAMKEEPER_IDLE_TIMEOUT": "90", "STREAMKEEPER_FLUSH_INTERVAL": "3"}
    settings = load_settings(config, {"flush_interval": 0.5}, environ=env)
    assert settings.hls_dir == "/srv/hls" and settings.sources["hls_dir"].startswith("file ")
    assert settings.idle_timeout == 90 and settings.sources["idle_timeout"] == "env STREAMKEEPER_IDLE_TIMEOUT"
    assert settings.flush_interval == 0.5 and settings.sources["flush_interval"] == "flag"


@pytest.mark.unit
def test_config_path_from_environment(tmp_path):
    config = write(tmp_path / "sk.toml", "viewer_window = 0\n")
    settings = load_settings(None, environ={"STREAMKEEPER_CONFIG": config})
    assert settings.viewer_window == 0 and settings.config_path == config


@pytest.mark.unit
@pytest.mark.parametrize(
    "text, key",
    [
        ("idle_timeout = -5\n", "idle_timeout"),
        ('flush_interval = "soon"\n', "flush_interval"),
        ('hls_dir = "relative/path"\n', "hls_dir"),
        ('redis_url = "http://x"\n', "redis_url"),
        ("bogus_key = 1\n", "bogus_key"),
        ("idle_timeout = \n", "invalid TOML"),
    ],
)
def test_invalid_values_name_the_key(tmp_path, text, key):
    config = write(tmp_path / "sk.toml", text)
    with pytest.raises(SettingsError, match=key):
        load_settings(config, environ={})


def streamctl(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "streamctl", *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=60
    )


def test_streamctl_config_shows_values_and_sources(tmp_path):
    config = write(tmp_path / "sk.toml", "idle_timeout = 77\n")
    result = streamctl("config", "--config", config, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["settings"]["idle_timeout"] == {"value": 77.0, "source": f"file {config}"}
    assert data["settings"]["viewer_window"]["source"] == "default"


def test_streamctl_config_bad_value_exits_2_with_one_line(tmp_path):
    config = write(tmp_path / "sk.toml", "viewer_window = -1\n")
    result = streamctl("config", "--config", config)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "viewer_window" in result.stderr


@pytest.mark.unit
def test_a_profile_in_the_file_replaces_only_its_namesake(tmp_path):
    """Finding 12: [quality_profiles.low] alone keeps copy, medium (the default) and high."""
    config = write(
        tmp_path / "sk.toml", '[quality_profiles.low]\nvideo = ["-c:v", "libx264"]\naudio = ["-c:a", "aac"]\n'
    )
    settings = load_settings(config, environ={})
    assert set(settings.quality_profiles) == {"copy", "low", "medium", "high"}
    assert settings.quality_profiles["low"]["video"] == ["-c:v", "libx264"]
    assert settings.quality_profiles["medium"]["video"][:2] == ["-c:v", "libx264"]


@pytest.mark.parametrize(
    "text, key",
    [
        ('[quality_profiles.low]\nvideo = ["-c:v", 5]\n', "quality_profiles"),
        ('[quality_profiles.low]\nvideo = ["-vf", "scale=1\\u0000"]\n', "quality_profiles"),
        ('[quality_profiles."bad name"]\nvideo = []\n', "quality_profiles"),
        ('[quality_profiles.low]\nanalyzeduration = "soon"\n', "quality_profiles"),
        ("[quality_profiles.low]\ncrf = 23\n", "quality_profiles"),
        ('user_agent = "UA\\r\\nX-Injected: 1"\n', "user_agent"),
        ("max_streams = -1\n", "max_streams"),
        ('tls_ca_file = "relative.pem"\n', "tls_ca_file"),
    ],
)
def test_bad_values_in_lists_and_tables_stop_the_program_at_load(tmp_path, text, key):
    config = write(tmp_path / "sk.toml", text)
    with pytest.raises(SettingsError, match=f"setting {key}"):
        load_settings(config, environ={})
    result = subprocess.run(
        [sys.executable, "-m", "streamctl", "config", "--config", config],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and key in result.stderr and "Traceback" not in result.stderr


def test_a_channel_without_quality_starts_with_only_low_defined(stack, extra_launcher, tmp_path):
    """Finding 12, end to end: the default quality (medium) is still there."""
    low = {"low": {"video": ["-c:v", "copy"], "audio": ["-c:a", "copy"]}}
    launcher = extra_launcher(hls_dir=str(tmp_path / "hls"), quality_profiles=json.dumps(low))
    stack.redis.set("channel:830", json.dumps({"source_url": stack.upstream_url("ch830")}))
    status, body = launcher.json("/channel/830/start", "POST")
    assert status == 200, body
    launcher.json("/channel/830/stop", "POST")


@pytest.mark.unit
def test_settings_are_one_typed_table():
    """Issue 17: one table (the Settings dataclass: type, default, parser, help per key), every
    value already of its declared type, so no caller casts."""
    import dataclasses
    import typing

    from streamstate.settings import SPECS, Settings

    settings = load_settings(None, {"idle_timeout": "90", "max_streams": "3", "hls_list_size": 4.0}, environ={})
    hints = typing.get_type_hints(Settings)
    assert [spec.key for spec in SPECS] == [f.name for f in dataclasses.fields(Settings) if "spec" in f.metadata]
    for spec in SPECS:
        declared = typing.get_origin(hints[spec.key]) or hints[spec.key]
        assert isinstance(getattr(settings, spec.key), declared), spec.key
    assert settings.idle_timeout == 90.0 and settings.max_streams == 3 and settings.hls_list_size == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.idle_timeout = 1.0
