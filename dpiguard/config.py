"""dpiguard configuration: one YAML file, overridable by environment variables, validated up front.

Every key is documented in ``docs/configuration.md`` and in ``dpiguard.example.yaml``. An environment
variable ``DPIGUARD_<SECTION>__<KEY>`` overrides ``section.key`` (``DPIGUARD_REDIS__URL`` overrides
``redis.url``); ``DPIGUARD_INSTANCE_ID`` overrides the top-level ``instance_id``. Values from the
environment are read as YAML scalars, so ``DPIGUARD_SESSIONS__IDLE_TIMEOUT=900`` is a number.

An invalid configuration raises :class:`ConfigError` naming the key, before anything listens.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

ENV_PREFIX = "DPIGUARD_"
#: Environment variables that are not configuration keys (see docs/configuration.md).
ENV_ONLY = frozenset({"DPIGUARD_CONFIG", "DPIGUARD_RUNTIME_DIR", "DPIGUARD_REDIS_PASSWORD", "DPIGUARD_TEST_REDIS"})


class ConfigError(ValueError):
    """A configuration problem; ``key`` is the dotted name of the offending key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"configuration key '{key}': {message}")


@dataclass
class Listen:
    host: str = "127.0.0.1"
    port: int = 8080


@dataclass
class Upstream:
    url: str = ""
    ca_file: str | None = None
    audience: str | None = None


@dataclass
class TLS:
    cert_file: str | None = None
    key_file: str | None = None


@dataclass
class RedisSection:
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "dpiguard"
    socket_timeout: float = 0.5
    # Topology, TLS and ACL: see dpiguard/redisconn.py and docs/operations.md.
    username: str | None = None
    password_file: str | None = None
    sentinel_password_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None


@dataclass
class Policies:
    dir: str = "policies"
    reload_interval: float = 1.0


@dataclass
class Secrets:
    data_key_file: str = "secrets/data.key"
    assertion_private_key_file: str = "secrets/assertion-ed25519.pem"
    assertion_ttl: int = 60


@dataclass
class Sessions:
    idle_timeout: int = 1800
    absolute_lifetime: int = 43200
    touch_interval: int = 60
    cookie_name: str = "dpiguard_session"


@dataclass
class Login:
    max_failures: int = 3
    failure_window: int = 600
    lock_seconds: int = 300
    ip_max_failures: int = 20
    ip_window: int = 600
    ip_block_seconds: int = 300
    issuer: str = "dpiguard"


@dataclass
class CareTeam:
    grace_seconds: int = 86400


@dataclass
class Adt:
    enabled: bool = False
    listen_host: str = "127.0.0.1"
    listen_port: int = 2575
    max_message_bytes: int = 1_048_576
    read_timeout: float = 30.0
    dedup_ttl: int = 604800
    patient_id_authority: str | None = None
    timezone: str = "Europe/Paris"
    application: str = "DPIGUARD"


@dataclass
class DecisionCacheSection:
    ttl: float = 60.0
    max_entries: int = 200_000


@dataclass
class Audit:
    path: str = "var/audit"
    signing_key_file: str = "secrets/audit-ed25519.pem"
    rotate_bytes: int = 64 << 20
    rotate_seconds: int = 86400
    checkpoint_records: int = 1000
    checkpoint_seconds: float = 60.0
    group_commit_ms: float = 0.0
    group_commit_max: int = 1024
    on_failure: str = "refuse"


@dataclass
class MassAccess:
    max_patients: int = 50
    window_seconds: int = 600
    action: str = "alert"
    throttle_seconds: int = 900
    refresh_seconds: float = 1.0


@dataclass
class Identity:
    strip_headers: list[str] = field(default_factory=list)


@dataclass
class Limits:
    max_header_bytes: int = 16384
    max_url_bytes: int = 4096


@dataclass
class FhirSection:
    public_origin: str | None = None  # scheme://host[:port] clients use to reach dpiguard (FHIR links)


@dataclass
class Metrics:
    allow_from: list[str] = field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])


@dataclass
class Config:
    instance_id: str = ""
    listen: Listen = field(default_factory=Listen)
    upstream: Upstream = field(default_factory=Upstream)
    tls: TLS = field(default_factory=TLS)
    redis: RedisSection = field(default_factory=RedisSection)
    policies: Policies = field(default_factory=Policies)
    secrets: Secrets = field(default_factory=Secrets)
    sessions: Sessions = field(default_factory=Sessions)
    login: Login = field(default_factory=Login)
    careteam: CareTeam = field(default_factory=CareTeam)
    adt: Adt = field(default_factory=Adt)
    decision_cache: DecisionCacheSection = field(default_factory=DecisionCacheSection)
    audit: Audit = field(default_factory=Audit)
    mass_access: MassAccess = field(default_factory=MassAccess)
    identity: Identity = field(default_factory=Identity)
    limits: Limits = field(default_factory=Limits)
    fhir: FhirSection = field(default_factory=FhirSection)
    metrics: Metrics = field(default_factory=Metrics)
    base_dir: Path = field(default_factory=Path.cwd, metadata={"internal": True})

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls.cert_file)

    @property
    def cookie_name(self) -> str:
        # The __Host- prefix makes browsers refuse the cookie unless it is Secure, host-only, Path=/.
        name = self.sessions.cookie_name
        return f"__Host-{name}" if self.tls_enabled else name

    @property
    def audience(self) -> str:
        if self.upstream.audience:
            return self.upstream.audience
        parts = urlsplit(self.upstream.url)
        return f"{parts.scheme}://{parts.netloc}"

    def path(self, value: str | None) -> Path | None:
        """Resolve a path from the file relative to the configuration file's folder."""
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)


# Validation -----------------------------------------------------------------------------------

_POSITIVE_INTS = {
    "listen.port", "secrets.assertion_ttl", "sessions.idle_timeout", "sessions.absolute_lifetime",
    "sessions.touch_interval", "login.max_failures", "login.failure_window", "login.lock_seconds",
    "login.ip_max_failures", "login.ip_window", "login.ip_block_seconds", "decision_cache.max_entries",
    "limits.max_header_bytes", "limits.max_url_bytes",
    "adt.listen_port", "adt.max_message_bytes", "adt.dedup_ttl",
    "audit.rotate_bytes", "audit.rotate_seconds", "audit.checkpoint_records", "audit.group_commit_max",
    "mass_access.window_seconds", "mass_access.throttle_seconds",
}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    text = str(typ)
    if typ is bool or text == "bool":
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if typ is int or text == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected a whole number, got {value!r}")
        return value
    if typ is float or text == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if typ is str or text == "str":
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(key, f"expected a non-empty text, got {value!r}")
        return value
    if text == "str | None":
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(key, f"expected a text or null, got {value!r}")
        return value
    if text == "list[str]":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"expected a list of texts, got {value!r}")
        return value
    raise ConfigError(key, f"unsupported type {text}")  # pragma: no cover - schema error


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(prefix or "(top level)", f"expected a mapping of keys, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in fields:
            name = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(name, f"unknown key (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name not in data:
            continue
        value = data[name]
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            kwargs[name] = _build(f.default_factory, value if value is not None else {}, dotted)
        else:
            kwargs[name] = _coerce(dotted, value, f.type)
    return cls(**kwargs)


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_ONLY:
            continue
        rest = name[len(ENV_PREFIX):].lower()
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        if "__" in rest:
            section, key = rest.split("__", 1)
            out.setdefault(section, {})
            if not isinstance(out[section], dict):
                raise ConfigError(section, f"environment variable {name} conflicts with another one")
            out[section][key] = value
        else:
            out[rest] = value
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def _validate(cfg: Config, check_files: bool = True) -> None:
    for dotted in _POSITIVE_INTS:
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value <= 0:
            raise ConfigError(dotted, f"must be greater than 0, got {value}")
    if cfg.listen.port > 65535:
        raise ConfigError("listen.port", f"must be at most 65535, got {cfg.listen.port}")
    if not cfg.upstream.url:
        raise ConfigError("upstream.url", "is required (the DPI application dpiguard protects, e.g. https://dpi.example.org)")
    parts = urlsplit(cfg.upstream.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("upstream.url", f"must be an http:// or https:// URL with a host, got {cfg.upstream.url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError("upstream.url", "must be an origin only (scheme://host[:port]), without path or query")
    from dpiguard.storage.clients import RedisSpec, RedisURLError

    try:
        RedisSpec.from_url(cfg.redis.url)
    except RedisURLError as exc:
        raise ConfigError("redis.url", str(exc)) from None
    if bool(cfg.redis.tls_cert_file) != bool(cfg.redis.tls_key_file):
        key = "redis.tls_key_file" if cfg.redis.tls_cert_file else "redis.tls_cert_file"
        raise ConfigError(key, "redis.tls_cert_file and redis.tls_key_file go together")
    import ipaddress

    for net in cfg.metrics.allow_from:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError("metrics.allow_from", f"not an address or CIDR network: {net!r}") from None
    if cfg.redis.socket_timeout <= 0:
        raise ConfigError("redis.socket_timeout", "must be greater than 0")
    if not cfg.redis.prefix.replace("-", "").replace("_", "").isalnum():
        raise ConfigError("redis.prefix", "may contain only letters, digits, '-' and '_'")
    if cfg.sessions.idle_timeout > cfg.sessions.absolute_lifetime:
        raise ConfigError("sessions.idle_timeout", "must not exceed sessions.absolute_lifetime")
    if not cfg.sessions.cookie_name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError("sessions.cookie_name", "may contain only letters, digits, '-' and '_'")
    if cfg.careteam.grace_seconds < 0:
        raise ConfigError("careteam.grace_seconds", "must be 0 or more")
    if cfg.adt.listen_port > 65535:
        raise ConfigError("adt.listen_port", f"must be at most 65535, got {cfg.adt.listen_port}")
    if cfg.adt.read_timeout <= 0:
        raise ConfigError("adt.read_timeout", "must be greater than 0")
    try:
        ZoneInfo(cfg.adt.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError("adt.timezone", f"unknown time zone {cfg.adt.timezone!r} (e.g. Europe/Paris)") from None
    if cfg.policies.reload_interval < 0:
        raise ConfigError("policies.reload_interval", "must be 0 (no reload) or more seconds")
    if cfg.decision_cache.ttl <= 0:
        raise ConfigError("decision_cache.ttl", "must be greater than 0")
    _validate_audit(cfg)
    if bool(cfg.tls.cert_file) != bool(cfg.tls.key_file):
        key = "tls.key_file" if cfg.tls.cert_file else "tls.cert_file"
        raise ConfigError(key, "tls.cert_file and tls.key_file go together")
    if cfg.fhir.public_origin is not None:
        o = urlsplit(cfg.fhir.public_origin)
        if o.scheme not in ("http", "https") or not o.hostname or o.path not in ("", "/") or o.query:
            raise ConfigError("fhir.public_origin", "must be an origin like https://dpi-proxy.example.org")
    if not check_files:
        return
    for dotted in ("tls.cert_file", "tls.key_file", "upstream.ca_file", "redis.password_file",
                   "redis.sentinel_password_file", "redis.tls_ca_file", "redis.tls_cert_file", "redis.tls_key_file"):
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value and not cfg.path(value).is_file():
            raise ConfigError(dotted, f"file not found: {cfg.path(value)}")
    if not cfg.path(cfg.policies.dir).is_dir():
        raise ConfigError("policies.dir", f"folder not found: {cfg.path(cfg.policies.dir)}")
    for dotted in ("secrets.data_key_file", "secrets.assertion_private_key_file", "audit.signing_key_file"):
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if not cfg.path(value).is_file():
            raise ConfigError(dotted, f"file not found: {cfg.path(value)} (create it with 'dpiguard keys init')")


def _validate_audit(cfg: Config) -> None:
    a = cfg.audit
    if a.on_failure not in ("refuse", "serve"):
        raise ConfigError("audit.on_failure", f"must be 'refuse' or 'serve', got {a.on_failure!r}")
    if a.checkpoint_seconds <= 0:
        raise ConfigError("audit.checkpoint_seconds", "must be greater than 0")
    if not 0 <= a.group_commit_ms <= 100:
        raise ConfigError("audit.group_commit_ms", "must be between 0 and 100 (milliseconds)")
    m = cfg.mass_access
    if m.max_patients < 0:
        raise ConfigError("mass_access.max_patients", "must be 0 (off) or more")
    if m.action not in ("alert", "throttle"):
        raise ConfigError("mass_access.action", f"must be 'alert' or 'throttle', got {m.action!r}")
    if m.refresh_seconds <= 0:
        raise ConfigError("mass_access.refresh_seconds", "must be greater than 0")
    store = cfg.path(a.path).resolve()
    key = cfg.path(a.signing_key_file).resolve()
    if key == store or store in key.parents:
        raise ConfigError("audit.signing_key_file", "must be kept outside the audit folder (audit.path)")


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None, *, check_files: bool = True) -> Config:
    """Read the YAML file (if any), apply environment overrides, validate, return a Config."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    base_dir = Path.cwd()
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("(file)", f"cannot read {p}: {exc}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError("(file)", f"{p} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError("(top level)", f"{p} must contain a mapping of sections")
        data = loaded
        base_dir = p.resolve().parent
    data = _merge(data, _env_overrides(env))
    if data.get("instance_id") in ("", None):  # empty (as in dpiguard.example.yaml): the default below
        data.pop("instance_id", None)
    cfg: Config = _build(Config, data, "")
    cfg.base_dir = base_dir
    if not cfg.instance_id:
        cfg.instance_id = f"{socket.gethostname()}-{os.getpid()}"
    _validate(cfg, check_files)
    return cfg


