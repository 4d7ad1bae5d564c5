"""The audit trail end to end, through real mitmproxy processes: durability before the answer, kill -9
under load, request ids on every response, refusal when the audit store cannot be written."""

from __future__ import annotations

import resource
import signal
import threading
import time

import httpx
import pytest

from dpiguard.audit.chain import AuditVerifier, read_records
from dpiguard.audit.verify import verify_store

from .stack import build_stack

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = build_stack(tmp_path_factory.mktemp("audit-stack"))
    s.start_proxy("a")
    yield s
    s.close()


def verifier(stack):
    return AuditVerifier.from_pem_file(stack.workdir / "secrets" / "audit-ed25519.pub.pem")


def by_request_id(stack) -> dict[str, dict]:
    return {r["request_id"]: r for r in read_records(stack.audit_path) if r.get("request_id")}


def test_every_response_names_its_record(stack):
    proxy = stack.proxies[0]
    c = stack.client(proxy, "inf.durand")
    allowed = c.get("/api/patients/P0001/biology")
    refused = c.get("/api/patients/P0002/biology")
    fhir = c.get("/fhir/Patient/P0001")
    anonymous = httpx.get(f"{proxy.url}/api/patients/P0001/biology")
    assert (allowed.status_code, refused.status_code, anonymous.status_code) == (200, 403, 401)
    records = by_request_id(stack)
    for response in (allowed, refused, fhir, anonymous):
        rid = response.headers["x-dpiguard-request-id"]
        assert rid in records, response.request.url
    rec = records[allowed.headers["x-dpiguard-request-id"]]
    assert rec["outcome"] == "allow" and rec["user"] == "inf.durand" and "CARDIO" in rec["units"]
    assert rec["path"] == "/api/patients/P0001/biology" and rec["seq"] > 0 and len(rec["hash"]) == 64
    assert rec["break_glass"] is None and rec["fhir_type"] is None
    assert records[refused.headers["x-dpiguard-request-id"]]["reason"] == "not_in_care_team"
    frec = records[fhir.headers["x-dpiguard-request-id"]]
    assert (frec["fhir_type"], frec["fhir_id"]) == ("Patient", "P0001")


def test_kill_9_under_load_loses_no_answered_record(stack):
    proxy = stack.start_proxy("k")
    clients = [stack.login(proxy, login) for login in ("inf.noel", "acc.leroy")]
    received: list[tuple[int, str]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def hammer(client: httpx.Client, paths: list[str]) -> None:
        i = 0
        while not stop.is_set():
            try:
                r = client.get(paths[i % len(paths)])
            except httpx.HTTPError:
                return  # the proxy is gone
            with lock:
                received.append((r.status_code, r.headers.get("x-dpiguard-request-id", "")))
            i += 1

    threads = [
        threading.Thread(target=hammer, args=(clients[0], ["/api/patients/P0001/biology", "/api/patients/P0002/biology"])),
        threading.Thread(target=hammer, args=(clients[1], ["/api/patients/P0001", "/api/patients/P0001/notes"])),
        threading.Thread(target=hammer, args=(clients[0], ["/api/patients/P0001"])),
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(received) < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    proxy.proc.send_signal(signal.SIGKILL)
    proxy.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(15)
    stack.proxies.remove(proxy)
    answered = [(status, rid) for status, rid in received if status < 500]
    assert len(answered) >= 300
    assert {s for s, _ in answered} >= {200, 403}
    records = {r["request_id"]: r for r in read_records(stack.audit_path / "k") if r.get("request_id")}
    missing = [rid for _, rid in answered if rid not in records]
    assert not missing, f"{len(missing)} answered request(s) have no record on disk"
    for status, rid in answered:
        assert records[rid]["outcome"] == ("allow" if status == 200 else "deny")
    # The chain of the killed instance is intact, and a restart continues it.
    rep = verify_store(stack.audit_path, verifier(stack), instance="k")[0]
    assert rep.ok, rep.describe()
    restarted = stack.start_proxy("k")
    stack.login(restarted, "dr.gaillard").get("/api/patients/P0001")
    restarted.stop()
    stack.proxies.remove(restarted)
    rep = verify_store(stack.audit_path, verifier(stack), instance="k")[0]
    assert rep.ok and rep.last_seq > len(answered), rep.describe()


def test_unwritable_audit_store_refuses_patient_data_and_says_so(stack):
    limit = 64 * 1024

    def small_files():  # a real EFBIG once the segment reaches the limit (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proxy = stack.start_proxy("full", preexec_fn=small_files)
    c = stack.login(proxy, "dr.martin")
    for _ in range(2000):
        r = c.get("/api/patients/P0001/biology")
        if r.status_code != 200:
            break
    assert r.status_code == 503 and r.json()["error"] == "audit_unavailable"
    before = len(stack.upstream_app.seen)
    for path in ("/api/patients/P0001/biology", "/api/patients/P0002/biology"):
        r = c.get(path)
        assert r.status_code == 503 and r.json()["error"] == "audit_unavailable"
    assert len(stack.upstream_app.seen) == before  # nothing reached the DPI without its trace
    health = httpx.get(f"{proxy.url}/_dpiguard/health", timeout=5)
    assert health.status_code == 503
    info = health.json()
    assert info["audit_writable"] is False and info["audit"]["serving_patient_data"] is False
    assert "EFBIG" in info["audit"]["last_error"] or "too large" in info["audit"]["last_error"]
    proxy.stop()
    stack.proxies.remove(proxy)
    # What was written still verifies: failed batches were truncated away, never left half-written.
    rep = verify_store(stack.audit_path, verifier(stack), instance="full")[0]
    assert rep.ok, rep.describe()


def test_mass_access_alert_then_throttle_through_the_proxy(stack):
    proxy = stack.start_proxy("m", env={"DPIGUARD_MASS_ACCESS__MAX_PATIENTS": "3",
                                        "DPIGUARD_MASS_ACCESS__ACTION": "throttle",
                                        "DPIGUARD_MASS_ACCESS__REFRESH_SECONDS": "0.1"})
    try:
        c = stack.login(proxy, "acc.rousseau")  # reception: administrative data of any patient
        for p in ("P0001", "P0002", "P0003", "P0004"):
            assert c.get(f"/api/patients/{p}").status_code == 200
        deadline = time.monotonic() + 10
        while True:
            r = c.get("/api/patients/P0005")
            if r.status_code == 403:
                break
            assert time.monotonic() < deadline, "no throttle 10 s after the threshold was passed"
            time.sleep(0.05)
        assert r.json()["error"] == "mass_access"
        assert c.get("/api/patients/P0001").json()["error"] == "mass_access"
        # A FHIR write (decided once its body is in) refused by the throttle is traced like any refusal.
        w = c.put("/fhir/Patient/P0001", json={"resourceType": "Patient", "id": "P0001"})
        assert w.status_code == 403 and w.json()["issue"][0]["details"]["coding"][0]["code"] == "mass_access"
        write_id = w.headers["x-dpiguard-request-id"]
        records = [rec for rec in read_records(stack.audit_path / "m")]
        alerts = [rec for rec in records if rec["event"] == "mass_access"]
        # Counting is batched (massaccess.BATCH_SECONDS): the alert fires once, with the 4 patients of the
        # crossing and possibly P0005 if it was opened before the batch reached Redis.
        assert len(alerts) == 1 and alerts[0]["user"] == "acc.rousseau" and alerts[0]["patients"] in (4, 5)
        assert any(rec.get("reason") == "mass_access" and rec["outcome"] == "deny" for rec in records)
        assert [rec["reason"] for rec in records if rec.get("request_id") == write_id] == ["mass_access"]
    finally:
        proxy.stop()
        stack.proxies.remove(proxy)
