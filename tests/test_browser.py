"""dpiguard's pages in a real browser: Debian's Chromium driven by Playwright (no browser download),
axe-core injected into every page (0 violations), keyboard-only use, 375 px and 200 % zoom without
horizontal scrolling, touch targets of 44 px, Back after logout, the idle warning of the session bar.

Screenshots are written to tests/output/screens/ (git-ignored) for a reviewer to look at.
Needs ``chromium`` (apt-get) and ``tests/browser/node_modules/axe-core`` (npm ci --prefix tests/browser):
``.ci/run`` installs both. Outside CI a missing browser skips these tests; in CI (``CI`` set) it fails them.
"""

from __future__ import annotations

import os
import re
import shutil
import time

import pytest

from dpiguard.demo.runner import DEMO_PASSWORD

from .stack import ROOT, build_stack

pytestmark = pytest.mark.timeout(600)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
AXE = ROOT / "tests" / "browser" / "node_modules" / "axe-core" / "axe.min.js"
SCREENS = ROOT / "tests" / "output" / "screens"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
WIDTHS = {"desktop": (1280, 1), "phone": (375, 1), "zoom200": (640, 2)}  # 200 % of 1280 px = 640 CSS px
IDLE, WARN = 300, 297  # the idle warning shows 3 s after a DPI page loaded


def _missing() -> str:
    if not CHROMIUM:
        return "chromium not installed (apt-get install chromium)"
    if not AXE.is_file():
        return "axe-core not installed (npm ci --prefix tests/browser)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright not installed"
    return ""


@pytest.fixture(scope="module")
def browser():
    missing = _missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests cannot run in CI: {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)  # a fresh profile each launch
        yield b
        b.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, browser):
    s = build_stack(tmp_path_factory.mktemp("browser"), config_extra={
        "sessions": {"idle_timeout": IDLE, "touch_interval": 5},
        "ui": {"idle_warning_seconds": WARN, "helpdesk": "Assistance informatique : poste 4242 (24 h/24)"}})
    s.start_proxy("a")
    SCREENS.mkdir(parents=True, exist_ok=True)
    yield s
    s.close()


@pytest.fixture(scope="module")
def url(stack):
    return stack.proxies[0].url


class Login:
    """The codes used to log in, so a test can type the same one again (break-glass step-up), and each
    user's logged-in browser state (cookies), so pages at several widths need one login (one TOTP step)."""

    def __init__(self, stack):
        self.stack = stack
        self.codes: dict[str, str] = {}
        self.states: dict[str, dict] = {}

    def code(self, user: str) -> str:
        self.codes[user] = self.stack.totp(user)
        return self.codes[user]


@pytest.fixture(scope="module")
def logins(stack):
    return Login(stack)


def new_page(browser, width: str = "desktop", lang: str = "fr-FR", state: dict | None = None):
    w, scale = WIDTHS[width]
    # bypass_csp: axe is injected as a script, which the pages' CSP (rightly) forbids.
    ctx = browser.new_context(viewport={"width": w, "height": 900}, device_scale_factor=scale, locale=lang,
                              bypass_csp=True, extra_http_headers={"Accept-Language": lang}, storage_state=state)
    return ctx.new_page()


def session_state(browser, url, logins, user: str) -> dict:
    if user not in logins.states:
        page = new_page(browser)
        log_in(page, url, logins, user)
        logins.states[user] = page.context.storage_state()
        page.context.close()
    return logins.states[user]


def log_in(page, url, logins, user, next_target="/"):
    page.goto(f"{url}/_dpiguard/login?next={next_target}")
    page.fill("#u", user)
    page.fill("#p", DEMO_PASSWORD)
    page.fill("#t", logins.code(user))
    page.click("form button[type=submit]")
    page.wait_for_load_state()


def axe(page, context: str | None = None) -> list[str]:
    """axe-core's violations on the page (or inside ``context``), as 'rule: targets' lines."""
    page.add_script_tag(path=str(AXE))
    result = page.evaluate("async (ctx) => (await axe.run(ctx || document)).violations.map("
                           "v => v.id + ': ' + v.nodes.map(n => n.target.join(' ')).join(', '))", context)
    return result


def fits(page) -> bool:
    """No horizontal scrolling."""
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")


def shot(page, name: str) -> None:
    page.screenshot(path=str(SCREENS / f"{name}.png"), full_page=True)


def check_page(browser, url, logins, name: str, target: str, user: str | None = None, context: str | None = None,
               lang: str = "fr-FR", prepare=None) -> None:
    """One page at every width: 0 axe violations, no horizontal scrolling, a screenshot each."""
    state = session_state(browser, url, logins, user) if user else None
    for width in WIDTHS:
        page = new_page(browser, width, lang, state)
        page.goto(url + target)
        if prepare:
            prepare(page)
        assert axe(page, context) == [], f"{name} at {width}"
        assert fits(page), f"{name} scrolls horizontally at {width}"
        shot(page, f"{name}-{width}")
        page.context.close()


# -- pages for everyone ---------------------------------------------------------------------------

def test_login_page(browser, url, logins):
    check_page(browser, url, logins, "login-fr", "/_dpiguard/login")
    check_page(browser, url, logins, "login-en", "/_dpiguard/login", lang="en-GB")
    page = new_page(browser)
    page.goto(url + "/_dpiguard/login")
    assert page.get_attribute("html", "lang") == "fr" and page.title().startswith("Se connecter")


def test_login_errors_and_lockout_warning(browser, url, logins):
    page = new_page(browser, "phone")
    page.goto(url + "/_dpiguard/login")
    for _ in range(2):
        page.fill("#u", "sec.morin")
        page.fill("#p", "Wrong-password-123")
        page.fill("#t", "000000")
        page.click("form button[type=submit]")
        page.wait_for_load_state()
    text = page.inner_text("main")
    assert "Attention : encore un échec et le compte sera verrouillé pendant 5 minutes" in text
    assert axe(page) == [] and fits(page)
    shot(page, "login-last-attempt-phone")
    page.fill("#u", "sec.morin")
    page.fill("#p", "Wrong-password-123")
    page.fill("#t", "000000")
    page.click("form button[type=submit]")
    page.wait_for_load_state()
    assert re.search(r"verrouillé jusqu'à \d\d:\d\d", page.inner_text("main"))
    assert "poste 4242" in page.inner_text("main")
    shot(page, "login-locked-phone")
    page.context.close()


def test_keyboard_only_login_and_visible_focus(browser, url, logins, stack):
    page = new_page(browser)
    page.goto(url + "/_dpiguard/login?next=/patients/P0001")
    # The user name field has the focus. Chromium applies `autofocus` at its next rendering update, which
    # can come after the load event on a loaded machine: wait for it (bounded), do not read it at once.
    page.wait_for_function("document.activeElement && document.activeElement.id === 'u'", timeout=5000)
    page.keyboard.type("dr.martin")
    order = []
    for _ in range(3):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
    assert order == ["p", "t", "BUTTON"]
    style = page.evaluate("(() => { const s = getComputedStyle(document.activeElement); "
                          "return [s.outlineStyle, parseFloat(s.outlineWidth)]; })()")
    assert style[0] != "none" and style[1] >= 2  # the focus is visible
    page.keyboard.press("Shift+Tab")
    page.keyboard.type(logins.code("dr.martin"))
    page.keyboard.press("Shift+Tab")
    page.keyboard.type(DEMO_PASSWORD)
    with page.expect_navigation():  # a key press does not wait for the page it submits
        page.keyboard.press("Enter")  # submits the form
    page.wait_for_load_state()
    assert page.url.endswith("/patients/P0001"), page.url
    shot(page, "keyboard-login-done")
    page.context.close()


def test_refusal_page_and_breakglass_with_the_login_code(browser, url, logins, stack):
    """3 a.m.: refused, she opens emergency access at once with the code she just logged in with."""
    check_page(browser, url, logins, "refusal-breakglass", "/patients/P0002/biology", user="inf.robin")
    user = "inf.legrand"  # ONCO; P0002 stays in PNEUMO
    page = new_page(browser, "phone")
    started = time.monotonic()
    log_in(page, url, logins, user, "/patients/P0002/notes")
    main = page.inner_text("main")
    assert "Accès refusé" in main and "dossier P0002" in main and "Notes médicales et infirmières" in main
    assert "Connecté·e en tant que" in main and "poste 4242" in page.inner_text("body")
    for box in page.query_selector_all(".choice, button, .links a"):  # touch targets at 375 px
        assert box.bounding_box()["height"] >= 44, box.inner_text()
    # Keyboard only: the reason with the arrows, the justification, the same code as the login.
    page.focus("#bg-r-1")
    page.keyboard.press("Space")
    page.keyboard.press("ArrowDown")
    assert page.is_checked("#bg-r-2")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "bg-text"
    page.keyboard.type("Patient inconscient aux urgences, équipe injoignable")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "bg-totp"
    page.keyboard.type(logins.codes[user])  # no wait for the next code
    with page.expect_navigation():  # a key press does not wait for the page it submits
        page.keyboard.press("Enter")
    page.wait_for_load_state()
    elapsed = time.monotonic() - started
    text = page.inner_text("main")
    assert "Accès d'urgence ouvert" in text and re.search(r"jusqu'à \d\d:\d\d", text), text
    assert axe(page) == [] and fits(page)
    shot(page, "breakglass-granted-phone")
    print(f"break-glass from login to grant: {elapsed:.1f} s of browser time (no TOTP step waited)")
    page.click("text=Ouvrir le dossier")
    page.wait_for_load_state()
    assert page.url.endswith("/patients/P0002/notes")
    bar = page.inner_text("#dpiguard-bar")
    assert "Accès d'urgence jusqu'à" in bar
    shot(page, "dpi-page-under-breakglass-phone")
    page.click("#dpiguard-bar >> text=Y mettre fin")
    page.wait_for_load_state()
    assert axe(page) == [] and fits(page)
    shot(page, "breakglass-end-confirm-phone")
    page.click("main button[type=submit]")
    page.wait_for_load_state()
    assert "Accès d'urgence terminé" in page.inner_text("main")
    page.goto(url + "/patients/P0002/notes")
    assert "Accès refusé" in page.inner_text("main")
    page.context.close()


def test_dpi_page_bar_logout_and_back_shows_nothing(browser, url, logins):
    page = new_page(browser)
    log_in(page, url, logins, "dr.gaillard", "/patients/P0001/notes")
    notes = page.inner_text("main")
    assert page.url.endswith("/patients/P0001/notes") and "Notes cliniques" in notes
    assert axe(page, "#dpiguard-bar") == []  # the bar dpiguard adds (the demo DPI's own markup is not ours)
    idle = page.locator(".dpiguard-idle")
    assert idle.evaluate("e => getComputedStyle(e).visibility") == "hidden"
    page.wait_for_timeout((IDLE - WARN + 1) * 1000)
    assert idle.evaluate("e => getComputedStyle(e).visibility") == "visible"  # the idle warning, no script
    shot(page, "dpi-page-bar-idle-warning")
    for width in ("phone", "zoom200"):
        p2 = new_page(browser, width, state=page.context.storage_state())
        p2.goto(url + "/patients/P0001/notes")
        assert p2.query_selector("#dpiguard-bar") is not None
        for link in p2.query_selector_all("#dpiguard-bar a"):
            assert link.bounding_box()["height"] >= 44
        shot(p2, f"dpi-page-bar-{width}")
        p2.context.close()
    page.click("#dpiguard-bar >> text=Se déconnecter")
    page.wait_for_load_state()
    assert page.url.endswith("/_dpiguard/logout")
    assert axe(page) == [] and fits(page)
    shot(page, "logout-confirm")
    page.click("main button[name=then][value=logged_out]")
    page.wait_for_load_state()
    assert "Vous êtes déconnecté·e" in page.inner_text("main")
    for _ in range(2):  # Back, twice: the logout page, then the notes
        page.go_back()
        page.wait_for_load_state()
        assert "Notes cliniques" not in page.inner_text("body"), page.url
        assert "/_dpiguard/login" in page.url
    shot(page, "back-after-logout")
    page.context.close()


def test_other_portal_pages(browser, url, logins):
    check_page(browser, url, logins, "logout-page", "/_dpiguard/logout?switch=1", user="dr.dupont")
    check_page(browser, url, logins, "not-found", "/_dpiguard/nowhere", lang="en-GB")
    check_page(browser, url, logins, "login-session-expired", "/_dpiguard/login?reason=session_expired&resume=abc")


# -- the console ----------------------------------------------------------------------------------

CONSOLE_PAGES = [
    ("console-home", "/_dpiguard/console", "dpo.marchand"),
    ("console-traces", "/_dpiguard/console/traces?patient=P0002", "rssi.garnier"),
    ("console-patient", "/_dpiguard/console/patient?patient=P0002", "dpo.marchand"),
    ("console-breakglass", "/_dpiguard/console/breakglass?all=1", "rssi.garnier"),
    ("console-alerts", "/_dpiguard/console/alerts", "dpo.marchand"),
    ("console-privacy", "/_dpiguard/console/privacy", "dpo.marchand"),
    ("console-stats", "/_dpiguard/console/stats", "rssi.garnier"),
    ("console-helpdesk", "/_dpiguard/console/helpdesk?login=inf.durand", "support.blanc"),
]


def test_console_pages(browser, url, logins, stack):
    stack.client(stack.proxies[0], "inf.denis").get("/api/patients/P0002/biology")  # a refusal to explain
    from dpiguard.privacy.alerts import Alert, AlertQueue
    from dpiguard.services import redis_client

    AlertQueue(redis_client(stack.config), stack.config.redis.prefix).create(Alert(  # a privacy alert to review
        "b1b2c3d4e5f6a7b8c9d0", "same_address", "inf.denis", "P0002", time.time() - 120,
        {"street": "rue des Lilas"}, {"request_id": "0123456789abcdef", "roles": ["nurse"], "units": ["CARDIO"]}))
    for name, target, user in CONSOLE_PAGES:
        check_page(browser, url, logins, name, target, user=user)
    page = new_page(browser, state=session_state(browser, url, logins, "rssi.garnier"))
    page.goto(url + "/_dpiguard/console/traces?outcome=deny&user=inf.denis")
    page.click("td a[href*='explain']")
    page.wait_for_load_state()
    assert "not_in_care_team" in page.inner_text("main") and "policy.csv" in page.inner_text("main")
    assert axe(page) == [] and fits(page)
    shot(page, "console-explain-desktop")
    page.context.close()
