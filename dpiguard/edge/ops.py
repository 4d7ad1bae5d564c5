"""Operations endpoints for load balancers and monitoring, and the probe behind them.

Served by the proxy itself under the reserved prefix, without a session, straight from the
``requestheaders`` hook (no I/O on the event loop: they read state the probe thread keeps):

- ``GET /_dpiguard/health/live``   200 while the process serves requests (liveness: restart me if not)
- ``GET /_dpiguard/health/ready``  200 when this instance can decide (readiness: send me traffic),
  503 otherwise; JSON says which check fails. Ready = Redis answered the last probe, the invalidation
  bus is coherent, a policy is loaded and the trace file is open and writable.
- ``GET /_dpiguard/metrics``       Prometheus text (dpiguard/metrics.py), only for client addresses in
  ``metrics.allow_from`` (default loopback); others get 404, as for an unknown path.

``GET /_dpiguard/health`` (the older combined summary, pinging Redis live) stays in the portal.

:class:`Monitor` runs one daemon thread per process: every ``interval`` seconds it PINGs Redis
(latency and errors go to the metrics) and checks the trace file, so that readiness is current
within about a second while answering it costs nothing.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
import time
from typing import Any

import orjson

from dpiguard import metrics
from dpiguard.decision.verdict import Incoming

log = logging.getLogger("dpiguard")

LIVE = "/_dpiguard/health/live"
READY = "/_dpiguard/health/ready"
METRICS = "/_dpiguard/metrics"
PATHS = frozenset({LIVE, READY, METRICS})


class Monitor:
    def __init__(self, services: Any, interval: float = 1.0, redis_mode: str = "standalone", client: Any = None):
        self.services = services
        # Its own Redis client: a Cluster client refreshes its slot map under a lock, so a probe on the
        # requests' client would make a request wait for the probe's timeouts too.
        self.client = client
        self.interval = float(interval)
        self.redis_mode = redis_mode
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._redis_ok = False
        self._redis_checked = 0.0
        self._redis_error = "not probed yet"
        self._audit_ok = False
        self.started = time.time()

    def start(self) -> "Monitor":
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self.probe()  # readiness is meaningful from the first request on
            self._thread = threading.Thread(target=self._run, name="dpiguard-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self.client is not None:
            self.client.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.probe()

    def probe(self) -> None:
        s = self.services
        t0 = time.perf_counter()
        try:
            (self.client or s.redis).ping()
            metrics.REDIS_PING_SECONDS.observe(time.perf_counter() - t0)
            self._redis_ok, self._redis_error = True, ""
        except Exception as exc:  # noqa: BLE001 - any failure means: not ready
            self._redis_ok, self._redis_error = False, f"{type(exc).__name__}: {exc}"[:200]
            metrics.redis_error("probe")
        self._redis_checked = time.monotonic()
        metrics.REDIS_UP.set(1 if self._redis_ok else 0)
        audit = s.audit  # the chained writer knows whether its last batch reached the disk
        self._audit_ok = audit.writable and os.access(audit.chain, os.W_OK)

    def readiness(self) -> dict:
        s = self.services
        fresh = time.monotonic() - self._redis_checked <= 3 * self.interval + 1
        redis_ok = self._redis_ok and fresh
        checks = {
            "redis": redis_ok,
            "cache_coherent": s.bus.coherent,
            "policy_loaded": s.policies is not None,
            "audit_writable": self._audit_ok,
        }
        out = {"ready": all(checks.values()), **checks, "instance": s.config.instance_id,
               "policy_version": s.policies.version if s.policies is not None else None,
               "redis_mode": self.redis_mode}
        if not redis_ok:
            out["redis_error"] = public_text(self._redis_error) or "probe is stale"
        return out


_LOCAL_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s:'\"/]+/)*([^\s:'\"/]+)")


def public_text(text: str | None) -> str | None:
    """A message for an unauthenticated answer: every local path reduced to its last name
    (``/srv/dpiguard/policies/fhir.yaml: ...`` → ``fhir.yaml: ...``), so the health output shows no
    folder of the host."""
    return None if text is None else _LOCAL_PATH.sub(r"\1", text)


def allowed_networks(specs: list[str]) -> tuple:
    return tuple(ipaddress.ip_network(n, strict=False) for n in specs)


def _client_allowed(client_ip: str, networks: tuple) -> bool:
    try:
        addr = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


def handle(req: Incoming, monitor: Monitor, networks: tuple) -> tuple[int, bytes, str] | None:
    """The reply (status, body, content type) for an operations path, None for any other path."""
    path = req.target.partition("?")[0]
    if path not in PATHS:
        return None
    if req.method not in ("GET", "HEAD"):
        return 405, b'{"error":"method_not_allowed"}', "application/json"
    if path == LIVE:
        body = {"live": True, "instance": monitor.services.config.instance_id,
                "uptime_seconds": round(time.time() - monitor.started, 1)}
        return 200, orjson.dumps(body), "application/json"
    if path == READY:
        info = monitor.readiness()
        return (200 if info["ready"] else 503), orjson.dumps(info), "application/json"
    if not _client_allowed(req.client_ip, networks):
        return 404, b'{"error":"not_found"}', "application/json"
    return 200, metrics.render(), metrics.CONTENT_TYPE
