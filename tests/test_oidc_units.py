"""Pure logic of OpenID Connect login: the mapping file, the Pro Santé Connect claims, the configuration.

The protocol itself is tested against a real provider in tests/test_oidc.py."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpiguard.auth.oidc import OidcSettings, RelyingParty, psc_exercises, psc_rpps
from dpiguard.config import Config, ConfigError
from dpiguard.policy.files import PolicyError
from dpiguard.policy.oidc import OidcMapping

ROLES = {"doctor": "", "nurse": "", "pharmacist": ""}


def mapping(text: str) -> OidcMapping:
    return OidcMapping.from_text(text, "policies/oidc.yaml", ROLES)


@pytest.mark.parametrize("text, line, message", [
    ("rules:\n  - roles: [doctor]\n", 2, "at least one condition"),
    ("rules:\n  - claim: groups\n    roles: [doctor]\n", 2, "'claim' and 'value' go together"),
    ("rules:\n  - claim: groups\n    value: x\n    roles: [surgeon]\n", 4, "unknown role 'surgeon'"),
    ("rules:\n  - profession: 10\n    colour: red\n    roles: [doctor]\n", 3, "unknown key 'colour'"),
    ("rules:\n  - profession: [10]\n    roles: [doctor]\n", 2, "must be a text"),
    ("rules:\n  - profession: '10'\n    roles: []\n", 3, "non-empty list"),
    ("rulez: []\n", 1, "unknown section"),
    ("rules: {a: 1}\n", 1, "must be a list"),
])
def test_mapping_file_mistakes_name_file_and_line(text, line, message):
    with pytest.raises(PolicyError) as err:
        mapping(text)
    assert err.value.line == line and message in err.value.message and "oidc.yaml" in str(err.value)


def test_mapping_all_conditions_of_a_rule_must_hold_and_roles_add_up():
    m = mapping("rules:\n"
                "  - profession: '10'\n    sector: SA07\n    roles: [doctor]\n"
                "  - claim: groups\n    value: pharma\n    roles: [pharmacist]\n")
    doc_sa07 = [{"profession": "10", "category": "C", "savoir_faire": "", "sectors": ("SA07",)}]
    doc_elsewhere = [{"profession": "10", "category": "C", "savoir_faire": "", "sectors": ("SA01",)}]
    assert m.roles_for({}, doc_sa07) == ("doctor",)
    assert m.roles_for({}, doc_elsewhere) == ()
    assert m.roles_for({"groups": ["x", "pharma"]}, doc_sa07) == ("doctor", "pharmacist")
    assert m.roles_for({"groups": "pharma"}, ()) == ("pharmacist",)
    assert m.roles_for({"groups": ["pharmacy"]}, ()) == ()
    # the profession and the sector must be those of the same exercise
    split = [{"profession": "10", "sectors": ("SA01",)}, {"profession": "60", "sectors": ("SA07",)}]
    assert m.roles_for({}, split) == ()


def test_no_file_means_no_role():
    assert OidcMapping().roles_for({"groups": ["anything"]}, [{"profession": "10"}]) == ()


_VALUE = st.one_of(st.sampled_from(["dpi-x", "dpi-X", "dpi-x ", "dpi", ""]), st.text(max_size=6))


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=200)
@given(st.dictionaries(st.sampled_from(["groups", "roles", "x"]),
                       st.one_of(_VALUE, st.lists(_VALUE, max_size=4), st.integers(), st.booleans(), st.none()),
                       max_size=3))
def test_property_a_claim_rule_gives_its_roles_exactly_when_the_value_is_there(claims):
    m = mapping("rules:\n  - claim: groups\n    value: dpi-x\n    roles: [nurse]\n")
    got = claims.get("groups")
    present = got == "dpi-x" or (isinstance(got, list) and "dpi-x" in got)
    assert m.roles_for(claims, ()) == (("nurse",) if present else ())


def test_psc_claims_object_or_json_text():
    ref = {"exercices": [{"codeProfession": "60", "codeCategorieProfessionnelle": "C", "codeSavoirFaire": "",
                          "activities": [{"codeSecteurDactivite": "SA07"}, {"codeSecteurActivite": "SA01"}]}]}
    expected = ({"profession": "60", "category": "C", "savoir_faire": "", "sectors": ("SA07", "SA01")},)
    assert psc_exercises({"SubjectRefPro": ref}) == expected
    assert psc_exercises({"SubjectRefPro": orjson.dumps(ref).decode()}) == expected
    for bad in ("{not json", 12, ["x"], {"exercices": "x"}, {"exercices": [1, None]}, None):
        assert psc_exercises({"SubjectRefPro": bad}) == ()


def test_psc_rpps():
    assert psc_rpps({"SubjectNameID": "810002909371"}) == "10002909371"
    assert psc_rpps({"preferred_username": "810002909371"}) == "10002909371"
    assert psc_rpps({"SubjectNameID": "10002909371"}) == "10002909371"
    assert psc_rpps({"SubjectNameID": "8ABC"}) == ""
    assert psc_rpps({}) == ""


def test_relying_party_refuses_symmetric_algorithms():
    with pytest.raises(ValueError):
        RelyingParty(OidcSettings(issuer="https://i", client_id="c", redirect_uri="https://r", algorithms=("HS256",)),
                     None)


BASE = {"upstream": {"url": "http://x"}}


@pytest.mark.parametrize("oidc, key, message", [
    ({"enabled": True}, "oidc.issuer", "required"),
    ({"enabled": True, "issuer": "https://i", "client_id": "c"}, "oidc.redirect_uri", "required"),
    ({"enabled": True, "issuer": "https://i", "client_id": "c", "redirect_uri": "https://r"},
     "oidc.client_secret_file", "required"),
    ({"issuer": "http://idp.example"}, "oidc.issuer", "https://"),
    ({"algorithms": ["RS256", "HS256"]}, "oidc.algorithms", "HS256"),
    ({"algorithms": ["none"]}, "oidc.algorithms", "none"),
    ({"clock_skew": 3600}, "oidc.clock_skew", "0 to 300"),
    ({"profile": "france"}, "oidc.profile", "generic"),
    ({"enabled": True, "issuer": "https://i", "client_id": "c", "redirect_uri": "https://r",
      "client_secret_file": "s", "scopes": ["profile"]}, "oidc.scopes", "openid"),
])
def test_config_section_says_what_is_wrong(oidc, key, message):
    with pytest.raises((ConfigError, ValueError)) as err:
        Config.model_validate({**BASE, "oidc": oidc})
    text = str(err.value)
    assert message in text
    if isinstance(err.value, ConfigError):
        assert err.value.key == key


def test_psc_profile_defaults():
    cfg = Config.model_validate({**BASE, "oidc": {"profile": "psc"}}).oidc
    assert cfg.acr_required == "eidas1" and cfg.acr_vouching == ["eidas1"]
    cfg = Config.model_validate(BASE).oidc
    assert cfg.acr_required is None and cfg.acr_vouching == [] and not cfg.enabled
