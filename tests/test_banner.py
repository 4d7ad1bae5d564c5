"""The session bar and no-store on forwarded answers (dpiguard/edge/banner.py), on real mitmproxy flows:
where the bar goes (top, bottom), what is never touched (JSON, fragments, pages without <body>,
public answers), compressed pages, that any problem leaves the page as it was, and that a bar reused
from the cache is the bar a rendering gives at that moment (Hypothesis, across clock changes)."""

from __future__ import annotations

import gzip

from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.test import tflow, tutils

from dpiguard.auth.sessions import Session
from dpiguard.decision.verdict import Verdict
from dpiguard.edge.banner import Banner
from dpiguard.edge.pages import Pages, PageSettings

PAGE = b"<!doctype html><html lang=fr><head><title>x</title></head><BODY class='a'><h1>Dossier</h1></body></html>"


def flow(body=PAGE, ctype="text/html; charset=utf-8", method="GET", headers=(), encoding=None, public=False):
    f = tflow.tflow(req=tutils.treq(method=method.encode(), path=b"/patients/P1"))
    for k, v in headers:
        f.request.headers[k] = v
    raw = gzip.compress(body) if encoding == "gzip" else body
    f.response = tutils.tresp(content=raw)
    f.response.headers["content-type"] = ctype
    f.response.headers["cache-control"] = "max-age=3600"
    if encoding:
        f.response.headers["content-encoding"] = encoding
    session = Session("h", "inf.durand", ("nurse",), 0, 1e12, 0, "csrf")
    verdict = Verdict(True, "public" if public else "allowed", public=public, session=None if public else session)
    Banner.note(f, verdict)
    return f


def banner(position="top", enabled=True):
    return Banner(Pages(PageSettings()), enabled=enabled, position=position, idle_timeout=1800)


def run(b, f):
    b.on_headers(f)
    b.on_response(f)
    return f.response


def test_top_after_body_tag_and_no_store():
    r = run(banner(), flow())
    body = r.content
    assert r.headers["cache-control"] == "no-store" and r.headers["pragma"] == "no-cache"
    at = body.index(b'<aside id="dpiguard-bar"')
    assert body[:at].endswith(b"<BODY class='a'>") and body.index(b"<h1>") > at
    assert body.isascii() and b"Connect&#233;&#183;e : inf.durand" in body
    assert b"<script" not in body[at:] and b"style=" not in body[at:]


def test_no_idle_warning_when_switched_off():
    b = Banner(Pages(PageSettings()), enabled=True, position="top", idle_timeout=1800, idle_warning=0)
    body = run(b, flow()).content
    assert b"dpiguard-bar" in body and b"dpiguard-idle" not in body
    assert b"dpiguard-idle" in run(banner(), flow()).content


def test_bottom_before_closing_body():
    body = run(banner("bottom"), flow()).content
    assert body.index(b"<h1>") < body.index(b'<aside id="dpiguard-bar"') < body.index(b"</body>")


def test_compressed_page_is_decoded_and_encoded_again():
    r = run(banner(), flow(encoding="gzip"))
    assert r.headers["content-encoding"] == "gzip" and b"dpiguard-bar" in gzip.decompress(r.raw_content)


def test_never_touched():
    for f in (flow(body=b'{"a":1}', ctype="application/json"),
              flow(body=b"<div>fragment</div>"),  # no <body>: a fragment
              flow(headers=[("sec-fetch-dest", "empty")]),  # fetched by a script
              flow(method="POST")):
        before = f.response.raw_content
        r = run(banner(), f)
        assert r.raw_content == before and r.headers["cache-control"] == "no-store"
    off = run(banner(enabled=False), flow())
    assert b"dpiguard-bar" not in off.content and off.headers["cache-control"] == "no-store"
    public = run(banner(), flow(public=True))  # a public asset: the DPI's own caching stays
    assert public.headers["cache-control"] == "max-age=3600" and b"dpiguard-bar" not in public.content


def test_a_failure_leaves_the_page_unchanged():
    b = banner()
    b.bar = lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
    r = run(b, flow())
    assert r.content == PAGE and r.headers["cache-control"] == "no-store"


def _fresh_bar(b, f, verdict, now):
    """The bar rendered directly, as before it was reused (the oracle of the cache)."""
    l10n = b.pages.localizer(f.request.headers)
    grant = verdict.break_glass
    html = b.pages.render_text("banner.html", l10n, position=b.position, user=verdict.session.user,
                               expires=l10n.clock(now + b.idle_timeout) if b.idle_warning else "", grant=grant,
                               until=l10n.clock(grant.end) if grant is not None else "")
    return html.encode("ascii", "xmlcharrefreplace")


# Around the autumn and spring clock changes in Paris (2026-10-25 01:00 UTC, 2027-03-28 01:00 UTC), and
# anywhere else: the reused bar must be the bar a rendering would give at that very second.
_DST = [1792890000.0, 1806195600.0]


@settings(max_examples=300, deadline=None)
@given(moments=st.lists(st.one_of(st.sampled_from(_DST).flatmap(lambda t: st.floats(t - 7200, t + 7200)),
                                  st.floats(1.7e9, 2.1e9)), min_size=1, max_size=8),
       users=st.lists(st.sampled_from(["inf.durand", "dr.martin", "sec.léa"]), min_size=1, max_size=8),
       langs=st.lists(st.sampled_from(["fr", "en", "de", "en-GB,fr;q=0.5"]), min_size=1, max_size=8),
       grant_end=st.none() | st.floats(1.7e9, 2.1e9), warning=st.sampled_from([0, 120]))
def test_reused_bar_is_the_bar_a_rendering_gives(moments, users, langs, grant_end, warning):
    from dpiguard.careteam.breakglass import Grant

    b = Banner(Pages(PageSettings()), enabled=True, position="top", idle_timeout=1800, idle_warning=warning)
    grant = None if grant_end is None else Grant("G1", "x", "P1", "urgence", "", ("biology",), ("read",), 0, grant_end)
    for i, now in enumerate(moments * 2):  # every moment twice: the second bar comes from the cache
        f = flow(headers=[("accept-language", langs[i % len(langs)])])
        session = Session("h", users[i % len(users)], ("nurse",), 0, 1e12, 0, "csrf")
        verdict = Verdict(True, "allowed", session=session, break_glass=grant)
        assert b.bar(f, verdict, now) == _fresh_bar(b, f, verdict, now)
