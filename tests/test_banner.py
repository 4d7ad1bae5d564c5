"""The session bar and no-store on forwarded answers (dpiguard/edge/banner.py), on real mitmproxy flows:
where the bar goes (top, bottom), what is never touched (JSON, fragments, pages without <body>,
public answers), compressed pages, and that any problem leaves the page as it was."""

from __future__ import annotations

import gzip

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
