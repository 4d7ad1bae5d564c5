"""Demographics, minimised: normalised names and addresses turned into keyed hashes (HMAC-SHA256).

dpiguard never stores a patient's or a staff member's name or address. What it keeps, to compare
them, is a keyed hash of their normalised form: without the key (derived from the data key of
``secrets.data_key_file`` with HKDF, never written anywhere), a hash cannot be reversed by hashing
a directory of names. Same input, same key → same hash, so "same family name" and "same address"
are equality tests on hashes.

Normalisation (French usage):

- family names: transliterated to ASCII (``anyascii``: accents, ligatures œ/æ, ß...), lower case,
  letters only. A compound name gives the whole name and each part (``Dupont-Moreau`` → ``dupontmoreau``,
  ``dupont``, ``moreau``), without particles (``de``, ``du``, ``le``, ``la``, ``d'``...) and with
  ``saint``/``sainte`` kept with the part that follows (``Saint-Martin`` never matches ``Martin``);
  birth name and usage name both count;
- addresses: the street line (number, repetition index ``bis``/``ter``, street type with the usual
  abbreviations expanded, street name), the postal code; the *address* hash is postal code + number
  + street, the *street* hash postal code + street (neighbours);
- identity (to recognise a staff member among patients): birth family name + first given name + birth
  date (``YYYYMMDD``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Iterable

from anyascii import anyascii
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

HKDF_INFO = b"dpiguard privacy pseudonyms v1"
TOKEN_HEX = 24  # 96 bits: no accidental collision among millions of values

PARTICLES = frozenset({"de", "du", "des", "d", "le", "la", "les", "l", "van", "von", "der", "den", "di", "da",
                       "del", "della", "dos", "das", "el", "al", "ben", "y", "e"})
GLUE_NEXT = frozenset({"saint", "sainte", "st", "ste"})
STREET_TYPES = {
    "r": "rue", "rue": "rue", "av": "avenue", "ave": "avenue", "avenue": "avenue", "bd": "boulevard",
    "bld": "boulevard", "blvd": "boulevard", "boulevard": "boulevard", "pl": "place", "place": "place",
    "ch": "chemin", "chem": "chemin", "chemin": "chemin", "imp": "impasse", "impasse": "impasse",
    "all": "allee", "allee": "allee", "sq": "square", "square": "square", "qu": "quai", "quai": "quai",
    "rte": "route", "route": "route", "fbg": "faubourg", "faubourg": "faubourg", "crs": "cours",
    "cours": "cours", "pass": "passage", "passage": "passage", "res": "residence", "residence": "residence",
    "lot": "lotissement", "lotissement": "lotissement", "sen": "sentier", "sentier": "sentier",
    "prom": "promenade", "promenade": "promenade", "rpt": "rond-point", "hameau": "hameau", "ham": "hameau",
    "lieu-dit": "lieu-dit", "ld": "lieu-dit", "cite": "cite", "mail": "mail", "voie": "voie", "parvis": "parvis",
    "esplanade": "esplanade", "esp": "esplanade", "villa": "villa", "clos": "clos",
}
REPETITION = {"b": "bis", "bis": "bis", "t": "ter", "ter": "ter", "q": "quater", "quater": "quater"}
WORD_ABBREVIATIONS = {"st": "saint", "ste": "sainte", "gal": "general", "gen": "general", "mal": "marechal",
                      "pdt": "president", "pr": "professeur", "dr": "docteur", "n": "notre"}
_NUMBER = re.compile(r"^(\d{1,5})([a-z]*)$")


def derive_key(data_key: bytes) -> bytes:
    """The HMAC key of the pseudonyms, derived from the data key (HKDF-SHA256, own context)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO).derive(data_key)


def fold(text: str) -> str:
    """ASCII, lower case, only letters, digits and single spaces (accents, case and punctuation folded)."""
    ascii_text = anyascii(text or "").lower()
    return " ".join(re.sub(r"[^a-z0-9]+", " ", ascii_text).split())


def family_forms(name: str) -> set[str]:
    """The normalised forms of one family name (whole name, and each part of a compound one)."""
    words = fold(name).split()
    words = [w for w in words if not w.isdigit()]
    if not words:
        return set()
    parts: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w in GLUE_NEXT and i + 1 < len(words):
            parts.append("saint" + ("e" if w in ("sainte", "ste") else "") + words[i + 1])
            i += 2
            continue
        if w not in PARTICLES and len(w) >= 2:
            parts.append(w)
        i += 1
    forms = {"".join(words)} if len(words) > 1 else set()
    forms.update(parts)
    return {f for f in forms if len(f) >= 2}


def given_form(name: str) -> str:
    """First given name, normalised (``Jean-Pierre`` → ``jeanpierre``)."""
    first = (name or "").strip().split(" ")[0] if name else ""
    return "".join(fold(first).split())


def birth_date_form(text: str) -> str:
    """``YYYYMMDD`` from an HL7 DTM (``19800412...``) or an ISO date (``1980-04-12``); '' if unusable."""
    digits = re.sub(r"\D", "", text or "")
    return digits[:8] if len(digits) >= 8 else ""


@dataclass(frozen=True)
class StreetAddress:
    postal_code: str
    number: str  # "12", "12bis", "" when the line has none
    street: str  # "rue des lilas"


def parse_street(line: str, postal_code: str) -> StreetAddress | None:
    """The street part of an address line (None if it has no street): number, type, name."""
    postal = re.sub(r"\s+", "", postal_code or "").upper()
    words = fold(line).split()
    if not words or not postal:
        return None
    number = ""
    m = _NUMBER.match(words[0])
    if m:
        number = m.group(1).lstrip("0") or "0"
        rest = m.group(2)
        words = words[1:]
        if rest in REPETITION:
            number += REPETITION[rest]
        elif words and words[0] in REPETITION and len(words) > 1:
            number += REPETITION[words[0]]
            words = words[1:]
    if not words:
        return None
    if words[0] in STREET_TYPES:
        words = [STREET_TYPES[words[0]]] + words[1:]
    words = [WORD_ABBREVIATIONS.get(w, w) if i else w for i, w in enumerate(words)]
    # "rue des lilas" and "rue lilas" are the same street: drop particles after the type
    core = [words[0]] + [w for w in words[1:] if w not in PARTICLES]
    return StreetAddress(postal, number, " ".join(core))


def pick_street(lines: Iterable[str], postal_code: str) -> StreetAddress | None:
    """The line of an address that names the street: the first with a number, else one starting with a
    street type, else the first line (building names and "appartement 12" lines are skipped)."""
    parsed = [(line, parse_street(line, postal_code)) for line in lines if line and line.strip()]
    parsed = [(line, p) for line, p in parsed if p is not None]
    for _, p in parsed:
        if p.number and p.street.split()[0] in STREET_TYPES.values():
            return p
    for _, p in parsed:
        if p.street.split()[0] in STREET_TYPES.values():
            return p
    for _, p in parsed:
        if p.number:
            return p
    return parsed[0][1] if parsed else None


@dataclass
class Demographics:
    """What one source (HL7 PID, FHIR Patient, a staff CSV line) says about a person, in clear text.

    Lives only in memory, long enough to be turned into :class:`Pseudonyms`."""

    family_names: list[str] = field(default_factory=list)
    given_name: str = ""
    birth_date: str = ""
    address_lines: list[list[str]] = field(default_factory=list)  # one list of lines per address
    postal_codes: list[str] = field(default_factory=list)  # same order as address_lines
    flags: set[str] = field(default_factory=set)  # "vip", "confidential", "staff"

    def empty(self) -> bool:
        return not (self.family_names or self.address_lines or self.flags)


@dataclass(frozen=True)
class Pseudonyms:
    """Keyed hashes of a person's normalised demographics: what dpiguard stores."""

    family: frozenset[str] = frozenset()
    addresses: frozenset[str] = frozenset()
    streets: frozenset[str] = frozenset()
    identity: frozenset[str] = frozenset()
    flags: frozenset[str] = frozenset()

    def fields(self) -> dict[str, str]:
        """As stored in the Redis hash (space-separated tokens; empty sets are left out)."""
        out = {}
        for name in ("family", "addresses", "streets", "identity", "flags"):
            value = getattr(self, name)
            if value:
                out[name] = " ".join(sorted(value))
        return out

    @classmethod
    def from_fields(cls, raw: dict) -> "Pseudonyms":
        def get(name: str) -> frozenset[str]:
            value = raw.get(name) or raw.get(name.encode())
            if isinstance(value, bytes):
                value = value.decode()
            return frozenset(value.split()) if value else frozenset()

        return cls(get("family"), get("addresses"), get("streets"), get("identity"), get("flags"))


class Hasher:
    """Turns :class:`Demographics` into :class:`Pseudonyms` with one key."""

    def __init__(self, key: bytes):
        if len(key) < 32:
            raise ValueError("the pseudonym key must have at least 32 bytes")
        self._key = key

    @classmethod
    def from_data_key(cls, data_key: bytes) -> "Hasher":
        return cls(derive_key(data_key))

    def token(self, kind: str, value: str) -> str:
        return hmac.new(self._key, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()[:TOKEN_HEX]

    def family_tokens(self, names: Iterable[str]) -> frozenset[str]:
        return frozenset(self.token("family", f) for name in names for f in family_forms(name))

    def pseudonyms(self, d: Demographics) -> Pseudonyms:
        addresses, streets = set(), set()
        for lines, postal in zip(d.address_lines, d.postal_codes):
            street = pick_street(lines, postal)
            if street is None:
                continue
            streets.add(self.token("street", f"{street.postal_code}|{street.street}"))
            if street.number:
                addresses.add(self.token("address", f"{street.postal_code}|{street.number}|{street.street}"))
        identity = set()
        given, born = given_form(d.given_name), birth_date_form(d.birth_date)
        if given and born:
            for name in d.family_names:
                whole = "".join(fold(name).split())
                if whole:
                    identity.add(self.token("identity", f"{whole}|{given}|{born}"))
        return Pseudonyms(self.family_tokens(d.family_names), frozenset(addresses), frozenset(streets),
                          frozenset(identity), frozenset(d.flags))
