import dataclasses
from pathlib import Path

import pytest
import yaml

from dpiguard.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, text):
    p = tmp_path / "dpiguard.yaml"
    p.write_text(text)
    return p


def test_example_file_documents_every_key():
    example = yaml.safe_load((ROOT / "dpiguard.example.yaml").read_text())
    for f in dataclasses.fields(Config):
        if f.metadata.get("internal"):
            continue
        assert f.name in example, f.name
        if dataclasses.is_dataclass(f.default_factory):
            section = {g.name for g in dataclasses.fields(f.default_factory)}
            assert set(example[f.name]) == section, f.name
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for section, keys in example.items():
        if isinstance(keys, dict):
            for key in keys:
                assert f"`{section}.{key}`" in doc, f"{section}.{key} missing from docs/configuration.md"


def test_example_file_loads_as_shipped(tmp_path):
    """`cp dpiguard.example.yaml /etc/dpiguard/dpiguard.yaml` (README, docs/deployment.md) is a valid
    start: only its upstream is a placeholder. Its empty instance_id means the default, hostname-pid."""
    cfg = load_config(ROOT / "dpiguard.example.yaml", {}, check_files=False)
    assert cfg.instance_id  # hostname-pid
    assert load_config(ROOT / "dpiguard.example.yaml", {"DPIGUARD_INSTANCE_ID": ""}, check_files=False).instance_id
    assert load_config(ROOT / "dpiguard.example.yaml", {"DPIGUARD_INSTANCE_ID": "px-2"},
                       check_files=False).instance_id == "px-2"


def test_env_overrides_file(tmp_path):
    p = _write(tmp_path, "upstream: {url: 'http://127.0.0.1:9000'}\nsessions: {idle_timeout: 600}\n")
    cfg = load_config(p, {"DPIGUARD_SESSIONS__IDLE_TIMEOUT": "900", "DPIGUARD_INSTANCE_ID": "px-2"},
                      check_files=False)
    assert cfg.sessions.idle_timeout == 900
    assert cfg.instance_id == "px-2"


@pytest.mark.parametrize("text, env, key", [
    ("", {}, "upstream.url"),
    ("upstream: {url: 'ftp://x'}", {}, "upstream.url"),
    ("upstream: {url: 'http://x/path'}", {}, "upstream.url"),
    ("upstream: {url: 'http://x'}\nsessions: {idle_timeout: -1}", {}, "sessions.idle_timeout"),
    ("upstream: {url: 'http://x'}\nsessions: {idle_timeout: 'soon'}", {}, "sessions.idle_timeout"),
    ("upstream: {url: 'http://x'}\nsessions: {idle_timeout: 90000}", {}, "sessions.idle_timeout"),
    ("upstream: {url: 'http://x'}\nsesions: {}", {}, "sesions"),
    ("upstream: {url: 'http://x'}", {"DPIGUARD_LOGIN__MAX_FAILURES": "zero"}, "login.max_failures"),
    ("upstream: {url: 'http://x'}", {"DPIGUARD_REDIS__URL": "http://redis"}, "redis.url"),
    ("upstream: {url: 'http://x'}\ntls: {cert_file: a.pem}", {}, "tls.key_file"),
    ("upstream: [1, 2", {}, "(file)"),
    ("- just\n- a list", {}, "(top level)"),
])
def test_invalid_configuration_names_the_key(tmp_path, text, env, key):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text), env, check_files=False)
    assert err.value.key == key
    assert key in str(err.value)


def test_missing_files_are_named(tmp_path):
    p = _write(tmp_path, f"upstream: {{url: 'http://x'}}\npolicies: {{dir: '{ROOT / 'policies'}'}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(p, {})
    assert err.value.key == "secrets.data_key_file"
