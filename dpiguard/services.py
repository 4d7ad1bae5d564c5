"""Builds dpiguard's components from a Config: one place where configuration meets code."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import redis

from .audit import AuditLog
from .auth import Authenticator, LoginPolicy
from .bus import InvalidationBus
from .cache import DecisionCache
from .careteam import CareTeamStore
from .config import Config
from .identity import AssertionSigner
from .pipeline import Pipeline
from .policy import Policy
from .portal import Portal
from . import metrics
from .ops import Monitor, allowed_networks
from .redisconn import client_for, spec_of
from .sessions import SessionStore
from .users import SecretBox, UserDirectory

log = logging.getLogger("dpiguard")


def redis_client(cfg: Config) -> redis.Redis:
    """The command client for the configured topology (standalone, Sentinel or Cluster)."""
    return client_for(cfg, health_check_interval=30)


def user_directory(cfg: Config, client: redis.Redis | None = None) -> UserDirectory:
    box = SecretBox.from_file(cfg.path(cfg.secrets.data_key_file))
    return UserDirectory(client or redis_client(cfg), box, prefix=cfg.redis.prefix, issuer=cfg.login.issuer)


def careteam_store(cfg: Config, client: redis.Redis | None = None) -> CareTeamStore:
    return CareTeamStore(client or redis_client(cfg), prefix=cfg.redis.prefix, grace_seconds=cfg.careteam.grace_seconds)


def session_store(cfg: Config, client: redis.Redis | None = None) -> SessionStore:
    return SessionStore(
        client or redis_client(cfg), prefix=cfg.redis.prefix, idle_timeout=cfg.sessions.idle_timeout,
        absolute_lifetime=cfg.sessions.absolute_lifetime, touch_interval=cfg.sessions.touch_interval,
    )


@dataclass
class Services:
    config: Config
    redis: redis.Redis
    users: UserDirectory
    sessions: SessionStore
    careteam: CareTeamStore
    cache: DecisionCache
    bus: InvalidationBus
    audit: AuditLog
    pipeline: Pipeline
    portal: Portal
    monitor: Any = None  # dpiguard.ops.Monitor: readiness probe behind /_dpiguard/health/ready
    metrics_networks: tuple = ()  # who may read /_dpiguard/metrics

    @property
    def policy(self) -> Policy:
        return self.pipeline.policy

    def start(self, wait: float = 5.0) -> None:
        self.bus.start()
        if self.monitor is not None:
            self.monitor.start()
        if not self.bus.wait_coherent(wait):
            log.warning("dpiguard: invalidation bus not connected yet; caches stay off until it is")

    def stop(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
        self.bus.stop()
        self.audit.close()

    def health(self) -> dict:
        redis_ok = True
        try:
            self.redis.ping()
        except redis.RedisError:
            redis_ok = False
        audit_ok = self.audit._fd is not None
        return {
            "ready": redis_ok and audit_ok and self.policy is not None,
            "instance": self.config.instance_id,
            "redis": redis_ok,
            "cache_coherent": self.bus.coherent,
            "audit_writable": audit_ok,
            "policy_version": self.policy.version,
            "decision_cache": self.cache.stats(),
        }


def build_services(cfg: Config) -> Services:
    """Load and validate everything; raises (PolicyError, ValueError, AuditError...) before serving."""
    policy = Policy.load(cfg.path(cfg.policies.dir))
    client = redis_client(cfg)
    users = user_directory(cfg, client)
    sessions = session_store(cfg, client)
    careteam = careteam_store(cfg, client)
    cache = DecisionCache(max_entries=cfg.decision_cache.max_entries, ttl=cfg.decision_cache.ttl)
    audit = AuditLog(cfg.path(cfg.audit.path), cfg.instance_id).open()
    signer = AssertionSigner.from_pem_file(cfg.path(cfg.secrets.assertion_private_key_file), audience=cfg.audience,
                                           ttl=cfg.secrets.assertion_ttl)
    authenticator = Authenticator(client, users, LoginPolicy(
        max_failures=cfg.login.max_failures, failure_window=cfg.login.failure_window,
        lock_seconds=cfg.login.lock_seconds, ip_max_failures=cfg.login.ip_max_failures,
        ip_window=cfg.login.ip_window, ip_block_seconds=cfg.login.ip_block_seconds,
    ), prefix=cfg.redis.prefix)
    spec = spec_of(cfg)
    bus = InvalidationBus(spec, prefix=cfg.redis.prefix, on_event_hook=metrics.bus_event)
    services_ref: dict[str, Services] = {}
    pipeline = Pipeline(
        policy=policy,
        sessions=sessions, careteam=careteam, cache=cache, signer=signer, audit=audit,
        cookie_name=cfg.cookie_name, instance_id=cfg.instance_id, decision_ttl=cfg.decision_cache.ttl,
        max_header_bytes=cfg.limits.max_header_bytes, max_url_bytes=cfg.limits.max_url_bytes,
        extra_identity_headers=tuple(cfg.identity.strip_headers), require_tls=cfg.tls_enabled,
    )
    portal = Portal(
        authenticator=authenticator, sessions=sessions, audit=audit, cookie_name=cfg.cookie_name,
        secure_cookies=cfg.tls_enabled, units_of=lambda u: careteam.user_units(u),
        health=lambda: services_ref["s"].health(),
    )
    services = Services(cfg, client, users, sessions, careteam, cache, bus, audit, pipeline, portal)
    services_ref["s"] = services
    services.monitor = Monitor(services, redis_mode=spec.mode)
    services.metrics_networks = allowed_networks(cfg.metrics.allow_from)
    metrics.bind(services, services.monitor)
    _wire_invalidation(services)
    return services


def _wire_invalidation(s: Services) -> None:
    """Bus messages → exact drops in every in-process cache; lost coherence → caches off and empty."""
    lock = threading.Lock()

    def on_message(kind: str, ident: str) -> None:
        if kind == "patient":
            s.cache.invalidate_patient(ident)
        elif kind == "user":
            s.cache.invalidate_user(ident)
            s.sessions.drop_local_user(ident)
            s.pipeline.drop_user(ident)
        elif kind == "session":
            s.sessions.drop_local(ident)
        elif kind == "all":
            s.cache.clear()
            s.pipeline.drop_all()

    def on_resync() -> None:
        with lock:
            s.cache.clear()
            s.sessions.clear_local()
            s.pipeline.drop_all()

    def on_coherence(coherent: bool) -> None:
        s.cache.enabled = coherent
        s.sessions.local_enabled = coherent

    s.bus.subscribe(on_message)
    s.bus.on_resync(on_resync)
    s.bus.on_coherence(on_coherence)
    on_coherence(False)  # until the subscription is live, no cache is trusted
