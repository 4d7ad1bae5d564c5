"""``policies/oidc.yaml``: which OpenID Connect / Pro Santé Connect identities get which dpiguard roles.

Written by the RSSI, validated like the other policy files (a mistake is a ``PolicyError`` naming file
and line; the running proxy keeps its previous set), sealed, part of the policy version and of hot
reload. No file: no OIDC identity gets any role, so nobody logs in through the IdP (default-deny).

Each rule gives roles when all its conditions hold (AND); an identity gets the union of the roles of
the rules that match it. A rule with no condition is refused (it would give roles to everyone).

    rules:
      - claim: groups            # generic OIDC: a claim of the id_token / userinfo (text or list of texts)
        value: dpi-medecins      # ... equals (or, for a list, contains) this text
        roles: [doctor]
      - profession: "10"         # Pro Santé Connect: codeProfession of one exercise (10 = médecin)
        savoir_faire: SM54       # optional, codeSavoirFaire of that same exercise
        sector: SA07             # optional, codeSecteurActivite of one activity of that exercise
        roles: [doctor]

Conditions: ``claim`` + ``value`` (both or neither), ``profession``, ``category`` (codeCategorieProfessionnelle),
``savoir_faire``, ``sector``; the last four are read from the same exercise of ``SubjectRefPro`` (see
:mod:`dpiguard.auth.oidc`). Roles must be roles of categories.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from dpiguard.policy.files import LineDict, LineList, PolicyError, load_yaml

OIDC_FILE = "oidc.yaml"
_CONDITIONS = ("claim", "value", "profession", "category", "savoir_faire", "sector")
_CLAIM_NAME_MAX = 64


@dataclass(frozen=True)
class OidcRule:
    roles: tuple[str, ...]
    claim: str | None = None
    value: str | None = None
    profession: str | None = None
    category: str | None = None
    savoir_faire: str | None = None
    sector: str | None = None
    line: int = 0

    def matches(self, claims: Mapping[str, Any], exercises: Iterable[Mapping[str, Any]]) -> bool:
        if self.claim is not None:
            got = claims.get(self.claim)
            values = got if isinstance(got, list) else [got]
            if not any(isinstance(v, (str, int)) and not isinstance(v, bool) and str(v) == self.value
                       for v in values):
                return False
        if self.profession is None and self.category is None and self.savoir_faire is None and self.sector is None:
            return True
        for ex in exercises:
            if self.profession is not None and ex.get("profession") != self.profession:
                continue
            if self.category is not None and ex.get("category") != self.category:
                continue
            if self.savoir_faire is not None and ex.get("savoir_faire") != self.savoir_faire:
                continue
            if self.sector is not None and self.sector not in ex.get("sectors", ()):
                continue
            return True
        return False


@dataclass(frozen=True)
class OidcMapping:
    rules: tuple[OidcRule, ...] = ()

    def roles_for(self, claims: Mapping[str, Any], exercises: Iterable[Mapping[str, Any]] = ()) -> tuple[str, ...]:
        """The roles of every matching rule, in file order, without repeats (empty: no access)."""
        exercises = list(exercises)
        out: list[str] = []
        for rule in self.rules:
            if rule.matches(claims, exercises):
                out.extend(r for r in rule.roles if r not in out)
        return tuple(out)

    @classmethod
    def from_text(cls, text: str, label: str, roles: Mapping[str, str]) -> "OidcMapping":
        data = load_yaml(text, label)
        for key in data:
            if key != "rules":
                raise PolicyError(label, data.line_of(key), f"unknown section {key!r} (known: rules)")
        section = data.get("rules")
        if section is None:
            return cls(())
        if not isinstance(section, LineList):
            raise PolicyError(label, data.line_of("rules"), "'rules' must be a list of rules (lines starting with '-')")
        rules = []
        for item, line in zip(section, section.item_lines):
            if not isinstance(item, LineDict):
                raise PolicyError(label, line, "a rule must be a mapping (claim/value, profession..., roles)")
            for key in item:
                if key not in _CONDITIONS and key != "roles":
                    raise PolicyError(label, item.line_of(key), f"unknown key {key!r} in a rule "
                                      f"(allowed: {', '.join(_CONDITIONS)}, roles)")
            fields: dict[str, str | None] = {}
            for key in _CONDITIONS:
                value = item.get(key)
                if value is None:
                    fields[key] = None
                    continue
                if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
                    raise PolicyError(label, item.line_of(key), f"{key!r} must be a text (put codes in quotes: \"10\")")
                fields[key] = str(value).strip()
            if (fields["claim"] is None) != (fields["value"] is None):
                raise PolicyError(label, line, "'claim' and 'value' go together: name the claim and the value it must have")
            if fields["claim"] is not None and len(fields["claim"]) > _CLAIM_NAME_MAX:
                raise PolicyError(label, item.line_of("claim"), "claim name too long")
            if all(v is None for v in fields.values()):
                raise PolicyError(label, line, "a rule needs at least one condition (claim/value or profession, "
                                  "category, savoir_faire, sector): without one it would give roles to everyone")
            given = item.get("roles")
            if isinstance(given, str):
                given = [given]
            if not isinstance(given, list) or not given or not all(isinstance(r, str) for r in given):
                raise PolicyError(label, item.line_of("roles"), "'roles' must be a non-empty list of role names")
            for r in given:
                if r not in roles:
                    raise PolicyError(label, item.line_of("roles"),
                                      f"unknown role {r!r} (roles of categories.yaml: {', '.join(sorted(roles))})")
            rules.append(OidcRule(roles=tuple(dict.fromkeys(given)), line=line, **fields))
        return cls(tuple(rules))
