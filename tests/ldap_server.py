"""A real OpenLDAP server (slapd from the Debian packages) for tests, on a loopback port: the launcher
of :mod:`dpiguard.demo.ldapdir` (own cn=config, TLS with a throw-away CA, ``memberof`` overlay, an
AD-like ``userAccountControl``) with the tests' directory.

Directory (base ``dc=hopital,dc=test``):

* ``ou=people``: ``inf.ldap`` (nurse, unit CARDIO through a group, ``departmentNumber: REA``),
  ``med.ldap`` (physician), ``sans.role`` (only in an unmapped group), ``inf.off`` (disabled:
  ``userAccountControl: 514``), ``svc.dpiguard`` (the service account, may search);
* ``ou=groups``: ``GG-DPI-Infirmiers``, ``GG-DPI-Medecins``, ``GG-Cardio``, ``GG-Cantine`` (unmapped).

slapd missing: :func:`require_slapd` skips, or fails when ``CI`` is set (``.ci/run`` installs it).
"""

from __future__ import annotations

import os

import pytest

from dpiguard.demo.ldapdir import INSTALL_HINT, Slapd, group, missing_tools, person, start_slapd

BASE = "dc=hopital,dc=test"
ROOT_DN = f"cn=admin,{BASE}"
ROOT_PW = "Root-Secret-4242"
SERVICE_DN = f"uid=svc.dpiguard,ou=people,{BASE}"
SERVICE_PW = "Service-Secret-4242"
USER_PW = "Ldap-Password-2026!"


def require_slapd() -> None:
    missing = missing_tools()
    if missing:
        message = f"{', '.join(missing)} not installed ({INSTALL_HINT}; .ci/run installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _person(uid: str, name: str, *, uac: int = 512, unit: str | None = None, password: str = USER_PW) -> str:
    return person(f"uid={uid},ou=people,{BASE}", uid, name, password, uac=uac, unit=unit)


def _group(cn: str, members: list[str]) -> str:
    return group(f"cn={cn},ou=groups,{BASE}", cn, [f"uid={m},ou=people,{BASE}" for m in members])


def directory_ldif() -> str:
    return (f"dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: hopital\no: Hopital test\n\n"
            f"dn: ou=people,{BASE}\nobjectClass: organizationalUnit\nou: people\n\n"
            f"dn: ou=groups,{BASE}\nobjectClass: organizationalUnit\nou: groups\n\n"
            + _person("svc.dpiguard", "Service dpiguard", password=SERVICE_PW)
            + _person("inf.ldap", "Lea Ldap", unit="REA")
            + _person("med.ldap", "Marc Ldap")
            + _person("sans.role", "Sam Sansrole")
            + _person("inf.off", "Odile Off", uac=514)
            + _group("GG-DPI-Infirmiers", ["inf.ldap", "inf.off"])
            + _group("GG-DPI-Medecins", ["med.ldap", "svc.dpiguard"])  # never empty (groupOfNames)
            + _group("GG-Cardio", ["inf.ldap"])
            + _group("GG-Cantine", ["sans.role", "inf.ldap"]))


class LdapServer(Slapd):
    """The tests' directory, with its changes."""

    def disable(self, uid: str) -> None:
        self.modify(f"dn: uid={uid},ou=people,{BASE}\nchangetype: modify\nreplace: userAccountControl\n"
                    "userAccountControl: 514\n")

    def enable(self, uid: str) -> None:
        self.modify(f"dn: uid={uid},ou=people,{BASE}\nchangetype: modify\nreplace: userAccountControl\n"
                    "userAccountControl: 512\n")

    def delete(self, uid: str) -> None:
        self.modify(f"dn: uid={uid},ou=people,{BASE}\nchangetype: delete\n")

    def group_add(self, group: str, uid: str) -> None:
        self.modify(f"dn: cn={group},ou=groups,{BASE}\nchangetype: modify\nadd: member\n"
                    f"member: uid={uid},ou=people,{BASE}\n")

    def group_remove(self, group: str, uid: str) -> None:
        self.modify(f"dn: cn={group},ou=groups,{BASE}\nchangetype: modify\ndelete: member\n"
                    f"member: uid={uid},ou=people,{BASE}\n")


def start_ldap() -> LdapServer:
    require_slapd()
    server = start_slapd(BASE, ROOT_DN, ROOT_PW, SERVICE_DN, directory_ldif())
    server.__class__ = LdapServer
    return server


def close_ldap(server: LdapServer) -> None:
    server.close()
