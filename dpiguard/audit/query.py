"""Searching the audit trail: filters, the records a patient's request concerns, summaries.

Read-only over chains (``audit.path/<instance>/``), a central store (``dpiguard audit collect``) or a
JSON-lines export. Used by ``dpiguard audit query|who-accessed|summary|report|export``.
"""

from __future__ import annotations

import csv
import io
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import orjson

from dpiguard.audit.chain import iter_chain, list_chains, list_segments
from dpiguard.audit.explain import ExplanationRates
from dpiguard.times import iso_ms

#: Records about access to patient data: request decisions, and FHIR answers (whose patients are
#: only known from the response for reads by id and filtered searches).
DATA_EVENTS = ("access", "fhir_response")


@dataclass
class Filter:
    patient: str | None = None
    user: str | None = None
    since: str | None = None  # ISO UTC strings, compared as text (fixed-width format)
    until: str | None = None
    outcome: str | None = None
    event: str | None = None
    reason: str | None = None
    instance: str | None = None
    unit: str | None = None  # one of the user's units at the time of the record

    def match(self, r: dict[str, Any]) -> bool:
        if r.get("event") == "checkpoint" and self.event != "checkpoint":
            return False
        t = r.get("time") or ""
        return not (
            (self.patient is not None and self.patient not in record_patients(r))
            or (self.user is not None and r.get("user") != self.user)
            or (self.since is not None and t < self.since)
            or (self.until is not None and t >= self.until)
            or (self.outcome is not None and r.get("outcome") != self.outcome)
            or (self.event is not None and r.get("event") != self.event)
            or (self.reason is not None and r.get("reason") != self.reason)
            or (self.instance is not None and r.get("instance") != self.instance)
            or (self.unit is not None and self.unit not in (r.get("units") or ()))
        )


def iter_store(source: Path) -> Iterator[dict[str, Any]]:
    """Records of an audit folder (every chain), of one chain folder, or of a JSON-lines file."""
    source = Path(source)
    if source.is_file():
        with open(source, "rb") as fh:
            for line in fh:
                line = line.strip()
                if line:
                    try:
                        rec = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(rec, dict):
                        yield rec
        return
    chains = [source] if list_segments(source) else list_chains(source)
    for chain in chains:
        for _, _, rec in iter_chain(chain):
            yield rec


def select(records: Iterable[dict[str, Any]], flt: Filter, limit: int | None = None) -> list[dict[str, Any]]:
    out = [r for r in records if flt.match(r)]
    out.sort(key=lambda r: (r.get("time") or "", r.get("instance") or "", r.get("seq") or 0))
    return out[-limit:] if limit else out


# -- output formats ---------------------------------------------------------------------------------

def record_patients(r: dict[str, Any]) -> set[str]:
    """Patients a record is about: ``patient`` (request decisions) and ``patients`` (FHIR answers,
    where a read by id or a filtered search only shows its patients in the response)."""
    found = {r["patient"]} if r.get("patient") else set()
    if isinstance(r.get("patients"), list):
        found.update(p for p in r["patients"] if isinstance(p, str))
    return found


QUERY_COLUMNS = ("time", "instance", "event", "outcome", "reason", "user", "roles", "patient", "category",
                 "action", "method", "path", "break_glass", "client", "request_id")


def cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return orjson.dumps(value).decode()
    return str(value)


def render(rows: list[dict[str, Any]], columns: tuple[str, ...], fmt: str) -> str:
    if fmt == "json":
        return orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n"
    if fmt == "jsonl":
        return "".join(orjson.dumps(r).decode() + "\n" for r in rows)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow([cell_text(r.get(c)) for c in columns])
        return buf.getvalue()
    cells = [[cell_text(r.get(c)) for c in columns] for r in rows]
    widths = [min(40, max([len(c)] + [len(row[i]) for row in cells])) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(widths[i]) for i, c in enumerate(columns)).rstrip()]
    for row in cells:
        lines.append("  ".join(v[:widths[i]].ljust(widths[i]) for i, v in enumerate(row)).rstrip())
    return "\n".join(lines) + "\n"


# -- who accessed my record -------------------------------------------------------------------------

WHO_COLUMNS = ("time", "outcome", "purpose", "category", "action", "roles", "units", "reason")
WHO_COLUMNS_NAMED = ("time", "user", "name") + WHO_COLUMNS[1:]

#: Why an access happened, as the timeline says it (one code per row; texts in the report templates):
#: ``care_team`` (the patient stays in the user's unit or is assigned to them), ``emergency`` (an
#: emergency access, bris de glace), ``no_care_team_needed`` (data any holder of the role may see, such as
#: the administrative file at the admissions desk), ``refused`` (dpiguard refused it: ``reason`` says why).
PURPOSES = ("care_team", "emergency", "no_care_team_needed", "refused")


def purpose_of(r: dict[str, Any]) -> str:
    if r.get("outcome") != "allow":
        return "refused"
    if r.get("break_glass"):
        return "emergency"
    source = r.get("care_team") or ""
    if source.startswith(("unit:", "assignment:", "stay:")):
        return "care_team"
    return "no_care_team_needed"


def who_accessed(records: Iterable[dict[str, Any]], patient: str, since: str | None = None, until: str | None = None,
                 names: dict[str, str] | None = None, with_names: bool = False,
                 refusals: bool = True) -> list[dict[str, Any]]:
    """The accesses to a patient's data, allowed and refused, for the patient's own request (RGPD art.
    15), each labelled with its real purpose (:func:`purpose_of`): care team, emergency access, data
    that needs no care team (the admissions desk), or refused.

    Professionals are described by role, unit and purpose; their identity appears only with
    ``with_names`` (CJEU C-579/21: staff identities are in principle not disclosed; the DPO decides)."""
    flt = Filter(patient=patient, since=since, until=until, outcome=None if refusals else "allow")
    rows = []
    seen: set[str] = set()  # one row per request (a FHIR read has a request and an answer record)
    for r in select(records, flt):
        if r.get("event") not in DATA_EVENTS:
            continue
        request_id = r.get("request_id")
        if request_id:
            if request_id in seen:
                continue
            seen.add(request_id)
        purpose = purpose_of(r)
        row = {
            "time": r.get("time"),
            "outcome": r.get("outcome"),
            "purpose": purpose,
            "category": r.get("category"),
            "action": r.get("action"),
            "roles": r.get("roles") or [],
            "units": r.get("units") or [],
            "reason": (r.get("break_glass_reason") if purpose == "emergency"
                       else r.get("reason") if purpose == "refused" else None),
            "care_team": r.get("care_team"),
            "break_glass": bool(r.get("break_glass")),
        }
        if with_names:  # the DPO's view: who, and the request's reference (to explain a refusal)
            row = {"time": row["time"], "user": r.get("user"),
                   "name": (names or {}).get(r.get("user") or "", ""), **{k: v for k, v in row.items() if k != "time"},
                   "request_id": request_id}
        rows.append(row)
    return rows


def find_request(records: Iterable[dict[str, Any]], request_id: str) -> dict[str, Any] | None:
    """The decision record of one request (``event: access``), for "why was this refused?"."""
    for r in records:
        if r.get("request_id") == request_id and r.get("event") == "access":
            return r
    return None


#: Refusals that are the ordinary way into the application: a browser without a session is sent to
#: the login page. They are counted apart in the statistics, not mixed with real refusals.
LOGIN_REDIRECT_REASONS = ("not_authenticated", "session_expired")


def refusal_stats(records: Iterable[dict[str, Any]], flt: Filter, top: int = 20) -> dict[str, Any]:
    """Refused decisions by reason, by user, by category and by day, the login redirects apart."""
    reasons: Counter = Counter()
    users: Counter = Counter()
    categories: Counter = Counter()
    days: Counter = Counter()
    redirects = total = 0
    for r in records:
        if r.get("event") != "access" or r.get("outcome") != "deny" or not flt.match(r):
            continue
        if r.get("reason") in LOGIN_REDIRECT_REASONS:
            redirects += 1
            continue
        total += 1
        reasons[r.get("reason") or "?"] += 1
        if r.get("user"):
            users[r["user"]] += 1
        if r.get("category"):
            categories[r["category"]] += 1
        days[(r.get("time") or "")[:10]] += 1
    return {"total": total, "login_redirects": redirects,
            "by_reason": [{"reason": k, "count": v} for k, v in reasons.most_common()],
            "by_user": [{"user": k, "count": v} for k, v in users.most_common(top)],
            "by_category": [{"category": k, "count": v} for k, v in categories.most_common()],
            "by_day": [{"day": d, "count": days[d]} for d in sorted(days)]}


# -- summaries --------------------------------------------------------------------------------------

def summarize(records: Iterable[dict[str, Any]], flt: Filter, top: int = 10) -> dict[str, Any]:
    by_day: Counter = Counter()
    by_day_denied: Counter = Counter()
    refusals: Counter = Counter()
    patients_per_user: dict[str, set] = defaultdict(set)
    events: Counter = Counter()
    break_glass: list[dict[str, Any]] = []
    grants: dict[str, dict[str, Any]] = {}
    under_grant: Counter = Counter()
    reviews: dict[str, tuple[str, str]] = {}
    refusal_users: Counter = Counter()
    login_redirects = 0
    privacy_alerts: Counter = Counter()
    first = last = None
    total = 0
    explained = ExplanationRates()
    for r in records:
        if not flt.match(r):
            continue
        total += 1
        explained.add(r)
        events[r.get("event")] += 1
        if r.get("event") == "break_glass" and r.get("break_glass_id"):
            grants[r["break_glass_id"]] = {
                "time": r.get("time"), "user": r.get("user"), "patient": r.get("patient"),
                "break_glass_reason": r.get("break_glass_label") or r.get("reason"),
                "justification": r.get("break_glass_text"), "id": r["break_glass_id"]}
        elif r.get("action") == "break_glass_review" and r.get("break_glass_id"):  # CLI or console review
            reviews[r["break_glass_id"]] = (r.get("review") or "", r.get("comment") or "")
        t = r.get("time") or ""
        first = t if first is None or t < first else first
        last = t if last is None or t > last else last
        if r.get("event") == "fhir_response" and r.get("outcome") == "allow" and r.get("user"):
            patients_per_user[r["user"]].update(record_patients(r))  # patients only the answer showed
        if r.get("event") == "privacy_alert":
            privacy_alerts[r.get("reason") or "?"] += 1
        if r.get("event") != "access":
            continue
        if r.get("break_glass_id"):
            under_grant[r["break_glass_id"]] += 1
        if r.get("outcome") == "deny" and r.get("reason") in LOGIN_REDIRECT_REASONS:
            login_redirects += 1  # the ordinary way to the login page: counted apart
            continue
        day = t[:13] if flt.since and flt.until and flt.until[:10] == flt.since[:10] else t[:10]
        by_day[day] += 1
        if r.get("outcome") == "deny":
            by_day_denied[day] += 1
            refusals[r.get("reason") or "?"] += 1
            if r.get("user"):
                refusal_users[r["user"]] += 1
        elif r.get("outcome") == "allow" and r.get("user") and record_patients(r):
            patients_per_user[r["user"]].update(record_patients(r))
        if r.get("break_glass"):
            break_glass.append({k: r.get(k) for k in ("time", "user", "roles", "units", "patient", "category",
                                                       "break_glass_reason", "outcome", "request_id")})
    top_users = sorted(((u, len(p)) for u, p in patients_per_user.items()), key=lambda x: (-x[1], x[0]))[:top]
    for grant_id, g in grants.items():
        status, comment = reviews.get(grant_id, ("pending", ""))
        g.update(requests=under_grant[grant_id], status=status, review_comment=comment)
    return {
        "generated": iso_ms(), "from": flt.since or first, "to": flt.until or last, "records": total,
        "events": dict(events.most_common()),
        "accesses_over_time": [{"period": d, "accesses": by_day[d], "refused": by_day_denied[d]} for d in sorted(by_day)],
        "refusals_by_reason": [{"reason": k, "count": v} for k, v in refusals.most_common()],
        "top_users_by_distinct_patients": [{"user": u, "patients": n} for u, n in top_users],
        "users_with_most_refusals": [{"user": u, "refusals": n} for u, n in refusal_users.most_common(top)],
        "break_glass": sorted(break_glass, key=lambda r: r.get("time") or ""),
        "break_glass_grants": sorted(grants.values(), key=lambda r: r.get("time") or ""),
        "login_redirects": login_redirects,
        "explanation_rate": explained.result(),
        "privacy_alerts": [{"detector": k, "count": v} for k, v in privacy_alerts.most_common()],
    }
