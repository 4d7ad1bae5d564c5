"""Audit reports for people: the self-contained HTML report for DPOs and the patient's "who accessed my record".

The selection and counting are in :mod:`dpiguard.audit.query`; this module only renders.
"""

from __future__ import annotations

import html
from typing import Any

from dpiguard.audit.query import cell_text

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
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell_text(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
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
