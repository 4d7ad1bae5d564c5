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

    def session(self, sid_hash: str) -> str:
        return f"{self.prefix}:session:{{{sid_hash}}}"

    def user_sessions(self, login: str) -> str:
        return f"{self.prefix}:user-sessions:{{{login}}}"

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
