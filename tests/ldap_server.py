"""A real OpenLDAP server (slapd from the Debian packages) for tests, on a loopback port.

The fixture writes its own cn=config (``slapadd -n0``), TLS with a throw-away CA (tests/certs.py), the
``memberof`` overlay for an Active-Directory-like layout (``memberOf`` on users, ``userAccountControl``
with bit 2 = disabled), then starts ``slapd -h "ldap://127.0.0.1:PORT ldaps://127.0.0.1:PORT2 ldapi://..."``
and loads the directory with ``ldapadd`` (so that the overlay computes ``memberOf``).

Directory (base ``dc=hopital,dc=test``):

* ``ou=people``: ``inf.ldap`` (nurse, unit CARDIO through a group and ``departmentNumber``),
  ``med.ldap`` (physician), ``sans.role`` (only in an unmapped group), ``inf.off`` (disabled:
  ``userAccountControl: 514``), ``svc.dpiguard`` (the service account, may search);
* ``ou=groups``: ``GG-DPI-Infirmiers``, ``GG-DPI-Medecins``, ``GG-Cardio``, ``GG-Cantine`` (unmapped).

slapd missing: :func:`require_slapd` skips, or fails when ``CI`` is set (``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .certs import make_ca, make_leaf

SLAPD = shutil.which("slapd") or ("/usr/sbin/slapd" if Path("/usr/sbin/slapd").exists() else None)
SLAPADD = shutil.which("slapadd") or ("/usr/sbin/slapadd" if Path("/usr/sbin/slapadd").exists() else None)
LDAPADD = shutil.which("ldapadd")
LDAPMODIFY = shutil.which("ldapmodify")
MODULE_DIR = "/usr/lib/ldap"
SCHEMA_DIR = Path("/etc/ldap/schema")

BASE = "dc=hopital,dc=test"
ROOT_DN = f"cn=admin,{BASE}"
ROOT_PW = "Root-Secret-4242"
SERVICE_DN = f"uid=svc.dpiguard,ou=people,{BASE}"
SERVICE_PW = "Service-Secret-4242"
USER_PW = "Ldap-Password-2026!"


def require_slapd() -> None:
    missing = [name for name, path in (("slapd", SLAPD), ("slapadd", SLAPADD), ("ldapadd", LDAPADD))
               if not path]
    if missing:
        message = (f"{', '.join(missing)} not installed (apt-get install -y slapd ldap-utils; "
                   ".ci/run installs them)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# An AD-like schema: the two Active Directory attributes dpiguard reads, with matching rules (the
# msuser.schema of the Debian package declares them without equality rules, so filters cannot use them).
AD_SCHEMA = """dn: cn=adlike,cn=schema,cn=config
objectClass: olcSchemaConfig
cn: adlike
olcAttributeTypes: ( 1.2.840.113556.1.4.221 NAME 'sAMAccountName' EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
olcAttributeTypes: ( 1.2.840.113556.1.4.8 NAME 'userAccountControl' EQUALITY integerMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
olcObjectClasses: ( 1.3.6.1.4.1.55555.1.1 NAME 'adLikeUser' AUXILIARY MAY ( sAMAccountName $ userAccountControl ) )
"""


def _config_ldif(work: Path, cert: Path, key: Path, ca: Path) -> str:
    schemas = "".join((SCHEMA_DIR / f"{name}.ldif").read_text() + "\n"
                      for name in ("core", "cosine", "inetorgperson"))
    return f"""dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {work}/slapd.pid
olcTLSCACertificateFile: {ca}
olcTLSCertificateFile: {cert}
olcTLSCertificateKeyFile: {key}
olcLogLevel: none

dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: {MODULE_DIR}
olcModuleLoad: back_mdb
olcModuleLoad: memberof

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

{schemas}
{AD_SCHEMA}
dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcAccess: {{0}}to * by dn.exact=gidNumber={os.getgid()}+uidNumber={os.getuid()},cn=peercred,cn=external,cn=auth manage by * none

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcSuffix: {BASE}
olcDbDirectory: {work}/data
olcRootDN: {ROOT_DN}
olcRootPW: {ROOT_PW}
olcDbIndex: objectClass eq
olcAccess: {{0}}to attrs=userPassword by self =xw by anonymous auth by * none
olcAccess: {{1}}to * by dn.exact="{SERVICE_DN}" read by self read by * none

dn: olcOverlay={{0}}memberof,olcDatabase={{1}}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcMemberOf
olcOverlay: {{0}}memberof
olcMemberOfRefInt: TRUE
olcMemberOfGroupOC: groupOfNames
olcMemberOfMemberAD: member
olcMemberOfMemberOfAD: memberOf
"""


def _person(uid: str, name: str, *, uac: int = 512, unit: str | None = None, password: str = USER_PW) -> str:
    sn = name.split()[-1]
    return (f"dn: uid={uid},ou=people,{BASE}\nobjectClass: inetOrgPerson\nobjectClass: adLikeUser\n"
            f"uid: {uid}\ncn: {name}\nsn: {sn}\ndisplayName: {name}\nsAMAccountName: {uid}\n"
            f"userAccountControl: {uac}\nuserPassword: {password}\n"
            + (f"departmentNumber: {unit}\n" if unit else "") + "\n")


def _group(cn: str, members: list[str]) -> str:
    return (f"dn: cn={cn},ou=groups,{BASE}\nobjectClass: groupOfNames\ncn: {cn}\n"
            + "".join(f"member: uid={m},ou=people,{BASE}\n" for m in members) + "\n")


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


@dataclass
class LdapServer:
    work: Path
    port: int  # ldap:// (StartTLS)
    ldaps_port: int
    ca_file: Path
    other_ca_file: Path  # a CA that did not sign the server's certificate
    proc: subprocess.Popen | None = None
    args: list[str] = field(default_factory=list)

    @property
    def ldapi(self) -> str:
        return "ldapi://" + str(self.work / "ldapi").replace("/", "%2F")

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    def start(self) -> "LdapServer":
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=open(self.work / "slapd.log", "ab"))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"slapd exited: {(self.work / 'slapd.log').read_text(errors='replace')}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("slapd did not listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # slapd's clean shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def modify(self, ldif: str) -> None:
        """Apply an LDIF change (changetype lines) as the directory's administrator."""
        subprocess.run([LDAPMODIFY, "-x", "-H", self.ldapi, "-D", ROOT_DN, "-w", ROOT_PW],
                       input=ldif.encode(), check=True, capture_output=True, timeout=20)

    def disable(self, uid: str) -> None:
        self.modify(f"dn: uid={uid},ou=people,{BASE}\nchangetype: modify\nreplace: userAccountControl\n"
                    "userAccountControl: 514\n")

    def enable(self, uid: str) -> None:
        self.modify(f"dn: uid={uid},ou=people,{BASE}\nchangetype: modify\nreplace: userAccountControl\n"
                    "userAccountControl: 512\n")

    def delete(self, uid: str) -> None:
        self.modify(f"dn: uid={uid},ou=people,{BASE}\nchangetype: delete\n")

    def add_ldif(self, ldif: str) -> None:
        subprocess.run([LDAPADD, "-x", "-H", self.ldapi, "-D", ROOT_DN, "-w", ROOT_PW], input=ldif.encode(),
                       check=True, capture_output=True, timeout=20)

    def group_add(self, group: str, uid: str) -> None:
        self.modify(f"dn: cn={group},ou=groups,{BASE}\nchangetype: modify\nadd: member\n"
                    f"member: uid={uid},ou=people,{BASE}\n")

    def group_remove(self, group: str, uid: str) -> None:
        self.modify(f"dn: cn={group},ou=groups,{BASE}\nchangetype: modify\ndelete: member\n"
                    f"member: uid={uid},ou=people,{BASE}\n")


def start_ldap(folder: Path | None = None) -> LdapServer:
    require_slapd()
    # ldapi:// socket paths are short (108 bytes): a short temporary folder
    work = Path(tempfile.mkdtemp(prefix="slapd-", dir="/tmp"))
    (work / "data").mkdir()
    (work / "slapd.d").mkdir()
    ca_key, ca_cert, ca_file = make_ca(work, "Test Directory CA")
    _, _, other_ca = make_ca(work, "Other CA")
    cert, key = make_leaf(work, "slapd", ca_key, ca_cert)
    (work / "config.ldif").write_text(_config_ldif(work, cert, key, ca_file))
    subprocess.run([SLAPADD, "-n0", "-F", str(work / "slapd.d"), "-l", str(work / "config.ldif")],
                   check=True, capture_output=True, timeout=60)
    server = LdapServer(work, _free_port(), _free_port(), ca_file, other_ca)
    server.args = [SLAPD, "-d", "0", "-F", str(work / "slapd.d"),
                   "-h", f"ldap://127.0.0.1:{server.port}/ ldaps://127.0.0.1:{server.ldaps_port}/ "
                   f"ldap://127.0.0.2:{server.port}/ {server.ldapi}"]  # 127.0.0.2: not in the certificate
    server.start()
    server.add_ldif(directory_ldif())
    return server


def close_ldap(server: LdapServer) -> None:
    server.stop()
    shutil.rmtree(server.work, ignore_errors=True)
