"""End to end: a real MLLP client → the ADT listener inside `dpiguard run` → Redis → two proxy
instances (real mitmproxy processes) → a nurse's access follows the patient within one second."""

from __future__ import annotations

import time

import pytest

from dpiguard.audit.chain import read_records
from tests.redis_server import free_port

from .hl7msgs import adt, mllp_exchange, msa
from .stack import build_stack

pytestmark = pytest.mark.timeout(180)

GRACE = 3  # careteam.grace_seconds for this stack
PATIENT = "P0008"  # a demo patient with no stay and no assignment
NURSE_A, NURSE_B, NURSE_URG = "inf.durand", "inf.clement", "inf.henry"  # CARDIO, PNEUMO, URG (transversal)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = build_stack(tmp_path_factory.mktemp("adt-stack"), config_extra={"careteam": {"grace_seconds": GRACE}})
    s.adt_port = free_port()
    s.start_proxy("a", env={"DPIGUARD_ADT__ENABLED": "true", "DPIGUARD_ADT__LISTEN_PORT": str(s.adt_port)})
    s.start_proxy("b")
    yield s
    s.close()


def status(stack, login):
    """Status of the nurse's request on each of the two instances."""
    return [stack.client(p, login).get(f"/api/patients/{PATIENT}/biology").status_code for p in stack.proxies]


def wait_for(stack, login, expected, within=1.0):
    """Both instances give ``expected`` within ``within`` seconds, then keep giving it."""
    deadline = time.monotonic() + within
    while status(stack, login) != [expected, expected]:
        assert time.monotonic() < deadline, f"{login}: {status(stack, login)} instead of {expected} after {within} s"
    for _ in range(3):
        assert status(stack, login) == [expected, expected]


def send(stack, trigger, **kw) -> list[str]:
    return msa(mllp_exchange(stack.adt_port, adt(trigger, patient=PATIENT, visit="VE2E", **kw)))


def test_access_follows_admission_transfer_and_cancellation(stack):
    # Warm both instances' caches with refusals.
    for login in (NURSE_A, NURSE_B, NURSE_URG):
        assert status(stack, login) == [403, 403]

    assert send(stack, "A01", unit="CARDIO", control_id="E2E-1")[1] == "AA"
    wait_for(stack, NURSE_A, 200)
    assert status(stack, NURSE_B) == [403, 403]
    assert status(stack, NURSE_URG) == [200, 200]  # emergency: transversal for patients staying anywhere

    transfer_at = time.time()
    assert send(stack, "A02", unit="PNEUMO", at=transfer_at, control_id="E2E-2")[1] == "AA"
    wait_for(stack, NURSE_B, 200)
    # A keeps access during the grace period after the transfer, then loses it on both instances.
    if time.time() < transfer_at + GRACE - 0.5:
        assert status(stack, NURSE_A) == [200, 200]
    while time.time() < transfer_at + GRACE + 0.01:
        time.sleep(0.05)
    wait_for(stack, NURSE_A, 403)

    # A replayed transfer (same control id) changes nothing; a stale discharge is refused.
    assert send(stack, "A02", unit="PNEUMO", at=transfer_at, control_id="E2E-2")[1] == "AA"
    stale = send(stack, "A03", at=transfer_at - 60, control_id="E2E-3")
    assert stale[1] == "AE"
    assert status(stack, NURSE_B) == [200, 200]

    # Cancel the transfer: back to CARDIO at once; PNEUMO's stay never happened (no grace).
    assert send(stack, "A12", unit="PNEUMO", control_id="E2E-4")[1] == "AA"
    wait_for(stack, NURSE_A, 200)
    wait_for(stack, NURSE_B, 403)

    # Discharge: the unit keeps the grace period, then loses access; the transversal unit at once.
    discharge_at = time.time()
    assert send(stack, "A03", at=discharge_at, control_id="E2E-5")[1] == "AA"
    wait_for(stack, NURSE_URG, 403)
    while time.time() < discharge_at + GRACE + 0.01:
        time.sleep(0.05)
    wait_for(stack, NURSE_A, 403)

    recs = [r for r in read_records(stack.audit_path) if r.get("event") == "adt_message"]
    assert [(r["message_control_id"], r["outcome"]) for r in recs] == [
        ("E2E-1", "applied"), ("E2E-2", "applied"), ("E2E-2", "duplicate"), ("E2E-3", "rejected"),
        ("E2E-4", "applied"), ("E2E-5", "applied")]
    assert all(r["patient"] == PATIENT and r["instance"] == "a" for r in recs)
