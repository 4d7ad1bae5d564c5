"""Privacy monitoring: the snooping that care-team rules cannot stop (docs/privacy.md).

- ``pseudonyms``  normalised names and addresses → keyed hashes (HMAC), never clear text;
- ``sources``     demographics from HL7 PID segments and FHIR Patient resources;
- ``store``       the hashes in Redis (patients learnt, staff imported, the VIP list), with retention;
- ``learner``     learning from the ADT feed and FHIR answers off the request path;
- ``rules``       the detectors, their settings and the French texts;
- ``detectors``   the detectors as pure functions (and the decision-time facts);
- ``monitor``     reads the audit chains, raises alerts idempotently, keeps its position;
- ``alerts``      alert identity, audit record and the review queue (CLI and DPO console).

Layer: under ``decision`` and ``policy`` (which read its rules and facts), over the domains
(``careteam`` for stays and assignments, ``audit`` for the chains).
"""
