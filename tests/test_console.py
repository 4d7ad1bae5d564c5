"""The web console /_dpiguard/console, end to end (real Redis, real demo DPI, real mitmproxy running
dpiguard): who may enter, what each role sees, the review queue, "why was this refused?", the
helpdesk actions, and that every console action is a trace record (tests/stack.py)."""

from __future__ import annotations

import csv
import html
import io
import re

import httpx
import pytest

from dpiguard.audit.chain import read_records
from dpiguard.demo.runner import DEMO_PASSWORD
from dpiguard.services import redis_client

from .stack import build_stack

pytestmark = pytest.mark.timeout(240)

JUSTIFICATION = "Arrêt cardiaque, équipe habituelle injoignable"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = build_stack(tmp_path_factory.mktemp("console"))
    s.start_proxy("a")
    yield s
    s.close()


@pytest.fixture(scope="module")
def proxy(stack):
    return stack.proxies[0]


def records(stack, **match):
    return [r for r in read_records(stack.audit_path) if all(r.get(k) == v for k, v in match.items())]


def console(stack, proxy, user) -> httpx.Client:
    c = stack.client(proxy, user)
    c.headers.update({"accept": "text/html", "sec-fetch-site": "same-origin"})
    return c


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


@pytest.fixture(scope="module")
def activity(stack, proxy):
    """A refusal, a reception access and an emergency access about P0002, by care accounts."""
    nurse = stack.client(proxy, "inf.durand")  # CARDIO; P0002 stays in PNEUMO
    refused = nurse.get("/api/patients/P0002/biology")
    assert refused.status_code == 403
    reception = stack.client(proxy, "acc.robert")
    assert reception.get("/api/patients/P0002").status_code == 200
    r = nurse.post("/_dpiguard/api/breakglass", json={"patient": "P0002", "reason": "urgence_vitale",
                                                      "text": JUSTIFICATION, "totp": stack.totp("inf.durand")})
    assert r.status_code == 201, r.text
    assert nurse.get("/api/patients/P0002/biology").status_code == 200
    return {"refused_id": refused.json()["request_id"], "grant_id": r.json()["break_glass_id"]}


def test_care_accounts_cannot_enter_admin_accounts_open_no_record(stack, proxy):
    nurse = console(stack, proxy, "inf.noel")
    r = nurse.get("/_dpiguard/console")
    assert r.status_code == 403 and "réservée aux comptes administratifs" in html.unescape(r.text)
    assert records(stack, event="console", user="inf.noel", outcome="deny")
    dpo = console(stack, proxy, "dpo.marchand")
    refused = dpo.get("/patients/P0001/notes")
    assert refused.status_code == 403 and "category_not_permitted" in refused.text  # the code is unchanged
    assert "n&#39;ouvrent pas les dossiers patients" in refused.text and "/_dpiguard/console" in refused.text
    assert dpo.get("/api/patients/P0001").status_code == 403
    # Not logged in: to the login page, back to the console afterwards.
    anon = httpx.get(f"{proxy.url}/_dpiguard/console/traces", headers={"accept": "text/html"})
    assert anon.status_code == 303 and anon.headers["location"] == "/_dpiguard/login?next=%2F_dpiguard%2Fconsole%2Ftraces"


def test_admin_login_lands_on_the_console(stack, proxy):
    c = httpx.Client(base_url=proxy.url, timeout=10)
    page = c.get("/_dpiguard/login")
    r = c.post("/_dpiguard/login", data={"username": "rssi.garnier", "password": DEMO_PASSWORD,
                                         "totp": stack.totp("rssi.garnier"), "csrf": csrf_of(page.text)})
    assert r.status_code == 303 and r.headers["location"] == "/_dpiguard/console"


def test_trace_search_filters_and_csv(stack, proxy, activity):
    c = console(stack, proxy, "rssi.garnier")
    page = c.get("/_dpiguard/console/traces", params={"patient": "P0002", "outcome": "deny"})
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    assert activity["refused_id"] in page.text and "not_in_care_team" in page.text
    assert f'href="/_dpiguard/console/explain?request_id={activity["refused_id"]}"' in page.text
    by_unit = c.get("/_dpiguard/console/traces", params={"unit": "CARDIO", "patient": "P0002"})
    assert activity["refused_id"] in by_unit.text
    assert activity["refused_id"] not in c.get("/_dpiguard/console/traces", params={"unit": "ONCO"}).text
    export = c.get("/_dpiguard/console/traces", params={"patient": "P0002", "format": "csv"})
    assert export.headers["content-type"].startswith("text/csv") and "attachment" in export.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(export.content.decode("utf-8-sig"))))
    assert {r["user"] for r in rows} >= {"inf.durand", "acc.robert"} and "units" in rows[0]
    bad = c.get("/_dpiguard/console/traces", params={"from": "demain"})
    assert bad.status_code == 400 and "Date et heure non valides" in html.unescape(bad.text)
    done = records(stack, event="console", user="rssi.garnier")
    assert {r["action"] for r in done} >= {"console_traces", "traces_csv"}


def test_timeline_names_only_for_the_dpo_labels_truthful(stack, proxy, activity):
    rssi = console(stack, proxy, "rssi.garnier").get("/_dpiguard/console/patient", params={"patient": "P0002"})
    text = html.unescape(rssi.text)
    assert "accès d'urgence (bris de glace)" in text and "refusé" in text and "sans équipe de soins nécessaire" in text
    assert "Claire Durand" not in text and "inf.durand" not in text  # staff by role and unit only
    dpo = html.unescape(console(stack, proxy, "dpo.marchand").get("/_dpiguard/console/patient",
                                                                  params={"patient": "P0002"}).text)
    assert "Claire Durand" in dpo and "(inf.durand)" in dpo and "Urgence vitale" in dpo
    letter = console(stack, proxy, "dpo.marchand").get("/_dpiguard/console/patient",
                                                       params={"patient": "P0002", "format": "html"})
    assert letter.status_code == 200 and "inf.durand" not in letter.text and "Claire Durand" not in letter.text
    assert '<html lang="fr">' in letter.text and "Accès au dossier du patient P0002" in letter.text
    assert records(stack, event="console", user="dpo.marchand", action="console_patient", patient="P0002")


def test_breakglass_review_mark_and_revoke_csrf(stack, proxy, activity):
    grant_id = activity["grant_id"]
    c = console(stack, proxy, "rssi.garnier")
    queue = c.get("/_dpiguard/console/breakglass")
    assert grant_id in queue.text and JUSTIFICATION in html.unescape(queue.text)
    csrf = csrf_of(queue.text)
    forged = c.post("/_dpiguard/console/breakglass", data={"csrf": "x", "id": grant_id, "action": "revoke"})
    assert forged.status_code == 403
    cross = c.post("/_dpiguard/console/breakglass", data={"csrf": csrf, "id": grant_id, "action": "revoke"},
                   headers={"sec-fetch-site": "cross-site"})
    assert cross.status_code == 403
    no_comment = c.post("/_dpiguard/console/breakglass", data={"csrf": csrf, "id": grant_id, "action": "justified"})
    assert no_comment.status_code == 400
    r = c.post("/_dpiguard/console/breakglass", data={"csrf": csrf, "id": grant_id, "action": "revoke"})
    assert r.status_code == 200 and "révoqué" in html.unescape(r.text)
    nurse = stack.client(proxy, "inf.durand")
    assert nurse.get("/api/patients/P0002/biology").status_code == 403  # ended at once
    r = c.post("/_dpiguard/console/breakglass", data={"csrf": csrf, "id": grant_id, "action": "justified",
                                                       "comment": "Arrêt cardiaque confirmé par le SAMU"})
    assert r.status_code == 200 and grant_id not in c.get("/_dpiguard/console/breakglass").text  # reviewed
    assert grant_id in c.get("/_dpiguard/console/breakglass", params={"all": "1"}).text
    rec = records(stack, event="console", action="break_glass_review", break_glass_id=grant_id)[0]
    assert rec["review"] == "justified" and rec["user"] == "rssi.garnier" and rec["target_user"] == "inf.durand"
    assert records(stack, event="console", action="break_glass_revoke", break_glass_id=grant_id)


def test_why_was_this_refused(stack, proxy, activity):
    c = console(stack, proxy, "rssi.garnier")
    page = html.unescape(c.get("/_dpiguard/console/explain", params={"request_id": activity["refused_id"]}).text)
    assert "not_in_care_team" in page and "p, nurse, biology, read" in page and "policy.csv:" in page
    assert "non membre" in page and "routes.yaml:" in page
    missing = c.get("/_dpiguard/console/explain", params={"request_id": "0000000000000000"})
    assert "Aucune décision" in html.unescape(missing.text)


def test_stats_leave_out_login_redirects(stack, proxy, activity):
    for _ in range(3):
        httpx.get(f"{proxy.url}/patients/P0001", headers={"accept": "text/html"})  # no session: to the login page
    page = html.unescape(console(stack, proxy, "dpo.marchand").get("/_dpiguard/console/stats").text)
    assert re.search(r"Non comptées : \d+ redirections ordinaires", page)
    assert "not_in_care_team" in page and "<code>not_authenticated</code>" not in page


def test_helpdesk_unlocks_resets_ends_sessions_not_admins(stack, proxy):
    victim = "sec.morin"
    for _ in range(3):
        httpx.post(f"{proxy.url}/_dpiguard/api/login", json={"username": victim, "password": "x", "totp": "1"})
    c = console(stack, proxy, "support.blanc")
    assert c.get("/_dpiguard/console/traces").status_code == 403  # the helpdesk has no trace search
    page = c.get("/_dpiguard/console/helpdesk", params={"login": victim})
    assert "verrouillé jusqu'à" in html.unescape(page.text)
    csrf = csrf_of(page.text)
    r = c.post("/_dpiguard/console/helpdesk", data={"csrf": csrf, "login": victim, "action": "unlock"})
    assert r.status_code == 200 and "est déverrouillé" in html.unescape(r.text)
    user_client = stack.login(proxy, victim)  # can log in again
    r = c.post("/_dpiguard/console/helpdesk", data={"csrf": csrf, "login": victim, "action": "end_sessions"})
    assert r.status_code == 200 and user_client.get("/api/patients/P0001").status_code == 401
    r = c.post("/_dpiguard/console/helpdesk", data={"csrf": csrf, "login": victim, "action": "reset_totp"})
    assert r.status_code == 200 and 'src="data:image/png;base64,' in r.text and "otpauth://totp/" in r.text
    admin = c.get("/_dpiguard/console/helpdesk", params={"login": "dpo.marchand"})
    assert admin.status_code == 400 and "gérés par les exploitants" in html.unescape(admin.text)
    actions = {r["action"] for r in records(stack, event="console", user="support.blanc", outcome="allow")}
    assert {"helpdesk_unlock", "helpdesk_end_sessions", "helpdesk_reset_totp"} <= actions
    redis_client(stack.config).delete("dpiguard:ipfail:127.0.0.1", "dpiguard:ipslow:127.0.0.1")


def test_mixed_accounts_are_refused_at_login(stack, proxy):
    from dpiguard.services import user_directory

    users = user_directory(stack.config)
    _, uri = users.add("mixed.user", DEMO_PASSWORD, ["nurse", "dpo"], display_name="Mixte")
    import pyotp

    secret = uri.split("secret=")[1].split("&")[0]
    r = httpx.post(f"{proxy.url}/_dpiguard/api/login", json={"username": "mixed.user", "password": DEMO_PASSWORD,
                                                             "totp": pyotp.TOTP(secret).now()})
    assert r.status_code == 403 and r.json()["error"] == "mixed_account"
    assert records(stack, event="login_failure", user="mixed.user", reason="mixed_account")


def test_privacy_alerts_review_queue(stack, proxy):
    """The detectors' alerts (dpiguard.privacy) in the console: listed for the DPO and the RSSI, reviewed
    with a comment and the CSRF token, the review in the trace like the CLI's; not for care accounts."""
    import time

    from dpiguard.privacy.alerts import Alert, AlertQueue

    queue = AlertQueue(redis_client(stack.config), stack.config.redis.prefix)
    alert = Alert("a1b2c3d4e5f6a7b8c9d0", "family_name", "inf.durand", "P0002", time.time() - 60,
                  {"family_name": "Durand"}, {"request_id": "0123456789abcdef", "roles": ["nurse"], "units": ["CARDIO"]})
    assert queue.create(alert)
    nurse = console(stack, proxy, "inf.durand")
    assert nurse.get("/_dpiguard/console/privacy").status_code == 403
    c = console(stack, proxy, "dpo.marchand")
    home = c.get("/_dpiguard/console")
    assert "Alertes de confidentialité à revoir : 1." in html.unescape(home.text)
    page = c.get("/_dpiguard/console/privacy")
    text = html.unescape(page.text)
    assert page.status_code == 200 and alert.id in text and "Même nom de famille que le patient" in text
    csrf = csrf_of(page.text)
    assert c.post("/_dpiguard/console/privacy", data={"csrf": "x", "id": alert.id, "action": "abusive",
                                                      "comment": "x"}).status_code == 403
    assert c.post("/_dpiguard/console/privacy", data={"csrf": csrf, "id": alert.id, "action": "abusive"}).status_code == 400
    assert c.post("/_dpiguard/console/privacy", data={"csrf": csrf, "id": "nosuchalert", "action": "abusive",
                                                      "comment": "vu"}).status_code == 400
    assert c.post("/_dpiguard/console/privacy", data={"csrf": csrf, "id": alert.id, "action": "delete",
                                                      "comment": "vu"}).status_code == 400
    assert c.get("/_dpiguard/console/privacy", params={"status": "bogus"}).status_code == 400
    r = c.post("/_dpiguard/console/privacy", data={"csrf": csrf, "id": alert.id, "action": "abusive",
                                                   "comment": "Consultation sans lien de soins, vue avec le cadre"})
    assert r.status_code == 200 and "abusif" in html.unescape(r.text)
    assert queue.get(alert.id).status == "abusive" and queue.get(alert.id).reviewer == "dpo.marchand"
    assert alert.id not in c.get("/_dpiguard/console/privacy").text  # only those to review by default
    assert alert.id in c.get("/_dpiguard/console/privacy", params={"status": "abusive"}).text
    (rec,) = records(stack, event="privacy_review", alert_id=alert.id)
    assert rec["reason"] == "abusive" and rec["operator"] == "dpo.marchand" and rec["user"] == "inf.durand"
    assert console(stack, proxy, "rssi.garnier").get("/_dpiguard/console/privacy").status_code == 200
