"""One decision, one policy set: a reload between a FHIR request and its answer changes neither.

The pipeline is built by the composition root (real Redis, real policy files); a valid edit of
fhir.yaml is put in service by the reloader between the request decision and the answer check.
"""

from __future__ import annotations

import shutil

import orjson

from dpiguard.decision.verdict import Incoming, NeedIO
from dpiguard.policy.snapshot import PolicySet
from tests.policyseal import seal

from .test_policy import POLICIES, edit

PATIENT = {"resourceType": "Patient", "id": "P0001", "name": [{"family": "Martin"}],
           "address": [{"city": "Lyon"}], "telecom": [{"system": "phone", "value": "0600000000"}]}


def decide(pipeline, req):
    try:
        return pipeline.decide(req, io=False)
    except NeedIO:
        return pipeline.decide(req, io=True)


def answer(s, req, verdict):
    fhir = s.pipeline.fhir
    try:
        return fhir.process_response(s.pipeline, req, verdict, 200, "application/fhir+json",
                                     orjson.dumps(PATIENT), io=False)
    except NeedIO:
        return fhir.process_response(s.pipeline, req, verdict, 200, "application/fhir+json",
                                     orjson.dumps(PATIENT), io=True)


def test_a_reload_between_request_and_answer_does_not_mix_two_policy_sets(services):
    directory, s = services
    token, _ = s.sessions.create("pha.petit", ["pharmacist"])
    req = Incoming("GET", "/fhir/Patient/P0001", {"authorization": f"Bearer {token}",
                                                 "accept": "application/fhir+json"}, "127.0.0.1", False)
    before = s.policies
    verdict = decide(s.pipeline, req)
    assert verdict.allowed and verdict.policies is before
    verdict.audit.result(5)

    # The RSSI lifts the pharmacists' masks; the reloader puts the new set in service.
    edit(directory / "fhir.yaml", "    administrative: [Patient.address, Patient.telecom]",
         "    administrative: [Patient.telecom]")
    seal(directory)
    assert s.reloader.check() is True
    after = s.policies
    assert after is not before and after.version != before.version

    # The answer to the request decided before the reload is checked with the set of its decision.
    status, body, record = answer(s, req, verdict)
    shown = orjson.loads(body)
    assert status == 200 and "address" not in shown and "telecom" not in shown
    assert record["policy_version"] == before.version
    assert record["fhir_policy_version"] == before.fhir.version

    # A request decided after the reload uses the new set, answer included.
    req2 = Incoming("GET", "/fhir/Patient/P0001", dict(req.headers), "127.0.0.1", False)
    verdict2 = decide(s.pipeline, req2)
    assert verdict2.policies is after
    _, body2, record2 = answer(s, req2, verdict2)
    shown2 = orjson.loads(body2)
    assert shown2["address"] == [{"city": "Lyon"}] and "telecom" not in shown2
    assert record2["policy_version"] == after.version


def test_the_policy_set_is_read_from_one_read_of_the_files(tmp_path):
    directory = tmp_path / "policies"
    shutil.copytree(POLICIES, directory)
    first = PolicySet.load(directory)
    again = PolicySet.load(directory)
    assert first.version == again.version and first.fhir.version == again.fhir.version
    edit(directory / "careteam.yaml", "grace_seconds:", "grace_seconds: 600\n# was:")
    changed = PolicySet.load(directory)
    assert changed.version != first.version and changed.careteam.grace_seconds == 600
    assert first.careteam.grace_seconds != 600  # an existing set never changes
