"""Bulk loads from CSV: the initial census of current stays, unit memberships (HR / planning) and
explicit assignments. Every file is validated completely first; a file with any error changes
nothing and the report names each bad line and column.

Files are UTF-8 (a BOM is accepted), separated by ``,`` or ``;`` (detected from the header line), with
a header line naming the columns (any order, case-insensitive; extra columns are refused):

- stays:        ``patient, unit, start[, visit]``  → applied as admissions (A01) through the
                movement engine and its journal, so ``dpiguard adt replay`` rebuilds them too;
- members:      ``login, unit[, from, to]``          → unit memberships (replaces a login's window);
- assignments:  ``login, patient[, kind, from, to]`` → explicit assignments (kind default ``assigned``).

Members and assignments are written index first, then the authoritative keys, then ``all`` is
published (:func:`dpiguard.storage.batch.run_stages`): one MULTI/EXEC on a standalone server or
Sentinel, on a Redis Cluster one pipeline per stage. If Redis fails during a Cluster import some rows
may be written and others not; importing the same file again is safe (every row replaces its entry).

Dates: ISO ``2026-03-01`` or ``2026-03-01T08:30`` (read in ``adt.timezone`` unless an offset is
given), or epoch seconds; empty = open.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable
from zoneinfo import ZoneInfo

import orjson
import redis

from dpiguard.careteam.adt import AdtError, Movement
from dpiguard.careteam.movements import MovementStore
from dpiguard.ids import ID_RE
from dpiguard.storage.batch import publish_each, run_stages
from dpiguard.storage.bus import format_event
from dpiguard.storage.keys import Keys
from dpiguard.times import fmt_epoch, parse_time

KINDS = {
    "stays": (("patient", "unit", "start"), ("visit",)),
    "members": (("login", "unit"), ("from", "to")),
    "assignments": (("login", "patient"), ("kind", "from", "to")),
}


@dataclass
class Report:
    path: str
    kind: str
    rows: int = 0
    errors: list[str] = field(default_factory=list)
    applied: int = 0
    unchanged: int = 0
    refused: list[str] = field(default_factory=list)
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors and not self.refused

    def lines(self) -> list[str]:
        out = list(self.errors) + list(self.refused)
        if self.errors:
            out.append(f"{self.path}: {len(self.errors)} error(s) in {self.rows} row(s): nothing imported")
        elif self.dry_run:
            out.append(f"{self.path}: {self.rows} {self.kind} row(s) valid (dry run: nothing imported)")
        else:
            out.append(f"{self.path}: {self.applied} {self.kind} row(s) imported, {self.unchanged} already "
                       f"present, {len(self.refused)} refused")
        return out


class _Rows:
    def __init__(self, report: Report, tz: ZoneInfo):
        self.report = report
        self.tz = tz

    def error(self, line: int, column: str | None, message: str) -> None:
        where = f"{self.report.path}:{line}" + (f": column '{column}'" if column else "")
        self.report.errors.append(f"{where}: {message}")

    def ident(self, line: int, row: dict, column: str, upper: bool = False) -> str | None:
        value = (row.get(column) or "").strip()
        if not ID_RE.fullmatch(value):
            self.error(line, column, f"{value[:40]!r} is not a valid id (1-64 characters among A-Z a-z 0-9 . _ -)")
            return None
        return value.upper() if upper else value

    def time(self, line: int, row: dict, column: str, required: bool = False) -> float | None | bool:
        value = (row.get(column) or "").strip()
        if not value:
            if required:
                self.error(line, column, "a date/time is required")
                return False
            return None
        try:
            return parse_time(value, self.tz)
        except ValueError:
            self.error(line, column, f"{value[:40]!r} is not a date/time (e.g. 2026-03-01 or 2026-03-01T08:30)")
            return False


def read_rows(path: str | Path, kind: str, report: Report) -> list[tuple[int, dict]]:
    """Rows of a CSV file as (line number, {column: value}); header problems go to the report."""
    required, optional = KINDS[kind]
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        report.errors.append(f"{path}: cannot read file ({exc.strerror or exc})")
        return []
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        report.errors.append(f"{path}:{line}: not valid UTF-8 text (save the file as UTF-8)")
        return []
    return parse_csv(text, str(path), required, optional, report)


def sort_by_line(errors: list[str], label: str) -> None:
    """Order a report's ``label:LINE: ...`` messages by line (file-level messages first), stable."""
    prefix = len(label) + 1

    def line_of(message: str) -> int:
        if not message.startswith(label + ":"):
            return 0
        digits = message[prefix:].split(":", 1)[0]
        return int(digits) if digits.isdigit() else 0

    errors.sort(key=line_of)


def parse_csv(text: str, label: str, required: list[str] | tuple[str, ...], optional: list[str] | tuple[str, ...],
              report: Any, max_rows: int | None = None) -> list[tuple[int, dict]]:
    """Rows of CSV text as (line number, {column: value}), for every import of dpiguard.

    The header (first line that is not blank or a ``#`` comment) names the columns, in any order and
    case; ``,`` or ``;`` separates fields. Problems go to ``report.errors`` as ``label:line: ...``;
    header problems stop the reading (no rows). ``report.rows`` is set to the number of rows."""
    first = next((ln for ln in text.split("\n") if ln.strip() and not ln.lstrip().startswith("#")), "")
    delimiter = ";" if first.count(";") > first.count(",") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    expected = list(required) + list(optional)
    columns: list[str] | None = None
    rows: list[tuple[int, dict]] = []
    try:
        for values in reader:
            line = reader.line_num
            if not any(v.strip() for v in values) or values[0].lstrip().startswith("#"):
                continue
            if columns is None:
                columns = [h.strip().lower() for h in values]
                for name in columns:
                    if name not in expected:
                        report.errors.append(f"{label}:{line}: column '{name}': unknown column (expected "
                                             f"{', '.join(required)} and optionally {', '.join(optional)})")
                for name in required:
                    if name not in columns:
                        report.errors.append(f"{label}:{line}: column '{name}': required column missing "
                                             "from the header")
                if len(set(columns)) != len(columns):
                    report.errors.append(f"{label}:{line}: a column name appears twice in the header")
                if report.errors:
                    return []
                continue
            if max_rows is not None and len(rows) >= max_rows:
                report.errors.append(f"{label}:{line}: more than {max_rows} rows; split the file")
                return []
            if len(values) != len(columns):
                report.errors.append(f"{label}:{line}: expected {len(columns)} columns, found {len(values)}")
                continue
            rows.append((line, dict(zip(columns, values))))
    except csv.Error as exc:
        report.errors.append(f"{label}:{reader.line_num}: {exc}")
    if columns is None:
        report.errors.append(f"{label}: empty file (expected a header line: {', '.join(expected)})")
    report.rows = len(rows)
    return rows


def import_members(client: redis.Redis, prefix: str, path: str | Path, tz: str = "Europe/Paris",
                   dry_run: bool = False) -> Report:
    report = Report(str(path), "members", dry_run=dry_run)
    v = _Rows(report, ZoneInfo(tz))
    parsed = []
    seen: dict[tuple[str, str], int] = {}
    for line, row in read_rows(path, "members", report):
        login, unit = v.ident(line, row, "login"), v.ident(line, row, "unit", upper=True)
        start, end = v.time(line, row, "from"), v.time(line, row, "to")
        if None in (login, unit) or start is False or end is False:
            continue
        if start is not None and end is not None and start > end:
            v.error(line, "to", "is before 'from'")
            continue
        if (login, unit) in seen:
            v.error(line, "unit", f"{login} in {unit} already given on line {seen[login, unit]}")
            continue
        seen[login, unit] = line
        parsed.append((login, unit, start, end))
    sort_by_line(report.errors, str(path))
    if report.errors or dry_run:
        return report
    keys = Keys(prefix)

    def index(pipe) -> None:  # index first (storage/batch.py)
        for login, unit, _, _ in parsed:
            pipe.sadd(keys.unit_members(unit), login)

    def memberships(pipe) -> None:
        for login, unit, start, end in parsed:
            pipe.hset(keys.user_units(login), unit, f"{fmt_epoch(start)}|{fmt_epoch(end)}")

    run_stages(client, [index, memberships])
    publish_each(client, keys.events, [format_event("all")])
    report.applied = len(parsed)
    return report


def import_assignments(client: redis.Redis, prefix: str, path: str | Path, tz: str = "Europe/Paris",
                       dry_run: bool = False) -> Report:
    report = Report(str(path), "assignments", dry_run=dry_run)
    v = _Rows(report, ZoneInfo(tz))
    parsed = []
    seen: dict[tuple[str, str], int] = {}
    for line, row in read_rows(path, "assignments", report):
        login, patient = v.ident(line, row, "login"), v.ident(line, row, "patient")
        kind = "assigned"
        if (row.get("kind") or "").strip():
            kind = v.ident(line, row, "kind")
        start, end = v.time(line, row, "from"), v.time(line, row, "to")
        if None in (login, patient, kind) or start is False or end is False:
            continue
        if start is not None and end is not None and start > end:
            v.error(line, "to", "is before 'from'")
            continue
        if (login, patient) in seen:
            v.error(line, "patient", f"{login} already assigned to {patient} on line {seen[login, patient]}")
            continue
        seen[login, patient] = line
        parsed.append((login, patient, kind, start, end))
    sort_by_line(report.errors, str(path))
    if report.errors or dry_run:
        return report
    keys = Keys(prefix)

    def index(pipe) -> None:  # index first (storage/batch.py)
        for login, patient, *_ in parsed:
            pipe.sadd(keys.user_assignments(login), patient)

    def assignments(pipe) -> None:
        for login, patient, kind, start, end in parsed:
            pipe.hset(keys.assignments(patient), login, orjson.dumps({"kind": kind, "start": start, "end": end}))

    run_stages(client, [index, assignments])
    publish_each(client, keys.events, [format_event("all")])
    report.applied = len(parsed)
    return report


def known_units(client: Any, prefix: str, declared: Iterable[str] = ()) -> Callable[[Iterable[str]], set[str]]:
    """What ``import stays`` accepts as a unit: one with at least one member (``ct:unit-members:UNIT``,
    so import members first) or one declared in careteam.yaml (``declared``: the transversal units).
    A stay in any other unit would give nobody access (most likely a typo: ``CARDO``)."""
    keys = Keys(prefix)
    declared = {u.upper() for u in declared}

    def known(units: Iterable[str]) -> set[str]:
        units = sorted(set(units) - declared)
        pipe = client.pipeline(transaction=False)
        for unit in units:
            pipe.scard(keys.unit_members(unit))
        return declared | {u for u, n in zip(units, pipe.execute()) if n}

    return known


def import_stays(store: MovementStore, path: str | Path, tz: str = "Europe/Paris",
                 dry_run: bool = False, known: Callable[[Iterable[str]], set[str]] | None = None) -> Report:
    """Census of current stays: each row becomes an admission (A01) of the movement engine.
    ``known``: the units that may be used (:func:`known_units`); a row naming another unit is an error."""
    report = Report(str(path), "stays", dry_run=dry_run)
    v = _Rows(report, ZoneInfo(tz))
    parsed = []
    seen: dict[str, int] = {}
    for line, row in read_rows(path, "stays", report):
        patient, unit = v.ident(line, row, "patient"), v.ident(line, row, "unit", upper=True)
        start = v.time(line, row, "start", required=True)
        visit = None
        if (row.get("visit") or "").strip():
            visit = v.ident(line, row, "visit")
            if visit is not None and len(visit) > 48:
                v.error(line, "visit", "at most 48 characters")
                visit = None
        if None in (patient, unit) or start is False or start is None:
            continue
        key = f"{patient}/{visit or ''}"
        if key in seen:
            v.error(line, "patient", f"the same stay is already on line {seen[key]}")
            continue
        seen[key] = line
        parsed.append((line, Movement(control_id=f"census-{patient}-{visit or int(start)}", sender="census",
                                      trigger="A01", patient=patient, visit=visit, unit=unit, time=start,
                                      patient_class="I")))
    if known is not None and parsed:
        accepted = known({mv.unit for _, mv in parsed})
        for line, mv in parsed:
            if mv.unit not in accepted:
                v.error(line, "unit", f"unknown unit {mv.unit!r}: it has no member and is not declared in "
                                      "careteam.yaml (import the members first, or check the spelling)")
    sort_by_line(report.errors, str(path))
    if report.errors or dry_run:
        return report
    for line, mv in parsed:
        try:
            outcome = store.apply(mv)
        except AdtError as exc:
            report.refused.append(f"{report.path}:{line}: refused: {exc.message}")
            continue
        if outcome.duplicate:
            report.unchanged += 1
        else:
            report.applied += 1
    return report
