"""The login decision (password + TOTP) and brute-force protection.

Order of checks in :meth:`Authenticator.login`:

1. client address slowed down (``P:ipfail:IP`` reached ``ip_max_failures``): one attempt per
   ``ip_slow_seconds`` from that address (``P:ipslow:IP``), the others get ``throttled`` with a wait of
   a few seconds. An address is never blocked: a ward's workstations behind one NAT or Citrix address
   share it, and a user who never failed must still log in. Addresses of ``trusted_networks`` are
   never slowed. Accounts are protected by their own lock (next point), whatever the address;
2. account locked (``P:lock:{LOGIN}`` exists) → ``locked`` with ``retry_after``;
3. both factors are verified, always, and the caller only learns ``invalid_credentials`` whatever
   failed (unknown user, wrong password, wrong or reused TOTP code, disabled account). The precise
   cause is in ``LoginResult.detail`` for the audit log only;
4. a failure increments ``P:authfail:{LOGIN}`` and ``P:ipfail:IP`` (each one Lua script: INCR, TTL =
   window on the first failure, and the lock when the threshold is reached). Unknown logins count
   and lock like real ones, so lockout reveals nothing about which accounts exist, and the answer
   says how many attempts are left (``attempts_left``) and, on the failure that locks, ``locked``
   at once with the wait (dpi-rules.md rule 4: 3 failed attempts lock the account 5 minutes).

Users of an external directory (a record with ``external=ldap``, dpiguard/auth/directory.py): the
first factor is the directory's bind instead of the argon2 hash, with the same steps 1, 2 and 4 (the
address slowdown, the account lock and the failure counting apply exactly as to a local password);
the TOTP code stays dpiguard's. The roles are those the directory's groups give through
``policies/directory.yaml`` at this login. Two more outward reasons, both traced: ``directory_unavailable``
(the directory did not answer: nothing is counted, the TOTP code is not used up) and ``no_role`` (both
factors were right but the groups give no role: no access).

A success resets the account counter (not the address counter: one valid account must not let a
client wipe its failures). Redis errors propagate: the caller fails closed.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

from dpiguard.auth.enrolment import looks_like_recovery_code
from dpiguard.auth.users import (
    TOTP_BAD,
    TOTP_OK,
    TOTP_REUSED,
    User,
    UserDirectory,
    is_valid_login,
    normalize_login,
)
from dpiguard.config import Login
from dpiguard.storage.clients import as_text
from dpiguard.storage.keys import Keys

MAX_LOGIN_LENGTH = 64

# Outward reasons.
OK = "ok"
INVALID_CREDENTIALS = "invalid_credentials"
LOCKED = "locked"
THROTTLED = "throttled"
CODE_USED = "totp_reused"  # step-up only: a correct code that already served (not a failure)
DIRECTORY_UNAVAILABLE = "directory_unavailable"  # external directory down or unusable (not a failure)
NO_ROLE = "no_role"  # both factors right, but the directory's groups give no role

# Audit details (never shown to the client).
DETAIL_UNKNOWN_USER = "unknown_user"
DETAIL_BAD_PASSWORD = "bad_password"
DETAIL_DISABLED = "disabled"
DETAIL_BAD_TOTP = TOTP_BAD  # "bad_totp"
DETAIL_TOTP_REUSED = TOTP_REUSED  # "totp_reused"
DETAIL_RECOVERY_CODE = "recovery_code"  # success detail: the second factor was a recovery code
DETAIL_SECURITY_KEY = "security_key"  # success detail: the second factor was a security key

# KEYS[1] = P:authfail:{LOGIN}, KEYS[2] = P:lock:{LOGIN} (same hash tag, same cluster slot).
# ARGV = window, max_failures, lock_seconds. Returns the failure count (0 when it just locked).
_ACCOUNT_FAILURE_SCRIPT = """
local n = redis.call('INCR', KEYS[1])
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
if n >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[3])
  redis.call('DEL', KEYS[1])
  return 0
end
return n
"""

# KEYS[1] = P:ipfail:IP. ARGV = window, ip_max_failures, ip_block_seconds (how long the address stays
# slowed down once it reached the threshold). Returns the count.
_IP_FAILURE_SCRIPT = """
local n = redis.call('INCR', KEYS[1])
if n >= tonumber(ARGV[2]) then
  if n == tonumber(ARGV[2]) or redis.call('TTL', KEYS[1]) < 0 then
    redis.call('EXPIRE', KEYS[1], ARGV[3])
  end
elseif redis.call('TTL', KEYS[1]) < 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return n
"""


@dataclass(frozen=True)
class LoginResult:
    ok: bool
    user: User | None
    reason: str
    retry_after: int = 0
    detail: str = ""  # precise cause, for the audit log only
    attempts_left: int | None = None  # failed attempts still possible before the account locks
    totp_step: int | None = None  # time step of the accepted code (the session keeps it: step-up)
    source: str = "local"  # where the identity came from (Session.source): local or ldap


UNKNOWN_ADDRESS = "unknown"


def normalize_ip(client_ip: str | None) -> str:
    """Canonical text of an address (IPv4-mapped IPv6 folded to IPv4, no scope id).

    Anything that is not an address (empty, None, a socket path) maps to one shared ``unknown``
    bucket: such clients are throttled together, never exempted.
    """
    try:
        ip = ipaddress.ip_address(str(client_ip or "").strip().split("%", 1)[0])
    except ValueError:
        return UNKNOWN_ADDRESS
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.compressed


def _seconds_left(pttl_ms: int, default: int) -> int:
    """Whole seconds (rounded up) from a PTTL reply; ``default`` if the key has no TTL."""
    if pttl_ms is None or pttl_ms == -1:
        return default
    return max(1, math.ceil(pttl_ms / 1000))


class Authenticator:
    """Decides a login attempt. Safe to share between threads (state lives in Redis)."""

    def __init__(self, redis_client, users: UserDirectory, policy: Login, prefix: str = "dpiguard",
                 external: dict | None = None, recovery=None):
        self.redis = redis_client
        # source ("ldap") -> first factor with verify(login, password) and logged_in(login, answer)
        # (dpiguard.auth.directory.DirectoryFirstFactor); a source without one refuses its users.
        self.external = dict(external or {})
        self.recovery = recovery  # dpiguard.auth.enrolment.RecoveryCodes, or None (no recovery codes)
        self.users = users
        self.policy = policy
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.trusted = tuple(ipaddress.ip_network(n, strict=False) for n in policy.trusted_networks)
        self._account_failure = redis_client.register_script(_ACCOUNT_FAILURE_SCRIPT)
        self._ip_failure = redis_client.register_script(_IP_FAILURE_SCRIPT)

    # -- the decision ------------------------------------------------------------------------------

    def login(self, login: str, password: str, totp_code: str, client_ip: str, now: float | None = None) -> LoginResult:
        ip = normalize_ip(client_ip)
        login = normalize_login(login if isinstance(login, str) else "")

        slowed_for = self._ip_slowed_for(ip)
        if slowed_for:
            return LoginResult(False, None, THROTTLED, retry_after=slowed_for, detail=THROTTLED)

        if len(login) > MAX_LOGIN_LENGTH or not is_valid_login(login):
            # Cannot be an account: no per-login keys with arbitrary content. Spend the argon2 time anyway.
            self.users.verify_password(login, password)
            self._record_ip_failure(ip)
            return LoginResult(False, None, INVALID_CREDENTIALS, detail=DETAIL_UNKNOWN_USER)

        locked_for = self._locked_for(login)
        if locked_for:
            return LoginResult(False, None, LOCKED, retry_after=locked_for, detail=LOCKED)

        user = self.users.get(login)
        if user is not None and user.external:
            return self._external_login(user, password, totp_code, ip, now)
        password_ok = self.users.verify_password(login, password)
        # Always check the code too; record its step only when the password was right, so a password
        # typo does not burn the user's current code.
        if self.recovery is not None and looks_like_recovery_code(totp_code):
            # A recovery code instead of the TOTP code: used up (once, on any instance) only with the
            # right password on an enabled account.
            usable = user is not None and not user.disabled and password_ok
            totp_outcome = TOTP_OK if usable and self.recovery.use(login, totp_code) else TOTP_BAD
            step, factor = None, DETAIL_RECOVERY_CODE
        else:
            totp_outcome, step = self.users.check_totp_step(login, totp_code, now=now, consume=password_ok)
            factor = OK

        if user is not None and not user.disabled and password_ok and totp_outcome == TOTP_OK:
            self.redis.delete(self.keys.login_failures(login))
            return LoginResult(True, user, OK, detail=factor, totp_step=step)

        if user is None:
            detail = DETAIL_UNKNOWN_USER
        elif user.disabled:
            detail = DETAIL_DISABLED
        elif not password_ok:
            detail = DETAIL_BAD_PASSWORD
        else:
            detail = totp_outcome  # bad_totp or totp_reused
        return self._failed(login, ip, detail)

    def _external_login(self, user: User, password: str, totp_code: str, ip: str, now: float | None) -> LoginResult:
        """Both factors of a directory user: the directory's bind, then dpiguard's TOTP code."""
        login = user.login
        factor = self.external.get(user.external)
        if factor is None:  # the directory is not configured (directory.enabled false): fail closed
            self.users.check_totp_step(login, totp_code, now=now, consume=False)
            return LoginResult(False, None, DIRECTORY_UNAVAILABLE, detail=f"{user.external}_not_configured")
        answer = factor.verify(login, password if isinstance(password, str) else "")
        if answer.outcome == DIRECTORY_UNAVAILABLE:
            self.users.check_totp_step(login, totp_code, now=now, consume=False)
            return LoginResult(False, None, DIRECTORY_UNAVAILABLE, detail=answer.detail or DIRECTORY_UNAVAILABLE)
        password_ok = answer.outcome in (OK, NO_ROLE)
        if self.recovery is not None and looks_like_recovery_code(totp_code):
            # A recovery code instead of the TOTP code, as for local accounts: used up only with the right
            # directory password on an enabled account.
            usable = not user.disabled and password_ok
            totp_outcome = TOTP_OK if usable and self.recovery.use(login, totp_code) else TOTP_BAD
            step, factor_detail = None, DETAIL_RECOVERY_CODE
        else:
            totp_outcome, step = self.users.check_totp_step(login, totp_code, now=now, consume=password_ok)
            factor_detail = OK
        if user.disabled:
            return self._failed(login, ip, DETAIL_DISABLED)
        if not password_ok:
            return self._failed(login, ip, answer.outcome)  # bad_password, unknown_user, directory_disabled
        if totp_outcome != TOTP_OK:
            return self._failed(login, ip, totp_outcome)
        self.redis.delete(self.keys.login_failures(login))
        if answer.outcome == NO_ROLE:
            return LoginResult(False, None, NO_ROLE, detail=answer.detail or NO_ROLE)
        factor.logged_in(login, answer)
        who = User(login=login, display_name=answer.display_name or user.display_name, roles=tuple(answer.roles),
                   disabled=False, created=user.created, external=user.external)
        return LoginResult(True, who, OK, detail=factor_detail, totp_step=step, source=user.external)

    def confirm_directory_password(self, login: str, password: str, client_ip: str) -> LoginResult:
        """The directory password of a directory account, alone (enrolment through a link: the person
        proves who they are before registering a second factor; nothing is stored). Address slowdown,
        account lock and failure counting as at the login form. Reasons: ``ok``, ``locked``,
        ``throttled``, ``directory_unavailable``, ``invalid_credentials``."""
        user = self.users.get(normalize_login(login if isinstance(login, str) else ""))
        if user is None or not user.external:  # never a local password here
            return LoginResult(False, None, DIRECTORY_UNAVAILABLE, detail="not_a_directory_account")
        return self.first_factor(login, password, client_ip)  # its directory branch: the same checks

    def reauthenticate(self, login: str, totp_code: str, client_ip: str, now: float | None = None,
                       login_step: int | None = None, claim_login_code=None) -> LoginResult:
        """Second-factor re-entry by a logged-in user (emergency access): a TOTP code.

        Address slowdown and account lock are honoured and a code is single-use across instances,
        with one exception: the code that opened this session (``login_step``) is accepted once more
        within the session, while it is still valid (``claim_login_code()`` marks that use, atomically,
        and returns False if it was already made), so a clinician does not wait for the next code.
        A wrong code counts as a failed login (so three lock the account); a correct code that already
        served is refused (``totp_reused``) but never counted as a failure. A success does not reset
        the failure counter (no password was checked)."""
        ip = normalize_ip(client_ip)
        login = normalize_login(login if isinstance(login, str) else "")
        slowed_for = self._ip_slowed_for(ip)
        if slowed_for:
            return LoginResult(False, None, THROTTLED, retry_after=slowed_for, detail=THROTTLED)
        if not is_valid_login(login):
            self._record_ip_failure(ip)
            return LoginResult(False, None, INVALID_CREDENTIALS, detail=DETAIL_UNKNOWN_USER)
        locked_for = self._locked_for(login)
        if locked_for:
            return LoginResult(False, None, LOCKED, retry_after=locked_for, detail=LOCKED)
        outcome, step = self.users.check_totp_step(login, totp_code, now=now)
        if outcome == TOTP_OK:
            return LoginResult(True, self.users.get(login), OK, detail=OK, totp_step=step)
        if outcome == TOTP_REUSED:
            if login_step is not None and step == login_step and claim_login_code is not None and claim_login_code():
                return LoginResult(True, self.users.get(login), OK, detail="login_code_step_up", totp_step=step)
            return LoginResult(False, None, CODE_USED, detail=TOTP_REUSED)
        return self._failed(login, ip, outcome)

    def first_factor(self, login: str, password: str, client_ip: str) -> LoginResult:
        """The password step of a login whose second factor is a security key (asked next, by the page).

        Address slowdown and account lock are honoured; a wrong password counts as a failed login. A
        success resets nothing: the login is not complete until :meth:`second_factor` says so."""
        ip = normalize_ip(client_ip)
        login = normalize_login(login if isinstance(login, str) else "")
        slowed_for = self._ip_slowed_for(ip)
        if slowed_for:
            return LoginResult(False, None, THROTTLED, retry_after=slowed_for, detail=THROTTLED)
        if len(login) > MAX_LOGIN_LENGTH or not is_valid_login(login):
            self.users.verify_password(login, password)
            self._record_ip_failure(ip)
            return LoginResult(False, None, INVALID_CREDENTIALS, detail=DETAIL_UNKNOWN_USER)
        locked_for = self._locked_for(login)
        if locked_for:
            return LoginResult(False, None, LOCKED, retry_after=locked_for, detail=LOCKED)
        user = self.users.get(login)
        if user is not None and user.external:  # a directory account: its password is the directory's
            factor = self.external.get(user.external)
            if factor is None:
                return LoginResult(False, None, DIRECTORY_UNAVAILABLE, detail=f"{user.external}_not_configured")
            answer = factor.verify(login, password if isinstance(password, str) else "")
            if answer.outcome == DIRECTORY_UNAVAILABLE:
                return LoginResult(False, None, DIRECTORY_UNAVAILABLE, detail=answer.detail or DIRECTORY_UNAVAILABLE)
            if user.disabled:
                return self._failed(login, ip, DETAIL_DISABLED)
            if answer.outcome not in (OK, NO_ROLE):
                return self._failed(login, ip, answer.outcome)
            return LoginResult(True, user, OK, detail="password_ok", source=user.external)
        password_ok = self.users.verify_password(login, password)
        if user is not None and not user.disabled and password_ok:
            return LoginResult(True, user, OK, detail="password_ok")
        detail = DETAIL_UNKNOWN_USER if user is None else DETAIL_DISABLED if user.disabled else DETAIL_BAD_PASSWORD
        return self._failed(login, ip, detail)

    def second_factor(self, login: str, client_ip: str, ok: bool, detail: str) -> LoginResult:
        """The end of a security-key login: ``ok`` and ``detail`` from the key's assertion check. A
        refused assertion counts as a failed login (lockout and address throttling apply)."""
        ip = normalize_ip(client_ip)
        login = normalize_login(login)
        locked_for = self._locked_for(login)
        if locked_for:
            return LoginResult(False, None, LOCKED, retry_after=locked_for, detail=LOCKED)
        user = self.users.get(login)
        if ok and user is not None and not user.disabled and user.external:
            return self._external_second_factor(user, ip)
        if ok and user is not None and not user.disabled:
            self.redis.delete(self.keys.login_failures(login))
            return LoginResult(True, user, OK, detail=DETAIL_SECURITY_KEY)
        return self._failed(login, ip, detail if not ok else DETAIL_DISABLED)

    def _external_second_factor(self, user: User, ip: str) -> LoginResult:
        """A directory account's key was accepted: its roles and units are the directory's now (its
        password was checked at the first step), exactly as at a login with a TOTP code."""
        login = user.login
        factor = self.external.get(user.external)
        answer = factor.current(login) if factor is not None else None
        if answer is None or answer.outcome == DIRECTORY_UNAVAILABLE:
            return LoginResult(False, None, DIRECTORY_UNAVAILABLE,
                               detail=(answer.detail if answer is not None else "") or DIRECTORY_UNAVAILABLE)
        if answer.outcome not in (OK, NO_ROLE):
            return self._failed(login, ip, answer.outcome)  # removed or disabled since the first step
        self.redis.delete(self.keys.login_failures(login))
        if answer.outcome == NO_ROLE:
            return LoginResult(False, None, NO_ROLE, detail=answer.detail or NO_ROLE)
        factor.logged_in(login, answer)
        who = User(login=login, display_name=answer.display_name or user.display_name, roles=tuple(answer.roles),
                   disabled=False, created=user.created, external=user.external)
        return LoginResult(True, who, OK, detail=DETAIL_SECURITY_KEY, source=user.external)

    def key_step_up(self, login: str, client_ip: str, ok: bool, detail: str) -> LoginResult:
        """A security key re-asked by a logged-in user (emergency access): like :meth:`reauthenticate`,
        a refused assertion counts as a failed login and a success resets nothing."""
        ip = normalize_ip(client_ip)
        login = normalize_login(login)
        slowed_for = self._ip_slowed_for(ip)
        if slowed_for:
            return LoginResult(False, None, THROTTLED, retry_after=slowed_for, detail=THROTTLED)
        locked_for = self._locked_for(login)
        if locked_for:
            return LoginResult(False, None, LOCKED, retry_after=locked_for, detail=LOCKED)
        user = self.users.get(login)
        if ok and user is not None and not user.disabled:
            return LoginResult(True, user, OK, detail=DETAIL_SECURITY_KEY)
        return self._failed(login, ip, detail if not ok else DETAIL_DISABLED)

    def _failed(self, login: str, ip: str, detail: str) -> LoginResult:
        """Count a failed attempt; the answer says what is left, or that the account is now locked."""
        count = self._record_failure(login, ip)
        if count == 0:  # this failure locked the account
            return LoginResult(False, None, LOCKED, retry_after=self.policy.lock_seconds, detail=detail,
                               attempts_left=0)
        return LoginResult(False, None, INVALID_CREDENTIALS, detail=detail,
                           attempts_left=max(0, self.policy.max_failures - count))

    # -- administration ----------------------------------------------------------------------------

    def unlock(self, login: str) -> None:
        """Lift an account lock and forget its recent failures."""
        login = normalize_login(login)
        self.redis.delete(self.keys.login_lock(login), self.keys.login_failures(login))

    def unblock_ip(self, client_ip: str) -> None:
        """Stop slowing down a client address and forget its recent failures."""
        ip = normalize_ip(client_ip)
        self.redis.delete(self.keys.address_failures(ip), self.keys.address_slow(ip))

    def locked_for(self, login: str) -> int:
        """Seconds until the account's lock ends (0: not locked)."""
        return self._locked_for(normalize_login(login))

    # -- counters ----------------------------------------------------------------------------------

    def is_trusted(self, ip: str) -> bool:
        if not self.trusted or ip == UNKNOWN_ADDRESS:
            return False
        address = ipaddress.ip_address(ip)
        return any(address in net for net in self.trusted)

    def _ip_slowed_for(self, ip: str) -> int:
        """0 if an attempt from ``ip`` may go on now, else the seconds to wait (a few)."""
        if self.is_trusted(ip):
            return 0
        count = self.redis.get(self.keys.address_failures(ip))
        if count is None or int(as_text(count)) < self.policy.ip_max_failures:
            return 0
        slow_key = self.keys.address_slow(ip)
        if self.redis.set(slow_key, "1", nx=True, ex=self.policy.ip_slow_seconds):
            return 0  # the one attempt of this interval
        return _seconds_left(self.redis.pttl(slow_key), self.policy.ip_slow_seconds)

    def _locked_for(self, login: str) -> int:
        pttl = self.redis.pttl(self.keys.login_lock(login))
        if pttl == -2:  # no such key
            return 0
        return _seconds_left(pttl, self.policy.lock_seconds)

    def _record_failure(self, login: str, ip: str) -> int:
        """The account's failure count after this one (0: it just locked the account)."""
        p = self.policy
        count = self._account_failure(
            keys=[self.keys.login_failures(login), self.keys.login_lock(login)],
            args=[p.failure_window, p.max_failures, p.lock_seconds],
        )
        self._record_ip_failure(ip)
        return int(count)

    def _record_ip_failure(self, ip: str) -> None:
        p = self.policy
        self._ip_failure(keys=[self.keys.address_failures(ip)], args=[p.ip_window, p.ip_max_failures, p.ip_block_seconds])
