"""The composition root: builds dpiguard's components from a Config, and wires them together.

This is the one module that knows every package. The command line (``dpiguard.cli``), the demo and
the mitmproxy script (``addons/dpiguard_addon.py``) build what they need through it; no other module
reads the configuration to build a component, and the domain packages receive what they need as
arguments. Dependency rules: docs/architecture.md ("Layout and dependency rules").
"""

from __future__ import annotations

import base64
import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from dpiguard import metrics
from dpiguard.audit.chain import AuditLog
from dpiguard.audit.chain import from_config as audit_from_config
from dpiguard.auth.directory import DirectoryFirstFactor, DirectoryRecheck, DirectorySettings, LdapDirectory
from dpiguard.auth.enrolment import EnrolmentLinks, RecoveryCodes
from dpiguard.auth.login import Authenticator
from dpiguard.auth.oidc import OidcSettings, RelyingParty
from dpiguard.auth.resume import ResumeStore
from dpiguard.auth.sessions import SessionStore
from dpiguard.auth.users import SecretBox, UserDirectory
from dpiguard.auth.webauthn import SecurityKeys
from dpiguard.careteam.breakglass import BreakGlassStore
from dpiguard.careteam.mllp import AdtProcessor, listener_settings
from dpiguard.careteam.movements import MovementStore
from dpiguard.careteam.objections import ObjectionStore
from dpiguard.careteam.store import CareTeamStore
from dpiguard.config import Config
from dpiguard.decision.access import AccessDecider
from dpiguard.decision.assertion import AssertionSigner
from dpiguard.decision.breakglass import BreakGlassService
from dpiguard.decision.cache import DecisionCache
from dpiguard.decision.fhir import FhirEnforcer
from dpiguard.decision.massaccess import MassAccessMonitor, throttled_users, unthrottle
from dpiguard.decision.pipeline import Pipeline
from dpiguard.edge.addon import DpiGuard
from dpiguard.edge.banner import Banner
from dpiguard.edge.console import Console
from dpiguard.edge.enrol import Enrolment
from dpiguard.edge.oidc import OidcPages
from dpiguard.edge.ops import Monitor, allowed_networks, public_text
from dpiguard.edge.pages import PageSettings
from dpiguard.edge.pools import Pools
from dpiguard.edge.portal import Portal, PortalSettings
from dpiguard.edge.prefetch import FactsReader
from dpiguard.edge.upstream import make_fetcher
from dpiguard.fhir.cursor import CursorSigner
from dpiguard.policy.fhir import FHIR_FILE
from dpiguard.policy.files import PolicyError
from dpiguard.policy.reload import PolicyReloader, files_fingerprint
from dpiguard.policy.snapshot import PolicySet
from dpiguard.privacy.alerts import AlertQueue
from dpiguard.privacy.learner import Learner
from dpiguard.privacy.monitor import PrivacyMonitor
from dpiguard.privacy.pseudonyms import Hasher
from dpiguard.privacy.store import PrivacyStore
from dpiguard.storage.bus import InvalidationBus
from dpiguard.storage.clients import client_for, spec_of

log = logging.getLogger("dpiguard")


# -- single components (also used by the command line and the demo) ---------------------------------
def redis_client(cfg: Config) -> redis.Redis:
    """The command client for the configured topology (standalone, Sentinel or Cluster). No
    health-check PING before commands: a dead pooled connection fails one attempt and the retry
    reconnects, so every wait stays within :func:`dpiguard.storage.clients.wait_bound`."""
    return client_for(cfg)


def admin_redis_client(cfg: Config) -> redis.Redis:
    """The configured Redis with a longer timeout, for operators' commands and batch jobs."""
    return spec_of(cfg).client(max(cfg.redis.socket_timeout, 2.0))


def load_policies(cfg: Config) -> PolicySet:
    """Every file of ``policies.dir``, validated (PolicyError naming file and line on any mistake), and
    matching its seal unless ``policies.require_seal`` is off (dpiguard/policy/seal.py)."""
    return PolicySet.load(cfg.path(cfg.policies.dir), default_grace_seconds=cfg.careteam.grace_seconds,
                          sealed=cfg.policies.require_seal)


def user_directory(cfg: Config, client: redis.Redis | None = None) -> UserDirectory:
    box = SecretBox.from_file(cfg.path(cfg.secrets.data_key_file))
    return UserDirectory(client or redis_client(cfg), box, prefix=cfg.redis.prefix, issuer=cfg.login.issuer)


def careteam_store(cfg: Config, client: redis.Redis | None = None, policies: PolicySet | None = None) -> CareTeamStore:
    """The care-team store; its ``membership``/``explain_*`` answers use the transversal units and grace
    period of ``policies`` (loaded from ``policies.dir`` when not given). The proxy decides through
    :class:`AccessDecider` with the policy set of each decision instead."""
    rules = (policies or load_policies(cfg)).careteam
    return CareTeamStore(client or redis_client(cfg), prefix=cfg.redis.prefix, grace_seconds=rules.grace_seconds,
                         transversal=rules.units)


def session_store(cfg: Config, client: redis.Redis | None = None) -> SessionStore:
    return SessionStore(
        client or redis_client(cfg), prefix=cfg.redis.prefix, idle_timeout=cfg.sessions.idle_timeout,
        absolute_lifetime=cfg.sessions.absolute_lifetime, touch_interval=cfg.sessions.touch_interval,
        resume_seconds=cfg.sessions.resume_seconds,
    )


def oidc_settings(cfg: Config) -> OidcSettings:
    """The relying party's settings from the ``oidc`` section (secrets read from their files)."""
    o = cfg.oidc
    secret = cfg.path(o.client_secret_file).read_text().strip() if o.client_secret_file else ""
    key = cfg.path(o.private_key_file).read_bytes() if o.private_key_file else b""
    return OidcSettings(
        issuer=o.issuer or "", client_id=o.client_id or "", redirect_uri=o.redirect_uri or "", client_secret=secret,
        token_auth=o.token_auth, private_key_pem=key, post_logout_redirect_uri=o.post_logout_redirect_uri,
        scopes=tuple(o.scopes), profile=o.profile, login_claim=o.login_claim, name_claim=o.name_claim,
        userinfo=o.userinfo, required_acr=o.acr_required, mfa_acr=tuple(o.acr_vouching), mfa_amr=tuple(o.mfa_amr),
        algorithms=tuple(o.algorithms), clock_skew=o.clock_skew, http_timeout=o.http_timeout,
        flow_seconds=o.flow_seconds, jwks_refresh_seconds=o.jwks_refresh_seconds, jwks_max_age=o.jwks_max_age)


def relying_party(cfg: Config, client) -> RelyingParty:
    return RelyingParty(oidc_settings(cfg), client, cfg.redis.prefix)


def portal_settings(cfg: Config) -> PortalSettings:
    """What the pages say: languages, local time, helpdesk line, session limits, console roles."""
    ui = cfg.ui
    pages = PageSettings(languages=tuple(ui.languages), language=ui.language, timezone=ui.timezone,
                         helpdesk=ui.helpdesk)
    return PortalSettings(pages=pages, idle_timeout=cfg.sessions.idle_timeout,
                          absolute_lifetime=cfg.sessions.absolute_lifetime, idle_warning=ui.idle_warning_seconds,
                          console_roles={r: tuple(c) for r, c in cfg.console.roles.items()}
                          if cfg.console.enabled else {})


def authenticator(cfg: Config, client: redis.Redis, users: UserDirectory,
                  external: dict | None = None) -> Authenticator:
    """``external``: source → first factor of directory users (``ldap``: :func:`ldap_first_factor`)."""
    return Authenticator(client, users, cfg.login, prefix=cfg.redis.prefix, external=external,
                         recovery=recovery_codes(cfg, client))


# -- LDAP / Active Directory (docs/authentication.md) -------------------------------------------------
def ldap_directory(cfg: Config) -> LdapDirectory:
    """The directory client of the ``directory`` section (its password read from bind_password_file)."""
    d = cfg.directory
    path = cfg.path(d.bind_password_file)
    try:
        password = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"directory.bind_password_file {path}: cannot read it ({exc})") from None
    if not password:
        raise ValueError(f"directory.bind_password_file {path}: empty (an empty password would be an "
                         "unauthenticated bind)")
    return LdapDirectory(DirectorySettings(
        url=d.url, ca_file=str(cfg.path(d.ca_file)), bind_dn=d.bind_dn, bind_password=password, base_dn=d.base_dn,
        start_tls=d.start_tls, user_filter=d.user_filter, name_attribute=d.name_attribute,
        group_attribute=d.group_attribute, unit_attribute=d.unit_attribute,
        ad_user_account_control=d.ad_user_account_control, disabled_filter=d.disabled_filter, timeout=d.timeout))


def directory_units_sync(users: UserDirectory, careteam: CareTeamStore):
    """``on_login`` of the directory's first factor: the units the directory gives a user become unit
    memberships (open-ended); the ones it gave at the previous login and no longer gives end. Other
    memberships (``careteam member add``, imports) are left as they are."""
    def sync(login: str, units: tuple[str, ...]) -> None:
        before = set(users.directory_units(login))
        current = set(careteam.user_units(login))
        for unit in sorted(before - set(units)):
            careteam.remove_unit_member(login, unit)
        for unit in sorted(set(units) - current):
            careteam.add_unit_member(login, unit)
        users.set_directory_units(login, sorted(units))
    return sync


def enrolment_links(cfg: Config, client: redis.Redis | None = None) -> EnrolmentLinks:
    return EnrolmentLinks(client or redis_client(cfg), cfg.redis.prefix, ttl=cfg.enrolment.link_ttl)


def recovery_codes(cfg: Config, client: redis.Redis | None = None) -> RecoveryCodes:
    return RecoveryCodes(client or redis_client(cfg), cfg.redis.prefix, count=cfg.enrolment.recovery_codes)


def webauthn_origins(cfg: Config) -> list[str]:
    """The configured origins; for ``webauthn_rp_id: localhost`` without any, the listening port's."""
    e = cfg.enrolment
    if e.origins or e.webauthn_rp_id != "localhost":
        return e.origins
    return [f"{'https' if cfg.tls_enabled else 'http'}://localhost:{cfg.listen.port}"]


def security_keys(cfg: Config, client: redis.Redis | None = None) -> SecurityKeys | None:
    """None when keys are off (no ``enrolment.webauthn_rp_id``)."""
    e = cfg.enrolment
    if not e.webauthn_rp_id:
        return None
    return SecurityKeys(client or redis_client(cfg), cfg.redis.prefix, rp_id=e.webauthn_rp_id,
                        rp_name=e.webauthn_rp_name, origins=webauthn_origins(cfg), challenge_ttl=e.challenge_ttl)


def enrol_link_text(cfg: Config, token: str) -> str:
    path = f"/_dpiguard/enrol?t={token}"
    return (cfg.enrolment.public_url.rstrip("/") + path) if cfg.enrolment.public_url else path


def movement_store(cfg: Config, client: redis.Redis | None = None) -> MovementStore:
    return MovementStore(client or redis_client(cfg), prefix=cfg.redis.prefix, dedup_ttl=cfg.adt.dedup_ttl)


def adt_processor(cfg: Config, client: redis.Redis | None = None, audit: AuditLog | None = None,
                  learner: Learner | None = None) -> AdtProcessor:
    """The HL7 ADT feed's processor: movements into Redis, one trace record per message. Without an
    ``audit`` log it opens its own chain (``<instance>-adt``). ``learner``: hands each applied
    message's demographics (PID) to the privacy learner."""
    if audit is None:
        audit = audit_from_config(cfg, f"{cfg.instance_id}-adt").open()  # signed like every chain
    settings = listener_settings(cfg)
    processor = AdtProcessor(movement_store(cfg, client), audit, settings.parse, settings.application)
    if learner is not None:
        processor.on_applied = learner.note_hl7
    return processor


# -- privacy monitoring (docs/privacy.md) -------------------------------------------------------------
def pseudonym_hasher(cfg: Config) -> Hasher:
    """Keyed hashes of demographics; the key is derived from the data key (``secrets.data_key_file``)."""
    path = cfg.path(cfg.secrets.data_key_file)
    try:
        key = base64.b64decode(path.read_text().strip(), validate=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"key file {path}: cannot read the data key ({exc})") from exc
    return Hasher.from_data_key(key)


def privacy_store(cfg: Config, client: redis.Redis | None = None) -> PrivacyStore:
    p = cfg.privacy
    return PrivacyStore(client or redis_client(cfg), cfg.redis.prefix, retention_days=p.retention_days,
                        staff_retention_days=p.staff_retention_days)


def privacy_learner(cfg: Config, client: redis.Redis | None = None) -> Learner:
    """Learns patient demographics (hashed) from the ADT feed and FHIR answers; start() it."""
    return Learner(privacy_store(cfg, client), pseudonym_hasher(cfg))


def privacy_monitor(cfg: Config, client: redis.Redis, audit: AuditLog, policies, source=None) -> PrivacyMonitor:
    """The privacy monitor over ``source`` (default ``audit.path``), alerts into ``audit``; ``policies``:
    a callable returning the policy set in service."""
    return PrivacyMonitor(client, source or cfg.path(cfg.audit.path), audit, policies, prefix=cfg.redis.prefix,
                          alert_retention_days=cfg.privacy.alert_retention_days,
                          on_alert=lambda alert: metrics.privacy_alert(alert.detector),
                          exclude=(audit.chain.name,))


def privacy_audit_log(cfg: Config, name: str | None = None) -> AuditLog:
    """The chain the privacy monitor writes its alerts to (``privacy-<host>`` by default), opened."""
    return audit_from_config(cfg, name or f"privacy-{socket.gethostname()}", lock_timeout=5.0).open()


def fhir_enforcer(cfg: Config) -> FhirEnforcer:
    """The FHIR step; it applies whenever the policy set has a fhir.yaml."""
    ca_file = str(cfg.path(cfg.upstream.ca_file)) if cfg.upstream.ca_file else None
    public_origin = cfg.fhir.public_origin or (f"{'https' if cfg.tls_enabled else 'http'}://"
                                               f"{cfg.listen.host}:{cfg.listen.port}")
    # dpiguard's paging cursors are signed with a key derived from the data key (same on every instance).
    cursors = CursorSigner(base64.b64decode(cfg.path(cfg.secrets.data_key_file).read_text().strip(), validate=True))
    return FhirEnforcer(make_fetcher(cfg.upstream.url, ca_file), cfg.upstream.url, public_origin, cursors,
                        upstream_page=cfg.fhir.upstream_page_size, max_scan=cfg.fhir.max_scan)


# -- the running proxy --------------------------------------------------------------------------------
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
    breakglass: BreakGlassService | None = None
    reloader: PolicyReloader | None = None  # hot reload of policies/ (None when policies.reload_interval is 0)
    mass_access: MassAccessMonitor | None = None
    privacy_learner: Learner | None = None  # demographics from the ADT feed and FHIR answers (privacy.learn_demographics)
    privacy_monitor: PrivacyMonitor | None = None  # privacy.monitor: the monitor as a thread of this process
    monitor: Any = None  # dpiguard.edge.ops.Monitor: readiness probe behind /_dpiguard/health/ready
    metrics_networks: tuple = ()  # who may read /_dpiguard/metrics
    pools: Pools | None = None  # bounded thread pools per kind of blocking work (edge/pools.py)
    facts_reader: FactsReader | None = None  # cold care-team reads on the event loop (edge/prefetch.py)
    banner: Banner | None = None  # no-store on forwarded answers, the session bar on the DPI's pages
    directory_recheck: DirectoryRecheck | None = None  # directory.enabled: re-check of users with live sessions

    @property
    def policies(self) -> PolicySet:
        """The policy set in service now."""
        return self.pipeline.policies

    def start(self, wait: float = 5.0) -> None:
        if self.mass_access is not None:
            self.mass_access.start()
        if self.privacy_learner is not None:
            self.privacy_learner.start()
        if self.privacy_monitor is not None:
            self.privacy_monitor.start(self.config.privacy.monitor_interval)
        self.bus.start()
        if self.monitor is not None:
            self.monitor.start()
        if not self.bus.wait_coherent(wait):
            log.warning("dpiguard: invalidation bus not connected yet; caches stay off until it is")
        if self.reloader is not None:
            self.reloader.start()
        if self.directory_recheck is not None:
            self.directory_recheck.start()

    def stop(self) -> None:
        if self.directory_recheck is not None:
            self.directory_recheck.stop()
        if self.pools is not None:
            self.pools.shutdown()
        if self.reloader is not None:
            self.reloader.stop()
        if self.monitor is not None:
            self.monitor.stop()
        self.bus.stop()
        if self.mass_access is not None:
            self.mass_access.stop()
        if self.privacy_monitor is not None:
            self.privacy_monitor.stop()
            self.privacy_monitor.audit.close()
        if self.privacy_learner is not None:
            self.privacy_learner.stop()
        self.audit.close()

    def adt_processor(self) -> AdtProcessor | None:
        """The ADT feed to serve beside the proxy (``adt.enabled``): same Redis client and trace."""
        if not self.config.adt.enabled:
            return None
        return adt_processor(self.config, self.redis, self.audit, self.privacy_learner)

    def health(self) -> dict:
        redis_ok = True
        try:
            self.redis.ping()
        except redis.RedisError:
            redis_ok = False
        audit_ok = self.audit.writable
        refuse = self.config.audit.on_failure == "refuse"
        info = {
            "ready": redis_ok and (audit_ok or not refuse) and self.policies is not None,
            "instance": self.config.instance_id,
            "redis": redis_ok,
            "cache_coherent": self.bus.coherent,
            "audit_writable": audit_ok,
            "audit": self._audit_status(audit_ok or not refuse),
            "policy_version": self.policies.version,
            "decision_cache": self.cache.stats(),
        }
        if self.reloader is not None:
            status = self.reloader.status()  # shared version, drift, last invalid edit
            info.update(status, policy_error=public_text(status["policy_error"]))
        return info

    def _audit_status(self, serving: bool) -> dict:
        """The trace writer's state for the (unauthenticated) health answer: no path of the host."""
        status = self.audit.status()
        status["chain"] = Path(status["chain"]).name  # the instance's chain, not where it is on disk
        status["last_error"] = public_text(status.get("last_error"))
        return dict(status, on_failure=self.config.audit.on_failure, serving_patient_data=serving)


def build_services(cfg: Config) -> Services:
    """Load and validate everything; raises (PolicyError, ValueError, AuditError...) before serving."""
    directory = cfg.path(cfg.policies.dir)
    fingerprint = files_fingerprint(directory)  # before loading: an edit made meanwhile is seen at once
    policies = load_policies(cfg)
    client = redis_client(cfg)
    users = user_directory(cfg, client)
    sessions = session_store(cfg, client)
    careteam = careteam_store(cfg, client, policies)
    cache = DecisionCache(max_entries=cfg.decision_cache.max_entries, ttl=cfg.decision_cache.ttl)
    audit = audit_from_config(cfg).open()
    signer = AssertionSigner.from_pem_file(cfg.path(cfg.secrets.assertion_private_key_file), audience=cfg.audience,
                                           ttl=cfg.secrets.assertion_ttl)
    pipeline_ref: dict[str, Pipeline] = {}
    ldap_factor = None
    if cfg.directory.enabled:
        ldap_factor = DirectoryFirstFactor(ldap_directory(cfg),
                                           mapping=lambda: pipeline_ref["p"].policies.directory_groups,
                                           on_login=directory_units_sync(users, careteam))
    auth = authenticator(cfg, client, users, {"ldap": ldap_factor} if ldap_factor else None)
    spec = spec_of(cfg)
    bus = InvalidationBus(spec, prefix=cfg.redis.prefix, on_event_hook=metrics.bus_event)
    grants, objections = BreakGlassStore(client, cfg.redis.prefix), ObjectionStore(client, cfg.redis.prefix)
    breakglass = BreakGlassService(store=grants, objections=objections, careteam=careteam, authenticator=auth,
                                   audit=audit, on_grant=lambda user, patient: (cache.invalidate_user(user),
                                                                                cache.invalidate_patient(patient)))
    m = cfg.mass_access
    mass_access = MassAccessMonitor(  # its own client: a background job never holds the requests' one
        spec.client(cfg.redis.socket_timeout), audit, prefix=cfg.redis.prefix, max_patients=m.max_patients, window_seconds=m.window_seconds,
        action=m.action, throttle_seconds=m.throttle_seconds, refresh_seconds=m.refresh_seconds,
    ) if m.max_patients > 0 else None
    pipeline = Pipeline(
        policies=policies, sessions=sessions, careteam=careteam,
        access=AccessDecider(careteam, objections, grants), cache=cache, signer=signer, audit=audit,
        cookie_name=cfg.cookie_name, instance_id=cfg.instance_id, decision_ttl=cfg.decision_cache.ttl,
        max_header_bytes=cfg.limits.max_header_bytes, max_url_bytes=cfg.limits.max_url_bytes,
        extra_identity_headers=tuple(cfg.identity.strip_headers), require_tls=cfg.tls_enabled,
        fhir=fhir_enforcer(cfg), mass_access=mass_access,
    )
    pipeline_ref["p"] = pipeline
    services_ref: dict[str, Services] = {}
    settings = portal_settings(cfg)
    resume = ResumeStore(client, users.box, cfg.redis.prefix, ttl=cfg.sessions.resume_seconds,
                         max_bytes=cfg.sessions.resume_max_bytes)
    portal = Portal(
        authenticator=auth, sessions=sessions, audit=audit, cookie_name=cfg.cookie_name,
        secure_cookies=cfg.tls_enabled, units_of=lambda u: careteam.user_units(u),
        health=lambda: services_ref["s"].health(), policies=lambda: pipeline.policies, breakglass=breakglass,
        settings=settings, resume=resume,
    )
    if cfg.oidc.enabled:
        portal.oidc = OidcPages(relying_party(cfg, client), users, label=cfg.oidc.button_label)
    if cfg.console.enabled:
        prefix = cfg.redis.prefix
        portal.console = Console(
            roles=settings.console_roles, audit_source=cfg.path(cfg.console.audit_source or cfg.audit.path),
            users=users, authenticator=auth, sessions=sessions, grants=grants, careteam=careteam,
            unthrottle=lambda user: unthrottle(client, prefix, user),
            throttled=lambda: throttled_users(client, prefix), max_rows=cfg.console.max_rows,
            privacy_alerts=AlertQueue(client, prefix, cfg.privacy.alert_retention_days),
            on_revoke=lambda user, patient: (cache.invalidate_user(user), cache.invalidate_patient(patient)))
    portal.enrol = Enrolment(redis_client=client, prefix=cfg.redis.prefix, users=users,
                             links=enrolment_links(cfg, client), recovery=auth.recovery,
                             keys=security_keys(cfg, client), secure_cookies=cfg.tls_enabled)
    banner = Banner(portal.pages, enabled=cfg.ui.banner, position=cfg.ui.banner_position,
                    idle_timeout=cfg.sessions.idle_timeout, idle_warning=cfg.ui.idle_warning_seconds)
    services = Services(cfg, client, users, sessions, careteam, cache, bus, audit, pipeline, portal,
                        breakglass=breakglass, mass_access=mass_access, banner=banner)
    if cfg.privacy.learn_demographics:
        services.privacy_learner = privacy_learner(cfg, client)
        pipeline.fhir.on_patient_answer = services.privacy_learner.note_fhir
    if cfg.privacy.monitor:
        services.privacy_monitor = privacy_monitor(cfg, client, privacy_audit_log(cfg, f"{cfg.instance_id}-privacy"),
                                                   lambda: pipeline.policies)
    if ldap_factor is not None:
        def trace(record: dict) -> None:
            audit.write({"request_id": None, "client": None, "method": None, "path": None, **record})

        services.directory_recheck = DirectoryRecheck(
            spec.client(cfg.redis.socket_timeout), cfg.redis.prefix, ldap_factor,
            users=lambda: users.external_logins("ldap"), revoke=sessions.revoke_user, trace=trace,
            interval=cfg.directory.recheck_seconds, down_grace=cfg.directory.down_grace_seconds,
            instance_id=cfg.instance_id)
    services_ref["s"] = services
    services.pools = Pools(cfg.threads.model_dump())
    services.facts_reader = FactsReader(spec.async_client(cfg.redis.socket_timeout),
                                        spec.wait_bound(cfg.redis.socket_timeout), concurrency=cfg.threads.decisions)
    services.monitor = Monitor(services, redis_mode=spec.mode, client=spec.client(cfg.redis.socket_timeout))
    services.metrics_networks = allowed_networks(cfg.metrics.allow_from)
    metrics.bind(services, services.monitor)
    _wire_invalidation(services)
    if cfg.policies.reload_interval > 0:
        def reload_policies() -> PolicySet:
            new = PolicySet.load(directory, default_grace_seconds=cfg.careteam.grace_seconds)
            if (new.fhir is None) != (pipeline.policies.fhir is None):
                # Without fhir.yaml, FHIR addresses would be mapped by routes.yaml, without answer checks.
                raise PolicyError(str(directory / FHIR_FILE), None,
                                  "adding or removing fhir.yaml needs a restart of dpiguard")
            if cfg.policies.require_seal:
                new.check_seal()  # on the very bytes the set was built from
            return new

        def drop_decisions() -> None:
            cache.clear()
            pipeline.drop_all()

        services.reloader = PolicyReloader(
            target=pipeline, directory=directory, interval=cfg.policies.reload_interval,
            load=reload_policies, audit=audit, on_swap=drop_decisions, redis_client=client,
            prefix=cfg.redis.prefix, instance_id=cfg.instance_id, publish=bus.publish,
            loaded_fingerprint=fingerprint)
        bus.subscribe(services.reloader.on_bus_event)
    return services


def mitmproxy_addon() -> DpiGuard:
    """The addon for ``mitmdump -s addons/dpiguard_addon.py --set dpiguard_config=FILE``: it builds
    everything from the ``dpiguard_config`` option when mitmproxy sets it."""
    return DpiGuard(build=build_services)


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
