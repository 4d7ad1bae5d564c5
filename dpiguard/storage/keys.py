"""Every Redis key and channel name dpiguard uses, in one place (table: docs/architecture.md).

``P`` is the configured prefix (``redis.prefix``, default ``dpiguard``). A key that belongs to one user,
one patient, one session, one grant or one audit chain puts that id in a hash tag (``{...}``), so that
the keys of one id stay in one Redis Cluster slot and a transaction on them is possible there.
"""

from __future__ import annotations


class Keys:
    """The key names for one prefix. Cheap to build; holds nothing else."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = "dpiguard"):
        self.prefix = prefix

    @property
    def everything(self) -> str:
        """SCAN pattern of every key of this prefix (the demo empties them at start)."""
        return f"{self.prefix}:*"

    # -- invalidation bus (storage/bus.py) ----------------------------------------------------------
    @property
    def events(self) -> str:
        """Pub/sub channel of cache invalidations (``KIND:ID`` messages)."""
        return f"{self.prefix}:events"

    # -- users and login (auth/) -------------------------------------------------------------------
    def user(self, login: str) -> str:
        return f"{self.prefix}:user:{{{login}}}"

    @property
    def users(self) -> str:
        return f"{self.prefix}:users"

    def login_failures(self, login: str) -> str:
        return f"{self.prefix}:authfail:{{{login}}}"

    def login_lock(self, login: str) -> str:
        return f"{self.prefix}:lock:{{{login}}}"

    def address_failures(self, address: str) -> str:
        return f"{self.prefix}:ipfail:{address}"

    def address_slow(self, address: str) -> str:
        """Set for ``ip_slow_seconds`` after each attempt from a slowed-down address."""
        return f"{self.prefix}:ipslow:{address}"

    # -- enrolment, recovery codes, security keys (auth/enrolment.py, auth/webauthn.py) -------------
    def enrol_link(self, token_hash: str) -> str:
        """An enrolment link (hash: login, created_by), by the SHA-256 of its token; TTL = its life."""
        return f"{self.prefix}:enrol:{{{token_hash}}}"

    def user_enrol_link(self, login: str) -> str:
        """The token hash of a user's current enrolment link (a new link replaces the old one)."""
        return f"{self.prefix}:user-enrol:{{{login}}}"

    def enrol_session(self, sid_hash: str) -> str:
        """An enrolment in progress (after the link was used): login, stage, pending TOTP secret."""
        return f"{self.prefix}:enrol-session:{{{sid_hash}}}"

    def recovery_codes(self, login: str) -> str:
        """Set of the SHA-256 digests of a user's unused recovery codes."""
        return f"{self.prefix}:recovery:{{{login}}}"

    def security_keys(self, login: str) -> str:
        """Hash: credential id (base64url) -> JSON of the registered key (public key, sign count, name)."""
        return f"{self.prefix}:webauthn:{{{login}}}"

    def webauthn_challenge(self, challenge_id: str) -> str:
        """A ceremony's challenge (single use, short TTL): any instance can finish the ceremony."""
        return f"{self.prefix}:webauthn-challenge:{{{challenge_id}}}"

    def session(self, sid_hash: str) -> str:
        return f"{self.prefix}:session:{{{sid_hash}}}"

    def user_sessions(self, login: str) -> str:
        return f"{self.prefix}:user-sessions:{{{login}}}"

    def oidc(self, kind: str, ident: str) -> str:
        """OpenID Connect state (auth/oidc.py): ``flow`` (by state), ``pending`` (identity waiting for a
        TOTP code), ``session`` (by session id hash), ``sid`` / ``sub`` (sets of session hashes, by sha256
        of the IdP's sid / sub), ``jti`` (logout tokens used)."""
        return f"{self.prefix}:oidc-{kind}:{{{ident}}}"

    def session_owner(self, sid_hash: str) -> str:
        """Whose a session was, kept after it ended by inactivity (a kept form goes to its author only)."""
        return f"{self.prefix}:session-owner:{{{sid_hash}}}"

    def resume(self, resume_id: str) -> str:
        """A form kept while its author logs in again (auth/resume.py)."""
        return f"{self.prefix}:resume:{{{resume_id}}}"

    # -- care team (careteam/) ---------------------------------------------------------------------
    def user_units(self, login: str) -> str:
        return f"{self.prefix}:ct:user-units:{{{login}}}"

    def unit_members(self, unit: str) -> str:
        return f"{self.prefix}:ct:unit-members:{unit}"

    def stays(self, patient: str) -> str:
        return f"{self.prefix}:ct:stays:{{{patient}}}"

    def unit_patients(self, unit: str) -> str:
        return f"{self.prefix}:ct:unit-patients:{unit}"

    def assignments(self, patient: str) -> str:
        return f"{self.prefix}:ct:assign:{{{patient}}}"

    def user_assignments(self, login: str) -> str:
        return f"{self.prefix}:ct:user-assign:{{{login}}}"

    def visits(self, patient: str) -> str:
        return f"{self.prefix}:ct:visits:{{{patient}}}"

    @property
    def visits_pattern(self) -> str:
        """SCAN pattern of every patient's visits key."""
        return f"{self.prefix}:ct:visits:*"

    @property
    def journal(self) -> str:
        return f"{self.prefix}:ct:journal"

    def adt_seen(self, patient: str, digest: str) -> str:
        """Duplicate marker of an applied HL7 message, in its patient's slot."""
        return f"{self.prefix}:adt:seen:{{{patient}}}:{digest}"

    def adt_seen_legacy(self, digest: str) -> str:
        """The marker's older shape (no hash tag, not in the patient's slot): still read until the
        markers written by an older dpiguard have expired (``adt.dedup_ttl``)."""
        return f"{self.prefix}:adt:seen:{digest}"

    def adt_outbox(self, patient: str) -> str:
        """Movements of a patient committed but not yet finished (careteam/movements.py)."""
        return f"{self.prefix}:ct:outbox:{{{patient}}}"

    @property
    def adt_outbox_pattern(self) -> str:
        """SCAN pattern of every patient's outbox."""
        return f"{self.prefix}:ct:outbox:*"

    # -- emergency access and objections (careteam/) ------------------------------------------------
    def grants_of(self, login: str) -> str:
        return f"{self.prefix}:bg:{{{login}}}"

    def grant(self, grant_id: str) -> str:
        return f"{self.prefix}:bg:grant:{{{grant_id}}}"

    @property
    def grant_review(self) -> str:
        return f"{self.prefix}:bg:review"

    def objections(self, patient: str) -> str:
        return f"{self.prefix}:obj:{{{patient}}}"

    @property
    def objection_patients(self) -> str:
        return f"{self.prefix}:obj:patients"

    # -- mass-access detection (decision/massaccess.py) --------------------------------------------
    def mass_counter(self, login: str) -> str:
        return f"{self.prefix}:mass:{{{login}}}"

    def mass_alert(self, login: str) -> str:
        return f"{self.prefix}:mass-alert:{{{login}}}"

    @property
    def mass_blocked(self) -> str:
        return f"{self.prefix}:mass-blocked"

    # -- privacy monitoring (privacy/) --------------------------------------------------------------
    def pv_patient(self, patient: str) -> str:
        """Minimised demographics of a patient (keyed hashes only) and what flags them (VIP...)."""
        return f"{self.prefix}:pv:patient:{{{patient}}}"

    def pv_staff(self, login: str) -> str:
        """Minimised demographics of a staff member (keyed hashes) and the patient ids that are them."""
        return f"{self.prefix}:pv:staff:{{{login}}}"

    def pv_vip(self, patient: str) -> str:
        """Confidential / VIP flag set by the RSSI's list (``dpiguard privacy vip``), no expiry."""
        return f"{self.prefix}:pv:vip:{{{patient}}}"

    def pv_ident(self, token: str) -> str:
        """Who carries this identity hash (``p:PATIENT`` / ``s:LOGIN``): links staff to patients."""
        return f"{self.prefix}:pv:ident:{token}"

    @property
    def pv_name_counts(self) -> str:
        """Family-name hash → number of patients carrying it (how common a name is)."""
        return f"{self.prefix}:pv:names"

    @property
    def pv_patient_count(self) -> str:
        return f"{self.prefix}:pv:patients"

    @property
    def pv_positions(self) -> str:
        """Audit chain → seq of the last record the privacy monitor has fully processed."""
        return f"{self.prefix}:pv:pos"

    @property
    def pv_pending(self) -> str:
        """Candidates waiting for their care-event window to pass (member = candidate, score = due)."""
        return f"{self.prefix}:pv:pending"

    def pv_alert(self, alert_id: str) -> str:
        return f"{self.prefix}:pv:alert:{{{alert_id}}}"

    @property
    def pv_queue(self) -> str:
        """Review queue: alert id → time of the access that raised it."""
        return f"{self.prefix}:pv:queue"

    def pv_orders(self, patient: str) -> str:
        """Writes seen for a patient: ``u:LOGIN`` / ``unit:UNIT`` → time of the latest one."""
        return f"{self.prefix}:pv:orders:{{{patient}}}"

    def pv_day_patients(self, login: str, day: str) -> str:
        return f"{self.prefix}:pv:dp:{{{login}}}:{day}"

    def pv_day_hours(self, login: str, day: str) -> str:
        return f"{self.prefix}:pv:dh:{{{login}}}:{day}"

    def pv_day_users(self, day: str) -> str:
        return f"{self.prefix}:pv:du:{day}"

    def pv_history(self, login: str) -> str:
        """Day → ``PATIENTS|HOURS`` (distinct patients, bit mask of local hours with access)."""
        return f"{self.prefix}:pv:hist:{{{login}}}"

    def pv_role_history(self, role: str) -> str:
        """Day → orjson statistics of the role that day (distinct patients per user, hours)."""
        return f"{self.prefix}:pv:rolehist:{role}"

    @property
    def pv_days(self) -> str:
        """Days with accesses whose baselines are not closed yet."""
        return f"{self.prefix}:pv:days"

    # -- policy version (policy/reload.py) ---------------------------------------------------------
    @property
    def policy_version(self) -> str:
        return f"{self.prefix}:policy:version"

    @property
    def policy_instances(self) -> str:
        return f"{self.prefix}:policy:instances"

    # -- audit shipping (audit/ship.py) ------------------------------------------------------------
    def audit_stream(self, instance: str) -> str:
        return f"{self.prefix}:audit:stream:{{{instance}}}"

    def audit_collected(self, instance: str) -> str:
        return f"{self.prefix}:audit:collected:{{{instance}}}"

    @property
    def audit_chains(self) -> str:
        return f"{self.prefix}:audit:chains"

    # -- LDAP / Active Directory re-check (auth/directory.py) -------------------------------------
    @property
    def ldap_recheck_lock(self) -> str:
        """Held ``recheck_seconds`` by the instance that re-checks the directory's users this period."""
        return f"{self.prefix}:ldap:recheck"

    @property
    def ldap_down_since(self) -> str:
        """Epoch seconds of the first failed re-check while the directory is unreachable."""
        return f"{self.prefix}:ldap:down-since"
