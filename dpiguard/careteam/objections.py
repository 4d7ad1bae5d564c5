"""Patient objections (CSP art. L.1110-4): a patient may object to a named professional, or to a
whole care unit, accessing their record. Such an access is a hard refusal (``patient_objection``),
care team or not; whether emergency access can override it is ``override_patient_objection`` in
``policies/breakglass.yaml`` (off by default).

Key layout (``P`` = prefix, see docs/architecture.md):

- ``P:obj:{PATIENT}`` hash ``user:LOGIN`` / ``unit:UNIT`` → orjson ``{"date", "source", "comment"}``
- ``P:obj:patients``  set of patients with at least one objection (for listing)

Writes put the patient in ``P:obj:patients`` before its objection and take it out after its last
objection is removed (:mod:`dpiguard.storage.batch`: one MULTI/EXEC on a standalone server, staged on
a Redis Cluster), so the listing never misses a patient with an objection; decisions read only
``P:obj:{PATIENT}``. Every write publishes ``patient:P`` on the invalidation bus after it committed, so cached decisions
about P are dropped on every instance at once. Reads for the request path happen in the pipelined
round trip of :mod:`dpiguard.access`; :func:`find_objection` decides from the raw reply.

CSV import (``dpiguard objections import FILE``): header line ``patient,type,target`` with optional
``date`` (ISO date or epoch seconds), ``source`` and ``comment`` columns. The whole file is
validated first; any error gives a report naming line and column and nothing is written.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import orjson
import redis

from dpiguard.storage.batch import publish_each, run_stages
from dpiguard.storage.bus import format_event
from dpiguard.storage.clients import as_text
from dpiguard.storage.keys import Keys
from dpiguard.times import parse_time

_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
KINDS = ("user", "unit")
MAX_TEXT = 500
CSV_REQUIRED = ("patient", "type", "target")
CSV_OPTIONAL = ("date", "source", "comment")
MAX_CSV_ROWS = 200_000


class ObjectionDataError(ValueError):
    """An objection stored in Redis is malformed (the request path refuses: fail closed)."""


@dataclass(frozen=True)
class Objection:
    patient: str
    kind: str  # "user" or "unit"
    target: str  # login (lower case) or unit (upper case)
    date: float
    source: str
    comment: str

    @property
    def field(self) -> str:
        return f"{self.kind}:{self.target}"

    def as_dict(self) -> dict:
        return {"patient": self.patient, "type": self.kind, "target": self.target, "date": self.date,
                "source": self.source, "comment": self.comment}



def check_target(kind: str, target: str) -> tuple[str, str]:
    """Validate and normalise (kind, target); ValueError with a clear message."""
    kind = (kind or "").strip().lower()
    if kind not in KINDS:
        raise ValueError(f"type must be 'user' or 'unit', got {kind!r}")
    target = (target or "").strip()
    if not _ID_RE.fullmatch(target):
        raise ValueError(f"invalid {kind} {target!r}: expected 1-64 characters among A-Z a-z 0-9 . _ -")
    return kind, (target.lower() if kind == "user" else target.upper())


def check_patient(patient: str) -> str:
    patient = (patient or "").strip()
    if not _ID_RE.fullmatch(patient):
        raise ValueError(f"invalid patient {patient!r}: expected 1-64 characters among A-Z a-z 0-9 . _ -")
    return patient


def _check_text(value: str | None, what: str) -> str:
    value = (value or "").strip()
    if len(value) > MAX_TEXT:
        raise ValueError(f"{what} must have at most {MAX_TEXT} characters")
    if any(not c.isprintable() for c in value):
        raise ValueError(f"{what} must not contain control characters")
    return value


def parse_stored(patient: str, field: Any, raw: Any) -> Objection:
    """One stored hash entry → Objection; ObjectionDataError if malformed."""
    field = as_text(field)
    kind, _, target = field.partition(":")
    try:
        kind, target = check_target(kind, target)
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        date = data.get("date")
        if isinstance(date, bool) or not isinstance(date, (int, float)):
            raise ValueError("bad date")
        return Objection(patient, kind, target, float(date), str(data.get("source") or ""),
                         str(data.get("comment") or ""))
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise ObjectionDataError(f"objection {field!r} of patient {patient}: {exc}") from None


def find_objection(patient: str, raw: Mapping[Any, Any], login: str,
                   active_units: Iterable[str]) -> Objection | None:
    """The objection that applies to ``login`` (by name, or through one of its active units).

    Every entry is parsed, so malformed data raises even if it would not apply (fail closed)."""
    objections = [parse_stored(patient, f, v) for f, v in raw.items()]
    units = {u.upper() for u in active_units}
    login = login.lower()
    for o in sorted(objections, key=lambda o: (o.kind != "user", o.target)):
        if (o.kind == "user" and o.target == login) or (o.kind == "unit" and o.target in units):
            return o
    return None


@dataclass
class ImportReport:
    rows: int = 0
    added: int = 0
    errors: list[str] = None  # "FILE:LINE: column 'X': message"

    def __post_init__(self):
        if self.errors is None:
            self.errors = []


class ObjectionStore:
    def __init__(self, redis_client: redis.Redis, prefix: str = "dpiguard"):
        self.redis = redis_client
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.channel = self.keys.events

    # -- writes ------------------------------------------------------------------------------------
    def add(self, patient: str, kind: str, target: str, *, source: str = "cli", comment: str = "",
            date: float | None = None) -> Objection:
        """Record (or replace) an objection, then publish ``patient:P``."""
        objection = self._build(patient, kind, target, source, comment, date)
        self._write([objection])
        return objection

    def remove(self, patient: str, kind: str, target: str) -> bool:
        patient = check_patient(patient)
        kind, target = check_target(kind, target)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self.keys.objections(patient), f"{kind}:{target}")
        pipe.hlen(self.keys.objections(patient))
        removed, left = pipe.execute()
        if not left:
            self.redis.srem(self.keys.objection_patients, patient)
        self._publish([patient])
        return bool(removed)

    def _build(self, patient, kind, target, source, comment, date) -> Objection:
        patient = check_patient(patient)
        kind, target = check_target(kind, target)
        return Objection(patient, kind, target, time.time() if date is None else float(date),
                         _check_text(source, "source") or "cli", _check_text(comment, "comment"))

    def _write(self, objections: list[Objection]) -> None:
        patients = sorted({o.patient for o in objections})
        run_stages(self.redis, [
            lambda pipe: pipe.sadd(self.keys.objection_patients, *patients),  # the listing index first
            lambda pipe: [pipe.hset(self.keys.objections(o.patient), o.field,
                                    orjson.dumps({"date": o.date, "source": o.source, "comment": o.comment}))
                          for o in objections],
        ])
        self._publish(patients)

    def _publish(self, patients: list[str]) -> None:
        publish_each(self.redis, self.channel, [format_event("patient", p) for p in patients])

    # -- reads -------------------------------------------------------------------------------------
    def list(self, patient: str | None = None) -> list[Objection]:
        patients = [check_patient(patient)] if patient else sorted(as_text(p) for p in self.redis.smembers(self.keys.objection_patients))
        pipe = self.redis.pipeline(transaction=False)
        for p in patients:
            pipe.hgetall(self.keys.objections(p))
        out = []
        for p, raw in zip(patients, pipe.execute()):
            out += [parse_stored(p, f, v) for f, v in raw.items()]
        return sorted(out, key=lambda o: (o.patient, o.kind, o.target))

    def find(self, patient: str, login: str, active_units: Iterable[str]) -> Objection | None:
        return find_objection(patient, self.redis.hgetall(self.keys.objections(check_patient(patient))), login, active_units)

    # -- CSV ---------------------------------------------------------------------------------------
    def import_csv(self, path: str | Path, *, source: str | None = None, dry_run: bool = False) -> ImportReport:
        """Validate the whole file; write everything only if no line has an error."""
        path = Path(path)
        report = ImportReport()
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except OSError as exc:
            report.errors.append(f"{path}: cannot read file ({exc.strerror or exc})")
            return report
        except UnicodeDecodeError:
            report.errors.append(f"{path}: file is not valid UTF-8 text (save it as UTF-8)")
            return report
        objections = self.validate_csv(text, str(path), report, default_source=source or f"csv:{path.name}")
        if not report.errors and objections and not dry_run:
            for start in range(0, len(objections), 1000):
                self._write(objections[start:start + 1000])
            report.added = len(objections)
        return report

    def validate_csv(self, text: str, label: str, report: ImportReport, default_source: str) -> list[Objection]:
        from dpiguard.careteam.imports import parse_csv, sort_by_line

        objections: list[Objection] = []
        seen: dict[tuple[str, str], int] = {}
        for line, cells in parse_csv(text, label, CSV_REQUIRED, CSV_OPTIONAL, report, max_rows=MAX_CSV_ROWS):
            ok = True

            def fail(col: str, message: str) -> None:
                nonlocal ok
                ok = False
                report.errors.append(f"{label}:{line}: column {col!r}: {message}")

            try:
                patient = check_patient(cells["patient"])
            except ValueError as exc:
                fail("patient", str(exc))
            try:
                kind, target = check_target(cells["type"], "x")
                try:
                    kind, target = check_target(kind, cells["target"])
                except ValueError as exc:
                    fail("target", str(exc))
            except ValueError as exc:
                fail("type", str(exc))
            date = None
            if cells.get("date", "").strip():
                try:
                    date = parse_time(cells["date"])
                except ValueError as exc:
                    fail("date", str(exc))
            for col in ("source", "comment"):
                try:
                    _check_text(cells.get(col), col)
                except ValueError as exc:
                    fail(col, str(exc))
            if not ok:
                continue
            key = (patient, f"{kind}:{target}")
            if key in seen:
                fail("target", f"same objection as line {seen[key]}")
                continue
            seen[key] = line
            objections.append(self._build(patient, kind, target, cells.get("source") or default_source,
                                          cells.get("comment", ""), date))
        sort_by_line(report.errors, label)
        return objections
