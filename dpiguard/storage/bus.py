"""Invalidation bus: Redis pub/sub that keeps every instance's in-process caches exact.

Writers change Redis first, then publish one ASCII message on channel ``P:events``:

- ``patient:P`` a stay or assignment of patient P changed
- ``user:U``    U's units, roles, status or assignments changed, or U's sessions were revoked
- ``session:H`` one session (id hash H) ended
- ``all``       drop every cached decision

Each instance runs one :class:`InvalidationBus`. Its daemon thread holds a SUBSCRIBE connection and
calls the registered callbacks for every message. The bus is *coherent* only while that subscription
is live; whenever coherence is lost, messages may be missed, so:

1. ``on_coherence(False)`` callbacks run (callers stop using their caches: ``cache.enabled = False``),
2. ``on_resync()`` callbacks run (callers drop everything they cached),
3. the thread reconnects forever with backoff (0.1 s doubling up to 2 s),
4. once SUBSCRIBE is confirmed again: ``on_resync()`` callbacks run again (anything cached meanwhile
   may be stale), then ``on_coherence(True)``.

A cache outage therefore changes only speed, never a decision. :meth:`InvalidationBus.bind_cache`
wires a :class:`dpiguard.cache.DecisionCache` (or anything with ``apply_event``, ``clear`` and an
``enabled`` attribute) to all three callbacks.

Dead connections: a killed server is seen at once (the socket read fails). A silent peer (network
partition, frozen server) is caught by our own liveness probe: the thread sends a PING on the
subscribed connection every ``health_interval`` seconds and declares the connection dead when
nothing at all (message or PONG) arrived for ``2 * health_interval + 0.5`` seconds. redis-py's own
``health_check_interval`` is not used for this because it swallows the PONG, so a missing reply
would go unnoticed. redis-py's transparent reconnect (which would resubscribe without telling us
and hide lost messages) is disabled by giving the connection zero retries.

Topologies (:mod:`dpiguard.redisconn`): standalone subscribes to the server; Redis Cluster to any
reachable node (classic PUBLISH is broadcast to every node of a cluster, so one node sees all);
Sentinel to the current master, and the thread asks the sentinels every ``health_interval`` which
node is master: when it changed (failover, even one where the old master is still alive), the
subscription is dropped and made again on the new master, which is a resync (caches cleared).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any, Callable

import redis

from dpiguard.storage.clients import RedisSpec
from dpiguard.storage.keys import Keys

log = logging.getLogger(__name__)

EVENT_KINDS = frozenset({"patient", "user", "session"})
_IDENT_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_PING_TOKEN = "dpiguard-liveness"
_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 2.0

EventCallback = Callable[[str, str], Any]
ResyncCallback = Callable[[], Any]
CoherenceCallback = Callable[[bool], Any]


def format_event(kind: str, ident: str = "") -> str:
    """Build a bus message; raises ValueError on an unknown kind or an invalid id."""
    if kind == "all":
        if ident:
            raise ValueError("the 'all' event takes no id")
        return "all"
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    if not isinstance(ident, str) or not _IDENT_RE.fullmatch(ident):
        raise ValueError(f"invalid id for {kind} event: {ident!r}")
    return f"{kind}:{ident}"


def parse_event(raw: bytes | str) -> tuple[str, str]:
    """Split a bus message into ``(kind, ident)``; raises ValueError if malformed."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise ValueError("bus message is not ASCII") from exc
    if raw == "all":
        return "all", ""
    kind, sep, ident = raw.partition(":")
    if not sep:
        raise ValueError(f"bus message without ':': {raw!r}")
    format_event(kind, ident)  # validates
    return kind, ident


class InvalidationBus:
    """One subscriber thread per instance plus a publisher client. See the module docstring."""

    def __init__(self, redis_url: "str | RedisSpec", prefix: str = "dpiguard", health_interval: float = 1.0,
                 on_event_hook: Callable[[str], Any] | None = None):
        if health_interval <= 0:
            raise ValueError("health_interval must be positive")
        self.spec = RedisSpec.from_url(redis_url) if isinstance(redis_url, str) else redis_url
        self._hook = on_event_hook  # metrics: called with "reconnect", "master_changed", "message"
        self._sentinel = None
        self.channel = Keys(prefix).events
        self.health_interval = float(health_interval)
        self._dead_after = 2 * self.health_interval + 0.5
        self._poll = min(0.25, self.health_interval / 2)
        self._callbacks_lock = threading.Lock()
        self._event_callbacks: list[EventCallback] = []
        self._resync_callbacks: list[ResyncCallback] = []
        self._coherence_callbacks: list[CoherenceCallback] = []
        self._coherent = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._session_was_live = False
        self._publisher: redis.Redis | None = None
        self._publisher_lock = threading.Lock()

    # ----------------------------------------------------------------- registration

    def subscribe(self, callback: EventCallback) -> None:
        """Call ``callback(kind, ident)`` for every message (``all`` has ident ``""``)."""
        with self._callbacks_lock:
            self._event_callbacks.append(callback)

    def on_resync(self, callback: ResyncCallback) -> None:
        """Call ``callback()`` when coherence is lost and again when the subscription is back."""
        with self._callbacks_lock:
            self._resync_callbacks.append(callback)

    def on_coherence(self, callback: CoherenceCallback) -> None:
        """Call ``callback(coherent)`` whenever :attr:`coherent` changes."""
        with self._callbacks_lock:
            self._coherence_callbacks.append(callback)

    def bind_cache(self, cache: Any) -> None:
        """Keep ``cache`` exact: route events to ``cache.apply_event``, clear it on resync, and set
        ``cache.enabled`` to the bus coherence (disabled right now if the bus is not coherent)."""
        cache.enabled = self.coherent
        self.on_coherence(lambda ok: setattr(cache, "enabled", ok))
        self.on_resync(cache.clear)
        self.subscribe(cache.apply_event)

    # ----------------------------------------------------------------- publishing

    def publish(self, message: str) -> int:
        """Publish one message (validated) on the events channel; returns the receiver count.

        Raises ValueError for a malformed message and redis.RedisError when Redis fails."""
        parse_event(message)
        with self._publisher_lock:
            if self._publisher is None:
                self._publisher = self.spec.client(2.0)
            publisher = self._publisher
        return int(publisher.publish(self.channel, message))

    # ----------------------------------------------------------------- lifecycle

    @property
    def coherent(self) -> bool:
        """True only while the subscription is live (callers may use their caches)."""
        return self._coherent.is_set()

    def wait_coherent(self, timeout: float | None = None) -> bool:
        """Block until the bus is coherent or ``timeout`` passes; returns :attr:`coherent`."""
        return self._coherent.wait(timeout)

    def start(self) -> "InvalidationBus":
        """Start the subscriber daemon thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="dpiguard-bus", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; the bus becomes incoherent (callbacks told), publisher closed."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._publisher_lock:
            if self._publisher is not None:
                self._publisher.close()
                self._publisher = None
        if self._sentinel is not None:
            for s in self._sentinel.sentinels:
                s.close()

    # ----------------------------------------------------------------- subscriber thread

    def _run(self) -> None:
        backoff = _BACKOFF_MIN
        while not self._stopping.is_set():
            try:
                self._session()
            except Exception as exc:  # noqa: BLE001 - any failure means: reconnect
                log.warning("invalidation bus: subscription lost (%s: %s)", type(exc).__name__, exc)
                self._notify("reconnect")
            finally:
                self._lose_coherence()
            if self._session_was_live:
                backoff = _BACKOFF_MIN  # a fresh outage starts with a short wait
            if self._stopping.wait(backoff):
                break
            backoff = min(backoff * 2, _BACKOFF_MAX)

    def _notify(self, what: str) -> None:
        if self._hook is not None:
            try:
                self._hook(what)
            except Exception:  # noqa: BLE001 - metrics never break the bus
                log.exception("invalidation bus: hook failed")

    def _current_master(self) -> tuple[str, int] | None:
        if self._sentinel is None:
            self._sentinel = self.spec.sentinel(self._dead_after)
        try:
            host, port = self._sentinel.discover_master(self.spec.service)
            return host, int(port)
        except redis.RedisError:  # includes MasterNotFoundError
            return None

    def _connect(self):
        """A subscribed (client, pubsub, node address) on the first node that accepts it."""
        if self.spec.mode == "sentinel":
            master = self._current_master()
            if master is None:
                raise redis.ConnectionError(f"no sentinel gives a master for {self.spec.service!r}")
            endpoints = [(self.spec.node_client(master, self._dead_after, subscriber=True), master)]
        else:
            endpoints = self.spec.pubsub_endpoints(self._dead_after)
        last_exc: Exception | None = None
        for client, address in endpoints:
            pubsub = client.pubsub()
            try:
                pubsub.subscribe(self.channel)
                for other, _ in endpoints:
                    if other is not client:
                        other.close()
                return client, pubsub, address
            except redis.RedisError as exc:
                last_exc = exc
                pubsub.close()
                client.close()
        raise last_exc or redis.ConnectionError("no Redis node to subscribe to")

    def _session(self) -> None:
        """One subscription, from connect to first error (or stop)."""
        self._session_was_live = False
        client, pubsub, address = self._connect()
        try:
            last_seen = last_ping = time.monotonic()
            while not self._stopping.is_set():
                message = pubsub.get_message(timeout=self._poll)
                now = time.monotonic()
                if message is not None:
                    last_seen = now
                    self._handle(message)
                if now - last_ping >= self.health_interval:
                    pubsub.ping(_PING_TOKEN)
                    last_ping = now
                    if self.spec.mode == "sentinel" and self._session_was_live:
                        master = self._current_master()
                        if master is not None and master != address:
                            self._notify("master_changed")
                            raise ConnectionError(f"Redis master moved from {address} to {master}")
                if now - last_seen > self._dead_after:
                    raise ConnectionError(f"no data from Redis for {now - last_seen:.1f} s")
        finally:
            try:
                pubsub.close()
            finally:
                client.close()

    def _handle(self, message: dict) -> None:
        kind = message.get("type")
        if kind == "subscribe":
            # (Re-)established: anything cached before now may have missed messages.
            if not self._fire_resync():
                raise RuntimeError("resync callback failed while subscribing")
            self._session_was_live = True
            self._set_coherent(True)
        elif kind == "message":
            self._dispatch(message.get("data"))
            self._notify("message")
        elif kind in ("unsubscribe", "punsubscribe"):
            raise ConnectionError("unexpectedly unsubscribed")
        # "pong" only refreshes liveness

    def _dispatch(self, data: Any) -> None:
        try:
            kind, ident = parse_event(data)
        except (ValueError, TypeError) as exc:
            log.warning("invalidation bus: ignoring malformed message %r (%s)", data, exc)
            return
        with self._callbacks_lock:
            callbacks = list(self._event_callbacks)
        failed = False
        for callback in callbacks:
            try:
                callback(kind, ident)
            except Exception:  # noqa: BLE001 - a callback must never kill the bus
                log.exception("invalidation bus: callback failed on %s:%s", kind, ident)
                failed = True
        if failed and not self._fire_resync():
            # Could neither apply the event nor drop everything: stop trusting caches.
            raise RuntimeError("resync after a failed callback also failed")

    def _fire_resync(self) -> bool:
        with self._callbacks_lock:
            callbacks = list(self._resync_callbacks)
        ok = True
        for callback in callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001
                log.exception("invalidation bus: resync callback failed")
                ok = False
        return ok

    def _set_coherent(self, coherent: bool) -> None:
        # Losing: flag first, then tell callers. Gaining: let callers re-enable first, then flag,
        # so that wait_coherent() returning True implies the callbacks already ran.
        if not coherent:
            self._coherent.clear()
        with self._callbacks_lock:
            callbacks = list(self._coherence_callbacks)
        for callback in callbacks:
            try:
                callback(coherent)
            except Exception:  # noqa: BLE001
                log.exception("invalidation bus: coherence callback failed")
        if coherent:
            self._coherent.set()

    def _lose_coherence(self) -> None:
        if self._coherent.is_set():
            self._set_coherent(False)
            self._fire_resync()
