"""Builds dpiguard's components from a Config: one place where configuration meets code."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import redis

from dpiguard.audit.chain import AuditLog, from_config as audit_from_config
from dpiguard.auth.login import Authenticator, LoginPolicy
from dpiguard.storage.bus import InvalidationBus
from dpiguard.decision.cache import DecisionCache
from dpiguard.careteam.store import CareTeamStore
from dpiguard.config import Config
from dpiguard.decision.assertion import AssertionSigner
from dpiguard.decision.massaccess import MassAccessMonitor
from dpiguard.decision.pipeline import Pipeline
from dpiguard.policy.table import Policy
from dpiguard.policy.reload import PolicyReloader, files_fingerprint
from dpiguard.edge.portal import Portal
from dpiguard import metrics
from dpiguard.edge.ops import Monitor, allowed_networks
from dpiguard.storage.clients import client_for, spec_of
from dpiguard.auth.sessions import SessionStore
from dpiguard.auth.users import SecretBox, UserDirectory

log = logging.getLogger("dpiguard")


def redis_client(cfg: Config) -> redis.Redis:
    """The command client for the configured topology (standalone, Sentinel or Cluster)."""
    return client_for(cfg, health_check_interval=30)


def user_directory(cfg: Config, client: redis.Redis | None = None) -> UserDirectory:
    box = SecretBox.from_file(cfg.path(cfg.secrets.data_key_file))
    return UserDirectory(client or redis_client(cfg), box, prefix=cfg.redis.prefix, issuer=cfg.login.issuer)


def careteam_policy(cfg: Config, categories=None):
    """policies/careteam.yaml (transversal units, grace period); empty when the file is absent."""
    from dpiguard.policy.careteam import CARETEAM_FILE, CareTeamPolicy

    return CareTeamPolicy.load(cfg.path(cfg.policies.dir) / CARETEAM_FILE, categories)


def careteam_store(cfg: Config, client: redis.Redis | None = None, categories=None) -> CareTeamStore:
    ct_policy = careteam_policy(cfg, categories)
    grace = cfg.careteam.grace_seconds if ct_policy.grace_seconds is None else ct_policy.grace_seconds
    return CareTeamStore(client or redis_client(cfg), prefix=cfg.redis.prefix, grace_seconds=grace,
                         transversal=ct_policy.units)


def session_store(cfg: Config, client: redis.Redis | None = None) -> SessionStore:
    return SessionStore(
        client or redis_client(cfg), prefix=cfg.redis.prefix, idle_timeout=cfg.sessions.idle_timeout,
        absolute_lifetime=cfg.sessions.absolute_lifetime, touch_interval=cfg.sessions.touch_interval,
    )


def emergency_access(cfg: Config, policy: Policy, client, careteam, authenticator, audit, cache):
    """Patient objections and emergency access (policies/breakglass.yaml): the portal's service and the
    pipeline's care-team step (see dpiguard/access.py)."""
    from dpiguard.decision.access import AccessDecider
    from dpiguard.careteam.breakglass import BreakGlassPolicy, BreakGlassService, BreakGlassStore
    from dpiguard.careteam.objections import ObjectionStore

    bg_policy = BreakGlassPolicy.load(cfg.path(cfg.policies.dir), policy.roles, policy.categories)
    grants, objections = BreakGlassStore(client, cfg.redis.prefix), ObjectionStore(client, cfg.redis.prefix)
    service = BreakGlassService(policy=bg_policy, store=grants, objections=objections, careteam=careteam,
                                authenticator=authenticator, audit=audit,
                                on_grant=lambda user, patient: (cache.invalidate_user(user),
                                                                cache.invalidate_patient(patient)))
    return service, AccessDecider(careteam, objections, grants, bg_policy)


def companions_loader(cfg: Config, pipeline: Pipeline, careteam: CareTeamStore, breakglass, access):
    """For hot reload: load and validate fhir.yaml, breakglass.yaml and careteam.yaml for a new policy,
    and return the function that puts them in service (see PolicyReloader.load_companions)."""
    from dpiguard.careteam.breakglass import BreakGlassPolicy
    from dpiguard.policy.fhir import FHIR_FILE, FhirPolicy

    directory = cfg.path(cfg.policies.dir)

    def load(policy: Policy):
        bg = BreakGlassPolicy.load(directory, policy.roles, policy.categories)
        ct = careteam_policy(cfg, policy.categories)
        grace = cfg.careteam.grace_seconds if ct.grace_seconds is None else ct.grace_seconds
        fhir_path = directory / FHIR_FILE
        fhir_policy = FhirPolicy.load(fhir_path, policy.roles, policy.categories) if fhir_path.exists() else None
        if (fhir_policy is None) != (pipeline.fhir is None):
            from dpiguard.policy.table import PolicyError

            raise PolicyError(str(fhir_path), None, "adding or removing fhir.yaml needs a restart of dpiguard")

        def apply() -> None:
            if access is not None:
                access.policy = bg
            if breakglass is not None:
                breakglass.policy = bg
            careteam.transversal, careteam.grace = dict(ct.units), grace
            if fhir_policy is not None:
                pipeline.fhir.policy = fhir_policy

        return apply

    return load


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
    reloader: PolicyReloader | None = None  # hot reload of policies/ (None when policies.reload_interval is 0)
    mass_access: MassAccessMonitor | None = None
    monitor: Any = None  # dpiguard.ops.Monitor: readiness probe behind /_dpiguard/health/ready
    metrics_networks: tuple = ()  # who may read /_dpiguard/metrics

    @property
    def policy(self) -> Policy:
        return self.pipeline.policy

    def start(self, wait: float = 5.0) -> None:
        if self.mass_access is not None:
            self.mass_access.start()
        self.bus.start()
        if self.monitor is not None:
            self.monitor.start()
        if not self.bus.wait_coherent(wait):
            log.warning("dpiguard: invalidation bus not connected yet; caches stay off until it is")
        if self.reloader is not None:
            self.reloader.start()

    def stop(self) -> None:
        if self.reloader is not None:
            self.reloader.stop()
        if self.monitor is not None:
            self.monitor.stop()
        self.bus.stop()
        if self.mass_access is not None:
            self.mass_access.stop()
        self.audit.close()

    def health(self) -> dict:
        redis_ok = True
        try:
            self.redis.ping()
        except redis.RedisError:
            redis_ok = False
        audit_ok = self.audit.writable
        refuse = self.config.audit.on_failure == "refuse"
        info = {
            "ready": redis_ok and (audit_ok or not refuse) and self.policy is not None,
            "instance": self.config.instance_id,
            "redis": redis_ok,
            "cache_coherent": self.bus.coherent,
            "audit_writable": audit_ok,
            "audit": dict(self.audit.status(), on_failure=self.config.audit.on_failure,
                          serving_patient_data=audit_ok or not refuse),
            "policy_version": self.policy.version,
            "decision_cache": self.cache.stats(),
        }
        if self.reloader is not None:
            info.update(self.reloader.status())  # shared version, drift, last invalid edit
        return info


def build_services(cfg: Config) -> Services:
    """Load and validate everything; raises (PolicyError, ValueError, AuditError...) before serving."""
    fingerprint = files_fingerprint(cfg.path(cfg.policies.dir))
    policy = Policy.load(cfg.path(cfg.policies.dir))
    client = redis_client(cfg)
    users = user_directory(cfg, client)
    sessions = session_store(cfg, client)
    careteam = careteam_store(cfg, client, policy.categories)
    cache = DecisionCache(max_entries=cfg.decision_cache.max_entries, ttl=cfg.decision_cache.ttl)
    audit = audit_from_config(cfg).open()
    signer = AssertionSigner.from_pem_file(cfg.path(cfg.secrets.assertion_private_key_file), audience=cfg.audience,
                                           ttl=cfg.secrets.assertion_ttl)
    authenticator = Authenticator(client, users, LoginPolicy(
        max_failures=cfg.login.max_failures, failure_window=cfg.login.failure_window,
        lock_seconds=cfg.login.lock_seconds, ip_max_failures=cfg.login.ip_max_failures,
        ip_window=cfg.login.ip_window, ip_block_seconds=cfg.login.ip_block_seconds,
    ), prefix=cfg.redis.prefix)
    spec = spec_of(cfg)
    bus = InvalidationBus(spec, prefix=cfg.redis.prefix, on_event_hook=metrics.bus_event)
    breakglass, access = emergency_access(cfg, policy, client, careteam, authenticator, audit, cache)
    services_ref: dict[str, Services] = {}
    pipeline = Pipeline(
        policy=policy,
        sessions=sessions, careteam=careteam, cache=cache, signer=signer, audit=audit,
        cookie_name=cfg.cookie_name, instance_id=cfg.instance_id, decision_ttl=cfg.decision_cache.ttl,
        max_header_bytes=cfg.limits.max_header_bytes, max_url_bytes=cfg.limits.max_url_bytes,
        extra_identity_headers=tuple(cfg.identity.strip_headers), require_tls=cfg.tls_enabled,
        access=access,
    )
    from dpiguard.decision.fhir import load_enforcer

    pipeline.fhir = load_enforcer(cfg.path(cfg.policies.dir), policy, cfg.upstream.url,
                                  str(cfg.path(cfg.upstream.ca_file)) if cfg.upstream.ca_file else None,
                                  cfg.fhir.public_origin or f"{'https' if cfg.tls_enabled else 'http'}://"
                                                            f"{cfg.listen.host}:{cfg.listen.port}")
    portal = Portal(
        authenticator=authenticator, sessions=sessions, audit=audit, cookie_name=cfg.cookie_name,
        secure_cookies=cfg.tls_enabled, units_of=lambda u: careteam.user_units(u),
        health=lambda: services_ref["s"].health(), breakglass=breakglass,
    )
    services = Services(cfg, client, users, sessions, careteam, cache, bus, audit, pipeline, portal)
    m = cfg.mass_access
    if m.max_patients > 0:
        services.mass_access = pipeline.mass_access = MassAccessMonitor(
            client, audit, prefix=cfg.redis.prefix, max_patients=m.max_patients, window_seconds=m.window_seconds,
            action=m.action, throttle_seconds=m.throttle_seconds, refresh_seconds=m.refresh_seconds)
    services_ref["s"] = services
    services.monitor = Monitor(services, redis_mode=spec.mode)
    services.metrics_networks = allowed_networks(cfg.metrics.allow_from)
    metrics.bind(services, services.monitor)
    _wire_invalidation(services)
    if cfg.policies.reload_interval > 0:
        def drop_decisions() -> None:
            cache.clear()
            pipeline.drop_all()

        services.reloader = PolicyReloader(
            target=pipeline, directory=cfg.path(cfg.policies.dir), interval=cfg.policies.reload_interval,
            audit=audit, on_swap=drop_decisions, redis_client=client, prefix=cfg.redis.prefix,
            instance_id=cfg.instance_id, publish=bus.publish, loaded_fingerprint=fingerprint,
            load_companions=companions_loader(cfg, pipeline, careteam, breakglass, access))
        bus.subscribe(services.reloader.on_bus_event)
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
