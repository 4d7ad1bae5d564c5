"""LDAP / Active Directory as the user directory: the first factor (a bind with the user's password),
the user's groups and units, and the periodic re-check of users with live sessions.

A login of a directory user (a dpiguard record with ``external=ldap``: it holds the TOTP secret and no
password) goes:

1. the login is checked against dpiguard's login syntax first (``LOGIN_RE``: no ``*``, ``(``, ``)``,
   ``\\``, NUL...), then escaped (RFC 4515, ``ldap3.utils.conv.escape_filter_chars``) into
   ``directory.user_filter``: an injection in the user name is a plain refusal, never a filter;
2. an empty password is refused before any network traffic (an LDAP simple bind with a DN and no
   password is an *unauthenticated* bind, which many servers accept as a success);
3. a service-account bind searches the user under ``base_dn``: exactly one entry, else refused;
4. disabled: Active Directory's ``userAccountControl`` bit 2 (``ad_user_account_control``) and/or an
   entry matching ``disabled_filter``: refused before the user's bind;
5. a bind as the user's DN with the password (the directory's own password policy and lockout apply);
6. the groups (``group_attribute``, e.g. ``memberOf``) and units (``unit_attribute``) are returned;
   ``policies/directory.yaml`` maps them to roles and units (dpiguard/policy/directory.py).

Transport: ``ldaps://`` or ``ldap://`` + StartTLS, the certificate checked against ``ca_file`` and the
host name, TLS 1.2 or later; every connect and every answer is bounded by ``timeout``. Any transport
failure raises :class:`DirectoryUnavailable` (the login is refused with a clear message). Blocking:
the portal runs logins in its worker pool (dpiguard/edge/pools.py), never on the event loop; the
re-check runs in its own thread.

The re-check (:class:`DirectoryRecheck`): every ``recheck_seconds`` one instance (a Redis lock) looks
up every directory user with live sessions; one disabled or removed in the directory, or whose groups
no longer give any role, has every session revoked through :meth:`SessionStore.revoke_user` (the bus
drops them on every instance). Directory unreachable: sessions are kept while the failures last less
than ``down_grace_seconds`` (since the first failed re-check, kept in Redis), then every directory
session is revoked (fail closed); the first successful re-check clears the outage.
"""

from __future__ import annotations

import logging
import math
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import ldap3
from ldap3.core import exceptions as ldap_errors
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import parse_dn

from dpiguard.auth.users import LOGIN_RE
from dpiguard.storage.clients import as_text
from dpiguard.storage.keys import Keys

log = logging.getLogger("dpiguard")

SOURCE = "ldap"

# Outcomes of LdapDirectory.authenticate (the audit detail of a refused login).
OK = "ok"
BAD_PASSWORD = "bad_password"
UNKNOWN_USER = "unknown_user"
DISABLED = "directory_disabled"
UNAVAILABLE = "directory_unavailable"

AD_ACCOUNTDISABLE = 0x2


def normalize_dn(dn: str) -> str:
    """A DN compared without regard to case or spaces around ``,``/``=``. ValueError if malformed."""
    try:
        parts = parse_dn(str(dn), escape=False, strip=True)
    except Exception as exc:  # ldap3 raises LDAPInvalidDnError and friends
        raise ValueError(f"not a distinguished name: {dn!r}") from exc
    if not parts:
        raise ValueError(f"not a distinguished name: {dn!r}")
    return ",".join(f"{attr.strip().lower()}={value.strip().lower()}" for attr, value, _ in parts)


class DirectoryUnavailable(Exception):
    """The directory could not be reached or used (connection, TLS, service bind, timeout)."""


@dataclass(frozen=True)
class DirectorySettings:
    url: str
    ca_file: str
    bind_dn: str
    bind_password: str
    base_dn: str
    start_tls: bool = False
    user_filter: str = "(sAMAccountName={login})"
    name_attribute: str = "displayName"
    group_attribute: str = "memberOf"
    unit_attribute: str | None = None
    ad_user_account_control: bool = True
    disabled_filter: str | None = None
    timeout: float = 5.0


@dataclass(frozen=True)
class DirectoryEntry:
    dn: str
    display_name: str
    groups: tuple[str, ...]
    unit_values: tuple[str, ...]
    disabled: bool


class GroupMapping(Protocol):
    """policies/directory.yaml (dpiguard.policy.directory.DirectoryMapping)."""

    def resolve(self, groups: Iterable[str], unit_values: Iterable[str] = ()) -> tuple[tuple[str, ...], tuple[str, ...]]:
        ...


def valid_login(login: str) -> bool:
    return isinstance(login, str) and LOGIN_RE.fullmatch(login) is not None


class LdapDirectory:
    """The directory client. Thread-safe: each call opens its own connections."""

    def __init__(self, settings: DirectorySettings):
        self.settings = settings
        s = settings
        self._tls = _VerifiedTls(validate=ssl.CERT_REQUIRED, ca_certs_file=s.ca_file)
        self._attributes = [a for a in (s.name_attribute, s.group_attribute, s.unit_attribute,
                                        "userAccountControl" if s.ad_user_account_control else None) if a]

    # -- connections -------------------------------------------------------------------------------
    def _open(self, user: str, password: str) -> tuple[ldap3.Connection, bool]:
        """A connection bound as ``user``: (connection, bound). DirectoryUnavailable on transport errors."""
        if not password:
            raise ValueError("refusing an LDAP bind without a password (it would be an unauthenticated bind)")
        s = self.settings
        # A new Server each time: ldap3's Server remembers addresses that failed and refuses them for
        # minutes ("invalid server address"), which would outlast a directory restart.
        server = ldap3.Server(s.url, use_ssl=s.url.lower().startswith("ldaps://"), tls=self._tls,
                              connect_timeout=s.timeout, get_info=ldap3.NONE)
        conn = ldap3.Connection(server, user=user, password=password, authentication=ldap3.SIMPLE,
                                auto_bind=ldap3.AUTO_BIND_NONE, receive_timeout=math.ceil(self.settings.timeout),  # ldap3 packs it as an integer

                                read_only=True, raise_exceptions=False, auto_referrals=False)
        try:
            conn.open()
            if self.settings.start_tls and not conn.start_tls():
                raise DirectoryUnavailable(f"StartTLS refused by the directory: {conn.result.get('description')}")
            bound = conn.bind()
        except DirectoryUnavailable:
            _close(conn)
            raise
        except (ldap_errors.LDAPException, OSError, ssl.SSLError) as exc:
            _close(conn)
            raise DirectoryUnavailable(_describe(exc)) from None
        if not bound and conn.result.get("result") not in (49, 53):  # 49 invalid credentials, 53 unwilling
            description = conn.result.get("description") or conn.result.get("message")
            _close(conn)
            raise DirectoryUnavailable(f"bind failed: {description}")
        return conn, bound

    def _service(self) -> ldap3.Connection:
        conn, bound = self._open(self.settings.bind_dn, self.settings.bind_password)
        if not bound:
            _close(conn)
            raise DirectoryUnavailable("the service account's bind was refused (directory.bind_dn and "
                                       "directory.bind_password_file)")
        return conn

    def check(self) -> str:
        """Connect, TLS, service bind and one search of ``base_dn``: a short report, or
        DirectoryUnavailable saying what is wrong (``dpiguard config check``)."""
        conn = self._service()
        try:
            if not conn.search(self.settings.base_dn, "(objectClass=*)", search_scope=ldap3.BASE,
                               attributes=[], time_limit=int(max(1, self.settings.timeout))):
                raise DirectoryUnavailable(f"directory.base_dn {self.settings.base_dn!r} not found or not readable "
                                           f"by the service account ({conn.result.get('description')})")
        except ldap_errors.LDAPException as exc:
            raise DirectoryUnavailable(_describe(exc)) from None
        finally:
            _close(conn)
        tls = "StartTLS" if self.settings.start_tls else "LDAPS"
        return f"directory {self.settings.url} reachable ({tls}, certificate verified, service bind OK)"

    # -- lookups ----------------------------------------------------------------------------------
    def find(self, login: str) -> DirectoryEntry | None:
        """The entry of ``login`` (service-account search), None if absent, ambiguous or not a login."""
        if not valid_login(login):
            return None
        conn = self._service()
        try:
            return self._find(conn, login)
        except ldap_errors.LDAPException as exc:
            raise DirectoryUnavailable(_describe(exc)) from None
        finally:
            _close(conn)

    def _find(self, conn: ldap3.Connection, login: str) -> DirectoryEntry | None:
        s = self.settings
        search_filter = s.user_filter.replace("{login}", escape_filter_chars(login))
        ok = conn.search(s.base_dn, search_filter, search_scope=ldap3.SUBTREE, attributes=self._attributes,
                         size_limit=2, time_limit=int(max(1, s.timeout)))
        code = conn.result.get("result")
        if not ok and code not in (0, 4, 32):  # success, size limit (2 entries: ambiguous), no such object
            raise DirectoryUnavailable(f"search failed: {conn.result.get('description')}")
        entries = [e for e in conn.response or [] if e.get("type") == "searchResEntry"]
        if len(entries) != 1:
            return None
        entry = entries[0]
        attrs = entry.get("attributes") or {}
        disabled = False
        if s.ad_user_account_control:
            uac = attrs.get("userAccountControl")
            uac = uac[0] if isinstance(uac, list) and uac else uac
            try:
                disabled = bool(int(uac) & AD_ACCOUNTDISABLE) if uac not in (None, []) else False
            except (TypeError, ValueError):
                disabled = True  # unreadable flags: fail closed
        if not disabled and s.disabled_filter:
            ok = conn.search(entry["dn"], s.disabled_filter, search_scope=ldap3.BASE, attributes=[],
                             time_limit=int(max(1, s.timeout)))
            if not ok and conn.result.get("result") not in (0, 32):
                raise DirectoryUnavailable(f"disabled_filter search failed: {conn.result.get('description')}")
            disabled = any(e.get("type") == "searchResEntry" for e in conn.response or [])
        name = attrs.get(s.name_attribute) or ""
        name = name[0] if isinstance(name, list) and name else name
        return DirectoryEntry(dn=entry["dn"], display_name=str(name or "")[:200],
                              groups=tuple(str(g) for g in _values(attrs.get(s.group_attribute))),
                              unit_values=tuple(str(v) for v in _values(attrs.get(s.unit_attribute)))
                              if s.unit_attribute else (),
                              disabled=disabled)

    def authenticate(self, login: str, password: str) -> tuple[str, DirectoryEntry | None]:
        """(outcome, entry): ``ok`` with the entry, or ``bad_password``/``unknown_user``/``directory_disabled``
        (entry None). DirectoryUnavailable when the directory cannot answer."""
        if not valid_login(login):
            return UNKNOWN_USER, None
        if not isinstance(password, str) or not password:
            return BAD_PASSWORD, None  # never an unauthenticated bind
        entry = self.find(login)
        if entry is None:
            return UNKNOWN_USER, None
        if entry.disabled:
            return DISABLED, None
        conn, bound = self._open(entry.dn, password)
        _close(conn)
        return (OK, entry) if bound else (BAD_PASSWORD, None)


class _VerifiedTls(ldap3.Tls):
    """ldap3's TLS with the standard library's verification: the chain against ``ca_file`` and the host
    name (DNS or IP address) checked by OpenSSL during the handshake, TLS 1.2 at least. (ldap3 turns
    the context's host-name check off and runs its own, which does not know IP addresses.)"""

    def wrap_socket(self, connection, do_handshake=False):
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_certs_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        connection.socket = context.wrap_socket(connection.socket, server_side=False,
                                                do_handshake_on_connect=do_handshake,
                                                server_hostname=connection.server.host)


def _close(conn: ldap3.Connection) -> None:
    try:
        conn.unbind()
    except (ldap_errors.LDAPException, OSError):
        pass  # a connection that failed: nothing left to close


def _values(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ldap_errors.LDAPStartTLSError) or "certificate" in text.lower() or isinstance(exc, ssl.SSLError):
        return f"TLS failed (is directory.ca_file the CA of the directory's certificate?): {text}"
    if isinstance(exc, (ldap_errors.LDAPSocketOpenError, ldap_errors.LDAPSocketReceiveError)) or isinstance(exc, OSError):
        return f"cannot reach the directory: {text}"
    return f"{type(exc).__name__}: {text}"


# -- first factor for the Authenticator -----------------------------------------------------------
@dataclass(frozen=True)
class ExternalAnswer:
    """What an external first factor says about a login."""

    outcome: str  # OK, BAD_PASSWORD, UNKNOWN_USER, DISABLED, UNAVAILABLE, or NO_ROLE
    roles: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    display_name: str = ""
    detail: str = ""


NO_ROLE = "no_role"


class DirectoryFirstFactor:
    """The directory's bind plus the RSSI's mapping: what :class:`dpiguard.auth.login.Authenticator`
    asks for users whose record says ``external=ldap``. ``mapping()`` gives the mapping in service
    (None: no directory.yaml, no role for anyone). ``on_login(login, units)`` runs after both factors
    succeeded (the units go to the care team)."""

    source = SOURCE

    def __init__(self, directory: LdapDirectory, mapping: Callable[[], GroupMapping | None],
                 on_login: Callable[[str, tuple[str, ...]], None] | None = None):
        self.directory = directory
        self.mapping = mapping
        self.on_login = on_login

    def verify(self, login: str, password: str) -> ExternalAnswer:
        try:
            outcome, entry = self.directory.authenticate(login, password)
        except DirectoryUnavailable as exc:
            log.warning("dpiguard: directory unavailable at login: %s", exc)
            return ExternalAnswer(UNAVAILABLE, detail=str(exc)[:300])
        if outcome != OK or entry is None:
            return ExternalAnswer(outcome)
        return self._mapped(entry)

    def current(self, login: str) -> ExternalAnswer:
        """What the directory says of ``login`` now, without its password (service-account search): the
        end of a login whose password was checked at an earlier step (security keys). ``ok`` with the
        roles and units, or ``unknown_user``/``directory_disabled``/``no_role``/unavailable."""
        try:
            entry = self.directory.find(login)
        except DirectoryUnavailable as exc:
            log.warning("dpiguard: directory unavailable at login: %s", exc)
            return ExternalAnswer(UNAVAILABLE, detail=str(exc)[:300])
        if entry is None:
            return ExternalAnswer(UNKNOWN_USER)
        if entry.disabled:
            return ExternalAnswer(DISABLED)
        return self._mapped(entry)

    def _mapped(self, entry: DirectoryEntry) -> ExternalAnswer:
        """An enabled entry through the RSSI's mapping: ``ok`` with roles and units, or ``no_role``."""
        mapping = self.mapping()
        roles, units = mapping.resolve(entry.groups, entry.unit_values) if mapping is not None else ((), ())
        if not roles:
            return ExternalAnswer(NO_ROLE, display_name=entry.display_name,
                                  detail=f"groups: {', '.join(entry.groups)}"[:300])
        return ExternalAnswer(OK, roles, units, entry.display_name)

    def logged_in(self, login: str, answer: ExternalAnswer) -> None:
        if self.on_login is not None:
            self.on_login(login, answer.units)


# -- the re-check of live sessions ----------------------------------------------------------------
class DirectoryRecheck:
    """Every ``interval`` seconds, revokes the sessions of directory users who are disabled, removed or
    left without role in the directory (see the module docstring). ``users()``: the logins of directory
    users; ``revoke(login)``: ends every session; ``trace(record)``: writes a trace record."""

    def __init__(self, redis_client, prefix: str, first_factor: DirectoryFirstFactor, users: Callable[[], list[str]],
                 revoke: Callable[[str], int], trace: Callable[[dict], None], interval: float,
                 down_grace: float, instance_id: str = ""):
        self.redis = redis_client
        self.keys = Keys(prefix)
        self.factor = first_factor
        self.users = users
        self.revoke = revoke
        self.trace = trace
        self.interval = interval
        self.down_grace = down_grace
        self.instance_id = instance_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dpiguard-ldap-recheck", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.factor.directory.settings.timeout * 3 + 2)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self.redis.set(self.keys.ldap_recheck_lock, self.instance_id or "1", nx=True,
                                  px=max(1, int(self.interval * 1000) - 200)):
                    self.run_once()
            except Exception:  # a failed round is retried at the next one; never kills the thread
                log.exception("dpiguard: directory re-check failed")

    def _live(self, login: str) -> bool:
        return bool(self.redis.scard(self.keys.user_sessions(login)))

    def run_once(self, now: float | None = None) -> dict[str, str]:
        """One round; returns login → what was done (for tests and the log)."""
        now = time.time() if now is None else now
        done: dict[str, str] = {}
        logins = [login for login in self.users() if self._live(login)]
        if not logins:
            self.redis.delete(self.keys.ldap_down_since)
            return done
        try:
            self.factor.directory.check()
        except DirectoryUnavailable as exc:
            self.redis.set(self.keys.ldap_down_since, repr(now), nx=True)
            since = float(as_text(self.redis.get(self.keys.ldap_down_since)) or now)
            if now - since < self.down_grace:
                log.warning("dpiguard: directory unreachable for the re-check (%.0f s of %s s grace): %s",
                            now - since, self.down_grace, exc)
                return {login: "kept" for login in logins}
            for login in logins:
                done[login] = self._end(login, "directory_unavailable", str(exc)[:300])
            return done
        self.redis.delete(self.keys.ldap_down_since)
        mapping = self.factor.mapping()
        for login in logins:
            try:
                entry = self.factor.directory.find(login)
            except DirectoryUnavailable as exc:  # a failure in the middle of a round: next round decides
                log.warning("dpiguard: directory re-check of %s failed: %s", login, exc)
                done[login] = "kept"
                continue
            if entry is None:
                done[login] = self._end(login, "directory_removed")
            elif entry.disabled:
                done[login] = self._end(login, "directory_disabled")
            elif mapping is None or not mapping.resolve(entry.groups, entry.unit_values)[0]:
                done[login] = self._end(login, "no_role")
            else:
                done[login] = "kept"
        return done

    def _end(self, login: str, reason: str, detail: str | None = None) -> str:
        count = self.revoke(login)
        self.trace({"event": "session_revoked", "outcome": "deny", "reason": reason, "user": login,
                    "detail": detail or f"{count} session(s) ended by the directory re-check", "idp": SOURCE})
        return reason
