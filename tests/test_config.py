import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from dpiguard.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, text):
    p = tmp_path / "dpiguard.yaml"
    p.write_text(text)
    return p


def _schema_keys() -> set[str]:
    """Every key of the file: `instance_id`, `section.key` (from the pydantic models)."""
    keys = set()
    for name, f in Config.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            keys |= {f"{name}.{key}" for key in f.annotation.model_fields}
        else:
            keys.add(name)
    return keys


def test_example_file_documents_every_key():
    example = yaml.safe_load((ROOT / "dpiguard.example.yaml").read_text())
    in_example = {f"{name}.{key}" for name, section in example.items() if isinstance(section, dict)
                  for key in section}
    in_example |= {name for name, value in example.items() if not isinstance(value, dict)}
    assert in_example == _schema_keys()
    assert "base_dir" not in Config.model_fields  # internal, not a key of the file
    doc = (ROOT / "docs" / "configuration.md").read_text()
    in_doc = set(re.findall(r"^\| `([a-z_]+(?:\.[a-z_]+)?)` \|", doc, flags=re.MULTILINE))
    assert in_doc == _schema_keys()


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
