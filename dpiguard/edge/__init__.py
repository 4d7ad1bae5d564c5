"""The proxy edge: everything that speaks HTTP to clients and the DPI, and the only code that imports mitmproxy.

* :mod:`.addon`    - the mitmproxy addon: hooks -> pipeline -> forward or answer;
* :mod:`.flows`    - flows to and from the decision (adapters, durable wait, last-resort trace);
* :mod:`.fhir`     - the FHIR hooks (write bodies, answers);
* :mod:`.portal`   - dpiguard's own pages and JSON API under ``/_dpiguard/`` (login, logout, refusals,
  emergency access);
* :mod:`.ops`      - health, readiness and Prometheus endpoints, and the readiness probe;
* :mod:`.upstream` - requests dpiguard makes to the DPI itself (stored FHIR resources);
* :mod:`.runner`, :mod:`.workers` - mitmproxy startup, one process per core.
"""
