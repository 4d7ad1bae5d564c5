"""Privacy monitoring end to end: real Redis, the demo DPI, real mitmproxy processes running dpiguard.

Both proxies run the privacy monitor as a thread (``privacy.monitor: true``) over the same chains, and
proxy ``a`` the ADT feed: an
admission's PID segment and the staff file make a patient the neighbour and namesake of a doctor, the
doctor opens the record, the alert appears in the review queue, the chain and the metrics. FHIR answers
teach the learner too. Proxy ``b`` serves a copy of policies/ whose privacy.yaml requires an emergency
access for confidential / VIP patients, even inside their care team.
"""

from __future__ import annotations

import shutil
import time

import httpx
import orjson
import pytest

from dpiguard.audit.chain import read_records
from dpiguard.cli import main as cli_main
from dpiguard.services import redis_client
from dpiguard.storage.keys import Keys
from tests.redis_server import free_port

from .hl7msgs import hl7_time, mllp_exchange, msa
from .policyseal import seal
from .stack import ROOT, build_stack

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("privacy-stack")
    strict = work / "policies-strict"
    shutil.copytree(ROOT / "policies", strict)
    text = (strict / "privacy.yaml").read_text()
    (strict / "privacy.yaml").write_text(text.replace("  vip:\n    enabled: true\n    action: alert",
                                                      "  vip:\n    enabled: true\n    action: require_break_glass"))
    seal(strict)
    s = build_stack(work, config_extra={"privacy": {"monitor": True, "monitor_interval": 0.2}})
    s.adt_port = free_port()
    s.start_proxy("a", env={"DPIGUARD_ADT__ENABLED": "true", "DPIGUARD_ADT__LISTEN_PORT": str(s.adt_port)})
    s.start_proxy("b", env={"DPIGUARD_POLICIES__DIR": str(strict)})
    yield s
    s.close()


def cli(capsys, stack, *argv) -> str:
    capsys.readouterr()
    assert cli_main([*argv, "--config", str(stack.config_path)]) == 0
    return capsys.readouterr().out


def admit(stack, patient: str, pid: str) -> str:
    msg = "\r".join([
        f"MSH|^~\\&|SIH-GAM|HOPITAL|DPIGUARD|HOPITAL|{hl7_time(time.time())}||ADT^A01^ADT_A01|PV{patient}|P|2.5|||||FRA|UNICODE UTF-8",
        f"EVN||{hl7_time(time.time())}|||||{hl7_time(time.time() - 60)}",
        pid,
        "PV1|1|I|CARDIO^101^1^HOPITAL||||||||||||||||VPRIV^^^HOPITAL^VN",
    ]) + "\r"
    return msa(mllp_exchange(stack.adt_port, msg))


def wait_for(predicate, within=15.0, what="condition"):
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_neighbours_record_raises_alerts_in_queue_chain_and_metrics(stack, capsys, tmp_path):
    staff = tmp_path / "staff.csv"
    staff.write_text("login,family_name,given_name,birth_date,address,postal_code\n"
                     "dr.martin,Martin,Paul,1975-03-02,5 rue des Lilas,99001\n", encoding="utf-8")
    assert "1 staff row(s) imported" in cli(capsys, stack, "privacy", "staff", "import", str(staff))
    ack = admit(stack, "P0150", "PID|||P0150^^^HOPITAL^PI||MARTÍN^Alice^^^^^L||19700101|F|||"
                                "5 r. des Lilas^^Villefictive^^99001^FRA^H")
    assert ack[1] == "AA", ack
    r = redis_client(stack.config)
    keys = Keys(stack.config.redis.prefix)
    wait_for(lambda: r.hget(keys.pv_patient("P0150"), "family"), what="demographics learnt from PID")
    assert b"artin" not in b"".join(r.hgetall(keys.pv_patient("P0150")).values()).lower()

    a = stack.proxies[0]
    doctor = stack.client(a, "dr.martin")
    assert doctor.get("/api/patients/P0150/notes").status_code == 200  # his unit's patient: allowed

    def alerts():
        rows = orjson.loads(cli(capsys, stack, "privacy", "alerts", "--user", "dr.martin", "--format", "json"))
        return rows if {x["detector"] for x in rows} >= {"same_address", "family_name"} else None

    rows = wait_for(alerts, what="privacy alerts from the monitor thread")
    same = next(x for x in rows if x["detector"] == "same_address")
    assert same["patient"] == "P0150" and same["status"] == "new" and "même adresse" in same["why"]
    assert same["access"]["explanation"] == "direct"
    chain = [x for x in read_records(stack.audit_path) if x.get("event") == "privacy_alert"]
    assert {x["alert_id"] for x in chain} >= {x["id"] for x in rows}
    assert all(x["request_id"] and x["access_instance"] == "a" for x in chain)
    assert not any("Lilas" in orjson.dumps(x).decode() or "MART" in orjson.dumps(x).decode() for x in chain)
    # Both proxies run a monitor over the same chains: the alert was raised once, by one of them.
    counted = 0.0
    for proxy in stack.proxies:
        for line in httpx.get(f"{proxy.url}/_dpiguard/metrics", timeout=5).text.splitlines():
            if line.startswith('dpiguard_privacy_alerts_total{detector="same_address"}'):
                counted += float(line.rsplit(" ", 1)[1])
    assert counted == 1.0

    # the alert is reviewed; the summary reports it with the explanation rate
    cli(capsys, stack, "privacy", "mark", same["id"], "justified", "--comment", "Patient du service, soigné par lui")
    marked = orjson.loads(cli(capsys, stack, "privacy", "alerts", "--status", "justified", "--format", "json"))
    assert [x["id"] for x in marked] == [same["id"]] and marked[0]["reviewer"]
    summary = orjson.loads(cli(capsys, stack, "audit", "summary", "--format", "json"))
    units = {x["name"]: x for x in summary["explanation_rate"]["by_unit"]}
    assert units["CARDIO"]["care"] >= 1


def test_fhir_patient_answers_teach_the_learner(stack):
    a = stack.proxies[0]
    nurse = stack.client(a, "inf.durand")
    r = nurse.get("/fhir/Patient/P0001")
    assert r.status_code == 200 and r.json()["resourceType"] == "Patient"
    client = redis_client(stack.config)
    key = Keys(stack.config.redis.prefix).pv_patient("P0001")
    stored = wait_for(lambda: client.hgetall(key), what="demographics learnt from the FHIR answer")
    assert stored.get(b"family") and stored.get(b"streets")
    family = r.json()["name"][0]["family"].lower().encode()
    assert family not in b"".join(stored.values()).lower()


def test_vip_needs_an_emergency_access_even_in_the_care_team(stack, capsys):
    b = stack.proxies[1]
    nurse = stack.client(b, "dr.martin")
    path = "/api/patients/P0001/biology"  # P0001 stays in CARDIO, his unit
    assert nurse.get(path).status_code == 200
    cli(capsys, stack, "privacy", "vip", "add", "P0001", "--level", "confidential")
    refused = wait_for(lambda: (x := nurse.get(path)).status_code == 403 and x, what="VIP rule applied")
    assert refused.json()["error"] == "privacy_break_glass_required"
    assert refused.json()["break_glass"] == "/_dpiguard/api/breakglass"
    grant = nurse.post("/_dpiguard/api/breakglass", json={
        "patient": "P0001", "reason": "continuite_des_soins", "text": "Patient confidentiel de mon service, visite",
        "totp": stack.totp("dr.martin")})
    assert grant.status_code == 201, grant.text
    r = nurse.get(path)
    assert r.status_code == 200
    last = [x for x in read_records(stack.audit_path) if x.get("event") == "access" and x.get("patient") == "P0001"
            and x.get("user") == "dr.martin"]
    assert last[-1]["break_glass"] is True and any(x["reason"] == "privacy_break_glass_required" for x in last)
    cli(capsys, stack, "privacy", "vip", "remove", "P0001")
