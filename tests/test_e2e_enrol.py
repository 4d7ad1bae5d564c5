"""Enrolment through the real proxy, over HTTP, with two instances sharing one Redis: each step of an
enrolment may land on either instance; a link serves once across both; a recovery code logs in once
across both; the key pages alone allow a same-origin script. (The security key itself is exercised
in real Chromium: tests/test_browser_keys.py.)"""

from __future__ import annotations

import html
import re
import subprocess
import sys

import httpx
import pyotp
import pytest

from dpiguard.audit.chain import read_records

from .stack import ROOT, build_stack

pytestmark = pytest.mark.timeout(240)

PASSWORD = "Enrolement-Test-77"
FORM = {"accept": "text/html", "sec-fetch-site": "same-origin"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = build_stack(tmp_path_factory.mktemp("enrol"), config_extra={
        "enrolment": {"webauthn_rp_id": "dpi.example.test", "public_url": "https://dpi.example.test"}})
    s.start_proxy("a")
    s.start_proxy("b")
    yield s
    s.close()


def cli(stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpiguard.cli", "users", *args, "--config", str(stack.config_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def token_of(out: str) -> str:
    return re.search(r"https://dpi\.example\.test/_dpiguard/enrol\?t=([A-Za-z0-9_-]{43})", out).group(1)


def records(stack, **match):
    return [r for r in read_records(stack.audit_path) if all(r.get(k) == v for k, v in match.items())]


def enrol_with_totp(stack, token: str) -> tuple[str, list[str]]:
    a, b = (httpx.Client(base_url=p.url, timeout=10) for p in stack.proxies)
    assert a.get("/_dpiguard/enrol", params={"t": token}, headers=FORM).status_code == 200
    weak = b.post("/_dpiguard/enrol", data={"t": token, "password": "abcdefghijkl", "password2": "abcdefghijkl"},
                  headers=FORM)
    assert weak.status_code == 400 and "trop faible" in html.unescape(weak.text)
    r = b.post("/_dpiguard/enrol", data={"t": token, "password": PASSWORD, "password2": PASSWORD}, headers=FORM)
    assert r.status_code == 303 and r.headers["location"] == "/_dpiguard/enrol/factor"
    a.cookies = b.cookies  # the same browser, whichever instance answers
    page = a.get("/_dpiguard/enrol/factor", headers=FORM)
    assert page.status_code == 200 and "data:image/png;base64," in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    secret = re.search(r"<code>([A-Z2-7 ]+)</code>", page.text).group(1).replace(" ", "")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    bad = b.post("/_dpiguard/enrol/totp", data={"csrf": csrf, "code": "12345"}, headers=FORM)
    assert bad.status_code == 400
    forged = b.post("/_dpiguard/enrol/totp", data={"csrf": "x" * 32, "code": pyotp.TOTP(secret).now()}, headers=FORM)
    assert forged.status_code == 403
    ok = b.post("/_dpiguard/enrol/totp", data={"csrf": csrf, "code": pyotp.TOTP(secret).now()}, headers=FORM)
    assert ok.status_code == 303 and ok.headers["location"] == "/_dpiguard/enrol/codes"
    codes_page = a.get("/_dpiguard/enrol/codes", headers=FORM)
    codes = re.findall(r"<li><code>([a-z2-9]{4}-[a-z2-9]{4}-[a-z2-9]{4})</code></li>", codes_page.text)
    assert len(codes) == 10
    again = b.get("/_dpiguard/enrol/codes", headers=FORM)  # shown once, on any instance
    assert again.status_code == 401 and not re.search(r"[a-z2-9]{4}-[a-z2-9]{4}-[a-z2-9]{4}", again.text)
    return secret, codes


def test_enrolment_across_instances_link_once_recovery_code_once(stack):
    out = cli(stack, "invite", "sf.martin", "--role", "nurse", "--name", "SF Martin")
    assert out.returncode == 0, out.stderr
    token = token_of(out.stdout)
    secret, codes = enrol_with_totp(stack, token)
    for p in stack.proxies:  # used: refused on both instances, and traced
        r = httpx.get(p.url + "/_dpiguard/enrol", params={"t": token}, headers=FORM)
        assert r.status_code == 410 and "Lien non valable" in r.text
    assert records(stack, event="enrol_link", outcome="deny")
    assert [r["event"] for r in records(stack, user="sf.martin") if r["event"].startswith("enrol_")][-1] == \
        "enrol_complete"

    a, b = stack.proxies
    login = {"username": "sf.martin", "password": PASSWORD, "totp": codes[3]}
    assert httpx.post(a.url + "/_dpiguard/api/login", json=login).status_code == 200
    assert httpx.post(b.url + "/_dpiguard/api/login", json=login).status_code == 401
    assert len(records(stack, event="login_success", user="sf.martin", detail="recovery_code")) == 1
    totp = {**login, "totp": pyotp.TOTP(secret).now()}
    assert httpx.post(b.url + "/_dpiguard/api/login", json=totp).status_code in (200, 401)  # 401: the confirming step


def test_login_page_allows_no_script_and_reset_needs_an_identity_check(stack):
    page = httpx.get(stack.proxies[0].url + "/_dpiguard/login", headers=FORM)
    assert "script" not in page.headers["content-security-policy"] and "<script" not in page.text
    assert "clé de sécurité" in page.text  # keys are on: the second button is offered
    out = cli(stack, "reset-factors", "sf.martin", "--checked-by", "", "--evidence", "x")
    assert out.returncode != 0 and "--checked-by" in out.stderr
    missing = cli(stack, "reset-factors", "sf.martin")
    assert missing.returncode != 0
    assert not records(stack, action="user_reset_factors")
