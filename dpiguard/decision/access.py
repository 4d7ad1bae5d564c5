"""The care-team step with patient objections and emergency access, in one Redis round trip.

Decision order (pipeline step 5, for every request naming a patient):

1. **patient objection** to this user, or to one of the user's active units → refused
   ``patient_objection`` (care team or not), unless ``override_patient_objection`` is true in
   ``policies/breakglass.yaml`` and an active emergency access covers the request;
2. a **privacy detector** of ``policies/privacy.yaml`` with a decision-time action matches this user
   and patient (self, same family name or address, patient on the staff, VIP; facts read in the same
   round trip, only when such an action is set): ``refuse`` → ``privacy_refused``;
   ``require_break_glass`` → allowed only under an active emergency access (care team or not), else
   ``privacy_break_glass_required``;
2b. categories that do not require the care team → allowed (the care-team source is still recorded
   when there is one);
3. **care-team membership** (assignment, or a stay in one of the user's units) → allowed;
4. an active **emergency access** (break-glass grant) for this patient covering the category and
   action → allowed, flagged;
5. otherwise ``not_in_care_team``.

:meth:`AccessDecider.read_facts` reads everything with one pipelined round trip (user units, patient
stays, assignment, objections, grant: :class:`AccessFacts`, the same for every category and action) and
:func:`decide_from_facts` returns the decision with ``valid_until``: the earliest
time at which it could change by the clock alone (a stay, membership or assignment window, the grant
end). Callers cache it no longer than that, so a grant's expiry needs no invalidation message.
Malformed data raises (the pipeline refuses with ``internal_error``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from dpiguard.careteam.breakglass import BreakGlassStore, Grant, parse_grant
from dpiguard.careteam.membership import compute_membership, parse_unit_window
from dpiguard.careteam.objections import ObjectionStore, find_objection
from dpiguard.careteam.store import CareTeamStore
from dpiguard.decision.packing import pack, unpack
from dpiguard.ids import check_id
from dpiguard.policy.breakglass import BreakGlassPolicy
from dpiguard.policy.snapshot import PolicySet
from dpiguard.privacy.detectors import static_matches
from dpiguard.privacy.store import parse_patient, parse_staff
from dpiguard.storage.clients import as_text


@dataclass(frozen=True, slots=True)
class AccessDecision:
    """The answer of step 5 (cached per user, patient, category and action)."""

    member: bool  # allowed by this step
    source: str | None  # why (care-team source, "break_glass:ID", "objection:user:X"...)
    reason: str = "not_in_care_team"  # refusal reason when not member
    break_glass: Grant | None = None  # the grant the access relies on
    objection_overridden: str | None = None  # objection field overridden by the grant

    def as_tuple(self) -> tuple:
        """The fields, in order, as a plain tuple (``AccessDecision(*t)`` rebuilds it): how the decision cache
        keeps it. With strings, booleans and None only, Python's collector stops tracking such a tuple, so a
        full cache adds nothing to its walks of the heap (a grant keeps it tracked)."""
        return (self.member, self.source, self.reason, self.break_glass, self.objection_overridden)


class AccessDecider:
    """Reads what step 5 needs from Redis in one round trip and decides with the rules of one policy set
    (``policies.breakglass``, ``policies.careteam``), given at each call."""

    def __init__(self, careteam: CareTeamStore, objections: ObjectionStore, grants: BreakGlassStore):
        self.careteam = careteam
        self.objections = objections
        self.grants = grants

    def decide(self, login: str, patient: str, category: str, action: str, care_team_required: bool,
               now: float, policies: PolicySet) -> tuple[AccessDecision, float | None]:
        decision, valid_until, _ = self.decide_with_units(login, patient, category, action, care_team_required,
                                                          now, policies)
        return decision, valid_until

    def decide_with_units(self, login: str, patient: str, category: str, action: str, care_team_required: bool,
                          now: float, policies: PolicySet) -> tuple[AccessDecision, float | None, list[str]]:
        """:meth:`decide`, plus the user's units valid at ``now`` from the same round trip."""
        facts = self.read_facts(login, patient, now, policies)
        return decide_from_facts(facts, login, patient, category, action, care_team_required, now, policies)

    def read_facts(self, login: str, patient: str, now: float, policies: PolicySet) -> AccessFacts:
        """What step 5 needs about ``login`` and ``patient``, whatever the category and action, in one
        pipelined round trip (the privacy facts only when ``policies`` has a decision-time action)."""
        pipe = self.careteam.redis.pipeline(transaction=False)
        for command, args in self.facts_commands(login, patient, policies):
            getattr(pipe, command)(*args)
        return facts_from_replies(login, patient, now, pipe.execute())

    def facts_commands(self, login: str, patient: str, policies: PolicySet) -> list[tuple[str, tuple]]:
        """The commands of :meth:`read_facts` as (client method, arguments), for a client of any kind (the
        event loop's asynchronous one too: dpiguard.edge.prefetch); their replies go to
        :func:`facts_from_replies`. Raises ValueError for an invalid login or patient."""
        login, patient = check_id(login, "login"), check_id(patient, "patient")
        ct = self.careteam
        commands = [("hgetall", (ct.keys.user_units(login),)), ("hgetall", (ct.keys.stays(patient),)),
                    ("hget", (ct.keys.assignments(patient), login)),
                    ("hgetall", (self.objections.keys.objections(patient),)),
                    ("hget", (self.grants.keys.grants_of(login), patient))]
        if policies.privacy.decision_actions:  # privacy detectors acting now: their facts, same round trip
            commands += [("hgetall", (ct.keys.pv_staff(login),)), ("hgetall", (ct.keys.pv_patient(patient),)),
                         ("get", (ct.keys.pv_vip(patient),))]
        return commands


def facts_from_replies(login: str, patient: str, now: float, replies: list) -> AccessFacts:
    """:class:`AccessFacts` from the replies of :meth:`AccessDecider.facts_commands`, in order (five, or
    eight with the privacy facts). Raises ValueError on replies of another shape."""
    if len(replies) not in (5, 8) or not all(type(replies[i]) is dict for i in (0, 1, 3)):
        raise ValueError("care-team facts: unexpected replies from Redis")
    user_units, stays, assignment, objections, grant_raw = replies[:5]
    matches = None
    if len(replies) == 8:
        matches = tuple(sorted(static_matches(login, patient, parse_staff(replies[5]),
                                              parse_patient(replies[6], replies[7]))))
    return AccessFacts(now, user_units, stays, assignment, objections, grant_raw, matches)


class AccessFacts(NamedTuple):
    """The Redis replies step 5 decides from, for one user and one patient (any category and action).

    The pipeline keeps them in its decision cache next to the decisions, under the key of
    :func:`facts_key`, so that the same invalidations drop both: a request for another category or action
    of the same user and patient is then decided in-process by :func:`decide_from_facts`, at its own time
    (stays, windows and grants are compared with the clock again), with no Redis round trip."""

    read_at: float  # when they were read: a decision taken from them is not kept longer than from a read
    user_units: dict
    stays: dict
    assignment: Any
    objections: dict
    grant_raw: Any
    # Privacy detectors matching the pair, sorted; None: not read (the policy set had no decision-time action).
    privacy_matches: tuple[str, ...] | None

    def packed(self) -> bytes:
        """How the decision cache keeps them: one bytes object (:mod:`dpiguard.decision.packing`), about 60 %
        of the memory of dicts or tuples of bytes. The collector never tracks it, so a full cache adds
        nothing to its walks of the heap, which hold the event loop (dpiguard.edge.runner.FreezeStartupHeap).
        :meth:`unpacked` gives the facts back."""
        return pack(self.read_at, (self.user_units, self.stays, self.assignment, self.objections, self.grant_raw,
                                   self.privacy_matches))

    @classmethod
    def unpacked(cls, packed: bytes) -> "AccessFacts":
        read_at, values = unpack(packed)
        if len(values) != 6:
            raise ValueError("packed care-team facts: unexpected shape")
        return cls(read_at, *values)

    def usable_with(self, policies: PolicySet) -> bool:
        """False when ``policies`` acts on privacy detectors at decision time and their facts were not read."""
        return self.privacy_matches is not None or not policies.privacy.decision_actions


FACTS_CATEGORY = "\x00facts"  # never a category name (policy names are identifiers): no decision's key


def facts_key(login: str, patient: str) -> tuple[str, str, str, str]:
    """The decision-cache key of the :class:`AccessFacts` of ``login`` and ``patient``: user and patient
    first, as decisions' keys, so a ``user:U`` or ``patient:P`` invalidation drops them with the decisions."""
    return (login, patient, FACTS_CATEGORY, "")


def decide_from_facts(facts: AccessFacts, login: str, patient: str, category: str, action: str,
                      care_team_required: bool, now: float,
                      policies: PolicySet) -> tuple[AccessDecision, float | None, list[str]]:
    """The decision for ``category`` and ``action`` at ``now``, its ``valid_until``, and the user's units
    valid at ``now``, from facts read earlier (pure: no I/O)."""
    privacy = None
    actions = policies.privacy.decision_actions
    if actions:
        if facts.privacy_matches is None:
            raise ValueError("privacy facts were not read for this policy set")
        privacy = {d: actions[d] for d in facts.privacy_matches if d in actions}
    decision, valid_until = decide_from(login, patient, category, action, care_team_required, now, facts.user_units,
                                        facts.stays, facts.assignment, facts.objections, facts.grant_raw,
                                        policies.grace_seconds, policies.breakglass, policies.careteam.units, privacy)
    units = sorted(as_text(u).upper() for u, raw in facts.user_units.items()
                   if parse_unit_window(raw, as_text(u)).contains(now))
    return decision, valid_until, units


def decide_from(login, patient, category, action, care_team_required, now, user_units, stays, assignment,
                objections, grant_raw, grace, policy: BreakGlassPolicy,
                transversal=None, privacy: dict[str, str] | None = None) -> tuple[AccessDecision, float | None]:
    """Pure decision from the raw Redis replies (see the module docstring).

    ``privacy``: privacy detectors that match this user and patient and act at decision time
    (detector → ``refuse`` / ``require_break_glass``, from ``policies/privacy.yaml``)."""
    boundaries: list[float] = []
    active_units = []
    for unit, raw in user_units.items():
        unit = as_text(unit).upper()
        window = parse_unit_window(raw, unit)
        boundaries += window.changes(now)
        if window.contains(now):
            active_units.append(unit)
    grant = None
    if grant_raw is not None:
        grant = parse_grant(grant_raw, f"grant of {login} for {patient}")
        if grant.user != login or grant.patient != patient:
            raise ValueError(f"grant {grant.id} is stored under the wrong user or patient")
        if grant.start > now:
            boundaries.append(grant.start)
        if grant.end > now:
            boundaries.append(grant.end)
    covering = grant if grant is not None and policy.enabled and grant.covers(category, action, now) else None

    def result(decision: AccessDecision) -> tuple[AccessDecision, float | None]:
        return decision, (min(boundaries) if boundaries else None)

    objection = find_objection(patient, objections, login, active_units)
    if objection is not None:
        if covering is not None and policy.override_patient_objection:
            return result(AccessDecision(True, f"break_glass:{covering.id}", "allowed", covering, objection.field))
        return result(AccessDecision(False, f"objection:{objection.field}", "patient_objection"))
    if privacy:
        refused = sorted(d for d, act in privacy.items() if act == "refuse")
        if refused:
            return result(AccessDecision(False, f"privacy:{refused[0]}", "privacy_refused"))
        if covering is not None:
            return result(AccessDecision(True, f"break_glass:{covering.id}", "allowed", covering))
        first = sorted(privacy)[0]
        return result(AccessDecision(False, f"privacy:{first}", "privacy_break_glass_required"))
    membership = compute_membership(user_units, stays, assignment, now, grace, category, transversal)
    if membership.valid_until is not None:
        boundaries.append(membership.valid_until)
    if not care_team_required:
        # Allowed by the role alone; the care relationship, when there is one, is still recorded: it is
        # what explains the access to the privacy monitor and in the explanation rate (docs/privacy.md).
        return result(AccessDecision(True, membership.source if membership.member else None, "allowed"))
    if membership.member:
        return result(AccessDecision(True, membership.source, "allowed"))
    if covering is not None:
        return result(AccessDecision(True, f"break_glass:{covering.id}", "allowed", covering))
    return result(AccessDecision(False, membership.source, "not_in_care_team"))
