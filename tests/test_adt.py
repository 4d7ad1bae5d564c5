"""HL7 v2 ADT parsing and the pure movement state machine (no I/O)."""

from __future__ import annotations

import pytest

from dpiguard.careteam import adt
from dpiguard.careteam.adt import AdtError, Movement, ParseOptions, parse_message
from dpiguard.careteam.movements import plan

from .hl7msgs import adt as msg

T0 = 1_780_000_000.0


def test_admit_fields():
    mv = parse_message(msg("A01", patient="P0042", unit="cardio", visit="V99", at=T0, control_id="C1"))
    assert (mv.trigger, mv.patient, mv.unit, mv.visit, mv.time, mv.control_id) == \
        ("A01", "P0042", "CARDIO", "V99", T0, "C1")
    assert mv.sender == "SIH-GAM/HOPITAL" and mv.kind == "admit"


def test_patient_identifier_choice():
    pid3 = "185^^^ASIP-SANTE-INS-NIR^NH~P7^^^HOPITAL^PI~X1^^^OTHER^PI"
    assert parse_message(msg("A01", pid3=pid3)).patient == "P7"  # type PI first
    assert parse_message(msg("A01", pid3=pid3), ParseOptions(patient_id_authority="OTHER")).patient == "X1"
    with pytest.raises(AdtError) as err:
        parse_message(msg("A01", pid3=pid3), ParseOptions(patient_id_authority="NOPE"))
    assert err.value.ack == "AR" and "NOPE" in err.value.message
    assert parse_message(msg("A01", pid3="Q1^^^A^MR")).patient == "Q1"  # no PI: the first


def test_times_local_zone_and_offsets():
    tz = ParseOptions(timezone="Europe/Paris")
    m = msg("A01", at=T0).replace("EVN||", "EVN||", 1)
    assert parse_message(m, tz).time == T0
    # PV1-44 (admit date) wins for an admission; without an offset it is read in Europe/Paris.
    pv1_44 = msg("A01").rstrip("\r").split("\r")
    pv1 = pv1_44[-1].split("|")
    pv1 += [""] * (45 - len(pv1))
    pv1[44] = "20260701120000"
    pv1_44[-1] = "|".join(pv1)
    mv = parse_message("\r".join(pv1_44), tz)
    assert mv.time == adt.parse_hl7_time("20260701100000+0000", tz=None)  # 12:00 CEST = 10:00 UTC
    assert adt.parse_hl7_time("202607011200", __import__("zoneinfo").ZoneInfo("UTC")) == \
        adt.parse_hl7_time("20260701120000+0000", None)


@pytest.mark.parametrize("text, code", [
    ("garbage", adt.ERR_SEGMENT_SEQUENCE),
    ("MSH|^~\\&|A|B|C|D|20260101||ORU^R01|1|P|2.5\rPID|||P1\r", adt.ERR_UNSUPPORTED_MESSAGE),
    ("MSH|^~\\&|A|B|C|D|20260101||ADT^A99|1|P|2.5\rPID|||P1\rPV1||I|U\r", adt.ERR_UNSUPPORTED_EVENT),
    ("MSH|^~\\&|A|B|C|D|20260101||ADT^A01||P|2.5\rPID|||P1\rPV1||I|U\r", adt.ERR_REQUIRED_FIELD),
    ("MSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|3.0\rPID|||P1\rPV1||I|U\r", adt.ERR_UNSUPPORTED_VERSION),
    ("MSH|^^\\&|A|B|C|D|20260101||ADT^A01|1|P|2.5\rPID|||P1\rPV1||I|U\r", adt.ERR_DATA_TYPE),
    ("MSH|ab|A|B|C|D|20260101||ADT^A01|1|P|2.5\rPID|||P1\rPV1||I|U\r", adt.ERR_DATA_TYPE),
    ("MSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|2.5\rPV1||I|U\r", adt.ERR_REQUIRED_FIELD),
    ("MSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|2.5\rPID|||P1\r", adt.ERR_REQUIRED_FIELD),
    ("MSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|2.5\rPID|||P1\rPV1||I|\r", adt.ERR_REQUIRED_FIELD),
    ("MSH|^~\\&|A|B|C|D|2026-01-01||ADT^A01|1|P|2.5\rPID|||P1\rPV1||I|U\r", adt.ERR_DATA_TYPE),
    ("MSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|2.5\rPID|||P 1\rPV1||I|U\r", adt.ERR_DATA_TYPE),
    ("MSH|^~\\&|A|B|C|D|20260101||ADT^A40|1|P|2.5\rPID|||P1\r", adt.ERR_REQUIRED_FIELD),
])
def test_unusable_messages_are_rejected_with_a_code(text, code):
    with pytest.raises(AdtError) as err:
        parse_message(text)
    assert err.value.ack == "AR"
    assert err.value.code == code, err.value.message


def test_decode_charset():
    latin = msg("A01", charset="8859/1").replace("MARTIN^ALICE", "HÉLÈNE^ZOÉ").encode("latin-1")
    assert "HÉLÈNE" in adt.decode(latin)
    with pytest.raises(AdtError):
        adt.decode(msg("A01").replace("MARTIN", "HÉLÈNE").encode("latin-1"))  # declared UTF-8, is not
    with pytest.raises(AdtError):
        adt.decode(msg("A01", charset="EBCDIC").encode())


def test_ack_escapes_and_carries_error():
    h = adt.read_header(msg("A02", control_id="X|1"))
    ack = adt.build_ack(h, "AE", "unit A|B ^ bad", "100", control_id="ACK1", timestamp="20260101")
    msh, msa_seg, err = ack.strip("\r").split("\r")
    assert msh.split("|")[8] == "ACK^A02^ACK"
    assert msa_seg.split("|")[1] == "AE" and len(msa_seg.split("|")) == 4
    assert "\\F\\" in msa_seg and err.startswith("ERR|||100^^HL70357|E")


# -- the state machine ----------------------------------------------------------------------------

def mv(trigger, at, unit="A", visit="V1", patient="P1", **kw):
    return Movement(control_id=f"{trigger}{at}", sender="PAS", trigger=trigger, patient=patient, visit=visit,
                    unit=unit, time=at, **kw)


class Sim:
    """Applies plans in memory, like the store does in Redis."""

    def __init__(self):
        self.visits, self.stays, self.latest = {}, {}, None

    def apply(self, m):
        p = plan(m, self.visits, self.stays, self.latest)
        for target, changes in ((self.stays, p.stays), (self.visits, p.visits)):
            for k, v in changes.items():
                if v is None:
                    target.pop(k, None)
                else:
                    target[k] = v
        if p.latest:
            self.latest = p.latest
        return p

    def units(self):
        return sorted((s["unit"], s["start"], s["end"]) for s in self.stays.values())


def test_admit_transfer_discharge_and_cancellations():
    s = Sim()
    s.apply(mv("A01", 100, "A"))
    assert s.units() == [("A", 100, None)]
    s.apply(mv("A02", 200, "B"))
    assert s.units() == [("A", 100, 200), ("B", 200, None)]
    s.apply(mv("A12", 210, None))  # cancel the transfer: back to A, B never happened
    assert s.units() == [("A", 100, None)]
    s.apply(mv("A02", 300, "B"))
    s.apply(mv("A03", 400, None))
    assert s.units() == [("A", 100, 300), ("B", 300, 400)]
    s.apply(mv("A13", 410, None))
    assert s.units() == [("A", 100, 300), ("B", 300, None)]
    with pytest.raises(AdtError):
        s.apply(mv("A13", 420, None))  # the discharge is already cancelled


def test_cancel_admit_removes_everything():
    s = Sim()
    s.apply(mv("A01", 100, "A"))
    s.apply(mv("A02", 200, "B"))
    s.apply(mv("A11", 210, None))
    assert s.units() == []
    assert s.visits["V1"]["status"] == "cancelled"
    s.apply(mv("A01", 300, "C"))  # the same visit number can be admitted again
    assert s.units() == [("C", 300, None)]
    assert list(s.stays) == ["V1.3"]  # stay ids are never reused


def test_out_of_order_and_invalid_sequences_are_refused():
    s = Sim()
    s.apply(mv("A01", 100, "A"))
    s.apply(mv("A02", 200, "B"))
    before = (dict(s.stays), dict(s.visits))
    for bad in (mv("A03", 150, None),          # discharge older than the current stay
                mv("A02", 150, "C"),           # transfer older than the current stay
                mv("A01", 300, "A"),           # visit already admitted
                mv("A13", 300, None),          # not discharged
                mv("A02", 300, "C", visit="V2"),  # unknown visit
                mv("A22", 300, None)):         # not on leave
        with pytest.raises(AdtError) as err:
            s.apply(bad)
        assert err.value.ack == "AE"
        assert (dict(s.stays), dict(s.visits)) == before, bad.trigger
    s.apply(mv("A03", 500, None))
    with pytest.raises(AdtError):
        s.apply(mv("A03", 600, None))  # already discharged
    with pytest.raises(AdtError):
        s.apply(mv("A12", 600, None))  # discharged: cancel the discharge first


def test_bed_change_leave_update_and_no_visit_number():
    s = Sim()
    s.apply(mv("A05", 50, "A", visit=None))
    assert s.stays == {}  # pre-admission gives no access
    s.apply(mv("A01", 100, "A", visit=None))
    assert s.units() == [("A", 100, None)]
    s.apply(mv("A02", 150, "A", visit=None))  # bed change in the same unit
    assert s.units() == [("A", 100, None)]
    s.apply(mv("A12", 160, None, visit=None))  # cancels the bed change only
    assert s.units() == [("A", 100, None)]
    s.apply(mv("A21", 170, None, visit=None))
    assert s.units() == [("A", 100, None)]
    s.apply(mv("A22", 180, None, visit=None))
    s.apply(mv("A08", 190, "B", visit=None))  # location corrected
    assert s.units() == [("B", 100, None)]


def test_merge_moves_visits():
    survivor = Sim()
    prior = Sim()
    prior.apply(mv("A01", 100, "A", patient="OLD"))
    p = plan(Movement("M1", "PAS", "A40", "NEW", None, None, 200.0, prior_patient="OLD"),
             survivor.visits, survivor.stays, None, (prior.visits, prior.stays))
    assert p.stays == {"V1.1": {"unit": "A", "start": 100, "end": None}}
    assert p.other_stays == {"V1.1": None} and p.other_patient == "OLD"
