"""``policies/directory.yaml``: which directory groups give which roles and care units (LDAP / AD).

Written by the RSSI, validated, sealed and hot-reloaded like the other policy files (any mistake is a
PolicyError naming file and line, and the running set stays in service)::

    groups:
      "CN=GG-DPI-Infirmiers,OU=Groupes,DC=chu,DC=fr":
        roles: [nurse]
      "CN=GG-Cardiologie,OU=Groupes,DC=chu,DC=fr":
        units: [CARDIO]
    unit_attribute_values:          # optional: values of directory.unit_attribute -> care units
      "Cardiologie": CARDIO

Rules (default deny):

* a group that is not listed gives nothing; a user whose groups give no role gets no access at all
  (the login is refused and traced);
* group names are distinguished names, compared without regard to case or to spaces around ``,``
  and ``=`` (``cn=GG-X, ou=Groupes`` is ``CN=GG-X,OU=Groupes``);
* roles must be declared in categories.yaml; units are unit names (A-Z a-z 0-9 . _ -);
* ``unit_attribute_values``: without the section, the values of ``directory.unit_attribute`` are unit
  names as they are (values that are not valid unit names are ignored); with it, only the listed
  values give a unit.

The file is optional: without it no directory user gets a role, so none can log in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping

from dpiguard.auth.directory import normalize_dn
from dpiguard.ids import ID_RE
from dpiguard.policy.files import LineDict, PolicyError, load_yaml

DIRECTORY_FILE = "directory.yaml"
_SECTIONS = ("groups", "unit_attribute_values")


@dataclass(frozen=True)
class GroupGrant:
    roles: tuple[str, ...] = ()
    units: tuple[str, ...] = ()


@dataclass(frozen=True)
class DirectoryMapping:
    """Group DN (normalized) → roles and units; attribute value → unit (None: values as they are)."""

    groups: Mapping[str, GroupGrant] = field(default_factory=lambda: MappingProxyType({}))
    attribute_units: Mapping[str, str] | None = None

    def resolve(self, groups: Iterable[str], unit_values: Iterable[str] = ()) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(roles, units) of a user with these group DNs and unit-attribute values. Sorted, no repeats."""
        roles: set[str] = set()
        units: set[str] = set()
        for dn in groups:
            grant = self.groups.get(normalize_dn(dn))
            if grant is not None:
                roles.update(grant.roles)
                units.update(grant.units)
        for value in unit_values:
            value = str(value).strip()
            if self.attribute_units is None:
                if ID_RE.fullmatch(value):
                    units.add(value.upper())
            elif value in self.attribute_units:
                units.add(self.attribute_units[value])
        return tuple(sorted(roles)), tuple(sorted(units))

    @classmethod
    def from_text(cls, text: str, label: str, roles: Iterable[str]) -> "DirectoryMapping":
        data = load_yaml(text, label)
        known = set(roles)
        for key in data:
            if key not in _SECTIONS:
                raise PolicyError(label, data.line_of(key),
                                  f"unknown section {key!r} (expected 'groups' and 'unit_attribute_values')")
        section = data.get("groups")
        if not isinstance(section, LineDict) or not section:
            raise PolicyError(label, data.line_of("groups") if "groups" in data else data.line,
                              "'groups' must map group names (distinguished names) to their roles and units")
        groups: dict[str, GroupGrant] = {}
        for name, value in section.items():
            line = section.line_of(name)
            if not isinstance(name, str) or "=" not in name:
                raise PolicyError(label, line, f"group {name!r}: write the group's distinguished name, "
                                               "e.g. \"CN=GG-DPI-Infirmiers,OU=Groupes,DC=chu,DC=fr\"")
            try:
                key = normalize_dn(name)
            except ValueError:
                raise PolicyError(label, line, f"group {name!r} is not a valid distinguished name") from None
            what = f"group {name!r}"
            if key in groups:
                raise PolicyError(label, line, f"{what} is listed twice (names ignore case and spaces)")
            if not isinstance(value, LineDict) or not value:
                raise PolicyError(label, line, f"{what}: expected 'roles' and/or 'units' below")
            for k in value:
                if k not in ("roles", "units"):
                    raise PolicyError(label, value.line_of(k), f"{what}: unknown setting {k!r} (allowed: roles, units)")
            grant_roles = value.get("roles", [])
            if not isinstance(grant_roles, list) or not all(isinstance(r, str) for r in grant_roles):
                raise PolicyError(label, value.line_of("roles"), f"{what}: 'roles' must be a list of role names")
            for r in grant_roles:
                if r not in known:
                    raise PolicyError(label, value.line_of("roles"), f"{what}: unknown role {r!r} "
                                                                     "(roles are declared in categories.yaml)")
            grant_units = value.get("units", [])
            if not isinstance(grant_units, list) or not all(isinstance(u, str) for u in grant_units):
                raise PolicyError(label, value.line_of("units"), f"{what}: 'units' must be a list of unit names")
            for u in grant_units:
                if not ID_RE.fullmatch(u):
                    raise PolicyError(label, value.line_of("units"),
                                      f"{what}: unit name {u!r}: 1-64 characters among A-Z a-z 0-9 . _ -")
            if not grant_roles and not grant_units:
                raise PolicyError(label, line, f"{what}: give at least one role or one unit")
            groups[key] = GroupGrant(tuple(dict.fromkeys(grant_roles)), tuple(dict.fromkeys(u.upper() for u in grant_units)))
        attribute_units = None
        if "unit_attribute_values" in data:
            values = data["unit_attribute_values"]
            if not isinstance(values, LineDict):
                raise PolicyError(label, data.line_of("unit_attribute_values"),
                                  "'unit_attribute_values' must map attribute values to unit names")
            attribute_units = {}
            for raw, unit in values.items():
                if not isinstance(raw, (str, int)) or isinstance(raw, bool) or not isinstance(unit, str) \
                        or not ID_RE.fullmatch(unit):
                    raise PolicyError(label, values.line_of(raw), f"value {raw!r}: expected 'value: UNIT' with a "
                                                                  "unit name of A-Z a-z 0-9 . _ -")
                attribute_units[str(raw)] = unit.upper()
            attribute_units = MappingProxyType(attribute_units)
        return cls(MappingProxyType(groups), attribute_units)


