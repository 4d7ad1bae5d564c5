"""The OpenID Connect pages in real Chromium (issue 15 point 2 with issue 16's bar): the login page with
the identity provider's button and dpiguard's authenticator-code step after an IdP login without a
second factor, at every width (desktop, 375 px, 200 % zoom), 0 axe violations, no horizontal scrolling,
keyboard only. The provider is the real ``oidc-provider`` process of tests/test_oidc.py (its ``env``
fixture: a second provider and stack for this module); the browser is tests/test_browser.py's.
"""

from __future__ import annotations

import pytest

from tests.test_browser import WIDTHS, axe, browser, fits, new_page, shot  # noqa: F401  (browser: fixture)
from tests.test_oidc import NURSE, env, wait_records  # noqa: F401  (env: fixture)

pytestmark = pytest.mark.timeout(600)


def _to_the_code_step(page, proxy) -> None:
    """Login page → the IdP's button (keyboard) → the provider's form → back at dpiguard's code step."""
    page.goto(proxy.url + "/_dpiguard/login?next=/patients/P0001")
    page.focus("a.button[href^='/_dpiguard/oidc/login']")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    page.wait_for_selector("input[name=login]")  # the provider's own (test) login form
    page.fill("input[name=login]", NURSE)
    page.click("button")
    page.wait_for_selector("form[action='/_dpiguard/oidc/totp'] #t", timeout=20000)  # the IdP's answer


def test_idp_button_and_code_step_at_every_width_keyboard_only(browser, env):  # noqa: F811
    gen, stack = env["gen"], env["stack"]
    for width in WIDTHS:
        page = new_page(browser, width)
        page.goto(gen.url + "/_dpiguard/login")
        assert page.is_visible("text=Se connecter avec le compte de l’hôpital")
        assert axe(page) == [] and fits(page), f"login page with the IdP button at {width}"
        box = page.query_selector("a.button[href^='/_dpiguard/oidc/login']").bounding_box()
        assert box["height"] >= 44, width  # a touch target
        shot(page, f"oidc-login-{width}")
        page.context.close()
    for width in WIDTHS:
        page = new_page(browser, width)
        _to_the_code_step(page, gen)
        assert page.get_attribute("html", "lang") == "fr"
        assert "code" in page.inner_text("main").lower()
        assert axe(page) == [] and fits(page), f"code step at {width}"
        shot(page, f"oidc-totp-{width}")
        if width != "phone":
            page.context.close()
            continue
        # At 375 px, keyboard only: the field has the focus, a wrong code is refused in French, the
        # right one opens the session and lands on the page asked first.
        page.wait_for_function("document.activeElement && document.activeElement.id === 't'", timeout=5000)
        page.keyboard.type("000000")
        with page.expect_navigation():
            page.keyboard.press("Enter")
        assert page.query_selector("[role=alert]") is not None and axe(page) == [] and fits(page)
        page.focus("#t")
        page.keyboard.type(stack.totp(NURSE))
        with page.expect_navigation():
            page.keyboard.press("Enter")
        page.wait_for_url("**/patients/P0001", timeout=15000)  # through the self-moving "logged in" page
        assert "Accès refusé" not in page.inner_text("body")  # the nurse's own unit patient (demo data)
        assert wait_records(env, event="login_success", user=NURSE, idp="oidc")
        page.context.close()
