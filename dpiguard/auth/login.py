"""The login decision (password + TOTP) and brute-force protection.

Order of checks in :meth:`Authenticator.login`:

1. client address blocked (``P:ipfail:IP`` reached ``ip_max_failures``) → ``throttled``;
2. account locked (``P:lock:{LOGIN}`` exists) → ``locked`` with ``retry_after``;
3. both factors are verified, always, and the caller only learns ``invalid_credentials`` whatever
   failed (unknown user, wrong password, wrong or reused TOTP code, disabled account). The precise
   cause is in ``LoginResult.detail`` for the audit log only;
4. a failure increments ``P:authfail:{LOGIN}`` and ``P:ipfail:IP`` (each one Lua script: INCR, TTL =
   window on the first failure, and the lock/block when the threshold is reached). Unknown logins
   count and lock like real ones, so lockout reveals nothing about which accounts exist. Failures of
   either factor count.

The address block lives in the ``P:ipfail:IP`` counter itself (the key layout has no other key for
it): once the counter reaches the threshold its TTL becomes ``ip_block_seconds``, and the address is
blocked while the counter stays at or above the threshold.

A success resets the account counter (not the address counter: one valid account must not let a
client wipe its failures). Redis errors propagate: the caller fails closed.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

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

# Audit details (never shown to the client).
DETAIL_UNKNOWN_USER = "unknown_user"
DETAIL_BAD_PASSWORD = "bad_password"
DETAIL_DISABLED = "disabled"
DETAIL_BAD_TOTP = TOTP_BAD  # "bad_totp"
DETAIL_TOTP_REUSED = TOTP_REUSED  # "totp_reused"

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

# KEYS[1] = P:ipfail:IP. ARGV = window, ip_max_failures, ip_block_seconds. Returns the count.
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

    def __init__(self, redis_client, users: UserDirectory, policy: Login, prefix: str = "dpiguard"):
        self.redis = redis_client
        self.users = users
        self.policy = policy
        self.prefix = prefix
        self.keys = Keys(prefix)
        self._account_failure = redis_client.register_script(_ACCOUNT_FAILURE_SCRIPT)
        self._ip_failure = redis_client.register_script(_IP_FAILURE_SCRIPT)

    # -- keys --------------------------------------------------------------------------------------

    # -- the decision ------------------------------------------------------------------------------

    def login(self, login: str, password: str, totp_code: str, client_ip: str, now: float | None = None) -> LoginResult:
        ip = normalize_ip(client_ip)
        login = normalize_login(login if isinstance(login, str) else "")

        blocked_for = self._ip_blocked_for(ip)
        if blocked_for:
            return LoginResult(False, None, THROTTLED, retry_after=blocked_for, detail=THROTTLED)

        if len(login) > MAX_LOGIN_LENGTH or not is_valid_login(login):
            # Cannot be an account: no per-login keys with arbitrary content. Spend the argon2 time anyway.
            self.users.verify_password(login, password)
            self._record_ip_failure(ip)
            return LoginResult(False, None, INVALID_CREDENTIALS, detail=DETAIL_UNKNOWN_USER)

        locked_for = self._locked_for(login)
        if locked_for:
            return LoginResult(False, None, LOCKED, retry_after=locked_for, detail=LOCKED)

        user = self.users.get(login)
        password_ok = self.users.verify_password(login, password)
        # Always check the code too; record its step only when the password was right, so a password
        # typo does not burn the user's current code.
        totp_outcome = self.users.check_totp(login, totp_code, now=now, consume=password_ok)

        if user is not None and not user.disabled and password_ok and totp_outcome == TOTP_OK:
            self.redis.delete(self.keys.login_failures(login))
            return LoginResult(True, user, OK, detail=OK)

        if user is None:
            detail = DETAIL_UNKNOWN_USER
        elif user.disabled:
            detail = DETAIL_DISABLED
        elif not password_ok:
            detail = DETAIL_BAD_PASSWORD
        else:
            detail = totp_outcome  # bad_totp or totp_reused
        self._record_failure(login, ip)
        return LoginResult(False, None, INVALID_CREDENTIALS, detail=detail)

    def reauthenticate(self, login: str, totp_code: str, client_ip: str, now: float | None = None) -> LoginResult:
        """Second-factor re-entry by a logged-in user (emergency access): a fresh TOTP code.

        Same rules as a login for that factor: address block and account lock are honoured, the code
        is single-use across instances, and a wrong or reused code counts as a failed login (so three
        lock the account). A success does not reset the failure counter (no password was checked)."""
        ip = normalize_ip(client_ip)
        login = normalize_login(login if isinstance(login, str) else "")
        blocked_for = self._ip_blocked_for(ip)
        if blocked_for:
            return LoginResult(False, None, THROTTLED, retry_after=blocked_for, detail=THROTTLED)
        if not is_valid_login(login):
            self._record_ip_failure(ip)
            return LoginResult(False, None, INVALID_CREDENTIALS, detail=DETAIL_UNKNOWN_USER)
        locked_for = self._locked_for(login)
        if locked_for:
            return LoginResult(False, None, LOCKED, retry_after=locked_for, detail=LOCKED)
        outcome = self.users.check_totp(login, totp_code, now=now)
        if outcome == TOTP_OK:
            return LoginResult(True, self.users.get(login), OK, detail=OK)
        self._record_failure(login, ip)
        locked_for = self._locked_for(login)
        if locked_for:
            return LoginResult(False, None, LOCKED, retry_after=locked_for, detail=outcome)
        return LoginResult(False, None, INVALID_CREDENTIALS, detail=outcome)

    # -- administration ----------------------------------------------------------------------------

    def unlock(self, login: str) -> None:
        """Lift an account lock and forget its recent failures."""
        login = normalize_login(login)
        self.redis.delete(self.keys.login_lock(login), self.keys.login_failures(login))

    def unblock_ip(self, client_ip: str) -> None:
        """Lift a client address block and forget its recent failures."""
        self.redis.delete(self.keys.address_failures(normalize_ip(client_ip)))

    # -- counters ----------------------------------------------------------------------------------

    def _ip_blocked_for(self, ip: str) -> int:
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.keys.address_failures(ip))
        pipe.pttl(self.keys.address_failures(ip))
        count, pttl = pipe.execute()
        if count is None or int(as_text(count)) < self.policy.ip_max_failures:
            return 0
        return _seconds_left(pttl, self.policy.ip_block_seconds)

    def _locked_for(self, login: str) -> int:
        pttl = self.redis.pttl(self.keys.login_lock(login))
        if pttl == -2:  # no such key
            return 0
        return _seconds_left(pttl, self.policy.lock_seconds)

    def _record_failure(self, login: str, ip: str) -> None:
        p = self.policy
        self._account_failure(
            keys=[self.keys.login_failures(login), self.keys.login_lock(login)],
            args=[p.failure_window, p.max_failures, p.lock_seconds],
        )
        self._record_ip_failure(ip)

    def _record_ip_failure(self, ip: str) -> None:
        p = self.policy
        self._ip_failure(keys=[self.keys.address_failures(ip)], args=[p.ip_window, p.ip_max_failures, p.ip_block_seconds])
