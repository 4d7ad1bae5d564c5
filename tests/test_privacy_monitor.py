"""The privacy monitor against a real Redis-protocol server and real audit chains: alerts once whatever
the restarts and the number of monitors, deferred care-event checks, baselines, the review queue, the
learner, decision-time actions and hot reload of privacy.yaml."""

from __future__ import annotations

import time

import orjson
import pytest
import redis

from dpiguard.audit.chain import AuditLog, read_records
from dpiguard.careteam.store import CareTeamStore
from dpiguard.cli import main as cli_main
from dpiguard.policy.snapshot import PolicySet
from dpiguard.privacy.alerts import AlertQueue
from dpiguard.privacy.learner import Learner
from dpiguard.privacy.monitor import PrivacyMonitor
from dpiguard.privacy.pseudonyms import Demographics, Hasher
from dpiguard.privacy.store import PrivacyStore
from dpiguard.storage.keys import Keys
from dpiguard.times import iso_ms

from .conftest import only_standalone
from .policyseal import seal
from .test_privacy import PID_MSG, ROOT

H = Hasher(b"0123456789abcdef0123456789abcdef")
DAY = 86400.0
POLICIES = PolicySet.load(ROOT / "policies")


def rec(user, patient, t, *, source=None, category="administrative", action="read", roles=("nurse",),
        units=("CARDIO",), bg=False):
    r = {"event": "access", "outcome": "allow", "reason": "allowed", "user": user, "roles": list(roles),
         "units": list(units), "patient": patient, "category": category, "action": action, "care_team": source,
         "time": iso_ms(t), "request_id": f"{abs(hash((user, patient, t))):016x}"[:16]}
    if bg:
        r.update(break_glass=True, care_team="break_glass:G1")
    return r


def write(chain_dir, name, records):
    log = AuditLog(chain_dir, name, fsync=False).open()
    for r in records:
        log.write(r)
    log.close()


def monitor(r, store_dir, name="privacy", batch=2000, policies=POLICIES):
    log = AuditLog(store_dir, name, fsync=False).open()
    return PrivacyMonitor(r, store_dir, log, lambda: policies, batch=batch, exclude=("privacy", "privacy-2")), log


def alerts_in(store_dir):
    return [x for x in read_records(store_dir) if x.get("event") == "privacy_alert"]


def relatives(r):
    store = PrivacyStore(r)
    store.import_staff("inf.a", H.pseudonyms(Demographics(["Zorglub"], address_lines=[["3 rue Haute"]],
                                                          postal_codes=["99001"])))
    store.learn_patients([("P1", H.pseudonyms(Demographics(["ZORGLUB"], address_lines=[["3 r. Haute"]],
                                                           postal_codes=["99001"])))])
    return store


def test_one_alert_whatever_the_restarts_and_the_number_of_monitors(r, tmp_path):
    relatives(r)
    t0 = time.time() - 10 * DAY
    write(tmp_path, "px1", [rec("inf.a", "P1", t0 + i * 60) for i in range(5)]
          + [rec("inf.b", f"P{100 + i}", t0 + i, source="unit:CARDIO stay:S1") for i in range(50)])
    write(tmp_path, "px2", [rec("inf.a", "P1", t0 + 3600)])
    m1, log1 = monitor(r, tmp_path, batch=7)
    m1.step(until_idle=True)  # a first batch of 7 records per chain, then the monitor "dies"
    first = r.hgetall(Keys().pv_positions)
    assert first == {b"px1": b"7", b"px2": b"2"}  # the position moved only as far as processed
    log1.close()
    m2, log2 = monitor(r, tmp_path, name="privacy")  # restart: resumes at the stored position
    m3, log3 = monitor(r, tmp_path, name="privacy-2")  # and a second monitor over the same chains
    m2.run(until_idle=True)
    m3.r.delete(Keys().pv_positions)  # which even starts from the beginning
    m3.run(until_idle=True)
    log2.close(), log3.close()
    found = sorted(a["reason"] for a in alerts_in(tmp_path))
    # each once, in the chains of three monitor runs (a relative's address file, read with no visit around)
    assert found == ["broad_rule", "family_name", "same_address"]
    q = AlertQueue(r).list()
    assert sorted(a.detector for a in q) == ["broad_rule", "family_name", "same_address"]
    assert all(a.user == "inf.a" and a.patient == "P1" for a in q)
    assert m3.stats.duplicates >= 3 and m3.stats.alerts == 0


@only_standalone("pauses the one Redis server")
def test_redis_outage_pauses_the_monitor_and_it_resumes_without_losing_records(redis_server, tmp_path):
    client = redis.Redis.from_url(redis_server.url, socket_timeout=0.3)
    redis_server.flushall()
    relatives(client)
    t0 = time.time() - 10 * DAY
    write(tmp_path, "px1", [rec("inf.a", "P1", t0)])
    m, log = monitor(client, tmp_path)
    admin = redis.Redis.from_url(redis_server.url)
    admin.execute_command("CLIENT", "PAUSE", 1500, "ALL")
    with pytest.raises(redis.RedisError):
        m.step(until_idle=True)
    time.sleep(1.6)
    assert not admin.hgetall(Keys().pv_positions)  # nothing was marked done
    m.run(until_idle=True)
    log.close()
    assert sorted(a["reason"] for a in alerts_in(tmp_path)) == ["broad_rule", "family_name", "same_address"]
    assert admin.hget(Keys().pv_positions, "px1") == b"2"  # the access and the chain's closing checkpoint


def test_broad_rule_waits_for_its_window_and_a_care_event_explains_it(r, tmp_path):
    t0 = time.time() - 10 * DAY
    CareTeamStore(r).add_stay("P2", "PNEUMO", t0 + 5 * 3600)  # arrives five hours after the desk read it
    write(tmp_path, "px1", [
        rec("acc.d", "P2", t0, roles=("reception",), units=()),  # explained: a movement around it
        rec("acc.d", "P3", t0, roles=("reception",), units=()),  # nothing around: browsing
        rec("sec.e", "P4", t0, roles=("secretary",)),  # booked: the write explains the read
        rec("sec.e", "P4", t0 + 60, roles=("secretary",), action="write"),
        rec("inf.f", "P5", t0 + 3600, roles=("nurse",), units=("LABO",), category="biology",
            source="transversal:LABO open_stay_anywhere"),
    ])
    m, log = monitor(r, tmp_path)
    m.step()  # wall clock far ahead of the records? no: `now` is the watermark only once caught up
    m.run(until_idle=True)
    log.close()
    got = sorted((a["reason"], a["patient"]) for a in alerts_in(tmp_path))
    assert got == [("broad_rule", "P3"), ("broad_rule", "P5")]
    detail = next(a for a in alerts_in(tmp_path) if a["patient"] == "P3")
    assert detail["evidence"]["care_event"] is False and "24 heures" in detail["detail"]



def test_staff_record_read_during_a_stay_elsewhere_alerts_unless_the_desk_registers_an_arrival(r, tmp_path):
    """Issue 17: a colleague's record read while they are hospitalised in another unit is not explained
    by that stay; the desk's reading is explained by the admission it registers, not by a stay going on."""
    t0 = time.time() - 10 * DAY
    store = PrivacyStore(r)
    for login, pid in (("inf.x", "P21"), ("inf.y", "P22"), ("inf.z", "P23")):
        store.import_staff(login, H.pseudonyms(Demographics([f"Agent{login[-1]}"])), [pid])
    ct = CareTeamStore(r)
    ct.add_stay("P21", "PNEUMO", t0 - 30 * 3600)  # in since yesterday morning
    ct.add_stay("P22", "PNEUMO", t0 - 3600)  # arrived an hour before the desk opened the file
    ct.add_stay("P23", "PNEUMO", t0 - 3 * DAY, t0 + 3600)  # leaves an hour after
    desk = {"roles": ("reception",), "units": ()}
    write(tmp_path, "px1", [
        rec("acc.d", "P21", t0, **desk),  # browsing a colleague's file during her stay: alert
        rec("acc.d", "P22", t0, **desk),  # the admission: explained
        rec("acc.e", "P23", t0, **desk),  # the discharge: explained
        # a nurse of PNEUMO and CARDIO writes in PNEUMO's care: not something CARDIO wrote for the patient
        rec("inf.m", "P22", t0 + 300, roles=("nurse",), units=("CARDIO", "PNEUMO"), action="write",
            category="vital_signs", source="unit:PNEUMO stay:S9"),
        rec("dr.k", "P22", t0 + 600, roles=("doctor",), units=("CARDIO",)),  # a stay elsewhere: alert
        rec("dr.k", "P21", t0, roles=("doctor",), units=("PNEUMO",), source="unit:PNEUMO stay:S1"),  # her doctor
    ])
    m, log = monitor(r, tmp_path)
    m.run(until_idle=True)
    log.close()
    got = sorted((a["reason"], a["user"], a["patient"]) for a in alerts_in(tmp_path) if a["reason"] == "staff_patient")
    assert got == [("staff_patient", "acc.d", "P21"), ("staff_patient", "dr.k", "P22")]
    desk_alert = next(a for a in alerts_in(tmp_path) if a["reason"] == "staff_patient" and a["user"] == "acc.d")
    assert desk_alert["evidence"]["desk_hours"] == 2 and "arrivée ou une sortie" in desk_alert["detail"]


def test_break_glass_without_treatment_alerts_once_the_window_is_over(r, tmp_path):
    t0 = time.time() - 10 * DAY
    write(tmp_path, "px1", [
        rec("dr.g", "P6", t0, bg=True, category="clinical_notes", roles=("doctor",)),
        rec("dr.g", "P6", t0 + 600, bg=True, category="prescriptions", action="write", roles=("doctor",)),
        rec("dr.h", "P7", t0, bg=True, category="clinical_notes", roles=("doctor",)),
    ])
    m, log = monitor(r, tmp_path)
    m.run(until_idle=True)
    log.close()
    assert sorted((a["reason"], a["user"]) for a in alerts_in(tmp_path)) == [("break_glass_unused", "dr.h")]


def test_volume_and_unusual_hours_against_own_and_role_baselines(r, tmp_path):
    start = time.time() - 20 * DAY
    day0 = start - start % DAY + 12 * 3600 - 2 * 3600  # about 10:00 Paris, whatever the season
    records = []
    for d in range(10):
        for user in ("sec.x", "sec.y", "sec.z"):
            for i in range(8):
                records.append(rec(user, f"P{d}{i}", day0 + d * DAY + i * 600, roles=("secretary",),
                                   source="unit:CARDIO stay:S1"))
    bad = day0 + 10 * DAY
    records += [rec("sec.x", f"Q{i}", bad + i * 30, roles=("secretary",), source="unit:CARDIO stay:S1")
                for i in range(60)]
    night = bad - 8 * 3600  # about 2:00
    records += [rec("sec.y", f"N{i}", night + i * 60, roles=("secretary",), source="unit:CARDIO stay:S1")
                for i in range(4)]
    write(tmp_path, "px1", sorted(records, key=lambda x: x["time"]))
    m, log = monitor(r, tmp_path)
    m.run(until_idle=True)
    log.close()
    found = sorted((a["reason"], a["user"]) for a in alerts_in(tmp_path))
    assert ("volume", "sec.x") in found and ("unusual_hours", "sec.y") in found
    assert not [f for f in found if f[0] in ("volume", "unusual_hours") and f[1] == "sec.z"]
    vol = next(a for a in alerts_in(tmp_path) if a["reason"] == "volume")
    assert vol["evidence"]["patients"] == 60 and vol["evidence"]["own"] == 8 and vol["patient"] is None


def test_learner_stores_hashes_only_and_links_staff_by_identity(r):
    store = PrivacyStore(r)
    learner = Learner(store, H)
    pubsub = r.pubsub()
    pubsub.subscribe(Keys().events)
    learner.note_hl7(PID_MSG, "P77")
    learner.note_fhir(orjson.dumps({"resourceType": "Bundle", "entry": [{"resource": {
        "resourceType": "Patient", "id": "P78", "name": [{"family": "Dupont", "given": ["Jean"]}],
        "birthDate": "1980-04-12"}}]}))
    assert learner.process() == 2
    assert store.patient("P77").vip == "confidential" and store.patient("P78").pseudonyms.family
    dump = b""
    for k in r.keys("*"):
        kind = r.type(k)
        values = (list(r.hgetall(k).values()) if kind == b"hash" else [r.get(k)] if kind == b"string"
                  else list(r.smembers(k)) if kind == b"set" else [])
        dump += k + b"".join(v for v in values if isinstance(v, bytes))
    assert b"upont" not in dump.lower() and b"lilas" not in dump.lower() and b"1980" not in dump
    # a staff member whose identity (name, first name, birth date) is a patient's: linked both ways
    store.import_staff("dr.dupont", H.pseudonyms(Demographics(["Dupont"], "Jean", "1980-04-12")))
    assert store.staff("dr.dupont").links == {"P77", "P78"}
    assert store.patient("P78").links == {"dr.dupont"}
    events = [m["data"] for m in iter(lambda: pubsub.get_message(timeout=0.2), None) if m["type"] == "message"]
    assert b"patient:P77" in events and b"user:dr.dupont" in events
    assert r.ttl(Keys().pv_patient("P77")) > 300 * DAY


def test_review_queue_cli_mark_and_figures(r, tmp_path, capsys, redis_server):
    from dpiguard.demo.runner import write_demo_config
    from tests.redis_server import free_port

    config = write_demo_config(tmp_path / "cfg", host="127.0.0.1", port=free_port(), upstream_port=free_port(),
                               redis_url=redis_server.url)
    relatives(r)
    store_dir = tmp_path / "cfg" / "audit"
    write(store_dir, "px1", [rec("inf.a", "P1", time.time() - DAY)])
    assert cli_main(["privacy", "monitor", "--config", str(config)]) == 0
    capsys.readouterr()
    assert cli_main(["privacy", "alerts", "--format", "json", "--config", str(config)]) == 0
    rows = orjson.loads(capsys.readouterr().out)
    assert sorted(x["detector"] for x in rows) == ["broad_rule", "family_name", "same_address"]
    assert all(x["status"] == "new" and x["why"] for x in rows)
    target = rows[0]["id"]
    assert cli_main(["privacy", "mark", target, "abusive", "--comment", "Consultation du dossier d'un proche",
                     "--config", str(config)]) == 0
    assert cli_main(["privacy", "mark", "nope", "abusive", "--comment", "x", "--config", str(config)]) == 1
    capsys.readouterr()
    assert cli_main(["privacy", "alerts", "--status", "abusive", "--format", "json", "--config", str(config)]) == 0
    assert [x["id"] for x in orjson.loads(capsys.readouterr().out)] == [target]
    assert cli_main(["privacy", "figures", "--format", "json", "--config", str(config)]) == 0
    figures = orjson.loads(capsys.readouterr().out)
    assert figures["users_with_abusive_alerts"] == 1 and sum(d["abusive"] for d in figures["detectors"]) == 1
    reviews = [x for x in read_records(store_dir) if x.get("event") == "privacy_review"]
    assert reviews and reviews[0]["alert_id"] == target and reviews[0]["reason"] == "abusive"
    # the summary and the export carry the alerts
    assert cli_main(["audit", "summary", "--format", "json", "--config", str(config)]) == 0
    summary = orjson.loads(capsys.readouterr().out)
    assert {x["detector"] for x in summary["privacy_alerts"]} == {"broad_rule", "family_name", "same_address"}
    assert summary["explanation_rate"]["overall"]["accesses"] == 1
    assert cli_main(["audit", "export", "--format", "fhir", "--event", "privacy_alert", "--config", str(config)]) == 0
    events = [orjson.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    assert events and all(e["type"]["code"] == "110113" for e in events)


def test_staff_import_reports_line_and_column(tmp_path, capsys, redis_server):
    from dpiguard.demo.runner import write_demo_config
    from tests.redis_server import free_port

    config = write_demo_config(tmp_path / "cfg", host="127.0.0.1", port=free_port(), upstream_port=free_port(),
                               redis_url=redis_server.url)
    bad = tmp_path / "staff.csv"
    bad.write_text("login,family_name,birth_date,address\ninf.a,Dupont,1980-04-12,\nbad login,X,,\n"
                   "inf.b,,1980-01-01,\ninf.c,Durand,12/1980,\n", encoding="utf-8")
    assert cli_main(["privacy", "staff", "import", str(bad), "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:3: column 'login'" in err and f"{bad}:4: column 'family_name'" in err
    assert f"{bad}:5: column 'birth_date'" in err and "nothing imported" in err


def test_decision_time_actions_and_hot_reload_of_privacy_yaml(services):
    directory, s = services
    store = PrivacyStore(s.redis)
    hasher = Hasher(b"0123456789abcdef0123456789abcdef")
    store.set_vip("P0001", "vip")
    store.import_staff("inf.durand", hasher.pseudonyms(Demographics(["Durand"])), ["P0042"])
    careteam = s.careteam
    careteam.add_unit_member("inf.durand", "CARDIO")
    careteam.add_stay("P0001", "CARDIO", time.time() - 3600)
    decide = s.pipeline.access.decide
    now = time.time()
    ok, _ = decide("inf.durand", "P0001", "biology", "read", True, now, s.policies)
    assert ok.member  # alert only, as shipped
    text = (directory / "privacy.yaml").read_text()
    edited = text.replace("  vip:\n    enabled: true\n    action: alert", "  vip:\n    enabled: true\n    action: "
                                                                      "require_break_glass")
    edited = edited.replace("  self_access:\n    enabled: true\n    action: alert",
                            "  self_access:\n    enabled: true\n    action: refuse")
    (directory / "privacy.yaml").write_text(edited)
    seal(directory)  # as the RSSI does once the edit's checks and decision tests pass
    assert s.reloader.check() is True
    vip, _ = decide("inf.durand", "P0001", "biology", "read", True, now, s.policies)
    assert not vip.member and vip.reason == "privacy_break_glass_required" and vip.source == "privacy:vip"
    own, _ = decide("inf.durand", "P0042", "administrative", "read", False, now, s.policies)
    assert not own.member and own.reason == "privacy_refused"
    (directory / "privacy.yaml").write_text(edited.replace("action: refuse", "action: shout"))
    seal(directory)  # sealed or not, a file dpiguard does not understand stays out of service
    assert s.reloader.check() is False  # invalid edit: the previous set stays in service
    assert "privacy.yaml" in s.reloader.error and s.policies.privacy.decision_actions["self_access"] == "refuse"


def test_a_candidate_waits_in_redis_until_its_window_is_really_over(r, tmp_path):
    t0 = time.time() - 3600  # an hour ago: its care-event window runs for another 23 hours
    write(tmp_path, "px1", [rec("acc.d", "P8", t0, roles=("reception",), units=()),
                            rec("acc.d", "P9", t0, roles=("reception",), units=())])
    m, log = monitor(r, tmp_path)
    m.run(until_idle=True)
    assert alerts_in(tmp_path) == [] and r.zcard(Keys().pv_pending) == 2  # nothing decided early
    CareTeamStore(r).add_stay("P8", "URG", t0 + 2 * 3600)  # P8 arrives two hours after the desk read it
    m2, log2 = monitor(r, tmp_path, name="privacy-2")  # another run, a day later
    m2.step(until_idle=True, now=t0 + 25 * 3600)
    log.close(), log2.close()
    assert [(a["reason"], a["patient"]) for a in alerts_in(tmp_path)] == [("broad_rule", "P9")]
    assert r.zcard(Keys().pv_pending) == 0


def test_the_standalone_monitor_follows_edits_of_privacy_yaml(tmp_path, redis_server, capsys):
    import shutil

    from dpiguard.cli.privacy import _reloading
    from dpiguard.config import load_config
    from dpiguard.demo.runner import write_demo_config
    from dpiguard.services import load_policies
    from tests.redis_server import free_port

    directory = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", directory)
    cfg = load_config(write_demo_config(tmp_path / "cfg", host="127.0.0.1", port=free_port(), upstream_port=free_port(),
                                        redis_url=redis_server.url, policies_dir=directory))
    current = _reloading(cfg, load_policies)
    first = current()
    assert first.privacy.on("vip").get("every_access") is False
    text = (directory / "privacy.yaml").read_text()
    (directory / "privacy.yaml").write_text(text.replace("every_access: false", "every_access: true"))
    seal(directory)
    time.sleep(1.1)
    assert current().privacy.on("vip").get("every_access") is True
    (directory / "privacy.yaml").write_text(text.replace("every_access: false", "every_access: sometimes"))
    seal(directory)
    time.sleep(1.1)
    kept = current()
    assert kept.privacy.on("vip").get("every_access") is True  # the invalid edit is refused
    assert "privacy.yaml:" in capsys.readouterr().err
