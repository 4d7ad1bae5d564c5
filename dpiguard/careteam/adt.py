"""HL7 v2 ADT messages (IHE PAM) → patient movements. Pure: no I/O, no clock.

The patient administration system (PAS) publishes admissions, transfers and discharges as HL7 v2.5
ADT messages. :func:`parse_message` checks one message (text, already decoded) and turns it into a
:class:`Movement`; anything dpiguard cannot use raises :class:`AdtError` with the acknowledgement code
to answer (``AR`` = message rejected: malformed, unsupported, a required field missing) and an HL7
error code (table 0357). Applying a movement to the care team is :mod:`dpiguard.movements`' job.

Mapping (see docs/careteam.md):

- trigger event: MSH-9.2 (message type MSH-9.1 must be ``ADT``); control id: MSH-10;
- patient: PID-3, a list of identifiers ``ID^^^AUTHORITY^TYPE``: the one whose assigning authority
  (CX-4.1) is ``patient_id_authority`` when configured, else the one with type (CX-5) ``PI``, else
  the first one;
- visit: PV1-19 (CX-1) when present (stays are keyed by it), else the patient's latest visit;
- unit: PV1-3.1 (point of care), upper-cased;
- time: for A01/A04/A05 PV1-44 (admit date), for A03 PV1-45 (discharge date), then EVN-6 (event
  occurred), then EVN-2 (recorded), then MSH-7. HL7 times without an offset are read in ``timezone``;
- A40 merge: the surviving patient is PID-3, the merged one MRG-1.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

import hl7
from hl7.exceptions import HL7Exception

#: Trigger events dpiguard applies, and what they mean.
TRIGGERS = {
    "A01": "admit",
    "A02": "transfer",
    "A03": "discharge",
    "A04": "register_outpatient",
    "A05": "pre_admit",
    "A08": "update",
    "A11": "cancel_admit",
    "A12": "cancel_transfer",
    "A13": "cancel_discharge",
    "A21": "leave_of_absence",
    "A22": "return_from_leave",
    "A40": "merge_patient",
}
#: Triggers that need a unit (PV1-3).
NEEDS_UNIT = frozenset({"A01", "A02", "A04"})

ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
VISIT_RE = re.compile(r"[A-Za-z0-9._-]{1,48}")  # stays are named VISIT.N (64 characters at most)
_DTM_RE = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?([+-]\d{4})?")

# HL7 table 0357 (message error condition codes) used in ACKs.
ERR_SEGMENT_SEQUENCE = "100"
ERR_REQUIRED_FIELD = "101"
ERR_DATA_TYPE = "102"
ERR_TABLE_VALUE = "103"
ERR_UNSUPPORTED_MESSAGE = "200"
ERR_UNSUPPORTED_EVENT = "201"
ERR_UNSUPPORTED_VERSION = "203"
ERR_UNKNOWN_KEY = "204"
ERR_DUPLICATE_KEY = "205"
ERR_INTERNAL = "207"


class AdtError(ValueError):
    """The message cannot be applied. ``ack`` is ``AR`` or ``AE``; ``code`` from HL7 table 0357."""

    def __init__(self, ack: str, code: str, message: str):
        super().__init__(message)
        self.ack = ack
        self.code = code
        self.message = message


def _reject(code: str, message: str) -> AdtError:
    return AdtError("AR", code, message)


@dataclass(frozen=True)
class Header:
    """What an ACK needs from MSH, even for a message that is otherwise unusable."""

    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    control_id: str = ""
    processing_id: str = "P"
    version: str = "2.5"
    trigger: str = ""


@dataclass(frozen=True)
class Movement:
    """One patient movement, normalised. Times are epoch seconds."""

    control_id: str
    sender: str  # MSH-3.1/MSH-4.1: control ids are unique per sender
    trigger: str  # A01, A02, ...
    patient: str
    visit: str | None
    unit: str | None
    time: float
    patient_class: str = ""  # PV1-2 (I inpatient, O outpatient, E emergency, ...)
    prior_patient: str | None = None  # A40: MRG-1

    @property
    def kind(self) -> str:
        return TRIGGERS[self.trigger]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Movement":
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__ if k in data})


# --------------------------------------------------------------------------- field access


def _subs(component) -> list[str]:
    if isinstance(component, str):
        return [component]
    return [s if isinstance(s, str) else str(s) for s in component]


def _repetitions(segment, index: int) -> list[list[list[str]]]:
    """Field ``index`` of ``segment`` as repetitions → components → subcomponents (strings)."""
    if segment is None or index >= len(segment):
        return []
    field = segment[index]
    if isinstance(field, str):
        return [[[field]]] if field else []
    reps = []
    for rep in field:
        if isinstance(rep, str):
            reps.append([[rep]])
        else:
            reps.append([_subs(c) for c in rep])
    return [r for r in reps if any(any(s for s in c) for c in r)]


def _comp(rep: list[list[str]], n: int, sub: int = 1) -> str:
    if n > len(rep) or sub > len(rep[n - 1]):
        return ""
    return rep[n - 1][sub - 1].strip()


def _first(segment, index: int, comp: int = 1) -> str:
    reps = _repetitions(segment, index)
    return _comp(reps[0], comp) if reps else ""


def _segment(msg, name: str):
    try:
        return msg.segment(name)
    except KeyError:
        return None


# --------------------------------------------------------------------------- times


def parse_hl7_time(text: str, tz: tzinfo) -> float:
    """HL7 DTM ``YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]`` → epoch seconds (ValueError if malformed)."""
    match = _DTM_RE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not an HL7 date/time: {text[:40]!r}")
    year, month, day, hour, minute, second, frac, offset = match.groups()
    if month is None and day is None:
        pass
    dt = datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0),
                  int(second or 0), int((frac or "0").ljust(6, "0")[:6]))
    if offset:
        sign = 1 if offset[0] == "+" else -1
        delta = timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5]))
        if delta > timedelta(hours=14):
            raise ValueError(f"bad time zone offset {offset!r}")
        dt = dt.replace(tzinfo=timezone(sign * delta))
    else:
        dt = dt.replace(tzinfo=tz)
    return dt.timestamp()


# --------------------------------------------------------------------------- the parser


@dataclass(frozen=True)
class ParseOptions:
    patient_id_authority: str | None = None
    timezone: str = "Europe/Paris"


_CHARSETS = {
    "": "utf-8", "UNICODE UTF-8": "utf-8", "ASCII": "ascii", "8859/1": "latin-1",
    "8859/15": "iso8859-15", "UNICODE": "utf-8",
}


def decode(raw: bytes) -> str:
    """Decode a frame using the charset of MSH-18 (default UTF-8). Raises AdtError (AR)."""
    if not raw.startswith(b"MSH") or len(raw) < 8:
        raise _reject(ERR_SEGMENT_SEQUENCE, "the message does not start with an MSH segment")
    sep = raw[3:4]
    msh = raw.split(b"\r", 1)[0].split(sep)
    charset = msh[17].split(b"~")[0].strip().decode("ascii", "replace").upper() if len(msh) > 17 else ""
    codec = _CHARSETS.get(charset)
    if codec is None:
        raise _reject(ERR_TABLE_VALUE, f"unsupported character set MSH-18 {charset[:20]!r}")
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as exc:
        raise _reject(ERR_DATA_TYPE, f"the message is not valid {charset or 'UTF-8'} text "
                                     f"(byte {exc.start})") from None


def check_delimiters(text: str) -> None:
    """MSH-1 and MSH-2 must declare 5 distinct, non-alphanumeric delimiters."""
    if not text.startswith("MSH") or len(text) < 8:
        raise _reject(ERR_SEGMENT_SEQUENCE, "the message does not start with an MSH segment")
    field_sep = text[3]
    encoding = text[4:].split(field_sep, 1)[0]
    chars = field_sep + encoding
    if len(encoding) not in (4, 5) or len(set(chars)) != len(chars) or any(
            c.isalnum() or c in "\r\n " for c in chars):
        raise _reject(ERR_DATA_TYPE, f"invalid encoding characters MSH-1/MSH-2 {chars[:8]!r} "
                                     "(expected e.g. |^~\\&)")


def read_header(text: str) -> Header:
    """Best-effort MSH fields for the ACK of a message that may be unusable (never raises)."""
    try:
        field_sep = text[3]
        comp_sep = text[4]
        fields = text.split("\r", 1)[0].split(field_sep)
    except IndexError:
        return Header()

    def get(n: int, comp: int = 1) -> str:
        # MSH-1 is the separator itself, so MSH-n is fields[n - 1].
        if n - 1 >= len(fields):
            return ""
        parts = fields[n - 1].split(comp_sep)
        return parts[comp - 1].strip()[:64] if comp - 1 < len(parts) else ""

    return Header(get(3), get(4), get(5), get(6), get(10)[:199], get(11) or "P", get(12) or "2.5", get(9, 2))


def parse_message(text: str, options: ParseOptions = ParseOptions()) -> Movement:
    """One decoded HL7 v2 ADT message → Movement. Raises AdtError (AR) when unusable."""
    check_delimiters(text)
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    try:
        msg = hl7.parse(text)
    except (HL7Exception, IndexError, ValueError, KeyError) as exc:
        raise _reject(ERR_SEGMENT_SEQUENCE, f"not an HL7 v2 message: {exc}"[:200]) from None
    msh = msg.segment("MSH")
    header = read_header(text)
    if not header.control_id:
        raise _reject(ERR_REQUIRED_FIELD, "MSH-10 (message control id) is empty")
    if not header.version.startswith("2."):
        raise _reject(ERR_UNSUPPORTED_VERSION, f"unsupported HL7 version MSH-12 {header.version!r}")
    msg_type = _first(msh, 9, 1)
    trigger = _first(msh, 9, 2).upper()
    if msg_type != "ADT":
        raise _reject(ERR_UNSUPPORTED_MESSAGE, f"unsupported message type {msg_type[:10]!r} (only ADT)")
    if trigger not in TRIGGERS:
        raise _reject(ERR_UNSUPPORTED_EVENT, f"unsupported ADT event {trigger[:10]!r} "
                                             f"(supported: {', '.join(sorted(TRIGGERS))})")
    tz = ZoneInfo(options.timezone)
    pid = _segment(msg, "PID")
    if pid is None:
        raise _reject(ERR_REQUIRED_FIELD, "the PID segment is missing")
    patient = _patient_id(_repetitions(pid, 3), options.patient_id_authority, "PID-3")
    pv1 = _segment(msg, "PV1")
    evn = _segment(msg, "EVN")
    if pv1 is None and trigger != "A40":
        raise _reject(ERR_REQUIRED_FIELD, "the PV1 segment is missing")

    visit = _first(pv1, 19, 1) or None
    if visit is not None and not VISIT_RE.fullmatch(visit):
        raise _reject(ERR_DATA_TYPE, f"PV1-19 visit number {visit[:40]!r}: expected 1-48 characters "
                                     "among A-Z a-z 0-9 . _ -")
    unit = _first(pv1, 3, 1) or None
    if unit is not None:
        if not ID_RE.fullmatch(unit):
            raise _reject(ERR_DATA_TYPE, f"PV1-3 unit {unit[:40]!r}: expected 1-64 characters "
                                         "among A-Z a-z 0-9 . _ -")
        unit = unit.upper()
    if trigger in NEEDS_UNIT and unit is None:
        raise _reject(ERR_REQUIRED_FIELD, f"PV1-3 (assigned location) is required for {trigger}")

    candidates = []
    if trigger in ("A01", "A04", "A05"):
        candidates.append(("PV1-44", _first(pv1, 44)))
    if trigger == "A03":
        candidates.append(("PV1-45", _first(pv1, 45)))
    candidates += [("EVN-6", _first(evn, 6)), ("EVN-2", _first(evn, 2)), ("MSH-7", _first(msh, 7))]
    when = None
    for name, value in candidates:
        if value:
            try:
                when = parse_hl7_time(value, tz)
            except (ValueError, OverflowError) as exc:
                raise _reject(ERR_DATA_TYPE, f"{name}: {exc}") from None
            break
    if when is None:
        raise _reject(ERR_REQUIRED_FIELD, "no event time (PV1-44/45, EVN-6, EVN-2 or MSH-7)")

    prior = None
    if trigger == "A40":
        mrg = _segment(msg, "MRG")
        if mrg is None:
            raise _reject(ERR_REQUIRED_FIELD, "A40 needs an MRG segment (the merged patient)")
        prior = _patient_id(_repetitions(mrg, 1), options.patient_id_authority, "MRG-1")
        if prior == patient:
            raise _reject(ERR_DATA_TYPE, "A40: MRG-1 names the same patient as PID-3")
    sender = "/".join(p for p in (header.sending_application, header.sending_facility) if p) or "-"
    return Movement(control_id=header.control_id, sender=sender, trigger=trigger, patient=patient,
                    visit=visit, unit=unit, time=when, patient_class=_first(pv1, 2).upper()[:4],
                    prior_patient=prior)


def _patient_id(reps: list, authority: str | None, where: str) -> str:
    """Pick the patient identifier among the repetitions of a CX field (see module docstring)."""
    ids = [(_comp(r, 1), _comp(r, 4), _comp(r, 5).upper()) for r in reps if _comp(r, 1)]
    if not ids:
        raise _reject(ERR_REQUIRED_FIELD, f"{where} (patient identifier) is empty")
    if authority:
        chosen = [i for i in ids if i[1] == authority]
        if not chosen:
            found = ", ".join(sorted({i[1] or '(none)' for i in ids}))
            raise _reject(ERR_UNKNOWN_KEY, f"{where}: no identifier of assigning authority {authority!r} "
                                           f"(found: {found[:80]})")
    else:
        chosen = [i for i in ids if i[2] == "PI"] or ids
    value = chosen[0][0]
    if not ID_RE.fullmatch(value):
        raise _reject(ERR_DATA_TYPE, f"{where}: patient id {value[:40]!r}: expected 1-64 characters "
                                     "among A-Z a-z 0-9 . _ -")
    return value


# --------------------------------------------------------------------------- acknowledgements


def _escape(text: str) -> str:
    out = text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
    out = out.replace("~", "\\R\\").replace("&", "\\T\\")
    return "".join(c if c >= " " else " " for c in out)


def build_ack(header: Header, ack: str, text: str = "", error_code: str | None = None, *,
              application: str = "DPIGUARD", control_id: str, timestamp: str) -> str:
    """An HL7 v2.5 original-mode ACK (MSH, MSA, and ERR when not accepted), ``\\r``-separated.

    Always uses the standard delimiters ``|^~\\&``; every echoed value is escaped."""
    e = _escape
    trigger = header.trigger if re.fullmatch(r"[A-Z0-9]{3}", header.trigger or "") else ""
    msh = "|".join([
        "MSH", "^~\\&", e(application), e(header.receiving_facility), e(header.sending_application),
        e(header.sending_facility), timestamp, "", f"ACK^{trigger}^ACK" if trigger else "ACK",
        e(control_id), e(header.processing_id[:3]) or "P", e(header.version[:8]) or "2.5",
    ])
    segments = [msh, "|".join(["MSA", ack, e(header.control_id), e(text[:80])])]
    if ack != "AA":
        code = error_code or ERR_INTERNAL
        segments.append("|".join(["ERR", "", "", f"{code}^^HL70357", "E", "", "", "", e(text[:250])]))
    return "\r".join(segments) + "\r"
