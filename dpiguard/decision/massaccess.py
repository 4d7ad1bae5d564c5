"""Mass-access detection: a professional opening more than N distinct patients in T minutes.

Off the hot path: the pipeline only appends (user, patient, time) to an in-process queue
(:meth:`MassAccessMonitor.note`, no I/O) and reads an in-process set of throttled users
(:meth:`MassAccessMonitor.blocked`). A worker thread does the Redis work in batches:

- ``P:mass:{USER}`` (sorted set, patient → last access time, TTL = window): ZADD, trim what is older
  than the window, ZCARD — shared by every instance, so accesses spread over instances add up;
- above the threshold, once per window (``P:mass-alert:{USER}``, SET NX), it writes a ``mass_access``
  alert record to the audit chain, and with ``mass_access.action: throttle`` adds the user to
  ``P:mass-blocked`` (sorted set, user → blocked until);
- every ``mass_access.refresh_seconds`` it reloads ``P:mass-blocked`` into the local set.

So a throttle decided on one instance applies on every instance within ``refresh_seconds`` plus the
batch delay (bounded, documented), while the common request still does no Redis round trip. Throttled
users are refused ``mass_access`` (403) on patient-bound data until the block expires or
``dpiguard audit unthrottle USER`` lifts it. If Redis is unavailable, counting pauses (the request path
is unaffected; Redis outages already refuse through the cache-coherence rule).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import redis

from dpiguard.storage.keys import Keys

log = logging.getLogger("dpiguard")


#: The worker sends noted accesses to Redis at most this often (one pipelined round trip per batch):
#: detection and throttling lag by at most this much plus ``refresh_seconds``.
BATCH_SECONDS = 0.25
#: A (user, patient) pair noted less than this ago is not sent again (it is already counted).
RESEND_SECONDS = 30.0

class MassAccessMonitor:
    def __init__(self, client: redis.Redis, audit, *, prefix: str = "dpiguard", max_patients: int = 50,
                 window_seconds: float = 600.0, action: str = "alert", throttle_seconds: float = 900.0,
                 refresh_seconds: float = 1.0):
        self.r = client
        self.audit = audit
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.max_patients = max_patients
        self.window = window_seconds
        self.action = action
        self.throttle_seconds = throttle_seconds
        self.refresh_seconds = refresh_seconds
        self._queue: deque = deque(maxlen=200_000)
        self._sent: dict[tuple[str, str], float] = {}  # (user, patient) → last time queued
        self._blocked: dict[str, float] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.alerts = 0

    # -- hot path (no I/O) -------------------------------------------------------------------------
    def note(self, user: str, patient: str, now: float) -> None:
        """Hot path: O(1), no I/O. The worker sends what was noted in batches (every BATCH_SECONDS)."""
        key = (user, patient)
        if now - self._sent.get(key, -1e18) < RESEND_SECONDS:
            return  # counted moments ago: the distinct-patient count cannot change
        self._sent[key] = now
        self._queue.append((user, patient, now))
        if len(self._queue) >= 5000:
            self._wake.set()

    def blocked(self, user: str, now: float) -> bool:
        until = self._blocked.get(user)
        return until is not None and until > now

    # -- worker ------------------------------------------------------------------------------------
    def start(self) -> "MassAccessMonitor":
        self._thread = threading.Thread(target=self._run, name="mass-access", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(5)

    def _run(self) -> None:
        next_refresh = 0.0
        while not self._stop.is_set():
            self._wake.wait(min(self.refresh_seconds, BATCH_SECONDS))
            self._wake.clear()
            if len(self._sent) > 200_000:
                self._sent.clear()
            try:
                self.process()
                if time.monotonic() >= next_refresh:
                    self.refresh()
                    next_refresh = time.monotonic() + self.refresh_seconds
            except redis.RedisError as exc:
                log.warning("dpiguard: mass-access counting paused (Redis: %s)", exc)
                time.sleep(self.refresh_seconds)
            except Exception:
                log.exception("dpiguard: mass-access worker error")

    def process(self) -> None:
        """Count what was noted since the last pass (one pipelined round trip per batch)."""
        batch = []
        while self._queue and len(batch) < 5000:
            batch.append(self._queue.popleft())
        if not batch:
            return
        latest: dict[tuple[str, str], float] = {}
        for user, patient, t in batch:
            latest[(user, patient)] = max(t, latest.get((user, patient), 0.0))
        users: dict[str, float] = {}
        pipe = self.r.pipeline(transaction=False)
        for (user, patient), t in latest.items():
            pipe.zadd(self.keys.mass_counter(user), {patient: t})
            users[user] = max(t, users.get(user, 0.0))
        order = sorted(users)
        for user in order:
            key = self.keys.mass_counter(user)
            pipe.zremrangebyscore(key, "-inf", users[user] - self.window)
            pipe.zcard(key)
            pipe.expire(key, int(self.window) + 1)
        results = pipe.execute()[len(latest):]
        for i, user in enumerate(order):
            count = results[i * 3 + 1]
            if count > self.max_patients:
                self._over(user, count, users[user])

    def _over(self, user: str, count: int, now: float) -> None:
        if not self.r.set(self.keys.mass_alert(user), int(now), nx=True, ex=int(self.window) + 1):
            return  # already alerted in this window (by this or another instance)
        throttle = self.action == "throttle"
        until = now + self.throttle_seconds
        if throttle:
            self.r.zadd(self.keys.mass_blocked, {user: until})
            self._blocked[user] = until
        self.alerts += 1
        try:
            self.audit.submit({
                "event": "mass_access", "outcome": "alert", "reason": "mass_access", "user": user,
                "patients": count, "window_seconds": self.window, "threshold": self.max_patients,
                "throttled_until": until if throttle else None,
                "detail": f"{count} distinct patients in {self.window / 60:g} min (threshold {self.max_patients})"
                          + ("; further patient access refused" if throttle else ""),
            })
        except Exception as exc:
            log.error("dpiguard: mass-access alert for %s not recorded: %s", user, exc)

    def refresh(self) -> None:
        now = time.time()
        self.r.zremrangebyscore(self.keys.mass_blocked, "-inf", now)
        rows = self.r.zrangebyscore(self.keys.mass_blocked, now, "+inf", withscores=True)
        self._blocked = {(u.decode() if isinstance(u, bytes) else u): until for u, until in rows}


def throttled_users(client: redis.Redis, prefix: str, now: float | None = None) -> dict[str, float]:
    """Users paused for mass access now, and until when (epoch seconds)."""
    now = time.time() if now is None else now
    rows = client.zrangebyscore(Keys(prefix).mass_blocked, now, "+inf", withscores=True)
    return {(u.decode() if isinstance(u, bytes) else u): until for u, until in rows}


def unthrottle(client: redis.Redis, prefix: str, user: str) -> bool:
    pipe = client.pipeline(transaction=False)
    keys = Keys(prefix)
    pipe.zrem(keys.mass_blocked, user)
    pipe.delete(keys.mass_alert(user))  # one key per DELETE: a Cluster pipeline takes no multi-key DELETE
    pipe.delete(keys.mass_counter(user))
    removed, _, _ = pipe.execute()
    return bool(removed)
