"""The decision: from a request to a verdict, with every step in the order of the pipeline.

* :mod:`.verdict`    - what flows through: :class:`Incoming`, :class:`Verdict`, :class:`NeedIO`;
* :mod:`.pipeline`   - the pipeline and its public steps (session, care team, grant, trace);
* :mod:`.cache`      - the in-process decision cache, kept exact by the invalidation bus;
* :mod:`.access`     - objections + care team + emergency access in one Redis round trip;
* :mod:`.fhir`       - the FHIR step: requests, write bodies, answers;
* :mod:`.breakglass` - asking for emergency access;
* :mod:`.massaccess` - mass-access detection and throttling;
* :mod:`.assertion`  - the identity headers and signed assertion sent to the DPI.

Knows nothing of mitmproxy (the proxy edge adapts flows to it).
"""

from dpiguard.decision.pipeline import Pipeline
from dpiguard.decision.verdict import Incoming, NeedIO, Verdict

__all__ = ["Pipeline", "Incoming", "NeedIO", "Verdict"]
