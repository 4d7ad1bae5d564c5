"""In-process decision cache with exact invalidation.

The common request must not touch Redis, so care-team decisions are cached here, keyed by
``(user, patient, category, action)`` (``patient`` may be None); the pipeline also keeps here, under
``(user, patient, FACTS_CATEGORY, "")``, the care-team facts its decisions are taken from
(:func:`dpiguard.decision.access.facts_key`), so that they are dropped with them. The cache is kept exact by the
invalidation bus (:mod:`dpiguard.bus`): ``patient:P`` drops every entry about P, ``user:U`` every
entry of U, ``all`` everything. Indexes user → keys and patient → keys make this O(entries dropped).

Race closed by the generation counter: a worker reads :meth:`DecisionCache.generation`, computes a
decision from Redis, then calls :meth:`DecisionCache.put` with that generation. Every invalidation
bumps the counter, so a decision computed from data that changed meanwhile is never stored::

    gen = cache.generation()
    value = compute_from_redis()
    cache.put(key, value, expires_at, gen)

Clock: callers pass ``now`` (epoch seconds, as used by :mod:`dpiguard.careteam`); an entry is served
while ``now < expires_at``. Entries also never outlive ``ttl`` seconds. When :attr:`enabled` is False
(bus not coherent) nothing is served or stored; toggling it drops everything and bumps the generation.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from typing import Any, Hashable

CacheKey = tuple[str, "str | None", str, str]
SMALL_INDEX = 8  # a patient's keys are kept in a list up to this many, in a set beyond


class DecisionCache:
    """Bounded, thread-safe value cache keyed by ``(user, patient, category, action)``."""

    def __init__(self, max_entries: int = 200_000, ttl: float = 60.0):
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self.max_entries = int(max_entries)
        self.ttl = float(ttl)
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[Any, float]] = OrderedDict()
        self._by_user: dict[str, set] = {}
        self._by_patient: dict[str, "tuple | list | set"] = {}  # patient → its key, a list or a set of its keys
        self._generation = 0
        self._enabled = True
        self._hits = 0
        self._misses = 0
        self._invalidations = 0
        self._evictions = 0
        self._rejected_puts = 0
        self._puts = 0  # values stored: decisions taken because the cache did not hold them
        self._fact_puts = 0  # facts stored: Redis reads decisions are taken from (Pipeline.care_team)

    # ----------------------------------------------------------------- hot path

    def get(self, key: CacheKey, now: float) -> Any | None:
        """The cached value, or None when absent, expired or the cache is disabled."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and now < entry[1] and self._enabled:
                self._hits += 1
                return entry[0]
            self._misses += 1
            if entry is not None and now >= entry[1]:
                self._remove(key)
            return None

    def generation(self) -> int:
        """Read before computing a value; pass it to :meth:`put`."""
        return self._generation

    def put(self, key: CacheKey, value: Any, expires_at: float | None, generation: int,
            now: float | None = None, *, decision: bool = True) -> bool:
        """Store ``value`` unless an invalidation happened since ``generation`` was read.

        ``expires_at`` (epoch s, None = no own bound) is capped at ``now + ttl``. Returns whether the
        value was stored. ``decision=False``: what is stored are the facts decisions are taken from (read
        from Redis), counted apart (``fact_puts``), not as a decision (``puts``)."""
        if value is None:
            raise ValueError("None cannot be cached (it means 'miss')")
        # One string object per distinct user, patient, category and action, however many entries and
        # requests name them (each request parses its own copy from the URL).
        key = tuple(sys.intern(part) if type(part) is str else part for part in key)
        user, patient = key[0], key[1]
        cap = (time.time() if now is None else now) + self.ttl
        expires = cap if expires_at is None else min(float(expires_at), cap)
        with self._lock:
            if not self._enabled or generation != self._generation:
                self._rejected_puts += 1
                return False
            if key in self._entries:
                self._entries.move_to_end(key)
            else:
                while len(self._entries) >= self.max_entries:
                    oldest, _ = self._entries.popitem(last=False)
                    self._unindex(oldest)
                    self._evictions += 1
                self._by_user.setdefault(user, set()).add(key)
                if patient is not None:
                    self._index_patient(patient, key)
            self._entries[key] = (value, expires)
            if decision:
                self._puts += 1
            else:
                self._fact_puts += 1
            return True

    # ----------------------------------------------------------------- invalidation

    def invalidate_user(self, user: str) -> int:
        """Drop every entry of ``user``; returns how many were dropped."""
        with self._lock:
            self._bump()
            keys = self._by_user.pop(user, ())
            for key in keys:
                del self._entries[key]
                self._unindex_patient(key)
            return len(keys)

    def invalidate_patient(self, patient: str) -> int:
        """Drop every entry about ``patient``; returns how many were dropped."""
        with self._lock:
            self._bump()
            keys = self._by_patient.pop(patient, ())
            if type(keys) is tuple and keys:  # one entry: the key itself (see _index_patient)
                keys = (keys,)
            for key in keys:
                del self._entries[key]
                self._unindex_user(key)
            return len(keys)

    def clear(self) -> None:
        """Drop everything."""
        with self._lock:
            self._bump()
            self._clear_locked()

    def apply_event(self, kind: str, ident: str) -> None:
        """Apply one invalidation-bus message (``patient``/``user``/``all``/``session``)."""
        if kind == "patient":
            self.invalidate_patient(ident)
        elif kind == "user":
            self.invalidate_user(ident)
        elif kind == "session":
            return  # decisions are not keyed by session
        else:
            self.clear()  # "all", or anything unexpected: be safe

    # ----------------------------------------------------------------- state

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        """Turning the cache on or off drops everything (it may have missed invalidations)."""
        with self._lock:
            if bool(value) != self._enabled:
                self._enabled = bool(value)
                self._bump()
                self._clear_locked()

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int | bool]:
        with self._lock:
            return {
                "hits": self._hits,
                "misses": self._misses,
                "entries": len(self._entries),
                "invalidations": self._invalidations,
                "evictions": self._evictions,
                "rejected_puts": self._rejected_puts,
                "puts": self._puts,
                "fact_puts": self._fact_puts,
                "generation": self._generation,
                "enabled": self._enabled,
            }

    # ----------------------------------------------------------------- internals (lock held)

    def _bump(self) -> None:
        self._generation += 1
        self._invalidations += 1

    def _clear_locked(self) -> None:
        self._entries.clear()
        self._by_user.clear()
        self._by_patient.clear()

    def _remove(self, key: Hashable) -> None:
        del self._entries[key]
        self._unindex(key)

    def _unindex(self, key: Hashable) -> None:
        self._unindex_user(key)
        self._unindex_patient(key)

    def _unindex_user(self, key: Hashable) -> None:
        keys = self._by_user.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_user[key[0]]

    def _index_patient(self, patient: str, key: tuple) -> None:
        """Most patients have a few cached entries (a decision or two and their facts): the index holds the
        key itself for one, a list of keys for up to :data:`SMALL_INDEX` (a list of two costs 72 bytes, a set
        216), and a set beyond. A key is indexed once (only when it enters the cache)."""
        keys = self._by_patient.get(patient)
        if keys is None:
            self._by_patient[patient] = key
        elif type(keys) is tuple:
            self._by_patient[patient] = [keys, key]
        elif type(keys) is list:
            if len(keys) < SMALL_INDEX:
                keys.append(key)
            else:
                self._by_patient[patient] = {*keys, key}
        else:
            keys.add(key)

    def _unindex_patient(self, key: Hashable) -> None:
        patient = key[1]
        if patient is None:
            return
        keys = self._by_patient.get(patient)
        if keys is None:
            return
        if type(keys) is tuple:
            if keys == key:
                del self._by_patient[patient]
            return
        if type(keys) is list:
            try:
                keys.remove(key)
            except ValueError:
                return
        else:
            keys.discard(key)
        if len(keys) == 1:
            self._by_patient[patient] = next(iter(keys))
        elif not keys:
            del self._by_patient[patient]
