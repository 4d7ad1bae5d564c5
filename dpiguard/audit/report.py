"""Reports for people: ``dpiguard audit query``, ``who-accessed``, ``summary`` and ``report`` (HTML).

Everything reads the audit store (all chains, or a central store's export) as a stream of records and
filters while reading. Outputs: aligned table, CSV, JSON, JSON lines, and one self-contained HTML file
(inline CSS and SVG charts, no script, no external asset) for the DPO.
"""

from __future__ import annotations

import csv
import html
import io
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import orjson

from dpiguard.audit.chain import iter_chain, list_chains, list_segments, utc_now_ms

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


def _cell(value: Any) -> str:
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
            w.writerow([_cell(r.get(c)) for c in columns])
        return buf.getvalue()
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [min(40, max([len(c)] + [len(row[i]) for row in cells])) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(widths[i]) for i, c in enumerate(columns)).rstrip()]
    for row in cells:
        lines.append("  ".join(v[:widths[i]].ljust(widths[i]) for i, v in enumerate(row)).rstrip())
    return "\n".join(lines) + "\n"


# -- who accessed my record -------------------------------------------------------------------------

WHO_COLUMNS = ("time", "purpose", "category", "action", "roles", "units", "care_team", "break_glass")
WHO_COLUMNS_NAMED = ("time", "user", "name") + WHO_COLUMNS[1:]


def who_accessed(records: Iterable[dict[str, Any]], patient: str, since: str | None = None, until: str | None = None,
                 names: dict[str, str] | None = None, with_names: bool = False) -> list[dict[str, Any]]:
    """The allowed accesses to a patient's data, for the patient's own request (RGPD art. 15).

    Professionals are described by role, unit and purpose; their identity appears only with
    ``with_names`` (an explicit request, e.g. when the patient asks who exactly)."""
    flt = Filter(patient=patient, since=since, until=until, outcome="allow")
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
        bg = bool(r.get("break_glass"))
        row = {
            "time": r.get("time"),
            "purpose": ("emergency access: " + (r.get("break_glass_reason") or "")) if bg else "care",
            "category": r.get("category"),
            "action": r.get("action"),
            "roles": r.get("roles") or [],
            "units": r.get("units") or [],
            "care_team": r.get("care_team"),
            "break_glass": bg,
        }
        if with_names:
            row = {"time": row["time"], "user": r.get("user"),
                   "name": (names or {}).get(r.get("user") or "", ""), **{k: v for k, v in row.items() if k != "time"}}
        rows.append(row)
    return rows


# -- summaries --------------------------------------------------------------------------------------

def summarize(records: Iterable[dict[str, Any]], flt: Filter, top: int = 10) -> dict[str, Any]:
    by_day: Counter = Counter()
    by_day_denied: Counter = Counter()
    refusals: Counter = Counter()
    patients_per_user: dict[str, set] = defaultdict(set)
    events: Counter = Counter()
    break_glass: list[dict[str, Any]] = []
    refusal_users: Counter = Counter()
    first = last = None
    total = 0
    for r in records:
        if not flt.match(r):
            continue
        total += 1
        events[r.get("event")] += 1
        t = r.get("time") or ""
        first = t if first is None or t < first else first
        last = t if last is None or t > last else last
        if r.get("event") == "fhir_response" and r.get("outcome") == "allow" and r.get("user"):
            patients_per_user[r["user"]].update(record_patients(r))  # patients only the answer showed
        if r.get("event") != "access":
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
    return {
        "generated": utc_now_ms(), "from": flt.since or first, "to": flt.until or last, "records": total,
        "events": dict(events.most_common()),
        "accesses_over_time": [{"period": d, "accesses": by_day[d], "refused": by_day_denied[d]} for d in sorted(by_day)],
        "refusals_by_reason": [{"reason": k, "count": v} for k, v in refusals.most_common()],
        "top_users_by_distinct_patients": [{"user": u, "patients": n} for u, n in top_users],
        "users_with_most_refusals": [{"user": u, "refusals": n} for u, n in refusal_users.most_common(top)],
        "break_glass": sorted(break_glass, key=lambda r: r.get("time") or ""),
    }


# -- HTML -------------------------------------------------------------------------------------------

def _bar_chart_h(items: list[tuple[str, int]], title: str, color: str) -> str:
    """Horizontal bars (categories) as inline SVG."""
    if not items:
        return f'<figure><figcaption>{html.escape(title)}</figcaption><p class="empty">nothing in this period</p></figure>'
    width, label_w, bar_h, gap = 640, 190, 20, 6
    height = len(items) * (bar_h + gap) + 10
    peak = max(v for _, v in items) or 1
    parts = [f'<svg role="img" aria-label="{html.escape(title)}" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">']
    for i, (label, value) in enumerate(items):
        y = 5 + i * (bar_h + gap)
        w = max(1, int((width - label_w - 60) * value / peak))
        parts.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end" font-size="12">{html.escape(label[:28])}</text>'
                     f'<rect class="bar" x="{label_w}" y="{y}" width="{w}" height="{bar_h}" fill="{color}">'
                     f'<title>{html.escape(label)}: {value}</title></rect>'
                     f'<text x="{label_w + w + 6}" y="{y + 15}" font-size="12">{value}</text>')
    parts.append("</svg>")
    return f'<figure><figcaption>{html.escape(title)}</figcaption>{"".join(parts)}</figure>'


def _time_chart(series: list[dict[str, Any]], title: str) -> str:
    """Columns per period (allowed + refused stacked) as inline SVG."""
    if not series:
        return f'<figure><figcaption>{html.escape(title)}</figcaption><p class="empty">nothing in this period</p></figure>'
    width, height, left, bottom = 720, 260, 50, 60
    n = len(series)
    slot = (width - left - 10) / n
    bar_w = max(2.0, slot * 0.7)
    peak = max(s["accesses"] for s in series) or 1
    scale = (height - bottom - 10) / peak
    parts = [f'<svg role="img" aria-label="{html.escape(title)}" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - 5}" y2="{height - bottom}" stroke="#889"/>',
             f'<text x="{left - 6}" y="18" text-anchor="end" font-size="11">{peak}</text>',
             f'<text x="{left - 6}" y="{height - bottom}" text-anchor="end" font-size="11">0</text>']
    every = max(1, n // 12)
    for i, s in enumerate(series):
        x = left + i * slot + (slot - bar_w) / 2
        allowed = s["accesses"] - s["refused"]
        h_ok, h_no = allowed * scale, s["refused"] * scale
        base = height - bottom
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{base - h_ok:.1f}" width="{bar_w:.1f}" height="{h_ok:.1f}" '
                     f'fill="#2e7d32"><title>{html.escape(s["period"])}: {allowed} allowed</title></rect>')
        if h_no:
            parts.append(f'<rect class="bar" x="{x:.1f}" y="{base - h_ok - h_no:.1f}" width="{bar_w:.1f}" '
                         f'height="{h_no:.1f}" fill="#c62828"><title>{html.escape(s["period"])}: {s["refused"]} refused'
                         f'</title></rect>')
        if i % every == 0:
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{base + 14}" font-size="10" text-anchor="end" '
                         f'transform="rotate(-40 {x + bar_w / 2:.1f} {base + 14})">{html.escape(s["period"])}</text>')
    parts.append("</svg>")
    legend = '<p class="legend"><span style="color:#2e7d32">■</span> allowed <span style="color:#c62828">■</span> refused</p>'
    return f'<figure><figcaption>{html.escape(title)}</figcaption>{"".join(parts)}{legend}</figure>'


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    if not rows:
        return '<p class="empty">none</p>'
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_report(summary: dict[str, Any], title: str = "dpiguard audit report") -> str:
    s = summary
    refusals = [(r["reason"], r["count"]) for r in s["refusals_by_reason"]]
    top = [(r["user"], r["patients"]) for r in s["top_users_by_distinct_patients"]]
    events = "".join(f"<li>{html.escape(str(k))}: {v}</li>" for k, v in s["events"].items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem;color:#1c2833;background:#fff}}
h1{{font-size:1.5rem}} h2{{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #dde}}
figure{{margin:1rem 0}} figcaption{{font-weight:600;margin-bottom:.4rem}}
table{{border-collapse:collapse;font-size:.85rem}} td,th{{border:1px solid #ccd;padding:.25rem .5rem;text-align:left}}
th{{background:#eef2f7}} .empty{{color:#778}} .legend{{font-size:.8rem}} .meta{{color:#556}}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="meta">Period: {html.escape(str(s["from"]))} → {html.escape(str(s["to"]))} · {s["records"]} records ·
generated {html.escape(s["generated"])}</p>
<ul class="meta">{events}</ul>
<h2>Accesses over time</h2>
{_time_chart(s["accesses_over_time"], "Accesses per period (allowed and refused)")}
<h2>Refusals by reason</h2>
{_bar_chart_h(refusals, "Refusals by reason", "#c62828")}
<h2>Top users by distinct patients</h2>
{_bar_chart_h(top, "Distinct patients accessed per user", "#1b5fa8")}
<h2>Users with the most refusals</h2>
{_table(s["users_with_most_refusals"], ("user", "refusals"))}
<h2>Break-glass accesses</h2>
{_table(s["break_glass"], ("time", "user", "roles", "units", "patient", "category", "break_glass_reason", "outcome", "request_id"))}
</body></html>
"""


def who_accessed_html(patient: str, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Accesses to the record of {html.escape(patient)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem}} table{{border-collapse:collapse;font-size:.9rem}}
td,th{{border:1px solid #ccd;padding:.25rem .5rem;text-align:left}} th{{background:#eef2f7}}</style></head><body>
<h1>Accesses to the record of patient {html.escape(patient)}</h1>
<p>{len(rows)} access(es). Each line is one consultation or update by a professional of the care team.</p>
{_table(rows, columns)}
</body></html>
"""


# -- CLI --------------------------------------------------------------------------------------------

def _time_bounds(args) -> tuple[str | None, str | None]:
    from dpiguard.cli import parse_time

    since = parse_time(args.since) if args.since else None
    until = parse_time(args.until) if args.until else None
    return (utc_now_ms(since) if since is not None else None, utc_now_ms(until) if until is not None else None)


def _source(args) -> Path:
    if args.source:
        return Path(args.source)
    from dpiguard.cli.audit import _store

    return _store(args)


def _emit(text: str, out: str | None) -> None:
    if out:
        Path(out).write_text(text, encoding="utf-8")
        print(f"written to {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def cmd_query(args) -> int:
    since, until = _time_bounds(args)
    flt = Filter(patient=args.patient, user=args.user, since=since, until=until, outcome=args.outcome,
                 event=args.event, reason=args.reason, instance=args.instance)
    rows = select(iter_store(_source(args)), flt, limit=args.limit)
    _emit(render(rows, QUERY_COLUMNS, args.format), args.out)
    return 0


def _display_names(args) -> dict[str, str]:
    try:
        from dpiguard.cli.audit import _cfg
        from dpiguard.services import user_directory

        return {u.login: u.display_name for u in user_directory(_cfg(args)).list()}
    except Exception as exc:  # names are a convenience; the logins are still shown
        print(f"dpiguard: display names unavailable ({exc}); showing logins only", file=sys.stderr)
        return {}


def cmd_who_accessed(args) -> int:
    since, until = _time_bounds(args)
    names = _display_names(args) if args.names else None
    rows = who_accessed(iter_store(_source(args)), args.patient, since, until, names, with_names=args.names)
    columns = WHO_COLUMNS_NAMED if args.names else WHO_COLUMNS
    text = who_accessed_html(args.patient, rows, columns) if args.format == "html" else render(rows, columns, args.format)
    _emit(text, args.out)
    return 0


def cmd_summary(args) -> int:
    since, until = _time_bounds(args)
    summary = summarize(iter_store(_source(args)), Filter(since=since, until=until, instance=args.instance), args.top)
    if args.format == "json":
        text = orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode() + "\n"
    else:
        fmt = "csv" if args.format == "csv" else "table"
        text = ("# refusals by reason\n" + render(summary["refusals_by_reason"], ("reason", "count"), fmt)
                + "\n# users with the most refusals\n" + render(summary["users_with_most_refusals"], ("user", "refusals"), fmt)
                + "\n# top users by distinct patients\n"
                + render(summary["top_users_by_distinct_patients"], ("user", "patients"), fmt)
                + "\n# break-glass accesses\n"
                + render(summary["break_glass"], ("time", "user", "patient", "category", "break_glass_reason",
                                                  "outcome", "request_id"), fmt))
    _emit(text, args.out)
    return 0


def cmd_report(args) -> int:
    since, until = _time_bounds(args)
    summary = summarize(iter_store(_source(args)), Filter(since=since, until=until, instance=args.instance), args.top)
    _emit(html_report(summary), args.out)
    return 0


def register(asub, with_config) -> None:
    def common(sp):
        with_config(sp)
        sp.add_argument("--source", help="audit folder, chain folder or JSON-lines export (default: audit.path)")
        sp.add_argument("--from", dest="since", help="start (date/time, UTC unless an offset is given)")
        sp.add_argument("--to", dest="until", help="end (exclusive)")
        sp.add_argument("--out", help="write to this file instead of standard output")
        sp.set_defaults(dir=None)
        return sp

    sp = common(asub.add_parser("query", help="search records by patient, user, period, outcome"))
    sp.add_argument("--patient"); sp.add_argument("--user"); sp.add_argument("--outcome", choices=("allow", "deny", "error"))
    sp.add_argument("--event"); sp.add_argument("--reason"); sp.add_argument("--instance")
    sp.add_argument("--limit", type=int, help="only the last N matching records")
    sp.add_argument("--format", choices=("table", "csv", "json", "jsonl"), default="table")
    sp.set_defaults(func=cmd_query)

    sp = common(asub.add_parser("who-accessed", help="accesses to a patient's record, for the patient's request"))
    sp.add_argument("patient")
    sp.add_argument("--names", action="store_true", help="also show who (login and name): only when explicitly asked")
    sp.add_argument("--format", choices=("table", "csv", "json", "html"), default="table")
    sp.set_defaults(func=cmd_who_accessed)

    sp = common(asub.add_parser("summary", help="refusal and break-glass summaries"))
    sp.add_argument("--instance"); sp.add_argument("--top", type=int, default=10)
    sp.add_argument("--format", choices=("table", "csv", "json"), default="table")
    sp.set_defaults(func=cmd_summary)

    sp = common(asub.add_parser("report", help="self-contained HTML report with charts"))
    sp.add_argument("--instance"); sp.add_argument("--top", type=int, default=10)
    sp.set_defaults(func=cmd_report)
