"""The files an RSSI edits (``policies/``), read, validated, versioned, reloaded, linted and simulated.

* :mod:`.files`    - reading a policy file: UTF-8, YAML with line numbers, ``PolicyError``;
* :mod:`.paths`    - strict path normalisation and query parsing (hostile targets refused);
* :mod:`.routes`   - ``routes.yaml``: address -> (patient, category, action);
* :mod:`.table`    - roles, categories and Casbin permissions compiled into a table;
* :mod:`.breakglass`, :mod:`.careteam`, :mod:`.fhir` - ``breakglass.yaml``, ``careteam.yaml``, ``fhir.yaml``;
* :mod:`.snapshot` - :class:`PolicySet`, all of them under one version, swapped whole;
* :mod:`.evaluate` - the pure decision steps shared by the pipeline and the simulator;
* :mod:`.reload`   - hot reload without a gap and without a broken set;
* :mod:`.lint`, :mod:`.sim` - ``dpiguard policy check|test|explain|diff``.
"""

from dpiguard.policy.files import PolicyError
from dpiguard.policy.paths import HostileRequest, normalize_path, parse_query
from dpiguard.policy.snapshot import PolicySet
from dpiguard.policy.table import Category, Policy

__all__ = ["PolicyError", "HostileRequest", "normalize_path", "parse_query", "PolicySet", "Category", "Policy"]
