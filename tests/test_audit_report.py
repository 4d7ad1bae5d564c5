"""Reports for people: query, who-accessed, summaries, and the self-contained HTML report."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import jinja2
import orjson
import png
import pytest

from dpiguard.audit import report
from dpiguard.audit.chain import AuditLog
from dpiguard.audit.query import WHO_COLUMNS, WHO_COLUMNS_NAMED, Filter, iter_store, summarize, who_accessed
from dpiguard.audit.report import html_report, who_accessed_html
from dpiguard.cli import main
from dpiguard.i18n import Localizer

EN = Localizer("en", "UTC")


def rec(t, user, patient, outcome="allow", reason="allowed", category="biology", **extra):
    base = {"event": "access", "time": t, "user": user, "roles": ["nurse"], "units": ["CARDIO"],
            "patient": patient, "category": category, "action": "read", "outcome": outcome, "reason": reason,
            "break_glass": None, "break_glass_reason": None, "request_id": f"{user}-{patient}-{t}",
            "care_team": "unit:CARDIO stay:S1"}
    base.update(extra)
    return base


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("report") / "audit"
    with AuditLog(root, "px1") as a, AuditLog(root, "px2") as b:
        a.write(rec("2026-03-01T08:00:00.000Z", "inf.durand", "P0001"))
        a.write(rec("2026-03-01T09:00:00.000Z", "inf.durand", "P0002", "deny", "not_in_care_team"))
        b.write(rec("2026-03-02T10:00:00.000Z", "dr.martin", "P0001", category="notes", care_team="unit:CARDIO"))
        b.write(rec("2026-03-02T11:00:00.000Z", "dr.martin", "P0003"))
        b.write(rec("2026-03-02T11:30:00.000Z", "dr.martin", "P0004", break_glass=True,
                    break_glass_reason="cardiac arrest, patient unconscious"))
        a.write(rec("2026-03-03T12:00:00.000Z", "acc.robert", "P0001", "deny", "category_not_permitted", category="notes"))
        a.write({"event": "login", "time": "2026-03-01T07:59:00.000Z", "user": "inf.durand", "outcome": "allow",
                 "reason": "ok"})
    return root


def test_query_filters_and_formats(store, capsys):
    assert main(["audit", "query", "--source", str(store), "--patient", "P0001", "--format", "json"]) == 0
    rows = orjson.loads(capsys.readouterr().out)
    assert [r["user"] for r in rows] == ["inf.durand", "dr.martin", "acc.robert"]  # time order across chains
    assert main(["audit", "query", "--source", str(store), "--outcome", "deny", "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["reason"] for r in table} == {"not_in_care_team", "category_not_permitted"}
    assert main(["audit", "query", "--source", str(store), "--user", "dr.martin",
                 "--from", "2026-03-02T10:30", "--to", "2026-03-03"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("TIME") and len(out) == 3 and "P0003" in out[1] and "P0004" in out[2]


def test_who_accessed_hides_names_unless_asked(store, capsys):
    assert main(["audit", "who-accessed", "P0001", "--source", str(store), "--format", "json"]) == 0
    rows = orjson.loads(capsys.readouterr().out)
    assert len(rows) == 3  # the refusal too: the patient learns that an access was attempted and refused
    assert all("user" not in r and "name" not in r for r in rows)
    assert rows[0]["units"] == ["CARDIO"] and rows[0]["purpose"] == "care_team"
    assert [r["purpose"] for r in rows] == ["care_team", "care_team", "refused"]
    assert rows[2]["reason"] == "category_not_permitted" and rows[2]["outcome"] == "deny"
    assert "inf.durand" not in orjson.dumps(rows).decode()
    assert main(["audit", "who-accessed", "P0001", "--source", str(store), "--format", "json", "--allowed-only"]) == 0
    assert len(orjson.loads(capsys.readouterr().out)) == 2
    named = who_accessed(iter_store(store), "P0001", with_names=True, names={"dr.martin": "Dr Paul Martin"})
    assert [(r["user"], r["name"]) for r in named] == [("inf.durand", ""), ("dr.martin", "Dr Paul Martin"),
                                                      ("acc.robert", "")]
    bg = who_accessed(iter_store(store), "P0004")
    assert bg[0]["break_glass"] and bg[0]["purpose"] == "emergency"
    assert bg[0]["reason"].startswith("cardiac arrest")


def test_who_accessed_labels_are_truthful():
    """Reception reading the administrative file is not "the care team"; an emergency access says so."""
    records = [rec("2026-03-01T08:00:00.000Z", "acc.robert", "P1", category="administrative", care_team=None),
               rec("2026-03-01T09:00:00.000Z", "dr.x", "P1", break_glass=True, break_glass_reason="garde",
                   care_team=None)]
    rows = who_accessed(records, "P1")
    assert [r["purpose"] for r in rows] == ["no_care_team_needed", "emergency"]
    page = who_accessed_html("P1", rows, WHO_COLUMNS, Localizer("fr"), {"administrative": "Patient identity, "
                                                                      "address, insurance and admission data."})
    assert '<html lang="fr">' in page and "sans équipe de soins nécessaire" in page
    assert "accès d&#39;urgence (bris de glace)" in page and "Identité, adresse" in page
    assert "1 mars 2026, 09:00:00" in page  # local time (Europe/Paris), French format; not ISO UTC


def test_summaries(store, capsys):
    s = summarize(iter_store(store), Filter())
    assert s["refusals_by_reason"] == [{"reason": "not_in_care_team", "count": 1},
                                       {"reason": "category_not_permitted", "count": 1}] or \
        sorted(r["reason"] for r in s["refusals_by_reason"]) == ["category_not_permitted", "not_in_care_team"]
    assert s["top_users_by_distinct_patients"][0] == {"user": "dr.martin", "patients": 3}
    assert [b["patient"] for b in s["break_glass"]] == ["P0004"]
    assert [p["period"] for p in s["accesses_over_time"]] == ["2026-03-01", "2026-03-02", "2026-03-03"]
    assert main(["audit", "summary", "--source", str(store), "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert "# break-glass accesses" in out and "cardiac arrest" in out


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)


def test_html_report_is_self_contained_with_charts(store, tmp_path):
    out = tmp_path / "report.html"
    assert main(["audit", "report", "--source", str(store), "--out", str(out)]) == 0
    text = out.read_text()
    parser = _Collect()
    parser.feed(text)
    assert parser.urls == []  # no external asset, no script
    assert "script" not in parser.tags and parser.tags.count("svg") == 3
    start = 0
    for _ in range(3):  # every chart is well-formed SVG with one bar per item
        start = text.index("<svg", start)
        end = text.index("</svg>", start) + 6
        svg = ET.fromstring(text[start:end])
        assert svg.findall(".//{http://www.w3.org/2000/svg}rect")
        start = end
    assert "cardiac arrest" in text and "not_in_care_team" in text


def test_empty_period_still_renders(store):
    page = html_report(summarize(iter_store(store), Filter(since="2030-01-01T00:00:00.000Z")), l10n=EN)
    assert page.count("nothing in this period") == 3
    fr = html_report(summarize(iter_store(store), Filter(since="2030-01-01T00:00:00.000Z")))
    assert fr.count("rien sur cette période") == 3 and '<html lang="fr">' in fr


IMG = "<img src=x onerror=alert(1)>"


def _svgs(text):
    start = 0
    while (start := text.find("<svg", start)) >= 0:
        end = text.index("</svg>", start) + 6
        yield ET.fromstring(text[start:end])
        start = end


def test_html_report_shows_hostile_values_as_text():
    """Users, patients, reasons and event names come from the trail (or an export): text, never markup."""
    hostile = [rec("2026-03-01T08:00:00.000Z", IMG, IMG),
               rec("2026-03-01T09:00:00.000Z", IMG, "P0002", "deny", IMG),
               rec("2026-03-02T11:30:00.000Z", "dr.martin", IMG, break_glass=True, break_glass_reason=IMG),
               {"event": IMG, "time": "2026-03-02T12:00:00.000Z", "user": IMG, "outcome": "allow"}]
    summary = summarize(hostile, Filter())
    page = html_report(summary, title="Report " + IMG, l10n=EN)
    assert IMG not in page
    parser = _Collect()
    parser.feed(page)
    assert "img" not in parser.tags and "script" not in parser.tags and parser.urls == []
    assert page.count("&lt;img src=x onerror=alert(1)&gt;") >= 8  # title x2, event, chart labels, table cells
    labels = [t.text for svg in _svgs(page) for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert IMG in labels  # the top-users and refusals charts name the user and the reason, as text
    titles = [t.text for svg in _svgs(page) for t in svg.iter("{http://www.w3.org/2000/svg}title")]
    assert f"{IMG}: 1" in titles


def test_who_accessed_html_shows_hostile_values_as_text():
    records = [rec("2026-03-01T08:00:00.000Z", IMG, IMG, care_team=IMG)]
    rows = who_accessed(records, IMG, with_names=True, names={IMG: "Dr " + IMG})
    page = who_accessed_html(IMG, rows, WHO_COLUMNS_NAMED, EN)
    assert IMG not in page
    parser = _Collect()
    parser.feed(page)
    assert "img" not in parser.tags
    assert "<h1>Accesses to the record of patient &lt;img src=x onerror=alert(1)&gt;</h1>" in page
    assert "<td>Dr &lt;img src=x onerror=alert(1)&gt;</td>" in page and "1 line(s), one per request" in page


def test_report_templates_autoescape():
    env = report.TEMPLATES.env("en")
    assert env.autoescape is True and sorted(env.list_templates()) == ["charts.html", "report.html",
                                                                         "who_accessed.html"]
    with pytest.raises(jinja2.UndefinedError):
        env.get_template("who_accessed.html").render(patient="P1", rows=[{"time": "t"}], L=EN)  # columns missing


@pytest.mark.skipif(not shutil.which("chromium"), reason="chromium not installed")
def test_html_report_renders_charts_in_headless_chromium(store, tmp_path):
    out = tmp_path / "report.html"
    main(["audit", "report", "--source", str(store), "--out", str(out)])
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=900,1400", out.as_uri()],
                   capture_output=True, timeout=90, check=False)
    assert shot.exists(), "chromium produced no screenshot"
    width, height, rows, info = png.Reader(filename=str(shot)).asRGBA8()
    colors = {"green": 0, "red": 0, "blue": 0}
    for row in rows:
        row = bytes(row)
        for x in range(0, len(row), 4):
            px = row[x:x + 3]
            if px == bytes((0x2e, 0x7d, 0x32)):
                colors["green"] += 1
            elif px == bytes((0xc6, 0x28, 0x28)):
                colors["red"] += 1
            elif px == bytes((0x1b, 0x5f, 0xa8)):
                colors["blue"] += 1
    assert all(n > 200 for n in colors.values()), colors  # the three charts' bars are painted
