import os
import re
import socket
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from dpiguard.config import Config, ConfigError, Login, load_config

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


U = "upstream: {url: 'http://x'}\n"
KNOWN_TOP = ("adt, audit, careteam, console, decision_cache, directory, enrolment, fhir, identity, instance_id, limits, "
             "listen, login, mass_access, metrics, oidc, policies, privacy, redis, secrets, sessions, threads, tls, ui, "
             "upstream")


@pytest.mark.parametrize("text, env, key, message", [
    # what people see, and the console
    (U + "ui: {language: de}", {}, "ui.language", "unknown language 'de' (known: fr, en)"),
    (U + "ui: {languages: [en]}", {}, "ui.language", "must be one of ui.languages (en)"),
    (U + "ui: {timezone: Mars/Olympus}", {}, "ui.timezone", "unknown time zone 'Mars/Olympus' (e.g. Europe/Paris)"),
    (U + "ui: {banner_position: left}", {}, "ui.banner_position", "must be 'top' or 'bottom', got 'left'"),
    (U + "login: {trusted_networks: [10.0.0.0/33]}", {}, "login.trusted_networks", "not an address or CIDR network: '10.0.0.0/33'"),
    (U + "console: {roles: {dpo: [everything]}}", {}, "console.roles", "role 'dpo': unknown capability 'everything' (known: traces, names, timeline, breakglass, alerts, stats, "
     "explain, helpdesk)"),
    (U + "console: {roles: {DPO: [traces]}}", {}, "console.roles", "role name 'DPO' must be lowercase letters, digits or '_'"),
    (U + "sessions: {resume_seconds: 7200}", {}, "sessions.resume_seconds", "must be from 0 (off) to 3600 seconds"),
    # unknown keys, at any level, from the file or the environment
    (U + "sessions: {idel_timeout: 5}", {}, "sessions.idel_timeout",
     "unknown key (known: absolute_lifetime, cookie_name, idle_timeout, resume_max_bytes, resume_seconds, "
     "touch_interval)"),
    (U + "base_dir: /tmp", {}, "base_dir", f"unknown key (known: {KNOWN_TOP})"),
    (U + "listen: {1: x}", {}, "listen.1", "unknown key (known: host, port)"),
    (U, {"DPIGUARD_FOO": "1"}, "foo", f"unknown key (known: {KNOWN_TOP})"),
    (U, {"DPIGUARD_LISTEN__PORTT": "1"}, "listen.portt", "unknown key (known: host, port)"),
    # strict types
    (U + "listen: {port: '8080'}", {}, "listen.port", "expected a whole number, got '8080'"),
    (U + "listen: {port: 8080.0}", {}, "listen.port", "expected a whole number, got 8080.0"),
    (U + "listen: {port: true}", {}, "listen.port", "expected a whole number, got True"),
    (U + "adt: {enabled: 1}", {}, "adt.enabled", "expected true or false, got 1"),
    (U, {"DPIGUARD_ADT__ENABLED": "1"}, "adt.enabled", "expected true or false, got 1"),
    (U + "redis: {socket_timeout: '1'}", {}, "redis.socket_timeout", "expected a number, got '1'"),
    (U + "redis: {socket_timeout: true}", {}, "redis.socket_timeout", "expected a number, got True"),
    ("upstream: {url: ''}", {}, "upstream.url", "expected a non-empty text, got ''"),
    (U + "listen: {host: '  '}", {}, "listen.host", "expected a non-empty text, got '  '"),
    (U + "instance_id: '  '", {}, "instance_id", "expected a non-empty text, got '  '"),
    (U + "instance_id: 7", {}, "instance_id", "expected a non-empty text, got 7"),
    (U + "upstream: {url: 'http://x', ca_file: ''}", {}, "upstream.ca_file", "expected a text or null, got ''"),
    (U + "fhir: {public_origin: 3}", {}, "fhir.public_origin", "expected a text or null, got 3"),
    (U + "metrics: {allow_from: [1]}", {}, "metrics.allow_from", "expected a list of texts, got [1]"),
    (U + "metrics: {allow_from: null}", {}, "metrics.allow_from", "expected a list of texts, got None"),
    (U + "listen: 5", {}, "listen", "expected a mapping of keys, got int"),
    (U, {"DPIGUARD_LISTEN": "5", "DPIGUARD_LISTEN__PORT": "1"}, "listen",
     "environment variable DPIGUARD_LISTEN__PORT conflicts with another one"),
    # value checks of one key
    (U + "listen: {port: 0}", {}, "listen.port", "must be greater than 0, got 0"),
    (U + "listen: {port: 70000}", {}, "listen.port", "must be at most 65535, got 70000"),
    (U + "adt: {listen_port: 70000}", {}, "adt.listen_port", "must be at most 65535, got 70000"),
    (U + "redis: {socket_timeout: 0}", {}, "redis.socket_timeout", "must be greater than 0"),
    (U + "redis: {prefix: 'a b'}", {}, "redis.prefix", "may contain only letters, digits, '-' and '_'"),
    (U + "sessions: {cookie_name: 'a;b'}", {}, "sessions.cookie_name", "may contain only letters, digits, '-' and '_'"),
    (U + "metrics: {allow_from: 'a, 10.0.0.0/8'}", {}, "metrics.allow_from", "not an address or CIDR network: 'a'"),
    (U + "careteam: {grace_seconds: -1}", {}, "careteam.grace_seconds", "must be 0 or more"),
    (U + "adt: {read_timeout: 0}", {}, "adt.read_timeout", "must be greater than 0"),
    (U + "adt: {timezone: Mars/Base}", {}, "adt.timezone", "unknown time zone 'Mars/Base' (e.g. Europe/Paris)"),
    (U + "policies: {reload_interval: -1}", {}, "policies.reload_interval", "must be 0 (no reload) or more seconds"),
    (U + "decision_cache: {ttl: 0}", {}, "decision_cache.ttl", "must be greater than 0"),
    (U + "audit: {on_failure: x}", {}, "audit.on_failure", "must be 'refuse' or 'serve', got 'x'"),
    (U + "audit: {on_failure: 5}", {}, "audit.on_failure", "expected a non-empty text, got 5"),
    (U + "audit: {checkpoint_seconds: 0}", {}, "audit.checkpoint_seconds", "must be greater than 0"),
    (U + "audit: {group_commit_ms: 101}", {}, "audit.group_commit_ms", "must be between 0 and 100 (milliseconds)"),
    (U + "mass_access: {max_patients: -1}", {}, "mass_access.max_patients", "must be 0 (off) or more"),
    (U + "mass_access: {action: x}", {}, "mass_access.action", "must be 'alert' or 'throttle', got 'x'"),
    (U + "mass_access: {refresh_seconds: 0}", {}, "mass_access.refresh_seconds", "must be greater than 0"),
    ("upstream: {url: 'ftp://x'}", {}, "upstream.url", "must be an http:// or https:// URL with a host, got 'ftp://x'"),
    ("upstream: {url: 'http://[x'}", {}, "upstream.url",
     "must be an http:// or https:// URL with a host, got 'http://[x'"),
    ("upstream: {url: 'http://x?q=1'}", {}, "upstream.url",
     "must be an origin only (scheme://host[:port]), without path or query"),
    (U + "fhir: {public_origin: 'http://p/x'}", {}, "fhir.public_origin",
     "must be an origin like https://dpi-proxy.example.org"),
    (U + "redis: {url: 'http://r'}", {}, "redis.url", "scheme must be one of redis://, rediss://, unix://, "
     "redis+sentinel://, rediss+sentinel://, redis+cluster://, rediss+cluster://, got 'http://r'"),
    # checks across keys
    ("", {}, "upstream.url", "is required (the DPI application dpiguard protects, e.g. https://dpi.example.org)"),
    (U + "sessions: {idle_timeout: 50000}", {}, "sessions.idle_timeout", "must not exceed sessions.absolute_lifetime"),
    (U + "redis: {tls_key_file: k.pem}", {}, "redis.tls_cert_file",
     "redis.tls_cert_file and redis.tls_key_file go together"),
    (U + "tls: {key_file: k.pem}", {}, "tls.cert_file", "tls.cert_file and tls.key_file go together"),
    (U + "audit: {path: a, signing_key_file: a/k.pem}", {}, "audit.signing_key_file",
     "must be kept outside the audit folder (audit.path)"),
    # unknown keys and wrong types anywhere come before value checks
    (U + "listen: {port: 0}\nsesions: {}", {}, "sesions", f"unknown key (known: {KNOWN_TOP})"),
    (U + "listen: {port: 0}\naudit: {rotate_bytes: big}", {}, "audit.rotate_bytes", "expected a whole number, got 'big'"),
    (U + "listen: {bad: 1, port: x}", {}, "listen.bad", "unknown key (known: host, port)"),
])
def test_error_messages(tmp_path, text, env, key, message):
    with pytest.raises(ConfigError) as err:  # never a pydantic ValidationError
        load_config(_write(tmp_path, text), env, check_files=False)
    assert err.value.key == key
    assert str(err.value) == f"configuration key '{key}': {message}"


def test_values_and_defaults(tmp_path):
    p = _write(tmp_path, U + "listen:\nredis: {socket_timeout: 1}\nadt: {enabled: yes}\n"
                         "identity: {strip_headers: [X-A, X-B]}\n")
    cfg = load_config(p, {"DPIGUARD_METRICS__ALLOW_FROM": "10.0.0.0/8,  ::1 ,", "DPIGUARD_UPSTREAM__CA_FILE": "",
                          "DPIGUARD_POLICIES__RELOAD_INTERVAL": "0", "DPIGUARD_CONFIG": "x",
                          "DPIGUARD_REDIS_PASSWORD": "p", "DPIGUARD_RUNTIME_DIR": "d", "DPIGUARD_TEST_REDIS": "s"},
                      check_files=False)
    assert cfg.listen.port == 8080 and cfg.listen.host == "127.0.0.1"  # an empty section: the defaults
    assert cfg.redis.socket_timeout == 1.0 and isinstance(cfg.redis.socket_timeout, float)
    assert cfg.policies.reload_interval == 0.0 and isinstance(cfg.policies.reload_interval, float)
    assert cfg.adt.enabled is True
    assert cfg.identity.strip_headers == ["X-A", "X-B"]
    assert cfg.metrics.allow_from == ["10.0.0.0/8", "::1"]
    assert cfg.upstream.ca_file is None
    assert cfg.instance_id == f"{socket.gethostname()}-{os.getpid()}"
    assert cfg.base_dir == tmp_path.resolve()
    assert cfg.path("a/b") == tmp_path.resolve() / "a/b" and cfg.path("/abs") == Path("/abs") and cfg.path(None) is None
    assert cfg.audience == "http://x" and cfg.cookie_name == "dpiguard_session" and not cfg.tls_enabled
    assert load_config(None, {"DPIGUARD_UPSTREAM__URL": "http://e"}, check_files=False).base_dir == Path.cwd()


def test_tls_cookie_and_audience(tmp_path):
    p = _write(tmp_path, "upstream: {url: 'https://dpi:8443/', audience: dpi}\ntls: {cert_file: c.pem, key_file: k.pem}")
    cfg = load_config(p, {}, check_files=False)
    assert cfg.tls_enabled and cfg.cookie_name == "__Host-dpiguard_session" and cfg.audience == "dpi"
    cfg.upstream.audience = None
    assert cfg.audience == "https://dpi:8443"


def test_sections_stay_plain_mutable_objects(tmp_path):
    cfg = load_config(_write(tmp_path, U), {}, check_files=False)
    cfg.adt.listen_host = "0.0.0.0"  # as `dpiguard adt listen --host --port` does
    cfg.adt.listen_port = 2576
    assert (cfg.adt.listen_host, cfg.adt.listen_port) == ("0.0.0.0", 2576)
    assert Login().max_failures == 3
    assert Login(max_failures=2, lock_seconds=1).lock_seconds == 1


def test_files_must_exist(tmp_path):
    (tmp_path / "pol").mkdir()
    text = U + "policies: {dir: pol}\nsecrets: {data_key_file: d.key, assertion_private_key_file: a.pem}\n" \
               "audit: {signing_key_file: k.pem}\n"
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text + "tls: {cert_file: c.pem, key_file: k.pem}"), {})
    assert str(err.value) == f"configuration key 'tls.cert_file': file not found: {tmp_path.resolve() / 'c.pem'}"
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text), {})
    assert err.value.key == "secrets.data_key_file"
    assert "(create it with 'dpiguard keys init')" in str(err.value)
    for name in ("d.key", "a.pem", "k.pem"):
        (tmp_path / name).write_text("x")
    assert load_config(_write(tmp_path, text), {}).policies.dir == "pol"
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text.replace("dir: pol", "dir: nowhere")), {})
    assert str(err.value) == f"configuration key 'policies.dir': folder not found: {tmp_path.resolve() / 'nowhere'}"
