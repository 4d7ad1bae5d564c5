"""Server-side sessions in Redis with an in-process cache on the hot path.

Redis (see docs/architecture.md):

* ``P:session:{SIDHASH}`` (hash, TTL = min(idle timeout, remaining absolute lifetime)): ``user``,
  ``roles`` (comma list), ``created``, ``last_seen``, ``abs_expiry``, ``csrf``, ``name`` (display
  name), ``src`` (identity source when not ``local``: ``ldap``, ``oidc``, ``psc``), ``rpps`` (RPPS/ADELI
  number when known), ``login_step`` and ``login_code_reused`` (below). SIDHASH is the sha256
  hex of the session id: the id itself (the cookie) is never stored.
* ``P:user-sessions:{LOGIN}`` (set): the session id hashes of a user, for revocation.
* ``P:session-owner:{SIDHASH}`` (string, TTL = absolute lifetime + ``resume_seconds``): the user of a
  session, kept after the session ended by inactivity so that a form sent then is kept for its author
  only (``auth/resume.py``); deleted by logout and revocation, which keep nothing.

The session hash also holds ``login_step`` (the TOTP time step of the login code) and, once used,
``login_code_reused``: the login code may serve once more for a step-up (emergency access) in the
same session, while it is valid (``auth/login.py``, ``Authenticator.reauthenticate``).

Hot path: :meth:`SessionStore.get` answers from an in-process LRU dict without a Redis round trip
(:meth:`SessionStore.get_local` answers from that dict only, for callers on an event loop).
Activity is recorded locally on every request and written to Redis by :meth:`SessionStore.touch` at
most every ``touch_interval`` seconds. A locally idle session is re-read from Redis before being
declared expired, because another instance may have seen (and touched) more recent activity. Since
instances write activity only every ``touch_interval``, the effective idle timeout lies between
``idle_timeout - touch_interval`` and ``idle_timeout``: it errs on the strict side.

Coherence with other instances comes from the invalidation bus (``dpiguard/bus.py``): it calls
:meth:`drop_local` on ``session:H``, :meth:`drop_local_user` on ``user:U`` and :meth:`clear_local`
on resync, and turns ``local_enabled`` off while the subscription is down. A Redis read that races
with an invalidation is not cached (generation counter). Redis errors propagate: callers fail closed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from dpiguard.storage.clients import as_text
from dpiguard.storage.keys import Keys

SID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
SID_BYTES = 32
DEFAULT_MAX_LOCAL = 100_000

# Record activity on an existing session only: never recreates a destroyed or expired one.
# KEYS[1] = session key; ARGV[1] = last_seen, ARGV[2] = TTL in ms. Returns 1 if the session exists.
_TOUCH_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local current = tonumber(redis.call('HGET', KEYS[1], 'last_seen')) or 0
if tonumber(ARGV[1]) > current then
  redis.call('HSET', KEYS[1], 'last_seen', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""

# The login code's second (and last) use: 1 if the session exists, has this login step and had not
# used it yet. KEYS[1] = session key; ARGV[1] = the step.
_CLAIM_LOGIN_CODE_SCRIPT = """
if redis.call('HGET', KEYS[1], 'login_step') ~= ARGV[1] then return 0 end
return redis.call('HSETNX', KEYS[1], 'login_code_reused', '1')
"""


def sid_hash(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


def is_valid_sid(sid) -> bool:
    return isinstance(sid, str) and SID_RE.fullmatch(sid) is not None


def cookie_value(cookie_header: str, name: str) -> str | None:
    """The value of cookie ``name`` in a Cookie header (first one wins), or None."""
    for part in cookie_header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def presented_token(headers, cookie_name: str) -> tuple[str | None, str | None]:
    """The session id a client presented and where: (id, 'bearer' | 'cookie') or (None, None).

    ``headers``: lower-case names (multi-valued headers joined). A bearer token wins over the cookie."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip(), "bearer"
    value = cookie_value(headers.get("cookie", ""), cookie_name)
    return (value, "cookie") if value else (None, None)


IDENTITY_SOURCES = ("local", "ldap", "oidc", "psc")  # dpiguard's directory, LDAP/AD, OpenID Connect, Pro Santé Connect


@dataclass
class Session:
    sid_hash: str
    user: str
    roles: tuple[str, ...]
    created: float
    abs_expiry: float
    last_seen: float  # last activity seen by this instance
    csrf: str
    touched_at: float = 0.0  # last_seen value last written to Redis (drives needs_touch)
    login_step: int | None = None  # TOTP time step of the code that opened the session
    display_name: str = ""  # shown on dpiguard's pages ("logged in as"), without a Redis read
    source: str = "local"  # where the identity came from: one of IDENTITY_SOURCES (written in each trace record)
    rpps: str = ""  # the professional's RPPS/ADELI number when the identity source gives it

    def copy(self) -> "Session":
        """A shallow copy (what ``dataclasses.replace(self)`` gives, without calling ``__init__``: the
        local cache hands one out per request)."""
        new = object.__new__(Session)
        new.__dict__.update(self.__dict__)
        return new


class _LocalCache:
    """Bounded LRU of sessions by id hash, with a user → id hashes index. Not thread-safe by itself."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self.entries: OrderedDict[str, Session] = OrderedDict()
        self.by_user: dict[str, set[str]] = {}

    def get(self, h: str) -> Session | None:
        session = self.entries.get(h)
        if session is not None:
            self.entries.move_to_end(h)
        return session

    def put(self, session: Session) -> None:
        self.pop(session.sid_hash)
        self.entries[session.sid_hash] = session
        self.by_user.setdefault(session.user, set()).add(session.sid_hash)
        while len(self.entries) > self.max_entries:
            oldest = next(iter(self.entries))
            self.pop(oldest)

    def pop(self, h: str) -> Session | None:
        session = self.entries.pop(h, None)
        if session is not None:
            hashes = self.by_user.get(session.user)
            if hashes is not None:
                hashes.discard(h)
                if not hashes:
                    del self.by_user[session.user]
        return session

    def pop_user(self, login: str) -> int:
        hashes = self.by_user.pop(login, set())
        for h in hashes:
            self.entries.pop(h, None)
        return len(hashes)

    def clear(self) -> None:
        self.entries.clear()
        self.by_user.clear()

    def __len__(self) -> int:
        return len(self.entries)


class SessionStore:
    def __init__(
        self,
        redis_client,
        prefix: str = "dpiguard",
        idle_timeout: int = 1800,
        absolute_lifetime: int = 43200,
        touch_interval: int = 60,
        max_local: int = DEFAULT_MAX_LOCAL,
        resume_seconds: int = 0,
    ):
        self.redis = redis_client
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.idle_timeout = idle_timeout
        self.absolute_lifetime = absolute_lifetime
        self.touch_interval = touch_interval
        self.resume_seconds = resume_seconds
        self._lock = threading.Lock()
        self._local = _LocalCache(max_local)
        self._generation = 0  # bumped by every invalidation; a racing Redis read is then not cached
        self._local_enabled = True
        self._touch = redis_client.register_script(_TOUCH_SCRIPT)
        self._claim = redis_client.register_script(_CLAIM_LOGIN_CODE_SCRIPT)

    # -- keys and events -------------------------------------------------------------------------

    # -- local cache switch ------------------------------------------------------------------------

    @property
    def local_enabled(self) -> bool:
        return self._local_enabled

    @local_enabled.setter
    def local_enabled(self, enabled: bool) -> None:
        """Off while the bus is not coherent: every get reads Redis. Any switch empties the cache."""
        with self._lock:
            self._local_enabled = bool(enabled)
            self._local.clear()
            self._generation += 1

    def local_size(self) -> int:
        with self._lock:
            return len(self._local)

    # -- lifecycle ---------------------------------------------------------------------------------

    def _ttl_ms(self, last_seen: float, abs_expiry: float) -> int:
        return max(1, math.ceil(min(self.idle_timeout, abs_expiry - last_seen) * 1000))

    def create(self, user: str, roles, now: float | None = None,
               login_step: int | None = None, display_name: str = "",
               source: str = "local", rpps: str = "") -> tuple[str, Session]:
        """New session for ``user``. Returns the opaque id (the cookie value) and the session.
        ``login_step``: the TOTP step of the login code (see the module docstring). ``source``: where the
        identity came from (one of ``IDENTITY_SOURCES``); ``rpps``: the RPPS/ADELI number when known."""
        if source not in IDENTITY_SOURCES:
            raise ValueError(f"unknown identity source {source!r}")
        rpps = str(rpps or "")[:32]
        now = time.time() if now is None else now
        sid = secrets.token_urlsafe(SID_BYTES)
        roles = tuple(roles)
        session = Session(
            sid_hash=sid_hash(sid),
            user=user,
            roles=roles,
            created=now,
            abs_expiry=now + self.absolute_lifetime,
            last_seen=now,
            csrf=secrets.token_urlsafe(SID_BYTES),
            touched_at=now,
            login_step=login_step,
            display_name=display_name,
            source=source,
            rpps=rpps,
        )
        key = self.keys.session(session.sid_hash)
        with self._lock:
            generation = self._generation
        pipe = self.redis.pipeline(transaction=False)
        # Index first: revoke_user must find every session that exists.
        pipe.sadd(self.keys.user_sessions(user), session.sid_hash)
        pipe.expire(self.keys.user_sessions(user), self.absolute_lifetime)
        pipe.hset(
            key,
            mapping={
                "user": user,
                "roles": ",".join(roles),
                "created": repr(now),
                "last_seen": repr(now),
                "abs_expiry": repr(session.abs_expiry),
                "csrf": session.csrf,
                **({"login_step": str(login_step)} if login_step is not None else {}),
                **({"name": display_name} if display_name else {}),
                **({"src": source} if source != "local" else {}),
                **({"rpps": rpps} if rpps else {}),
            },
        )
        pipe.pexpire(key, self._ttl_ms(now, session.abs_expiry))
        if self.resume_seconds:
            pipe.set(self.keys.session_owner(session.sid_hash), user,
                     ex=self.absolute_lifetime + self.resume_seconds)
        pipe.execute()
        with self._lock:
            if self._local_enabled and self._generation == generation:  # not revoked meanwhile
                self._local.put(dataclasses.replace(session))
        return sid, session

    def get_local(self, sid: str, now: float | None = None) -> Session | None:
        """The session from the in-process cache only; never touches Redis (safe on the event loop).

        None means "not answerable locally" (miss, locally idle, expired, cache disabled, malformed
        id): the caller then uses :meth:`get`, off the event loop, for the authoritative answer.
        """
        if not is_valid_sid(sid):
            return None
        now = time.time() if now is None else now
        session, _ = self._local_lookup(sid_hash(sid), now)
        return session

    def get(self, sid: str, now: float | None = None) -> Session | None:
        """The session for a cookie value, or None (unknown, malformed, idle or past its lifetime)."""
        if not is_valid_sid(sid):
            return None
        now = time.time() if now is None else now
        h = sid_hash(sid)
        session, generation = self._local_lookup(h, now)
        if session is not None:
            return session

        session = self._load(h)
        if session is None or now >= session.abs_expiry or now - session.last_seen >= self.idle_timeout:
            with self._lock:
                self._local.pop(h)
            return None
        session.last_seen = max(session.last_seen, now)
        with self._lock:
            if generation is not None and self._local_enabled and self._generation == generation:
                self._local.put(session)
        return dataclasses.replace(session)

    def _local_lookup(self, h: str, now: float) -> tuple[Session | None, int | None]:
        """A copy of the cached session if it is valid and not locally idle, and the cache generation
        to check before caching a Redis read (None when the cache is disabled)."""
        with self._lock:
            if not self._local_enabled:
                return None, None
            cached = self._local.get(h)
            if cached is not None:
                if now >= cached.abs_expiry:
                    self._local.pop(h)
                elif now - cached.last_seen < self.idle_timeout:
                    cached.last_seen = max(cached.last_seen, now)
                    return cached.copy(), self._generation
                # else idle here; another instance may have seen activity: only Redis can tell.
            return None, self._generation

    def _load(self, h: str) -> Session | None:
        fields = self.redis.hgetall(self.keys.session(h))
        if not fields:
            return None
        f = {as_text(k): as_text(v) for k, v in fields.items()}
        try:
            last_seen = float(f["last_seen"])
            return Session(
                sid_hash=h,
                user=f["user"],
                roles=tuple(r for r in f.get("roles", "").split(",") if r),
                created=float(f["created"]),
                abs_expiry=float(f["abs_expiry"]),
                last_seen=last_seen,
                csrf=f["csrf"],
                touched_at=last_seen,
                login_step=int(f["login_step"]) if f.get("login_step") else None,
                display_name=f.get("name", ""),
                source=f.get("src", "local"),
                rpps=f.get("rpps", ""),
            )
        except (KeyError, ValueError):
            return None  # incomplete or corrupt record: no session

    def needs_touch(self, session: Session, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return now - session.touched_at >= self.touch_interval

    def touch(self, session: Session, now: float | None = None) -> bool:
        """Write activity to Redis and refresh the TTL. Returns False if the session is gone."""
        now = time.time() if now is None else now
        if now >= session.abs_expiry:
            self.drop_local(session.sid_hash)
            return False
        exists = self._touch(
            keys=[self.keys.session(session.sid_hash)], args=[repr(now), self._ttl_ms(now, session.abs_expiry)]
        )
        if not exists:
            self.drop_local(session.sid_hash)
            return False
        session.touched_at = now
        with self._lock:
            cached = self._local.get(session.sid_hash)
            if cached is not None:
                cached.touched_at = max(cached.touched_at, now)
                cached.last_seen = max(cached.last_seen, now)
        return True

    def claim_login_code(self, session: Session) -> bool:
        """Use the session's login code once more (step-up). True at most once per session, across
        instances; False when the session has no login step or it was already used."""
        if session.login_step is None:
            return False
        return bool(self._claim(keys=[self.keys.session(session.sid_hash)], args=[str(session.login_step)]))

    def owner_of_ended(self, sid: str, now: float | None = None) -> str | None:
        """The user of a session that ended by inactivity or lifetime (not by logout or revocation),
        while ``resume_seconds`` allow a kept form; None otherwise (live, unknown, logged out)."""
        if not self.resume_seconds or not is_valid_sid(sid):
            return None
        h = sid_hash(sid)
        owner = as_text(self.redis.get(self.keys.session_owner(h)))
        if owner is None:
            return None
        if self.get(sid, now) is not None:
            return None  # still alive: nothing to resume
        return owner

    def rotate(self, old_sid: str | None, user: str, roles, now: float | None = None) -> tuple[str, Session]:
        """End the previous session (if any) and create a new one: the id changes at login."""
        if old_sid:
            self.destroy(old_sid)
        return self.create(user, roles, now=now)

    def destroy(self, sid: str) -> bool:
        """End one session (logout). Returns True if it existed."""
        if not is_valid_sid(sid):
            return False
        return self.destroy_hash(sid_hash(sid))

    def owner_hint(self, h: str) -> str | None:
        """The user of a live session known by its id hash (for a trace record), or None."""
        return as_text(self.redis.hget(self.keys.session(h), "user"))

    def destroy_hash(self, h: str) -> bool:
        """End one session known by its id hash (back-channel logout from an IdP), on every instance."""
        key = self.keys.session(h)
        user = as_text(self.redis.hget(key, "user"))
        existed = bool(self.redis.delete(key))
        self.redis.delete(self.keys.session_owner(h))  # logged out: no kept form for this session
        if user is not None:
            self.redis.srem(self.keys.user_sessions(user), h)
        self.drop_local(h)
        self.redis.publish(self.keys.events, f"session:{h}")
        return existed

    def revoke_user(self, login: str) -> int:
        """End every session of ``login``. Returns how many existed."""
        index = self.keys.user_sessions(login)
        hashes = [as_text(h) for h in self.redis.smembers(index)]
        count = 0
        if hashes:
            pipe = self.redis.pipeline(transaction=False)
            for h in hashes:
                pipe.delete(self.keys.session(h))
                pipe.delete(self.keys.session_owner(h))
            count = sum(pipe.execute()[::2])
            # Remove only what was read: a session created meanwhile stays indexed.
            self.redis.srem(index, *hashes)
        self.drop_local_user(login)
        self.redis.publish(self.keys.events, f"user:{login}")
        return count

    # -- invalidation (called by the bus listener) ---------------------------------------------------

    def drop_local(self, sid_hash: str) -> None:
        with self._lock:
            self._generation += 1
            self._local.pop(sid_hash)

    def drop_local_user(self, login: str) -> None:
        with self._lock:
            self._generation += 1
            self._local.pop_user(login)

    def clear_local(self) -> None:
        with self._lock:
            self._generation += 1
            self._local.clear()
