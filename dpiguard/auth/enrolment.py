"""Self-service enrolment: the password rule, one-time enrolment links, recovery codes.

* :func:`password_problems` - the password rule of the enrolment page: **either** 12 characters or more
  from at least 3 of the 4 classes (the directory's rule, :func:`dpiguard.auth.users.check_password_policy`)
  **or** at least 80 bits of entropy computed as the CNIL does in délibération 2022-100
  (``length × log2(size of the alphabet the characters are drawn from)``, the alphabet being the sum of
  the classes used: 26 lowercase, 26 uppercase, 10 digits, 33 other printable ASCII characters, and
  a generous 100 more for any other character). 80 bits is the CNIL's level for a password used
  alone; dpiguard adds a second factor and locks accounts, so this is stricter than the 50 bits the
  CNIL accepts with limited attempts. In every case the password must not contain the login.
* :class:`EnrolmentLinks` - a link token (32 random bytes, base64url) is given once; Redis keeps only
  its SHA-256 digest, with the link's life as TTL; :meth:`EnrolmentLinks.take` consumes it atomically
  (Lua: read and delete), so a link serves once across every instance. A new link for a user
  replaces (deletes) the previous one.
* :class:`RecoveryCodes` - ``n`` codes of 60 random bits (``xxxx-xxxx-xxxx``, base32 without look-alike
  characters), shown once; Redis keeps a set of their SHA-256 digests (salted with the login). A
  code is used by SREM: exactly one login consumes it, on any instance.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import string
import time
from dataclasses import dataclass

from dpiguard.auth.users import PASSWORD_MAX_LENGTH, check_password_policy, is_valid_login, normalize_login
from dpiguard.storage.clients import as_text
from dpiguard.storage.keys import Keys

CNIL_MIN_BITS = 80
PASSWORD_MIN_LENGTH = 12

# Alphabet sizes of délibération 2022-100's computation.
_CLASSES = (
    (str.islower, 26),
    (str.isupper, 26),
    (str.isdigit, 10),
)
_ASCII_OTHER = frozenset(string.punctuation + " ")  # 33 characters
_ASCII_OTHER_SIZE = 33
_NON_ASCII_SIZE = 100


def password_entropy_bits(password: str) -> float:
    """length × log2(alphabet size), the alphabet being the union of the classes the password uses."""
    if not password:
        return 0.0
    size = 0
    for test, n in _CLASSES:
        if any(c.isascii() and test(c) for c in password):
            size += n
    if any(c in _ASCII_OTHER for c in password):
        size += _ASCII_OTHER_SIZE
    if any(not c.isascii() for c in password):
        size += _NON_ASCII_SIZE
    return len(password) * math.log2(size) if size > 1 else 0.0


# Problem codes (the page says each in the person's language).
TOO_LONG = "too_long"
CONTAINS_LOGIN = "contains_login"
TOO_WEAK = "too_weak"
MISMATCH = "mismatch"


def password_problems(password: str, login: str, again: str | None = None) -> list[str]:
    """Empty list when the enrolment rule accepts ``password`` for ``login``; else the problem codes."""
    if not isinstance(password, str):
        return [TOO_WEAK]
    problems: list[str] = []
    if len(password) > PASSWORD_MAX_LENGTH:
        problems.append(TOO_LONG)
    login = normalize_login(login)
    if login and login in password.lower():
        problems.append(CONTAINS_LOGIN)
    try:
        check_password_policy(password)
        classic = True
    except ValueError:
        classic = False
    if not classic and password_entropy_bits(password) < CNIL_MIN_BITS:
        problems.append(TOO_WEAK)
    if again is not None and again != password:
        problems.append(MISMATCH)
    return problems


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")

# Consume a link once (KEYS[1]: the link); returns the login, or false. ARGV[1]: a token of this one
# take. The link is not deleted at once but marked taken by that token for ARGV[2] seconds: the client
# retries a command whose reply it lost (a socket timeout, a failover), and that retry must give the
# link to the same caller, not call it used.
_TAKE_SCRIPT = """
local f = redis.call('HMGET', KEYS[1], 'login', 'taken_by')
if not f[1] then return false end
if f[2] then
  if f[2] == ARGV[1] then return f[1] end
  return false
end
redis.call('HSET', KEYS[1], 'taken_by', ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return f[1]
"""
TAKEN_KEEP_SECONDS = 60  # how long a taken link stays marked (longer than any retry of the take)


@dataclass(frozen=True)
class Link:
    token: str
    login: str
    expires: int


class EnrolmentLinks:
    def __init__(self, redis_client, prefix: str = "dpiguard", ttl: int = 259200):
        self.redis = redis_client
        self.keys = Keys(prefix)
        self.ttl = ttl
        self._take = redis_client.register_script(_TAKE_SCRIPT)

    def issue(self, login: str, created_by: str = "", ttl: int | None = None) -> Link:
        """A new link for ``login`` (the previous one, if any, stops working)."""
        login = normalize_login(login)
        if not is_valid_login(login):
            raise ValueError(f"invalid login {login!r}")
        ttl = ttl or self.ttl
        token = secrets.token_urlsafe(32)
        digest = _digest(token)
        old = self.redis.get(self.keys.user_enrol_link(login))
        if old is not None:
            self.redis.delete(self.keys.enrol_link(as_text(old)))
        key = self.keys.enrol_link(digest)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping={"login": login, "created_by": created_by[:64], "created": str(int(time.time()))})
        pipe.expire(key, ttl)
        pipe.set(self.keys.user_enrol_link(login), digest, ex=ttl)
        pipe.execute()
        return Link(token, login, int(time.time()) + ttl)

    def peek(self, token: str) -> str | None:
        """The login a valid, unused, unexpired link is for (nothing consumed), or None."""
        if not isinstance(token, str) or not TOKEN_RE.fullmatch(token):
            return None
        login, taken = self.redis.hmget(self.keys.enrol_link(_digest(token)), ["login", "taken_by"])
        return as_text(login) if login is not None and taken is None else None

    def take(self, token: str) -> str | None:
        """Consume the link (once, on any instance); the login, or None if unknown, used or expired."""
        if not isinstance(token, str) or not TOKEN_RE.fullmatch(token):
            return None
        digest = _digest(token)
        login = self._take(keys=[self.keys.enrol_link(digest)], args=[secrets.token_urlsafe(16), TAKEN_KEEP_SECONDS])
        return as_text(login) if login else None

    def revoke(self, login: str) -> None:
        login = normalize_login(login)
        old = self.redis.get(self.keys.user_enrol_link(login))
        if old is not None:
            self.redis.delete(self.keys.enrol_link(as_text(old)), self.keys.user_enrol_link(login))


RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i
RECOVERY_RE = re.compile(r"[a-z2-9]{4}-?[a-z2-9]{4}-?[a-z2-9]{4}")


def normalize_recovery_code(code: str) -> str:
    return (code or "").strip().lower().replace(" ", "").replace("-", "")


def looks_like_recovery_code(code) -> bool:
    return isinstance(code, str) and bool(RECOVERY_RE.fullmatch(code.strip().lower().replace(" ", "")))


class RecoveryCodes:
    def __init__(self, redis_client, prefix: str = "dpiguard", count: int = 10):
        self.redis = redis_client
        self.keys = Keys(prefix)
        self.count = count

    @staticmethod
    def _digest(login: str, code: str) -> str:
        return _digest(f"{login}:{normalize_recovery_code(code)}")

    def generate(self, login: str) -> list[str]:
        """New codes for ``login`` (the old ones stop working). Returned once, never stored in clear."""
        login = normalize_login(login)
        codes = []
        for _ in range(self.count):
            raw = "".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(12))
            codes.append(f"{raw[:4]}-{raw[4:8]}-{raw[8:]}")
        key = self.keys.recovery_codes(login)
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(key)
        pipe.sadd(key, *(self._digest(login, c) for c in codes))
        pipe.execute()
        return codes

    def use(self, login: str, code: str) -> bool:
        """True once per code (atomic SREM: two instances cannot both accept it)."""
        login = normalize_login(login)
        if not is_valid_login(login) or not looks_like_recovery_code(code):
            return False
        return bool(self.redis.srem(self.keys.recovery_codes(login), self._digest(login, code)))

    def remaining(self, login: str) -> int:
        return int(self.redis.scard(self.keys.recovery_codes(normalize_login(login))))

    def revoke(self, login: str) -> None:
        self.redis.delete(self.keys.recovery_codes(normalize_login(login)))
