"""dpiguard configuration: one YAML file, overridable by environment variables, validated up front.

Every key is documented in ``docs/configuration.md`` and in ``dpiguard.example.yaml``. An environment
variable ``DPIGUARD_<SECTION>__<KEY>`` overrides ``section.key`` (``DPIGUARD_REDIS__URL`` overrides
``redis.url``); ``DPIGUARD_INSTANCE_ID`` overrides the top-level ``instance_id``. Values from the
environment are read as YAML scalars, so ``DPIGUARD_SESSIONS__IDLE_TIMEOUT=900`` is a number.

The schema is a set of pydantic models. Types are strict (no ``"8080"`` for a number, no ``1`` for a
boolean), unknown keys are refused, single values are checked by the field types below, and checks
that involve several keys (or the files) by :meth:`Config._check_consistency`. The models are plain,
mutable objects once built: reading an attribute does no validation.

An invalid configuration raises :class:`ConfigError` naming the key, before anything listens; a
pydantic ``ValidationError`` never reaches the user (:func:`_config_error` turns it into one).
"""

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    model_validator,
)

ENV_PREFIX = "DPIGUARD_"
#: Environment variables that are not configuration keys (see docs/configuration.md).
ENV_ONLY = frozenset({"DPIGUARD_CONFIG", "DPIGUARD_RUNTIME_DIR", "DPIGUARD_REDIS_PASSWORD", "DPIGUARD_TEST_REDIS"})


class ConfigError(ValueError):
    """A configuration problem; ``key`` is the dotted name of the offending key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"configuration key '{key}': {message}")


# Field types ----------------------------------------------------------------------------------
#
# Each type carries its own error message. A value of the wrong type raises _WrongType (reported before
# any value check, wherever it is in the file); a value check raises ValueError. The message is used
# as is in the ConfigError.


class _WrongType(ValueError):
    """The value has the wrong type or shape for its key."""


def _expect(what: str) -> WrapValidator:
    """Report any failure of the wrapped (strict) validation as 'expected WHAT, got VALUE'."""

    def wrap(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise _WrongType(f"expected {what}, got {value!r}") from None

    return WrapValidator(wrap)


def _check(ok: Callable[[Any], bool], message: str) -> AfterValidator:
    """A value check; ``message`` may refer to the value as ``{value}`` or ``{value!r}``."""

    def check(value: Any) -> Any:
        if not ok(value):
            raise ValueError(message.format(value=value))
        return value

    return AfterValidator(check)


def _split_commas(value: Any) -> Any:
    # An environment variable can only hold a text: "a, b" is the list [a, b].
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


_not_blank = _check(lambda v: bool(v.strip()), "blank")  # only ever seen through _expect's message

Flag = Annotated[bool, Strict(), _expect("true or false")]
Whole = Annotated[int, Strict(), _expect("a whole number")]
Number = Annotated[float, Strict(), _expect("a number")]  # strict float still takes an int (as a float)
Text = Annotated[str, Strict(), _not_blank, _expect("a non-empty text")]
OptionalText = Annotated[Annotated[str, Strict(), _not_blank] | None, _expect("a text or null")]
TextList = Annotated[list[Annotated[str, Strict()]], Strict(), BeforeValidator(_split_commas),
                     _expect("a list of texts")]

PositiveWhole = Annotated[Whole, _check(lambda v: v > 0, "must be greater than 0, got {value}")]
Port = Annotated[PositiveWhole, _check(lambda v: v <= 65535, "must be at most 65535, got {value}")]
PositiveNumber = Annotated[Number, _check(lambda v: v > 0, "must be greater than 0")]
Name = Annotated[Text, _check(lambda v: v.replace("-", "").replace("_", "").isalnum(),
                              "may contain only letters, digits, '-' and '_'")]


def _split_url(url: str) -> Any:
    try:
        return urlsplit(url)
    except ValueError:  # e.g. "http://[x": a bracket that opens no IPv6 address
        return urlsplit("")


def _http_origin(url: str) -> str:
    parts = _split_url(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host, got {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("must be an origin only (scheme://host[:port]), without path or query")
    return url


def _public_origin(url: str | None) -> str | None:
    if url is not None:
        o = _split_url(url)
        if o.scheme not in ("http", "https") or not o.hostname or o.path not in ("", "/") or o.query:
            raise ValueError("must be an origin like https://dpi-proxy.example.org")
    return url


def _redis_url(url: str) -> str:
    from dpiguard.storage.clients import RedisSpec, RedisURLError

    try:
        RedisSpec.from_url(url)
    except RedisURLError as exc:
        raise ValueError(str(exc)) from None
    return url


def _networks(nets: list[str]) -> list[str]:
    for net in nets:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ValueError(f"not an address or CIDR network: {net!r}") from None
    return nets


def _time_zone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (e.g. Europe/Paris)") from None
    return name


# Sections -------------------------------------------------------------------------------------


class _Section(BaseModel):
    """A section of the file: only its own keys; an empty (null) section means all defaults."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, data: Any) -> Any:
        if data is None:
            return {}
        if not isinstance(data, (Mapping, cls)):
            raise _WrongType(f"expected a mapping of keys, got {type(data).__name__}")
        return data


class Listen(_Section):
    host: Text = "127.0.0.1"
    port: Port = 8080


class Upstream(_Section):
    url: Annotated[Text, AfterValidator(_http_origin)] = ""  # required: see Config._check_consistency
    ca_file: OptionalText = None
    audience: OptionalText = None


class TLS(_Section):
    cert_file: OptionalText = None
    key_file: OptionalText = None


class RedisSection(_Section):
    url: Annotated[Text, AfterValidator(_redis_url)] = "redis://127.0.0.1:6379/0"
    prefix: Name = "dpiguard"
    socket_timeout: PositiveNumber = 0.5
    # Topology, TLS and ACL: see dpiguard/storage/clients.py and docs/operations.md.
    username: OptionalText = None
    password_file: OptionalText = None
    sentinel_password_file: OptionalText = None
    tls_ca_file: OptionalText = None
    tls_cert_file: OptionalText = None
    tls_key_file: OptionalText = None


class Policies(_Section):
    dir: Text = "policies"
    reload_interval: Annotated[Number, _check(lambda v: v >= 0, "must be 0 (no reload) or more seconds")] = 1.0
    # Only a set matching its seal.json (dpiguard policy seal) goes into service: dpiguard/policy/seal.py.
    require_seal: Flag = True


class Secrets(_Section):
    data_key_file: Text = "secrets/data.key"
    assertion_private_key_file: Text = "secrets/assertion-ed25519.pem"
    assertion_ttl: PositiveWhole = 60


class Sessions(_Section):
    idle_timeout: PositiveWhole = 1800
    absolute_lifetime: PositiveWhole = 43200
    touch_interval: PositiveWhole = 60
    cookie_name: Name = "dpiguard_session"
    # A form sent after the session ended by inactivity is kept (encrypted, in Redis) this long while
    # its author logs in again, then sent once (docs/configuration.md). 0 = not kept.
    resume_seconds: Annotated[Whole, _check(lambda v: 0 <= v <= 3600, "must be from 0 (off) to 3600 seconds")] = 900
    resume_max_bytes: Annotated[PositiveWhole, _check(lambda v: v <= 1_048_576, "must be at most 1048576")] = 65536


class Login(_Section):
    """The ``login`` section, also the policy of :class:`dpiguard.auth.login.Authenticator`."""

    max_failures: PositiveWhole = 3
    failure_window: PositiveWhole = 600
    lock_seconds: PositiveWhole = 300
    ip_max_failures: PositiveWhole = 20
    ip_window: PositiveWhole = 600
    ip_block_seconds: PositiveWhole = 300
    # Once an address reached ip_max_failures it is slowed down (one attempt per ip_slow_seconds),
    # never blocked: a ward behind one NAT address keeps working. Trusted networks are never slowed.
    ip_slow_seconds: Annotated[PositiveWhole, _check(lambda v: v <= 60, "must be at most 60 seconds")] = 2
    trusted_networks: Annotated[TextList, AfterValidator(_networks)] = Field(default_factory=list)
    issuer: Text = "dpiguard"


def _https_or_loopback(url: str | None) -> str | None:
    """An https:// URL, or http:// on a loopback host only (tests, a local IdP)."""
    if url is None:
        return url
    parts = _split_url(url)
    loopback = parts.hostname in ("127.0.0.1", "::1", "localhost")
    if not parts.hostname or not (parts.scheme == "https" or (parts.scheme == "http" and loopback)):
        raise ValueError(f"must be an https:// URL (http:// only on 127.0.0.1/localhost), got {url!r}")
    if parts.fragment:
        raise ValueError("must not have a #fragment")
    return url


def _jws_algorithms(algs: list[str]) -> list[str]:
    allowed = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
    if not algs:
        raise ValueError("must name at least one signature algorithm")
    for alg in algs:
        if alg not in allowed:
            raise ValueError(f"{alg!r} is not accepted (only asymmetric signatures: {', '.join(allowed)}; "
                             "never 'none' nor HS256/384/512)")
    return algs


class Oidc(_Section):
    """OpenID Connect login, generic or with the Pro Santé Connect profile (docs/authentication.md).

    Off by default. Roles come from ``policies/oidc.yaml`` (no file: nobody gets a role)."""

    enabled: Flag = False
    profile: Annotated[Text, _check(lambda v: v in ("generic", "psc"), "must be 'generic' or 'psc', not {value!r}")] = "generic"
    issuer: Annotated[OptionalText, AfterValidator(_https_or_loopback)] = None  # discovery: ISSUER/.well-known/openid-configuration
    client_id: OptionalText = None
    client_secret_file: OptionalText = None  # a file holding the secret (client_secret_basic / _post)
    token_auth: Annotated[Text, _check(lambda v: v in ("client_secret_basic", "client_secret_post", "private_key_jwt"),
                                       "must be client_secret_basic, client_secret_post or private_key_jwt")] = "client_secret_basic"
    private_key_file: OptionalText = None  # PEM private key for private_key_jwt
    redirect_uri: Annotated[OptionalText, AfterValidator(_https_or_loopback)] = None  # https://proxy/_dpiguard/oidc/callback
    post_logout_redirect_uri: Annotated[OptionalText, AfterValidator(_https_or_loopback)] = None
    scopes: TextList = Field(default_factory=lambda: ["openid", "profile"])
    login_claim: Text = "preferred_username"  # the dpiguard login (TOTP account, trace records)
    name_claim: Text = "name"
    userinfo: Flag = True  # also read the userinfo endpoint (Pro Santé Connect puts SubjectRefPro there)
    required_acr: OptionalText = None  # psc: eidas1 when not set
    mfa_acr: TextList = Field(default_factory=list)  # acr values that vouch for a second factor (psc: eidas1)
    mfa_amr: TextList = Field(default_factory=lambda: ["mfa", "otp", "hwk", "sc", "swk"])
    algorithms: Annotated[TextList, AfterValidator(_jws_algorithms)] = Field(default_factory=lambda: ["RS256", "PS256", "ES256"])
    clock_skew: Annotated[Whole, _check(lambda v: 0 <= v <= 300, "must be 0 to 300 seconds")] = 60
    http_timeout: Annotated[PositiveNumber, _check(lambda v: v <= 30, "must be at most 30 seconds")] = 5.0
    flow_seconds: Annotated[PositiveWhole, _check(lambda v: v <= 1800, "must be at most 1800 seconds")] = 300
    jwks_refresh_seconds: Annotated[Whole, _check(lambda v: v >= 0, "must be 0 or more")] = 30  # at most one re-fetch on an unknown kid per this
    jwks_max_age: PositiveWhole = 3600
    button_label: OptionalText = None  # e.g. "Se connecter avec le compte de l'hôpital"

    @property
    def acr_required(self) -> str | None:
        return self.required_acr or ("eidas1" if self.profile == "psc" else None)

    @property
    def acr_vouching(self) -> list[str]:
        return list(self.mfa_acr) or (["eidas1"] if self.profile == "psc" else [])


class Enrolment(_Section):
    """The ``enrolment`` section: enrolment links, recovery codes and security keys (WebAuthn);
    docs/authentication.md, "Security keys, enrolment and recovery"."""

    # The address users open (scheme://host[:port], no path): printed in enrolment links, and the
    # WebAuthn origin that key ceremonies must come from. null: links are printed as a path only.
    public_url: OptionalText = None
    link_ttl: Annotated[PositiveWhole, _check(lambda v: v <= 30 * 86400, "must be at most 30 days")] = 259200
    recovery_codes: Annotated[PositiveWhole, _check(lambda v: v <= 20, "must be at most 20")] = 10
    # WebAuthn relying party id (a domain: the DPI's host name, e.g. dpi.hopital.fr). null: keys are off.
    webauthn_rp_id: OptionalText = None
    webauthn_rp_name: Text = "dpiguard"
    # Origins allowed in key ceremonies (default: public_url).
    webauthn_origins: TextList = Field(default_factory=list)
    challenge_ttl: Annotated[PositiveWhole, _check(lambda v: v <= 600, "must be at most 600 seconds")] = 120

    @property
    def origins(self) -> list[str]:
        return list(self.webauthn_origins) or ([self.public_url.rstrip("/")] if self.public_url else [])


def _check_enrolment(e: "Enrolment") -> None:
    """The enrolment section's addresses: a public URL is scheme://host[:port]; the WebAuthn RP id is a
    domain (browsers refuse an IP address), and every origin is on it or on one of its subdomains."""
    for key, url in [("enrolment.public_url", e.public_url)] + [("enrolment.webauthn_origins", o)
                                                                 for o in e.webauthn_origins]:
        if url is None:
            continue
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/") or parts.query:
            raise ConfigError(key, f"expected scheme://host[:port] with no path, e.g. https://dpi.hopital.fr, "
                                   f"got {url!r}")
    rp = e.webauthn_rp_id
    if rp is None:
        return
    try:
        ipaddress.ip_address(rp.strip("[]"))
        is_ip = True
    except ValueError:
        is_ip = False
    if is_ip:
        raise ConfigError("enrolment.webauthn_rp_id", f"must be a domain name, not an IP address ({rp!r}): "
                                                      "browsers refuse security keys for an IP address")
    if not re.fullmatch(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*", rp):
        raise ConfigError("enrolment.webauthn_rp_id", f"must be a lowercase domain name like dpi.hopital.fr, got {rp!r}")
    for origin in e.origins:
        host = urlsplit(origin).hostname or ""
        if host != rp and not host.endswith("." + rp):
            raise ConfigError("enrolment.webauthn_origins" if e.webauthn_origins else "enrolment.public_url",
                              f"the origin {origin!r} is not on enrolment.webauthn_rp_id ({rp!r}) or a subdomain "
                              "of it: browsers would refuse the key")


class CareTeam(_Section):
    grace_seconds: Annotated[Whole, _check(lambda v: v >= 0, "must be 0 or more")] = 86400


class Adt(_Section):
    enabled: Flag = False
    listen_host: Text = "127.0.0.1"
    listen_port: Port = 2575
    max_message_bytes: PositiveWhole = 1_048_576
    read_timeout: PositiveNumber = 30.0
    dedup_ttl: PositiveWhole = 604800
    patient_id_authority: OptionalText = None
    timezone: Annotated[Text, AfterValidator(_time_zone)] = "Europe/Paris"
    application: Text = "DPIGUARD"


class DecisionCacheSection(_Section):
    ttl: PositiveNumber = 60.0
    max_entries: PositiveWhole = 200_000


class Audit(_Section):
    path: Text = "var/audit"
    signing_key_file: Text = "secrets/audit-ed25519.pem"  # outside `path`: see Config._check_consistency
    rotate_bytes: PositiveWhole = 64 << 20
    rotate_seconds: PositiveWhole = 86400
    checkpoint_records: PositiveWhole = 1000
    checkpoint_seconds: PositiveNumber = 60.0
    group_commit_ms: Annotated[Number, _check(lambda v: 0 <= v <= 100,
                                              "must be between 0 and 100 (milliseconds)")] = 0.0
    group_commit_max: PositiveWhole = 1024
    on_failure: Annotated[Text, _check(lambda v: v in ("refuse", "serve"),
                                       "must be 'refuse' or 'serve', got {value!r}")] = "refuse"


class MassAccess(_Section):
    max_patients: Annotated[Whole, _check(lambda v: v >= 0, "must be 0 (off) or more")] = 50
    window_seconds: PositiveWhole = 600
    action: Annotated[Text, _check(lambda v: v in ("alert", "throttle"),
                                   "must be 'alert' or 'throttle', got {value!r}")] = "alert"
    throttle_seconds: PositiveWhole = 900
    refresh_seconds: PositiveNumber = 1.0


class Privacy(_Section):
    """Privacy monitoring (docs/privacy.md); the detectors themselves are tuned in policies/privacy.yaml."""

    learn_demographics: Flag = True
    retention_days: Annotated[Whole, _check(lambda v: 1 <= v <= 3650, "must be 1 to 3650 days")] = 365
    staff_retention_days: Annotated[Whole, _check(lambda v: 1 <= v <= 3650, "must be 1 to 3650 days")] = 400
    alert_retention_days: Annotated[Whole, _check(lambda v: 1 <= v <= 7300, "must be 1 to 7300 days")] = 400
    monitor: Flag = False
    monitor_interval: PositiveNumber = 1.0


class Identity(_Section):
    strip_headers: TextList = Field(default_factory=list)


class Limits(_Section):
    max_header_bytes: PositiveWhole = 16384
    max_url_bytes: PositiveWhole = 4096


class FhirSection(_Section):
    # scheme://host[:port] clients use to reach dpiguard (FHIR links)
    public_origin: Annotated[OptionalText, AfterValidator(_public_origin)] = None
    # dpiguard pages FHIR searches itself (docs/fhir.md): entries asked of the DPI per page, and at most
    # read to fill one page before the search is refused as too broad
    upstream_page_size: Annotated[PositiveWhole, _check(lambda v: 10 <= v <= 5000, "must be 10..5000, got {value}")] = 500
    max_scan: Annotated[PositiveWhole, _check(lambda v: v >= 100, "must be at least 100, got {value}")] = 10000


class Metrics(_Section):
    allow_from: Annotated[TextList, AfterValidator(_networks)] = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"])


class Threads(_Section):
    """Worker threads per kind of blocking work (dpiguard/edge/pools.py)."""

    decisions: PositiveWhole = 16
    portal: PositiveWhole = 4
    fhir: PositiveWhole = 8
    adt: PositiveWhole = 2


_LANGUAGES = ("fr", "en")


def _language(value: str) -> str:
    if value not in _LANGUAGES:
        raise ValueError(f"unknown language {value!r} (known: {', '.join(_LANGUAGES)})")
    return value


def _languages(values: list[str]) -> list[str]:
    if not values:
        raise ValueError("give at least one language")
    for value in values:
        _language(value)
    return values


class UI(_Section):
    """What people see: language, local time, helpdesk line, the banner on the DPI's pages."""

    language: Annotated[Text, AfterValidator(_language)] = "fr"
    languages: Annotated[TextList, AfterValidator(_languages)] = Field(default_factory=lambda: ["fr", "en"])
    timezone: Annotated[Text, AfterValidator(_time_zone)] = "Europe/Paris"
    helpdesk: OptionalText = None  # e.g. "Assistance informatique : poste 4242, 24 h/24"
    banner: Flag = True
    banner_position: Annotated[Text, _check(lambda v: v in ("top", "bottom"),
                                            "must be 'top' or 'bottom', got {value!r}")] = "top"
    idle_warning_seconds: Annotated[Whole, _check(lambda v: v >= 0, "must be 0 (no warning) or more")] = 120


#: What an administrative role may do in the web console (docs/console.md).
CONSOLE_CAPABILITIES = ("traces", "names", "timeline", "breakglass", "alerts", "stats", "explain", "helpdesk")


def _console_roles(value: Any) -> dict[str, list[str]]:
    if not isinstance(value, Mapping) or not value:
        raise _WrongType(f"expected a mapping role: [capability, ...], got {value!r}")
    out: dict[str, list[str]] = {}
    for role, caps in value.items():
        if not isinstance(role, str) or not role.replace("_", "").isalnum() or not role[:1].islower():
            raise ValueError(f"role name {role!r} must be lowercase letters, digits or '_'")
        if isinstance(caps, str):
            caps = _split_commas(caps)
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
            raise ValueError(f"role {role!r}: expected a list of capabilities ({', '.join(CONSOLE_CAPABILITIES)})")
        for cap in caps:
            if cap not in CONSOLE_CAPABILITIES:
                raise ValueError(f"role {role!r}: unknown capability {cap!r} (known: {', '.join(CONSOLE_CAPABILITIES)})")
        out[role] = list(dict.fromkeys(caps))
    return out


def _default_console_roles() -> dict[str, list[str]]:
    return {"dpo": ["traces", "names", "timeline", "breakglass", "alerts", "stats", "explain"],
            "rssi": ["traces", "timeline", "breakglass", "alerts", "stats", "explain"],
            "helpdesk": ["helpdesk"]}


class Console(_Section):
    """The web console under /_dpiguard/console, for administrative accounts only."""

    enabled: Flag = True
    roles: Annotated[dict, BeforeValidator(_console_roles)] = Field(default_factory=_default_console_roles)
    max_rows: PositiveWhole = 500
    audit_source: OptionalText = None  # a central store (`audit collect`) instead of audit.path


def _ldap_url(url: str) -> str:
    parts = _split_url(url)
    if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
        raise ValueError(f"must be an ldaps:// or ldap:// URL with a host, got {url!r}")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError("must be scheme://host[:port] only (the search base is directory.base_dn)")
    return url


def _ldap_filter_template(value: str) -> str:
    if value.count("{login}") != 1 or not (value.startswith("(") and value.endswith(")")):
        raise ValueError("must be one LDAP filter in parentheses with {login} once, e.g. (sAMAccountName={login})")
    return value


class Directory(_Section):
    """LDAP / Active Directory as the user directory (docs/authentication.md, "LDAP / Active Directory")."""

    enabled: Flag = False
    url: Annotated[Text, AfterValidator(_ldap_url)] = "ldaps://ad.example.org"
    # ldap:// is accepted only with start_tls (the password never crosses the network in clear).
    start_tls: Flag = False
    ca_file: OptionalText = None  # CA of the directory's certificate (required: verified, never skipped)
    bind_dn: OptionalText = None  # the service account that searches users
    bind_password_file: OptionalText = None
    base_dn: OptionalText = None
    user_filter: Annotated[Text, AfterValidator(_ldap_filter_template)] = "(sAMAccountName={login})"
    name_attribute: Text = "displayName"
    group_attribute: Text = "memberOf"
    unit_attribute: OptionalText = None  # an attribute whose values are care units (e.g. departmentNumber)
    # Active Directory: userAccountControl bit 2 (ACCOUNTDISABLE) means disabled.
    ad_user_account_control: Flag = True
    # Any directory: an account matching this filter is disabled, e.g. (pwdAccountLockedTime=*).
    disabled_filter: OptionalText = None
    timeout: Annotated[PositiveNumber, _check(lambda v: v <= 30, "must be at most 30 seconds")] = 5.0
    # Users with live sessions are looked up again this often; disabled or removed: sessions end.
    recheck_seconds: Annotated[PositiveWhole, _check(lambda v: v <= 3600, "must be at most 3600 seconds")] = 300
    # Directory unreachable at the re-check: live sessions are kept this long, then ended (0: at once).
    down_grace_seconds: Annotated[Whole, _check(lambda v: 0 <= v <= 86400, "must be 0 to 86400 seconds")] = 900


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


#: Files that must exist (when ``check_files``) if they are set, and files that must exist, full stop.
_OPTIONAL_FILES = ("tls.cert_file", "tls.key_file", "upstream.ca_file", "redis.password_file",
                   "redis.sentinel_password_file", "redis.tls_ca_file", "redis.tls_cert_file", "redis.tls_key_file",
                   "directory.ca_file", "directory.bind_password_file")
_KEY_FILES = ("secrets.data_key_file", "secrets.assertion_private_key_file", "audit.signing_key_file")


class Config(BaseModel):
    """The whole configuration. Build it with :func:`load_config`.

    ``base_dir`` (the configuration file's folder, against which relative paths resolve) is not a key
    of the file; :func:`load_config` sets it.
    """

    model_config = ConfigDict(extra="forbid")

    instance_id: Text = Field(default_factory=_default_instance_id)
    listen: Listen = Field(default_factory=Listen)
    upstream: Upstream = Field(default_factory=Upstream)
    tls: TLS = Field(default_factory=TLS)
    redis: RedisSection = Field(default_factory=RedisSection)
    policies: Policies = Field(default_factory=Policies)
    secrets: Secrets = Field(default_factory=Secrets)
    sessions: Sessions = Field(default_factory=Sessions)
    login: Login = Field(default_factory=Login)
    oidc: Oidc = Field(default_factory=Oidc)
    careteam: CareTeam = Field(default_factory=CareTeam)
    enrolment: Enrolment = Field(default_factory=Enrolment)
    adt: Adt = Field(default_factory=Adt)
    decision_cache: DecisionCacheSection = Field(default_factory=DecisionCacheSection)
    audit: Audit = Field(default_factory=Audit)
    mass_access: MassAccess = Field(default_factory=MassAccess)
    privacy: Privacy = Field(default_factory=Privacy)
    identity: Identity = Field(default_factory=Identity)
    limits: Limits = Field(default_factory=Limits)
    fhir: FhirSection = Field(default_factory=FhirSection)
    metrics: Metrics = Field(default_factory=Metrics)
    threads: Threads = Field(default_factory=Threads)
    ui: UI = Field(default_factory=UI)
    console: Console = Field(default_factory=Console)
    directory: Directory = Field(default_factory=Directory)

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @base_dir.setter
    def base_dir(self, value: Path) -> None:
        self._base_dir = Path(value)

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

    def _value(self, dotted: str) -> Any:
        section, key = dotted.split(".")
        return getattr(getattr(self, section), key)

    @model_validator(mode="after")
    def _check_consistency(self, info: ValidationInfo) -> "Config":
        """Checks across keys, then (context ``check_files``) the files; run once every key is valid.

        The validation context of :func:`load_config` gives ``base_dir`` and ``check_files``.
        """
        context = info.context or {}
        if "base_dir" in context:
            self.base_dir = context["base_dir"]
        if not self.upstream.url:
            raise ConfigError("upstream.url",
                              "is required (the DPI application dpiguard protects, e.g. https://dpi.example.org)")
        r = self.redis
        if bool(r.tls_cert_file) != bool(r.tls_key_file):
            key = "redis.tls_key_file" if r.tls_cert_file else "redis.tls_cert_file"
            raise ConfigError(key, "redis.tls_cert_file and redis.tls_key_file go together")
        if self.sessions.idle_timeout > self.sessions.absolute_lifetime:
            raise ConfigError("sessions.idle_timeout", "must not exceed sessions.absolute_lifetime")
        _check_enrolment(self.enrolment)
        store = self.path(self.audit.path).resolve()
        key = self.path(self.audit.signing_key_file).resolve()
        if key == store or store in key.parents:
            raise ConfigError("audit.signing_key_file", "must be kept outside the audit folder (audit.path)")
        if self.ui.language not in self.ui.languages:
            raise ConfigError("ui.language", f"must be one of ui.languages ({', '.join(self.ui.languages)})")
        if bool(self.tls.cert_file) != bool(self.tls.key_file):
            key = "tls.key_file" if self.tls.cert_file else "tls.cert_file"
            raise ConfigError(key, "tls.cert_file and tls.key_file go together")
        self._check_directory()
        o = self.oidc
        if o.enabled:
            for key in ("issuer", "client_id", "redirect_uri"):
                if not getattr(o, key):
                    raise ConfigError(f"oidc.{key}", "is required when oidc.enabled is true")
            if o.token_auth == "private_key_jwt" and not o.private_key_file:
                raise ConfigError("oidc.private_key_file", "is required with token_auth: private_key_jwt")
            if o.token_auth != "private_key_jwt" and not o.client_secret_file:
                raise ConfigError("oidc.client_secret_file", f"is required with token_auth: {o.token_auth}")
            if "openid" not in o.scopes:
                raise ConfigError("oidc.scopes", "must contain 'openid'")
        if context.get("check_files"):
            self._check_files()
        return self

    def _check_directory(self) -> None:
        d = self.directory
        if not d.enabled:
            return
        if d.url.startswith("ldap://") and not d.start_tls:
            raise ConfigError("directory.start_tls", "ldap:// without StartTLS would send passwords in clear: "
                                                     "use ldaps:// or set start_tls: true")
        if d.url.startswith("ldaps://") and d.start_tls:
            raise ConfigError("directory.start_tls", "StartTLS is for ldap:// URLs; ldaps:// is TLS already")
        for key in ("ca_file", "bind_dn", "bind_password_file", "base_dn"):
            if not getattr(d, key):
                raise ConfigError(f"directory.{key}", "is required when directory.enabled is true")

    def _check_files(self) -> None:
        for dotted in _OPTIONAL_FILES:
            value = self._value(dotted)
            if value and not self.path(value).is_file():
                raise ConfigError(dotted, f"file not found: {self.path(value)}")
        if self.oidc.enabled:
            for key in ("client_secret_file", "private_key_file"):
                value = getattr(self.oidc, key)
                if value and not self.path(value).is_file():
                    raise ConfigError(f"oidc.{key}", f"file not found: {self.path(value)}")
        if not self.path(self.policies.dir).is_dir():
            raise ConfigError("policies.dir", f"folder not found: {self.path(self.policies.dir)}")
        for dotted in _KEY_FILES:
            value = self._value(dotted)
            if not self.path(value).is_file():
                raise ConfigError(dotted, f"file not found: {self.path(value)} (create it with 'dpiguard keys init')")


# Errors ---------------------------------------------------------------------------------------

_UNKNOWN_KEY = ("extra_forbidden", "invalid_key")  # a key not in the schema; a key that is not even a text


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The model (Config or a section) that the location ``loc`` names, if any."""
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _rank(error: dict) -> tuple:
    """Which of several errors to report: unknown keys and wrong types anywhere come before value
    checks; then the order of the file's schema, the unknown keys of a section before its fields."""
    cause = (error.get("ctx") or {}).get("error")
    first = error["type"] in _UNKNOWN_KEY or isinstance(cause, _WrongType)
    position = []
    for depth, part in enumerate(error["loc"]):
        model = _model_at(error["loc"][:depth])
        names = list(model.model_fields) if model is not None else []
        position.append(names.index(part) + 1 if part in names else 0)
    return (0 if first else 1, position)


def _config_error(exc: ValidationError) -> ConfigError:
    """The ConfigError that tells the user about the first problem pydantic found."""
    error = min(exc.errors(), key=_rank)
    loc = error["loc"]
    key = ".".join(str(part) for part in loc) or "(top level)"
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):
        return cause
    if error["type"] in _UNKNOWN_KEY:
        model = _model_at(loc[:-1])
        known = ", ".join(sorted(model.model_fields)) if model is not None else ""
        return ConfigError(key, f"unknown key (known: {known})")
    if isinstance(cause, ValueError):
        return ConfigError(key, str(cause))
    return ConfigError(key, error["msg"])  # not expected: every field type above gives its own message


# Loading --------------------------------------------------------------------------------------


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """The keys set by DPIGUARD_* environment variables, as a nested mapping like the file's."""
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
    if data.get("instance_id") in ("", None):  # empty (as in dpiguard.example.yaml): the default, hostname-pid
        data.pop("instance_id", None)
    try:
        return Config.model_validate(data, context={"base_dir": base_dir, "check_files": check_files})
    except ValidationError as exc:
        raise _config_error(exc) from None
