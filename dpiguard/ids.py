"""The identifiers every part of dpiguard shares: logins, patients, units, stays, visits.

One syntax, checked in one place, so that a value refused at an import or by the ADT feed is refused
the same way by the care-team store and the request path.
"""

from __future__ import annotations

import re
from typing import Any

ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


# --------------------------------------------------------------------------- validation helpers


def check_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise ValueError(f"invalid {what} {value!r}: expected 1-64 characters among A-Z a-z 0-9 . _ -")
    return value


def check_unit(value: Any) -> str:
    return check_id(value, "unit").upper()
