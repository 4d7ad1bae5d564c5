"""Audit reports for people: the self-contained HTML report for DPOs and the patient's "who accessed my record".

The selection and counting are in :mod:`dpiguard.audit.query`; this module computes the charts'
geometry and renders the Jinja2 templates of ``dpiguard/audit/templates/`` (``report.html``,
``who_accessed.html``, and the SVG chart and table macros of ``charts.html``), with autoescaping: every
value from the audit trail (users, patients, reasons, periods...) is escaped for HTML.
"""

from __future__ import annotations

from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from dpiguard.audit.query import cell_text

#: The report templates, parsed once on first use and kept.
_TEMPLATES = Environment(loader=PackageLoader("dpiguard.audit", "templates"), autoescape=True,
                         undefined=StrictUndefined, auto_reload=False, keep_trailing_newline=True)
_TEMPLATES.filters["cell"] = cell_text


# -- chart geometry (the templates draw it) ---------------------------------------------------------

def _bar_chart_h(items: list[tuple[str, int]]) -> dict[str, Any] | None:
    """Horizontal bars (categories), one per (label, value); None when there is nothing to draw."""
    if not items:
        return None
    width, label_w, bar_h, gap = 640, 190, 20, 6
    peak = max(v for _, v in items) or 1
    bars = []
    for i, (label, value) in enumerate(items):
        y = 5 + i * (bar_h + gap)
        w = max(1, int((width - label_w - 60) * value / peak))
        bars.append({"label": label, "short_label": label[:28], "value": value, "y": y, "text_y": y + 15,
                     "width": w, "value_x": label_w + w + 6})
    return {"width": width, "height": len(items) * (bar_h + gap) + 10, "label_x": label_w - 8, "bar_x": label_w,
            "bar_height": bar_h, "bars": bars}


def _time_chart(series: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Columns per period (allowed + refused stacked); None when there is nothing to draw."""
    if not series:
        return None
    width, height, left, bottom = 720, 260, 50, 60
    n = len(series)
    slot = (width - left - 10) / n
    bar_w = max(2.0, slot * 0.7)
    peak = max(s["accesses"] for s in series) or 1
    scale = (height - bottom - 10) / peak
    every = max(1, n // 12)  # label one period in ``every``
    columns = []
    for i, s in enumerate(series):
        x = left + i * slot + (slot - bar_w) / 2
        allowed = s["accesses"] - s["refused"]
        columns.append({"period": s["period"], "allowed": allowed, "refused": s["refused"], "x": x,
                        "allowed_height": allowed * scale, "refused_height": s["refused"] * scale,
                        "labelled": i % every == 0, "label_x": x + bar_w / 2})
    return {"width": width, "height": height, "left": left, "base": height - bottom, "peak": peak,
            "bar_width": bar_w, "columns": columns}


# -- pages ------------------------------------------------------------------------------------------

def html_report(summary: dict[str, Any], title: str = "dpiguard audit report") -> str:
    """The DPO's report of a :func:`dpiguard.audit.query.summarize` result: one self-contained HTML file."""
    s = summary
    return _TEMPLATES.get_template("report.html").render(
        summary=s, title=title,
        accesses_chart=_time_chart(s["accesses_over_time"]),
        refusals_chart=_bar_chart_h([(r["reason"], r["count"]) for r in s["refusals_by_reason"]]),
        top_users_chart=_bar_chart_h([(r["user"], r["patients"]) for r in s["top_users_by_distinct_patients"]]),
    )


def who_accessed_html(patient: str, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    """The accesses to one patient's record (:func:`dpiguard.audit.query.who_accessed`), for the patient."""
    return _TEMPLATES.get_template("who_accessed.html").render(patient=patient, rows=rows, columns=columns)
