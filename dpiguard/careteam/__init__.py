"""Whether the user takes care of the patient: the data behind the care-team rule, and its feeds.

* :mod:`.membership`  - the rule itself, a pure function of stays, units, assignments;
* :mod:`.store`       - stays, unit memberships, assignments in Redis (writes publish invalidations);
* :mod:`.adt`, :mod:`.movements`, :mod:`.mllp` - the HL7 v2 ADT feed: parsing, applying movements,
  the MLLP listener;
* :mod:`.imports`, :mod:`.bulkload` - CSV imports and batched loads;
* :mod:`.breakglass`  - emergency-access grants and their review queue;
* :mod:`.objections`  - patient objections (CSP L.1110-4).

The rules of ``policies/careteam.yaml`` and ``breakglass.yaml`` are read by :mod:`dpiguard.policy` and
given to this package as arguments.
"""

from dpiguard.careteam.breakglass import BreakGlassStore, Grant
from dpiguard.careteam.membership import CareTeamDataError, Membership, compute_membership
from dpiguard.careteam.movements import MovementStore
from dpiguard.careteam.objections import ObjectionStore
from dpiguard.careteam.store import CareTeamStore

__all__ = ["BreakGlassStore", "Grant", "CareTeamDataError", "Membership", "compute_membership", "MovementStore", "ObjectionStore", "CareTeamStore"]
