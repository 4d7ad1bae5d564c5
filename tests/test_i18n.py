"""The catalogues: every text of the code and templates has a French translation, with the same
placeholders; language negotiation and local times (dpiguard/i18n.py, docs/i18n.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.pofile import read_po

from dpiguard.i18n import LOCALE_DIR, Localizer, negotiate, parse_accept_language

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = re.compile(r"%\((\w+)\)[sd]")


def extracted() -> set:
    with open(ROOT / "babel.cfg") as fh:
        method_map, options_map = parse_mapping_cfg(fh)
    out = set()
    for _, _, message, _, _ in extract_from_dir(str(ROOT), method_map, options_map):
        out.add(message if isinstance(message, str) else tuple(message))
    return out


@pytest.fixture(scope="module")
def catalog():
    with open(LOCALE_DIR / "fr" / "LC_MESSAGES" / "messages.po", "rb") as fh:
        return read_po(fh, locale="fr")


def test_every_message_has_a_french_translation(catalog):
    messages = extracted()
    assert len(messages) > 250  # pages, refusals, console, reports
    translated = {m.id: m for m in catalog if m.id}
    missing = sorted(str(m) for m in messages if m not in translated)
    assert missing == [], "run pybabel extract/update and translate (docs/i18n.md)"
    empty = sorted(str(m.id) for m in translated.values()
                   if m.fuzzy or not (m.string if isinstance(m.string, str) else all(m.string)))
    assert empty == []


def test_translations_keep_the_placeholders(catalog):
    for m in catalog:
        if not m.id:
            continue
        ids = m.id if isinstance(m.id, tuple) else (m.id,)
        strings = m.string if isinstance(m.string, tuple) else (m.string,)
        wanted = set(PLACEHOLDER.findall(" ".join(ids)))
        for s in strings:
            assert set(PLACEHOLDER.findall(s)) == wanted, (m.id, s)


def test_negotiation():
    assert parse_accept_language("en-GB;q=0.8, fr-FR, de;q=0") == ["fr-fr", "en-gb"]
    assert negotiate({}) == "fr"
    assert negotiate({"accept-language": "en-US,en;q=0.9"}) == "en"
    assert negotiate({"accept-language": "de, en;q=0.5"}) == "en"
    assert negotiate({"accept-language": "en", "cookie": "a=1; dpiguard_lang=fr"}) == "fr"
    assert negotiate({"cookie": "dpiguard_lang=xx"}, default="fr") == "fr"  # not a language offered
    assert negotiate({"accept-language": "en"}, available=("fr",)) == "fr"


def test_local_times_and_words():
    fr = Localizer("fr", "Europe/Paris")
    t = 1773322325  # 2026-03-12 13:32:05 UTC
    assert fr.clock(t) == "14:32" and fr.datetime(t) == "12 mars 2026, 14:32:05"
    assert fr.iso("2026-03-12T13:32:05.000Z") == "12 mars 2026, 14:32:05"
    assert fr.duration(300) == "5 minutes" and fr.duration(5400) == "1 heure 30 minutes"
    assert fr.yes_no(True) == "oui" and fr.yes_no(False) == "non"
    en = Localizer("en", "Europe/Paris")
    assert en.clock(t) == "2:32\u202fPM" or en.clock(t) == "2:32 PM"
    assert en.duration(14400) == "4 hours"
    assert Localizer("fr", "America/New_York").clock(t) == "09:32"
