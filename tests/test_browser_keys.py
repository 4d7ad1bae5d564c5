"""Enrolment, recovery codes and security keys in a real browser: Debian's Chromium driven by Playwright,
its **virtual authenticator** (DevTools WebAuthn domain) as the security key, through the real proxy
(``tests/stack.py``). The proxy is browsed as ``http://localhost:PORT``: a WebAuthn RP id must be a
domain, and localhost is a secure context. Pages are checked like the others (axe 0 violations, no
horizontal scrolling at 375 px and 200 % zoom). Helpers come from tests/test_browser.py."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pyotp
import pytest

from dpiguard.audit.chain import read_records

from .stack import ROOT, build_stack
from .test_browser import SCREENS, WIDTHS, axe, browser, fits, new_page, shot  # noqa: F401  (browser: a fixture)

pytestmark = pytest.mark.timeout(600)

PASSWORD = "Cle-Securite-2026"
PHRASE = "une phrase longue pour mon compte hopital"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, browser):  # noqa: F811
    s = build_stack(tmp_path_factory.mktemp("keys"), config_extra={
        "enrolment": {"webauthn_rp_id": "localhost", "link_ttl": 3600},
        "ui": {"helpdesk": "Assistance informatique : poste 4242 (24 h/24)"}})
    s.start_proxy("a")
    SCREENS.mkdir(parents=True, exist_ok=True)
    yield s
    s.close()


@pytest.fixture(scope="module")
def url(stack):
    return f"http://localhost:{stack.proxies[0].port}"


def cli(stack, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "dpiguard.cli", "users", *args, "--config", str(stack.config_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    return out.stdout


def link_of(output: str, url: str) -> str:
    return url + re.search(r"(/_dpiguard/enrol\?t=[A-Za-z0-9_-]{43})", output).group(1)


def records(stack, **match):
    return [r for r in read_records(stack.audit_path) if all(r.get(k) == v for k, v in match.items())]


def virtual_key(page):
    cdp = page.context.new_cdp_session(page)
    cdp.send("WebAuthn.enable")
    auth_id = cdp.send("WebAuthn.addVirtualAuthenticator", {"options": {
        "protocol": "ctap2", "transport": "usb", "hasResidentKey": True, "hasUserVerification": True,
        "isUserVerified": True}})["authenticatorId"]
    return cdp, auth_id


def check_widths(browser, target: str, name: str) -> None:  # noqa: F811
    for width in WIDTHS:
        page = new_page(browser, width)
        page.goto(target)
        assert axe(page) == [], f"{name} at {width}"
        assert fits(page), f"{name} scrolls horizontally at {width}"
        shot(page, f"{name}-{width}")
        page.context.close()


def set_password(page, link: str, password: str) -> None:
    page.goto(link)
    page.fill("#np", password)
    page.fill("#np2", password)
    page.click("form button[type=submit]")
    page.wait_for_load_state()


def logged_in_as(page, url) -> str | None:
    r = page.request.get(url + "/_dpiguard/api/session")
    return r.json().get("user") if r.ok else None


def password_step(page, url, login: str, password: str) -> None:
    page.goto(url + "/_dpiguard/login")
    page.fill("#u", login)
    page.fill("#p", password)
    page.click("text=Se connecter avec une clé de sécurité")
    page.wait_for_load_state()


def key_login(page, url, login: str, password: str) -> None:
    password_step(page, url, login, password)
    assert page.title().startswith("Clé de sécurité"), page.inner_text("main")
    with page.expect_navigation():
        page.click("text=Utiliser ma clé")
    page.wait_for_load_state()


def code_login(page, url, login: str, password: str, code: str) -> None:
    page.goto(url + "/_dpiguard/login")
    page.fill("#u", login)
    page.fill("#p", password)
    page.fill("#t", code)
    page.click("form button[type=submit] >> nth=0")
    page.wait_for_load_state()


def test_enrol_with_a_key_log_in_with_it_recovery_codes_clone_and_helpdesk_reset(browser, stack, url):  # noqa: F811
    out = cli(stack, "invite", "inf.cle", "--role", "nurse", "--name", "Inf Clé", "--by", "helpdesk.test")
    link = link_of(out, url)
    assert records(stack, action="user_invite", user="inf.cle")

    # Step 1: the rule is shown, a weak password refused (the link still works), a good one accepted.
    check_widths(browser, link, "enrol-password")
    page = new_page(browser)
    cdp, auth_id = virtual_key(page)
    page.goto(link)
    assert "12 caractères" in page.inner_text("#np-rule") and "CNIL" in page.inner_text("#np-rule")
    set_password(page, link, "court")
    assert page.locator("[role=alert]").is_visible() and "trop faible" in page.inner_text("[role=alert]")
    assert records(stack, event="enrol_password", outcome="deny", user="inf.cle")
    set_password(page, link, PASSWORD)
    assert page.url.endswith("/_dpiguard/enrol/factor")
    assert axe(page) == [] and fits(page)
    shot(page, "enrol-factor-desktop")

    # The link served once.
    other = new_page(browser)
    other.goto(link)
    assert "Lien non valable" in other.title() or "expiré" in other.inner_text("main")
    other.context.close()

    # Step 2: a security key (the virtual authenticator), then step 3: the recovery codes, once.
    page.fill("#kn", "clé bleue")
    with page.expect_navigation():
        page.click("text=Enregistrer la clé de sécurité")
    page.wait_for_load_state()
    assert page.url.endswith("/_dpiguard/enrol/codes"), page.inner_text("main")
    codes = [c.strip() for c in page.locator("ul.recovery code").all_inner_texts()]
    assert len(codes) == 10 and all(re.fullmatch(r"[a-z2-9]{4}-[a-z2-9]{4}-[a-z2-9]{4}", c) for c in codes)
    assert axe(page) == [] and fits(page)
    shot(page, "enrol-codes-desktop")
    page.goto(url + "/_dpiguard/enrol/codes")
    assert "ul.recovery" not in page.content() and page.locator("ul.recovery").count() == 0
    assert "clé bleue" in cli(stack, "keys", "inf.cle")

    # Login: password, then the key.
    key_login(page, url, "inf.cle", PASSWORD)
    assert logged_in_as(page, url) == "inf.cle"
    assert [r for r in records(stack, event="login_success", user="inf.cle") if "security_key" in (r["detail"] or "")]

    # A recovery code instead of the TOTP code: once.
    rc = new_page(browser, "phone")
    code_login(rc, url, "inf.cle", PASSWORD, codes[0])
    assert logged_in_as(rc, url) == "inf.cle"
    assert records(stack, event="login_success", user="inf.cle", detail="recovery_code")
    rc.context.clear_cookies()
    code_login(rc, url, "inf.cle", PASSWORD, codes[0])
    assert logged_in_as(rc, url) is None and "incorrect" in rc.inner_text("main")

    # New codes from the user's own page: the old ones stop working.
    page.goto(url + "/_dpiguard/account")
    assert "clé bleue" in page.inner_text("main") and "Codes de secours non utilisés : 9" in page.inner_text("main")
    assert axe(page) == [] and fits(page)
    page.fill("#ap2", "not-my-password-1")
    page.click("text=Créer de nouveaux codes de secours")
    page.wait_for_load_state()
    assert "Le mot de passe est incorrect." in page.inner_text("[role=alert]")  # a session alone is not enough
    page.fill("#ap2", PASSWORD)
    page.click("text=Créer de nouveaux codes de secours")
    page.wait_for_load_state()
    new_codes = [c.strip() for c in page.locator("ul.recovery code").all_inner_texts()]
    assert len(new_codes) == 10 and not set(new_codes) & set(codes)
    assert records(stack, event="recovery_codes_regenerated", user="inf.cle")
    code_login(rc, url, "inf.cle", PASSWORD, codes[1])
    assert logged_in_as(rc, url) is None
    assert "verrouillé" in rc.inner_text("main")  # the third failure in a row (reused code, password, old code)
    rc.context.close()
    cli(stack, "unlock", "inf.cle")

    # A cloned key: the same private key with a counter that went back is refused and traced.
    cred = cdp.send("WebAuthn.getCredentials", {"authenticatorId": auth_id})["credentials"][0]
    assert cred["signCount"] >= 1
    cdp.send("WebAuthn.removeCredential", {"authenticatorId": auth_id, "credentialId": cred["credentialId"]})
    cdp.send("WebAuthn.addCredential", {"authenticatorId": auth_id, "credential": {**cred, "signCount": 0}})
    page.context.clear_cookies()
    key_login(page, url, "inf.cle", PASSWORD)
    assert logged_in_as(page, url) is None
    clone = records(stack, event="security_key_clone", user="inf.cle")
    assert clone and clone[-1]["reason"] == "sign_count_regression"
    cli(stack, "unlock", "inf.cle")

    # Lost key and codes: the helpdesk resets the factors after an identity check.
    with_session = new_page(browser)
    code_login(with_session, url, "inf.cle", PASSWORD, new_codes[1])
    assert logged_in_as(with_session, url) == "inf.cle"
    out = cli(stack, "reset-factors", "inf.cle", "--checked-by", "helpdesk.dupont",
              "--evidence", "carte professionnelle vue au guichet")
    reset = records(stack, action="user_reset_factors", user="inf.cle")
    assert reset and reset[-1]["checked_by"] == "helpdesk.dupont" and reset[-1]["keys_removed"] == 1
    assert logged_in_as(with_session, url) is None  # live sessions ended
    with_session.context.close()
    new_link = link_of(out, url)
    old = new_page(browser)
    code_login(old, url, "inf.cle", PASSWORD, new_codes[2])  # old recovery codes are dead
    assert logged_in_as(old, url) is None
    password_step(old, url, "inf.cle", PASSWORD)  # the old key too: no key, a failed login
    assert old.title().startswith("Se connecter") and "incorrect" in old.inner_text("main")
    old.context.close()
    cli(stack, "unlock", "inf.cle")

    # Re-enrolment through the new link, with the authenticator application this time.
    page.context.clear_cookies()
    set_password(page, new_link, PHRASE)  # a long sentence: the CNIL entropy rule
    assert page.url.endswith("/_dpiguard/enrol/factor")
    secret = page.inner_text("main code").replace(" ", "")
    page.fill("#ec", "000000" if pyotp.TOTP(secret).now() != "000000" else "111111")
    page.click("text=Valider le code")
    page.wait_for_load_state()
    assert page.url.endswith("/_dpiguard/enrol/totp") and "QR code" in page.inner_text("[role=alert]")
    confirmed = pyotp.TOTP(secret).now()
    page.fill("#ec", confirmed)
    page.click("text=Valider le code")
    page.wait_for_load_state()
    assert page.url.endswith("/_dpiguard/enrol/codes")
    assert page.locator("ul.recovery code").count() == 10
    page.context.clear_cookies()
    code_login(page, url, "inf.cle", PHRASE, confirmed)  # the confirming code cannot be replayed to log in
    assert logged_in_as(page, url) is None
    step = int(time.time()) // 30
    while int(time.time()) // 30 == step:  # the next code
        page.wait_for_timeout(500)
    code_login(page, url, "inf.cle", PHRASE, pyotp.TOTP(secret).now())
    assert logged_in_as(page, url) == "inf.cle"
    page.context.close()


def test_expired_link_is_refused(browser, stack, url):  # noqa: F811
    out = cli(stack, "invite", "inf.tard", "--role", "nurse", "--ttl", "1")
    link = link_of(out, url)
    page = new_page(browser, "zoom200")
    page.wait_for_timeout(2200)
    page.goto(link)
    assert "Lien non valable" in page.title()
    assert axe(page) == [] and fits(page)
    assert records(stack, event="enrol_link", outcome="deny")
    page.context.close()


def test_account_page_lists_and_removes_a_key(browser, stack, url):  # noqa: F811
    link = link_of(cli(stack, "invite", "aide.cle", "--role", "nurse"), url)
    page = new_page(browser)
    virtual_key(page)
    set_password(page, link, PASSWORD)
    page.fill("#kn", "clé du service")
    with page.expect_navigation():
        page.click("text=Enregistrer la clé de sécurité")
    key_login(page, url, "aide.cle", PASSWORD)
    assert logged_in_as(page, url) == "aide.cle"
    # Emergency access (bris de glace) with the key as the re-asked second factor.
    page.goto(url + "/patients/P0002/notes")
    assert page.locator("#bg-text").count() == 1, page.inner_text("main")
    page.locator("input[name=reason]").first.check()
    page.fill("#bg-text", "Patient en détresse respiratoire, médecin absent")
    page.click("text=Ouvrir avec ma clé de sécurité")
    page.wait_for_load_state()
    assert axe(page) == [] and fits(page)
    with page.expect_navigation():
        page.click("text=Utiliser ma clé de sécurité")
    page.wait_for_load_state()
    granted = records(stack, event="break_glass", user="aide.cle")
    assert granted and granted[-1]["step_up"] == "security_key" and granted[-1]["patient"] == "P0002"
    assert "P0002" in page.inner_text("[role=status]") and axe(page) == []
    page.goto(url + "/patients/P0002/notes")
    assert page.locator("#bg-text").count() == 0  # the record is open now
    state = page.context.storage_state()
    for width in WIDTHS:
        other = new_page(browser, width, state=state)
        other.goto(url + "/_dpiguard/account")
        assert axe(other) == [] and fits(other), width
        shot(other, f"account-{width}")
        other.context.close()
    page.goto(url + "/_dpiguard/logout")
    page.click("text=Mes clés de sécurité et codes de secours")
    page.wait_for_load_state()
    with page.expect_navigation():
        page.click("text=Retirer")
    assert "La clé de sécurité a été retirée." in page.inner_text("main")
    assert "Aucune clé de sécurité" in page.inner_text("main")
    assert records(stack, event="security_key_removed", user="aide.cle", outcome="allow")
    page.context.clear_cookies()
    password_step(page, url, "aide.cle", PASSWORD)  # no key left: a failed login, traced
    assert logged_in_as(page, url) is None
    assert records(stack, event="login_failure", user="aide.cle", detail="no_security_key")
    page.context.close()
