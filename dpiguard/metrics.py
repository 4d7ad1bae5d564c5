"""Prometheus metrics of one dpiguard process (served on ``/_dpiguard/metrics``, see dpiguard/ops.py).

Hot-path cost: one ``Counter.inc`` and one ``Histogram.observe`` per request on pre-resolved
label children (no dict building, no I/O). Labels are bounded sets (outcome, reason code, tier,
...): never a user, patient or path, so the series count does not grow with traffic.

Per-process state that already exists elsewhere (decision cache statistics, bus coherence, audit
counters, policy version, readiness) is read at scrape time by :class:`_StateCollector`, so it
costs nothing per request. Every metric is listed in docs/operations.md.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

REQUESTS = Counter("dpiguard_requests", "Requests decided by the pipeline, by outcome and reason code",
                   ["outcome", "reason"], registry=REGISTRY)
DECISION_SECONDS = Histogram("dpiguard_decision_seconds",
                             "Time to decide a request; mode=local (in-process caches only) or io (Redis asked)",
                             ["mode"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
CACHE_LOOKUPS = Counter("dpiguard_cache_lookups",
                        "Lookups per cache tier: session (in-process session cache), fast_path (request "
                        "decided without any Redis round trip)", ["tier", "result"], registry=REGISTRY)
REDIS_ERRORS = Counter("dpiguard_redis_errors", "Redis errors seen, by where they happened",
                       ["where"], registry=REGISTRY)
REDIS_PING_SECONDS = Histogram("dpiguard_redis_ping_seconds", "Latency of the periodic Redis probe (PING)",
                               buckets=_LATENCY_BUCKETS, registry=REGISTRY)
REDIS_UP = Gauge("dpiguard_redis_up", "1 if the last Redis probe succeeded", registry=REGISTRY)
BUS_EVENTS = Counter("dpiguard_bus_events",
                     "Invalidation bus events: message (invalidation received), reconnect (subscription "
                     "lost), master_changed (Sentinel failover seen by the bus)", ["event"], registry=REGISTRY)
LOGINS = Counter("dpiguard_logins", "Login attempts by outcome (success, failure, locked, throttled, error)",
                 ["outcome"], registry=REGISTRY)

PRIVACY_ALERTS = Counter("dpiguard_privacy_alerts", "Privacy alerts raised by the privacy monitor, by detector",
                         ["detector"], registry=REGISTRY)

_OUTCOMES = ("allow", "deny")
_children_lock = threading.Lock()
_request_children: dict[tuple[str, str], Any] = {}
_local = DECISION_SECONDS.labels("local")
_io = DECISION_SECONDS.labels("io")
_fast_hit = CACHE_LOOKUPS.labels("fast_path", "hit")
_fast_miss = CACHE_LOOKUPS.labels("fast_path", "miss")
_session_hit = CACHE_LOOKUPS.labels("session", "hit")
_session_miss = CACHE_LOOKUPS.labels("session", "miss")
_bus_children = {e: BUS_EVENTS.labels(e) for e in ("message", "reconnect", "master_changed")}
for _e in ("success", "failure", "locked", "throttled", "error"):
    LOGINS.labels(_e)
for _w in ("decision", "login", "probe"):
    REDIS_ERRORS.labels(_w)


def observe_decision(allowed: bool, reason: str, seconds: float, used_io: bool) -> None:
    """One decided request (hot path)."""
    key = (_OUTCOMES[0] if allowed else _OUTCOMES[1], reason)
    child = _request_children.get(key)
    if child is None:
        with _children_lock:
            child = _request_children.get(key)
            if child is None:
                child = _request_children[key] = REQUESTS.labels(*key)
    child.inc()
    if used_io:
        _io.observe(seconds)
        _fast_miss.inc()
    else:
        _local.observe(seconds)
        _fast_hit.inc()


def privacy_alert(detector: str) -> None:
    """One new privacy alert (the label is a detector name from a fixed list, never a user or patient)."""
    PRIVACY_ALERTS.labels(detector).inc()


def session_lookup(hit: bool) -> None:
    (_session_hit if hit else _session_miss).inc()


def redis_error(where: str) -> None:
    REDIS_ERRORS.labels(where).inc()


def bus_event(event: str) -> None:
    child = _bus_children.get(event)
    if child is not None:
        child.inc()


def login(outcome: str) -> None:
    LOGINS.labels(outcome if outcome in ("success", "failure", "locked", "throttled", "error") else "failure").inc()


class _StateCollector:
    """Reads the state of the bound Services at scrape time."""

    def __init__(self):
        self.services = None
        self.monitor = None

    def describe(self):
        return []

    def collect(self):
        s, m = self.services, self.monitor
        if s is None:
            return
        info = InfoMetricFamily("dpiguard_build", "Instance and policy of this process")
        info.add_metric([], {"dpiguard_instance": str(s.config.instance_id), "policy_version": str(s.policies.version),
                             "redis_mode": m.redis_mode if m is not None else ""})
        yield info
        stats = s.cache.stats()
        for name, key, doc in (("hits", "hits", "served from the decision cache"),
                               ("misses", "misses", "not in the decision cache (Redis asked)"),
                               ("invalidations", "invalidations", "exact invalidations applied"),
                               ("evictions", "evictions", "entries evicted by size")):
            c = CounterMetricFamily(f"dpiguard_decision_cache_{name}", f"Care-team decisions {doc}")
            c.add_metric([], stats[key])
            yield c
        g = GaugeMetricFamily("dpiguard_decision_cache_entries", "Entries in the decision cache")
        g.add_metric([], stats["entries"])
        yield g
        g = GaugeMetricFamily("dpiguard_session_cache_entries", "Sessions in the in-process session cache")
        g.add_metric([], s.sessions.local_size())
        yield g
        g = GaugeMetricFamily("dpiguard_bus_coherent",
                              "1 while the invalidation subscription is live (in-process caches in use)")
        g.add_metric([], 1 if s.bus.coherent else 0)
        yield g
        c = CounterMetricFamily("dpiguard_audit_records", "Trace records written")
        c.add_metric([], s.audit.records_written)
        yield c
        c = CounterMetricFamily("dpiguard_audit_errors", "Trace writes that failed (each one refused a request)")
        c.add_metric([], s.audit.errors)
        yield c
        g = GaugeMetricFamily("dpiguard_audit_queue_depth", "Trace records waiting for the writer (group commit)")
        g.add_metric([], s.audit.queue_depth())
        yield g
        c = CounterMetricFamily("dpiguard_audit_batches", "Group commits written (one fdatasync each)")
        c.add_metric([], s.audit.batches)
        yield c
        c = CounterMetricFamily("dpiguard_audit_fsyncs", "fdatasync calls of the trace writer")
        c.add_metric([], s.audit.fsyncs)
        yield c
        c = CounterMetricFamily("dpiguard_audit_fsync_seconds",
                                "Time spent in fdatasync (rate / rate of dpiguard_audit_fsyncs = mean latency)")
        c.add_metric([], s.audit.fsync_seconds)
        yield c
        reloader = getattr(s, "reloader", None)
        if reloader is not None:
            c = CounterMetricFamily("dpiguard_policy_reloads", "Policy edits applied by hot reload")
            c.add_metric([], reloader.reloads)
            yield c
            c = CounterMetricFamily("dpiguard_policy_reload_failures",
                                    "Policy edits refused by hot reload (the previous policy kept serving)")
            c.add_metric([], reloader.failures)
            yield c
        breakglass = getattr(s.portal, "breakglass", None)
        if breakglass is not None:
            c = CounterMetricFamily("dpiguard_break_glass_grants", "Emergency accesses (bris de glace) opened here")
            c.add_metric([], breakglass.grants_issued)
            yield c
        if m is not None:
            ready = m.readiness()
            g = GaugeMetricFamily("dpiguard_ready", "1 when this instance is ready (see /_dpiguard/health/ready)")
            g.add_metric([], 1 if ready["ready"] else 0)
            yield g
            g = GaugeMetricFamily("dpiguard_audit_writable", "1 if the trace file is open and writable")
            g.add_metric([], 1 if ready["audit_writable"] else 0)
            yield g


_STATE = _StateCollector()
REGISTRY.register(_STATE)


def bind(services: Any, monitor: Any = None) -> None:
    """Report the state of these Services (the last bound wins: one per process in production)."""
    _STATE.services = services
    _STATE.monitor = monitor


def render() -> bytes:
    """The Prometheus text exposition of every dpiguard metric of this process."""
    return generate_latest(REGISTRY)
