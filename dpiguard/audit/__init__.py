"""The trace of everything: a tamper-evident chain per instance, and what DPOs do with it.

* :mod:`.chain`  - the chain writer (group commit, Ed25519-signed checkpoints and head), readers;
* :mod:`.verify` - proof that a chain is intact, explicit pruning that keeps it verifiable;
* :mod:`.ship`   - local chains to Redis Streams, and a central verifiable copy (collect);
* :mod:`.query`  - filters, "who accessed my record", summaries;
* :mod:`.report` - the HTML report and the patient's access list;
* :mod:`.export` - FHIR AuditEvent (IHE BALP) and syslog (RFC 5424) for SIEMs.
"""

from dpiguard.audit.chain import AuditError, AuditLog, AuditSigner, AuditVerifier, read_records
from dpiguard.audit.query import Filter, summarize, who_accessed
from dpiguard.audit.verify import verify_store

__all__ = ["AuditError", "AuditLog", "AuditSigner", "AuditVerifier", "read_records", "Filter", "summarize", "who_accessed", "verify_store"]
