"""An OpenLDAP server (slapd from the Debian packages) on loopback, for ``dpiguard demo --ldap`` and the tests.

It writes its own cn=config (``slapadd -n0``) in a temporary folder: TLS with a throw-away CA, the
``memberof`` overlay (``memberOf`` on users, like Active Directory), a small AD-like schema
(``sAMAccountName``, ``userAccountControl`` with bit 2 = disabled, both with matching rules), then
starts ``slapd`` on ``ldap://127.0.0.1:PORT`` (StartTLS), ``ldaps://127.0.0.1:PORT2`` and an ``ldapi://``
socket, and loads the entries with ``ldapadd`` (so that the overlay computes ``memberOf``).

Install: ``apt-get install -y slapd ldap-utils`` (Debian). :func:`missing_tools` names what is absent.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

MODULE_DIR = "/usr/lib/ldap"
SCHEMA_DIR = Path("/etc/ldap/schema")
INSTALL_HINT = "apt-get install -y slapd ldap-utils (Debian/Ubuntu, as root)"


def _tool(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in ("/usr/sbin", "/usr/bin") if Path(f"{d}/{name}").exists()),
                                      None)


def missing_tools() -> list[str]:
    return [name for name in ("slapd", "slapadd", "ldapadd", "ldapmodify") if not _tool(name)]


# -- a throw-away PKI -------------------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def make_ca(folder: Path, cn: str = "Test Hospital CA"):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path = folder / f"{cn.replace(' ', '_')}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, cert_path


def make_leaf(folder: Path, name: str, ca_key, ca_cert, client: bool = False) -> tuple[Path, Path]:
    """A leaf for localhost/127.0.0.1: server authentication, or client authentication (``client``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                  else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}.crt.pem", folder / f"{name}.key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return cert_path, key_path


# -- cn=config --------------------------------------------------------------------------------------
# The two Active Directory attributes dpiguard reads, with matching rules (the msuser.schema of the
# Debian package declares them without equality rules, so filters cannot use them).
AD_SCHEMA = """dn: cn=adlike,cn=schema,cn=config
objectClass: olcSchemaConfig
cn: adlike
olcAttributeTypes: ( 1.2.840.113556.1.4.221 NAME 'sAMAccountName' EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
olcAttributeTypes: ( 1.2.840.113556.1.4.8 NAME 'userAccountControl' EQUALITY integerMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
olcObjectClasses: ( 1.3.6.1.4.1.55555.1.1 NAME 'adLikeUser' AUXILIARY MAY ( sAMAccountName $ userAccountControl ) )
"""


def config_ldif(work: Path, cert: Path, key: Path, ca: Path, base: str, root_dn: str, root_pw: str,
                reader_dn: str) -> str:
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
olcSuffix: {base}
olcDbDirectory: {work}/data
olcRootDN: {root_dn}
olcRootPW: {root_pw}
olcDbIndex: objectClass eq
olcAccess: {{0}}to attrs=userPassword by self =xw by anonymous auth by * none
olcAccess: {{1}}to * by dn.exact="{reader_dn}" read by self read by * none

dn: olcOverlay={{0}}memberof,olcDatabase={{1}}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcMemberOf
olcOverlay: {{0}}memberof
olcMemberOfRefInt: TRUE
olcMemberOfGroupOC: groupOfNames
olcMemberOfMemberAD: member
olcMemberOfMemberOfAD: memberOf
"""


def person(dn: str, uid: str, name: str, password: str, *, uac: int = 512, unit: str | None = None) -> str:
    """An AD-like user entry (inetOrgPerson + sAMAccountName + userAccountControl)."""
    sn = name.split()[-1]
    return (f"dn: {dn}\nobjectClass: inetOrgPerson\nobjectClass: adLikeUser\n"
            f"uid: {uid}\ncn: {name}\nsn: {sn}\ndisplayName: {name}\nsAMAccountName: {uid}\n"
            f"userAccountControl: {uac}\nuserPassword: {password}\n"
            + (f"departmentNumber: {unit}\n" if unit else "") + "\n")


def group(dn: str, cn: str, members: list[str]) -> str:
    return f"dn: {dn}\nobjectClass: groupOfNames\ncn: {cn}\n" + "".join(f"member: {m}\n" for m in members) + "\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Slapd:
    work: Path
    port: int  # ldap:// (StartTLS)
    ldaps_port: int
    ca_file: Path
    other_ca_file: Path  # a CA that did not sign the server's certificate
    root_dn: str
    root_pw: str
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

    def start(self) -> "Slapd":
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

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    def modify(self, ldif: str) -> None:
        """Apply an LDIF change (changetype lines) as the directory's administrator."""
        subprocess.run([_tool("ldapmodify"), "-x", "-H", self.ldapi, "-D", self.root_dn, "-w", self.root_pw],
                       input=ldif.encode(), check=True, capture_output=True, timeout=20)

    def add_ldif(self, ldif: str) -> None:
        subprocess.run([_tool("ldapadd"), "-x", "-H", self.ldapi, "-D", self.root_dn, "-w", self.root_pw],
                       input=ldif.encode(), check=True, capture_output=True, timeout=20)


def start_slapd(base: str, root_dn: str, root_pw: str, reader_dn: str, entries: str) -> Slapd:
    """A running slapd holding ``entries`` (LDIF), readable by ``reader_dn``. RuntimeError if it fails."""
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not installed ({INSTALL_HINT})")
    work = Path(tempfile.mkdtemp(prefix="slapd-", dir="/tmp"))  # ldapi:// paths must be short
    (work / "data").mkdir()
    (work / "slapd.d").mkdir()
    ca_key, ca_cert, ca_file = make_ca(work, "Test Directory CA")
    _, _, other_ca = make_ca(work, "Other CA")
    cert, key = make_leaf(work, "slapd", ca_key, ca_cert)
    (work / "config.ldif").write_text(config_ldif(work, cert, key, ca_file, base, root_dn, root_pw, reader_dn))
    subprocess.run([_tool("slapadd"), "-n0", "-F", str(work / "slapd.d"), "-l", str(work / "config.ldif")],
                   check=True, capture_output=True, timeout=60)
    server = Slapd(work, _free_port(), _free_port(), ca_file, other_ca, root_dn, root_pw)
    server.args = [_tool("slapd"), "-d", "0", "-F", str(work / "slapd.d"),
                   "-h", f"ldap://127.0.0.1:{server.port}/ ldaps://127.0.0.1:{server.ldaps_port}/ "
                   f"ldap://127.0.0.2:{server.port}/ {server.ldapi}"]  # 127.0.0.2: not in the certificate
    server.start()
    try:
        server.add_ldif(entries)
    except Exception:
        server.close()
        raise
    return server


# -- the demo's directory (dpiguard demo --ldap) --------------------------------------------------------
DEMO_BASE = "dc=chu-exemple,dc=fr"
DEMO_PEOPLE = f"ou=Personnel,{DEMO_BASE}"
DEMO_GROUPS = f"ou=Groupes,{DEMO_BASE}"
DEMO_SERVICE_DN = f"cn=svc-dpiguard,{DEMO_PEOPLE}"
#: (login, name, groups, disabled) — the groups are those of the example policies/directory.yaml.
DEMO_PEOPLE_ENTRIES = (
    ("ldap.infirmiere", "Ines Annuaire (infirmière)", ("GG-DPI-Infirmiers", "GG-Service-Cardiologie"), False),
    ("ldap.medecin", "Paul Annuaire (médecin)", ("GG-DPI-Medecins", "GG-Service-Cardiologie"), False),
    ("ldap.sansrole", "Sacha Annuaire (aucun groupe DPI)", (), False),
    ("ldap.desactive", "Denis Annuaire (compte désactivé)", ("GG-DPI-Infirmiers",), True),
)


def demo_directory_ldif(password: str, service_password: str) -> str:
    out = (f"dn: {DEMO_BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: chu-exemple\no: CHU exemple\n\n"
           f"dn: {DEMO_PEOPLE}\nobjectClass: organizationalUnit\nou: Personnel\n\n"
           f"dn: {DEMO_GROUPS}\nobjectClass: organizationalUnit\nou: Groupes\n\n"
           + person(DEMO_SERVICE_DN, "svc-dpiguard", "Compte de service dpiguard", service_password))
    members: dict[str, list[str]] = {}
    for login, name, groups, disabled in DEMO_PEOPLE_ENTRIES:
        dn = f"uid={login},{DEMO_PEOPLE}"
        out += person(dn, login, name, password, uac=514 if disabled else 512)
        for g in groups:
            members.setdefault(g, []).append(dn)
    for g, dns in members.items():
        out += group(f"cn={g},{DEMO_GROUPS}", g, dns)
    return out


def start_demo_directory(password: str, service_password: str) -> Slapd:
    return start_slapd(DEMO_BASE, f"cn=admin,{DEMO_BASE}", service_password + "-admin", DEMO_SERVICE_DN,
                       demo_directory_ldif(password, service_password))


def demo_directory_config(server: Slapd, password_file: Path) -> dict:
    """The ``directory`` section of the demo's configuration for ``server``."""
    return {"enabled": True, "url": server.url, "start_tls": True, "ca_file": str(server.ca_file),
            "bind_dn": DEMO_SERVICE_DN, "bind_password_file": str(password_file), "base_dn": DEMO_PEOPLE,
            "user_filter": "(sAMAccountName={login})", "recheck_seconds": 30, "down_grace_seconds": 300}
