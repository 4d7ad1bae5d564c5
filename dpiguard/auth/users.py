"""Local user directory in Redis: logins, roles, argon2id password hashes and encrypted TOTP secrets.

Key layout (see docs/architecture.md):

* ``P:user:{LOGIN}`` (hash): ``login``, ``display_name``, ``roles`` (comma list), ``pw_hash`` (argon2id),
  ``totp_enc`` (AES-256-GCM, base64, the login as associated data), ``totp_last_step``, ``disabled``
  (``0``/``1``), ``created`` (epoch seconds); ``external`` (``ldap``) for a user of an external
  directory: such a record has no ``pw_hash`` (the directory checks the password, a local password can
  never be set or used), its roles come from the directory at each login, ``dir_units`` lists the care
  units the directory gave it at its last login (dpiguard/auth/directory.py).
* ``P:users`` (set): every login.

Every administrative mutation publishes ``user:LOGIN`` on ``P:events`` after the write, so that every
proxy instance drops what it cached about that user. Bookkeeping written during a login (the last
accepted TOTP step, an argon2 rehash) changes no decision and is not published.

TOTP replay protection: a code is accepted only if its time step is strictly greater than the stored
``totp_last_step``; the compare-and-set runs in one Lua script so that every instance sharing the
Redis refuses the same code, or an older one, exactly once accepted.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dpiguard.storage.clients import as_text
from dpiguard.storage.keys import Keys

LOGIN_RE = re.compile(r"[a-z0-9][a-z0-9._-]{1,63}")
ROLE_RE = re.compile(r"[a-z][a-z0-9_]*")
TOTP_CODE_RE = re.compile(r"[0-9]{6}")

PASSWORD_MIN_LENGTH = 12
PASSWORD_MAX_LENGTH = 1024
DISPLAY_NAME_MAX_LENGTH = 200

TOTP_STEP_SECONDS = 30
TOTP_DIGITS = 6
TOTP_VALID_WINDOW = 1  # steps accepted either side of the current one

# Outcomes of UserDirectory.check_totp.
TOTP_OK = "ok"
TOTP_BAD = "bad_totp"
TOTP_REUSED = "totp_reused"

#: Directories that may check a user's password instead of dpiguard (``external`` field).
EXTERNAL_SOURCES = ("ldap",)

_NO_STEP = -1  # totp_last_step of an account that never logged in (or whose TOTP was reset)


def normalize_login(login: str) -> str:
    return (login or "").strip().lower()


def is_valid_login(login: str) -> bool:
    return bool(LOGIN_RE.fullmatch(login))


def check_password_policy(password: str) -> None:
    """Raise ValueError unless the password has 12+ characters from at least 3 of the 4 classes."""
    if not isinstance(password, str) or len(password) < PASSWORD_MIN_LENGTH:
        raise ValueError(f"password must have at least {PASSWORD_MIN_LENGTH} characters")
    if len(password) > PASSWORD_MAX_LENGTH:
        raise ValueError(f"password must have at most {PASSWORD_MAX_LENGTH} characters")
    classes = (
        any(c.islower() for c in password),
        any(c.isupper() for c in password),
        any(c.isdigit() for c in password),
        any(not c.isalnum() for c in password),
    )
    if sum(classes) < 3:
        raise ValueError(
            "password must use at least 3 of: lowercase letters, uppercase letters, digits, other characters"
        )


def _check_roles(roles) -> tuple[str, ...]:
    if isinstance(roles, str):
        roles = roles.split(",")
    cleaned: list[str] = []
    for role in roles:
        role = role.strip()
        if not ROLE_RE.fullmatch(role):
            raise ValueError(f"invalid role name {role!r} (expected {ROLE_RE.pattern})")
        if role not in cleaned:
            cleaned.append(role)
    if not cleaned:
        raise ValueError("a user needs at least one role")
    return tuple(cleaned)


def _check_display_name(display_name: str) -> str:
    display_name = (display_name or "").strip()
    if len(display_name) > DISPLAY_NAME_MAX_LENGTH:
        raise ValueError(f"display name must have at most {DISPLAY_NAME_MAX_LENGTH} characters")
    if any(not c.isprintable() for c in display_name):
        raise ValueError("display name must not contain control characters")
    return display_name


class SecretBox:
    """AES-256-GCM for secrets at rest. Token = base64(12-byte random nonce || ciphertext || tag)."""

    KEY_BYTES = 32
    NONCE_BYTES = 12

    def __init__(self, key: bytes):
        if not isinstance(key, bytes) or len(key) != self.KEY_BYTES:
            raise ValueError(f"SecretBox key must be {self.KEY_BYTES} bytes")
        self._aead = AESGCM(key)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SecretBox":
        """Read a key file: one line, base64 of 32 random bytes."""
        path = Path(path)
        try:
            key = base64.b64decode(path.read_text().strip(), validate=True)
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise ValueError(f"key file {path}: not base64 ({exc})") from exc
        if len(key) != cls.KEY_BYTES:
            raise ValueError(f"key file {path}: expected base64 of {cls.KEY_BYTES} bytes, got {len(key)} bytes")
        return cls(key)

    @classmethod
    def generate_key_file(cls, path: str | os.PathLike) -> Path:
        """Write a new random key with mode 0600. Refuses to overwrite an existing file."""
        path = Path(path)
        encoded = base64.b64encode(os.urandom(cls.KEY_BYTES)) + b"\n"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError as exc:
            raise FileExistsError(f"key file {path} already exists; refusing to overwrite it") from exc
        with os.fdopen(fd, "wb") as f:
            f.write(encoded)
        os.chmod(path, 0o600)  # in case the umask was stricter than needed or the file system ignored mode
        return path

    def encrypt(self, plaintext: str, aad: str) -> str:
        nonce = os.urandom(self.NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), aad.encode())
        return base64.b64encode(nonce + sealed).decode()

    def decrypt(self, token: str, aad: str) -> str:
        try:
            raw = base64.b64decode(token, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("encrypted secret is not valid base64") from exc
        if len(raw) <= self.NONCE_BYTES:
            raise ValueError("encrypted secret is too short")
        try:
            plain = self._aead.decrypt(raw[: self.NONCE_BYTES], raw[self.NONCE_BYTES :], aad.encode())
        except InvalidTag as exc:
            raise ValueError("encrypted secret failed authentication (tampered, wrong key or wrong account)") from exc
        return plain.decode()


@dataclass(frozen=True)
class User:
    login: str
    display_name: str
    roles: tuple[str, ...]
    disabled: bool
    created: int
    external: str = ""  # "" for a local account, else the directory that checks its password ("ldap")


# Create the user hash only if it does not exist. ARGV[1]: a token of this one create, kept in the
# hash as ``create_op``; ARGV[2..]: field, value, field, value, ... The client retries a command whose
# reply was lost (a socket timeout on a busy server, a failover): that retry finds the hash its own
# first attempt created and must say "created", not "already exists". Returns 1 created (now or by
# the earlier attempt of the same create), 0 someone else's account.
_CREATE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'create_op') == ARGV[1] then return 1 end
  return 0
end
redis.call('HSET', KEYS[1], 'create_op', unpack(ARGV))
return 1
"""

# Update fields of an existing user hash; never creates a partial one. ARGV: field, value, ...
_UPDATE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# Compare-and-set of the last accepted TOTP step.
# ARGV[1] = matched step, ARGV[2] = totp_enc the code was checked against, ARGV[3] = 1 to record it.
# Returns 1 accepted, 0 reused/older step, -1 account gone, disabled or TOTP secret changed meanwhile.
_TOTP_STEP_SCRIPT = """
local f = redis.call('HMGET', KEYS[1], 'totp_enc', 'disabled', 'totp_last_step')
if not f[1] or f[1] ~= ARGV[2] or f[2] ~= '0' then return -1 end
local last = tonumber(f[3]) or -1
local step = tonumber(ARGV[1])
if step <= last then return 0 end
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'totp_last_step', ARGV[1]) end
return 1
"""

# Replace the password hash only if it is still the one that was verified (rehash after a login).
_REHASH_SCRIPT = """
if redis.call('HGET', KEYS[1], 'pw_hash') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'pw_hash', ARGV[2])
return 1
"""


class UserDirectory:
    """Users stored in Redis. Thread-safe as long as the redis client is (redis-py's is)."""

    def __init__(self, redis_client, box: SecretBox, prefix: str = "dpiguard", issuer: str = "dpiguard"):
        self.redis = redis_client
        self.box = box
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.issuer = issuer
        self.hasher = PasswordHasher()
        # Verified against for unknown or disabled accounts so that they cost the same argon2 time.
        self._dummy_hash = self.hasher.hash(base64.b64encode(os.urandom(18)).decode())
        self._dummy_secret = pyotp.random_base32()
        self._create = redis_client.register_script(_CREATE_SCRIPT)
        self._update = redis_client.register_script(_UPDATE_SCRIPT)
        self._totp_step = redis_client.register_script(_TOTP_STEP_SCRIPT)
        self._rehash = redis_client.register_script(_REHASH_SCRIPT)

    def _create_once(self, login: str, fields: dict) -> bool:
        """Create the user hash unless it exists; True if this call created it (also when the reply of
        the first attempt was lost and the client's retry ran the script again)."""
        argv = [secrets.token_urlsafe(16)] + [item for pair in fields.items() for item in pair]
        return bool(self._create(keys=[self.keys.user(login)], args=argv))

    def _publish(self, login: str) -> None:
        self.redis.publish(self.keys.events, f"user:{login}")

    # -- reading -----------------------------------------------------------------------------------

    @staticmethod
    def _user_from_hash(fields: dict) -> User:
        f = {as_text(k): as_text(v) for k, v in fields.items()}
        roles = tuple(r for r in (f.get("roles") or "").split(",") if r)
        return User(
            login=f["login"],
            display_name=f.get("display_name") or "",
            roles=roles,
            disabled=f.get("disabled") != "0",  # anything but an explicit "0" counts as disabled
            created=int(f.get("created") or 0),
            external=f.get("external") or "",
        )

    def get(self, login: str) -> User | None:
        login = normalize_login(login)
        if not is_valid_login(login):
            return None
        fields = self.redis.hgetall(self.keys.user(login))
        return self._user_from_hash(fields) if fields else None

    def list(self) -> list[User]:
        logins = sorted(as_text(m) for m in self.redis.smembers(self.keys.users))
        pipe = self.redis.pipeline(transaction=False)
        for login in logins:
            pipe.hgetall(self.keys.user(login))
        return [self._user_from_hash(fields) for fields in pipe.execute() if fields]

    # -- administration ----------------------------------------------------------------------------

    def provisioning_uri(self, login: str, secret: str) -> str:
        return pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_STEP_SECONDS).provisioning_uri(
            name=login, issuer_name=self.issuer
        )

    def add(self, login: str, password: str, roles, display_name: str = "") -> tuple[User, str]:
        """Create a user. Returns the user and the otpauth:// URI to enrol the authenticator app."""
        login = normalize_login(login)
        if not is_valid_login(login):
            raise ValueError(f"invalid login {login!r} (expected {LOGIN_RE.pattern})")
        roles = _check_roles(roles)
        display_name = _check_display_name(display_name)
        check_password_policy(password)
        secret = pyotp.random_base32()
        user = User(login=login, display_name=display_name, roles=roles, disabled=False, created=int(time.time()))
        fields = {
            "login": login,
            "display_name": display_name,
            "roles": ",".join(roles),
            "pw_hash": self.hasher.hash(password),
            "totp_enc": self.box.encrypt(secret, aad=login),
            "totp_last_step": str(_NO_STEP),
            "disabled": "0",
            "created": str(user.created),
        }
        if not self._create_once(login, fields):
            raise ValueError(f"user {login!r} already exists")
        self.redis.sadd(self.keys.users, login)
        self._publish(login)
        return user, self.provisioning_uri(login, secret)

    def add_external(self, login: str, source: str, display_name: str = "") -> tuple[User, str]:
        """Create the record of a user whose first factor is an external directory (``source``:
        ``ldap``): the TOTP secret only, no password and no roles (the directory gives them at each
        login). Returns the user and the otpauth:// URI to enrol the authenticator app."""
        if source not in EXTERNAL_SOURCES:
            raise ValueError(f"unknown external directory {source!r} (known: {', '.join(EXTERNAL_SOURCES)})")
        login = normalize_login(login)
        if not is_valid_login(login):
            raise ValueError(f"invalid login {login!r} (expected {LOGIN_RE.pattern})")
        display_name = _check_display_name(display_name)
        secret = pyotp.random_base32()
        user = User(login=login, display_name=display_name, roles=(), disabled=False, created=int(time.time()),
                    external=source)
        fields = {
            "login": login,
            "display_name": display_name,
            "roles": "",
            "totp_enc": self.box.encrypt(secret, aad=login),
            "totp_last_step": str(_NO_STEP),
            "disabled": "0",
            "created": str(user.created),
            "external": source,
        }
        if not self._create_once(login, fields):
            raise ValueError(f"user {login!r} already exists")
        self.redis.sadd(self.keys.users, login)
        self._publish(login)
        return user, self.provisioning_uri(login, secret)

    def external_logins(self, source: str) -> list[str]:
        """The logins whose first factor is the directory ``source``."""
        return [u.login for u in self.list() if u.external == source]

    def directory_units(self, login: str) -> list[str]:
        """The units the directory gave ``login`` at its last login (see the module docstring)."""
        raw = as_text(self.redis.hget(self.keys.user(normalize_login(login)), "dir_units")) or ""
        return [u for u in raw.split(",") if u]

    def set_directory_units(self, login: str, units) -> None:
        """Bookkeeping of a login (not published: the care-team writes publish their own events)."""
        self._update(keys=[self.keys.user(normalize_login(login))], args=["dir_units", ",".join(units)])

    def _refuse_external(self, login: str, what: str) -> None:
        user = self.get(login)
        if user is not None and user.external:
            raise ValueError(f"user {user.login!r} is a {user.external} directory account: {what} "
                             "in the directory, not in dpiguard")

    def _update_fields(self, login: str, fields: dict[str, str]) -> str:
        """Write fields of an existing user, publish, return the normalized login. KeyError if unknown."""
        login = normalize_login(login)
        if not is_valid_login(login):
            raise KeyError(login)
        argv = [item for pair in fields.items() for item in pair]
        if not self._update(keys=[self.keys.user(login)], args=argv):
            raise KeyError(login)
        self._publish(login)
        return login

    def disable(self, login: str) -> None:
        self._update_fields(login, {"disabled": "1"})

    def enable(self, login: str) -> None:
        self._update_fields(login, {"disabled": "0"})

    def set_roles(self, login: str, roles) -> None:
        self._refuse_external(login, "its roles come from its groups (policies/directory.yaml)")
        self._update_fields(login, {"roles": ",".join(_check_roles(roles))})

    def set_display_name(self, login: str, display_name: str) -> None:
        self._update_fields(login, {"display_name": _check_display_name(display_name)})

    def set_password(self, login: str, password: str) -> None:
        self._refuse_external(login, "its password is set")
        check_password_policy(password)
        self._update_fields(login, {"pw_hash": self.hasher.hash(password)})

    def reset_totp(self, login: str) -> str:
        """Give the user a new TOTP secret (old codes stop working). Returns the new otpauth:// URI."""
        login = normalize_login(login)
        secret = pyotp.random_base32()
        self._update_fields(
            login, {"totp_enc": self.box.encrypt(secret, aad=login), "totp_last_step": str(_NO_STEP)}
        )
        return self.provisioning_uri(login, secret)

    def store_password(self, login: str, password: str) -> None:
        """Set a password the caller already checked against its own rule (the enrolment page applies
        :func:`dpiguard.auth.enrolment.password_problems`); only the length bounds are checked here.
        Never for a directory account (its password is the directory's)."""
        self._refuse_external(login, "its password is set")
        if not isinstance(password, str) or not password or len(password) > PASSWORD_MAX_LENGTH:
            raise ValueError("password missing or too long")
        self._update_fields(login, {"pw_hash": self.hasher.hash(password)})

    def set_totp_secret(self, login: str, secret: str, last_step: int = _NO_STEP) -> None:
        """Install a TOTP secret the user proved they hold (a code of ``last_step`` was confirmed, so
        that code and older ones cannot serve to log in)."""
        self._update_fields(login, {"totp_enc": self.box.encrypt(secret, aad=normalize_login(login)),
                                    "totp_last_step": str(last_step)})

    @staticmethod
    def totp_step_of(secret: str, code: str, now: float | None = None) -> int | None:
        """The time step ``code`` belongs to for ``secret`` (within the window), or None."""
        if not isinstance(code, str) or not TOTP_CODE_RE.fullmatch(code):
            return None
        return UserDirectory._matching_step(secret, code, time.time() if now is None else now)

    # -- verification ------------------------------------------------------------------------------

    def verify_password(self, login: str, password: str) -> bool:
        """True only for an enabled user with this password. Same argon2 cost whether the user exists."""
        login = normalize_login(login)
        stored = None
        if is_valid_login(login) and isinstance(password, str):
            pw_hash, disabled, external = self.redis.hmget(self.keys.user(login), ["pw_hash", "disabled", "external"])
            # A directory account never has a usable local password, even if one were written by hand.
            if pw_hash is not None and as_text(disabled) == "0" and not external:
                stored = as_text(pw_hash)
        candidate = password if isinstance(password, str) else ""
        try:
            self.hasher.verify(stored or self._dummy_hash, candidate)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        if stored is None:
            return False
        if self.hasher.check_needs_rehash(stored):
            self._rehash(keys=[self.keys.user(login)], args=[stored, self.hasher.hash(candidate)])
        return True

    def check_totp(self, login: str, code: str, now: float | None = None, consume: bool = True) -> str:
        """Check a TOTP code; returns TOTP_OK, TOTP_BAD or TOTP_REUSED.

        With ``consume`` the accepted step is recorded (atomically), so the code, and every older one,
        is refused afterwards. With ``consume=False`` the same reads and checks run but nothing is
        written: the login flow uses it when the password was wrong, so that a typo does not burn the
        user's current code, while the time spent stays the same.
        """
        return self.check_totp_step(login, code, now, consume)[0]

    def check_totp_step(self, login: str, code: str, now: float | None = None,
                        consume: bool = True) -> tuple[str, int | None]:
        """:meth:`check_totp`, and the time step the code belongs to (None for a wrong code): the
        session remembers the step of its login code (step-up for emergency access)."""
        login = normalize_login(login)
        if not isinstance(code, str) or not TOTP_CODE_RE.fullmatch(code) or not is_valid_login(login):
            return TOTP_BAD, None
        key = self.keys.user(login)
        enc, disabled = (as_text(v) for v in self.redis.hmget(key, ["totp_enc", "disabled"]))
        secret = self._dummy_secret
        if enc is not None and disabled == "0":
            secret = self.box.decrypt(enc, aad=login)  # ValueError on tampering: propagate, fail closed
        matched = self._matching_step(secret, code, time.time() if now is None else now)
        # Always one script call, even for unknown accounts (it writes nothing then): same round trips.
        outcome = self._totp_step(
            keys=[key], args=[matched if matched is not None else 0, enc or "", "1" if consume else "0"]
        )
        if matched is None or enc is None or outcome == -1:
            return TOTP_BAD, None
        return (TOTP_OK if outcome == 1 else TOTP_REUSED), matched

    def has_totp(self, login: str) -> bool:
        """True if ``login`` is an enabled account with a TOTP secret (an IdP login may use it as second factor)."""
        login = normalize_login(login)
        if not is_valid_login(login):
            return False
        enc, disabled = (as_text(v) for v in self.redis.hmget(self.keys.user(login), ["totp_enc", "disabled"]))
        return enc is not None and disabled == "0"

    def verify_totp(self, login: str, code: str, now: float | None = None) -> bool:
        """RFC 6238 check (30 s, 6 digits, +-1 step) with single use of each time step."""
        return self.check_totp(login, code, now) == TOTP_OK

    @staticmethod
    def _matching_step(secret: str, code: str, now: float) -> int | None:
        """The highest time step in the window whose code equals ``code`` (constant-time compares)."""
        totp = pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_STEP_SECONDS)
        current = int(now) // TOTP_STEP_SECONDS
        matched = None
        for step in range(current - TOTP_VALID_WINDOW, current + TOTP_VALID_WINDOW + 1):
            if step < 0:
                continue
            if hmac.compare_digest(totp.generate_otp(step).encode(), code.encode()):
                matched = step
        return matched
