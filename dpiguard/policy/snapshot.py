"""One immutable set of every policy file, under one version: what a decision reads, whole.

``PolicySet.load`` reads the bytes of every file of ``policies/`` once (:func:`read_policy_files`),
validates each (any mistake is a ``PolicyError`` naming the file and line, and nothing of the set is
used), and keeps them together:

* ``table``      roles, categories, permissions and routes (categories.yaml, model.conf, policy.csv,
                 routes.yaml: :mod:`dpiguard.policy.table`);
* ``breakglass`` emergency access (breakglass.yaml: :mod:`dpiguard.policy.breakglass`);
* ``careteam``   transversal units and the grace period (careteam.yaml: :mod:`dpiguard.policy.careteam`),
                 the grace already resolved against ``careteam.grace_seconds`` of the configuration;
* ``fhir``       the FHIR mapping (fhir.yaml: :mod:`dpiguard.policy.fhir`), or None without the file;
* ``privacy``    the privacy detectors (privacy.yaml: :mod:`dpiguard.policy.privacy`), defaults without it;
* ``directory_groups`` LDAP / AD groups → roles and units (directory.yaml: :mod:`dpiguard.policy.directory`), or
                 None without the file (then no directory user has a role).
* ``oidc``       OpenID Connect / Pro Santé Connect claims → roles (oidc.yaml: :mod:`dpiguard.policy.oidc`),
                 no rule (nobody gets a role through the IdP) without it.

A running proxy loads only a sealed set (``sealed=True``: the files are exactly those of
``seal.json``, see :mod:`dpiguard.policy.seal`). The version is a hash over the bytes the set was built from. The pipeline holds one set and a reload
replaces it in one assignment; every step of a decision, and the FHIR checks of its answer, read the
set the decision started with, and its trace record names that set's version.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping

from dpiguard.policy.breakglass import FILE_NAME as BREAKGLASS_FILE
from dpiguard.policy.breakglass import BreakGlassPolicy
from dpiguard.policy.careteam import CARETEAM_FILE, CareTeamPolicy
from dpiguard.policy.directory import DIRECTORY_FILE, DirectoryMapping
from dpiguard.policy.fhir import FHIR_FILE, FhirPolicy
from dpiguard.policy.files import decode_policy_file
from dpiguard.policy.oidc import OIDC_FILE, OidcMapping
from dpiguard.policy.privacy import PRIVACY_FILE, PrivacyPolicy
from dpiguard.policy.routes import RouteTable
from dpiguard.policy.seal import check_seal
from dpiguard.policy.table import Category, Policy, read_policy_files


@dataclass(frozen=True)
class PolicySet:
    directory: Path
    version: str
    table: Policy
    breakglass: BreakGlassPolicy
    careteam: CareTeamPolicy
    fhir: FhirPolicy | None
    privacy: PrivacyPolicy = PrivacyPolicy()
    directory_groups: DirectoryMapping | None = None  # directory.yaml (None: no file)
    oidc: OidcMapping = OidcMapping()
    contents: Mapping[str, bytes] = field(default_factory=dict, repr=False, compare=False)  # the bytes read

    @classmethod
    def load(cls, directory: str | Path, *, default_grace_seconds: int = 86400, sealed: bool = False) -> PolicySet:
        """Read and validate every policy file of ``directory``; PolicyError on the first mistake.

        ``default_grace_seconds``: the grace period when careteam.yaml does not set one.
        ``sealed``: the files must also be exactly those of the folder's ``seal.json``
        (:mod:`dpiguard.policy.seal`), checked on the bytes the set is built from; a running proxy
        loads with it, the editing tools (``policy check``, ``test``...) without."""
        directory = Path(directory)
        contents = read_policy_files(directory)
        policies = cls.from_contents(directory, contents, default_grace_seconds=default_grace_seconds)
        if sealed:  # after the checks of meaning, so that a broken file is reported as such (file:line)
            policies.check_seal()
        return policies

    @classmethod
    def from_contents(cls, directory: Path, contents: Mapping[str, bytes], *,
                      default_grace_seconds: int = 86400) -> PolicySet:
        """The set built from the bytes of its files (as :func:`read_policy_files` gives them)."""
        table = Policy.from_files(directory, contents)

        def text(name: str) -> str | None:
            return decode_policy_file(directory / name, contents[name]) if name in contents else None

        bg_text = text(BREAKGLASS_FILE)
        breakglass = (BreakGlassPolicy.from_text(bg_text, str(directory / BREAKGLASS_FILE), table.roles,
                                                 table.categories)
                      if bg_text is not None else BreakGlassPolicy.disabled())
        ct_text = text(CARETEAM_FILE)
        careteam = (CareTeamPolicy.from_text(ct_text, str(directory / CARETEAM_FILE), table.categories)
                    if ct_text is not None else CareTeamPolicy())
        if careteam.grace_seconds is None:
            careteam = replace(careteam, grace_seconds=default_grace_seconds)
        fhir_text = text(FHIR_FILE)
        fhir = (FhirPolicy.from_text(fhir_text, str(directory / FHIR_FILE), table.roles, table.categories,
                                     hashlib.sha256(contents[FHIR_FILE]).hexdigest()[:16])
                if fhir_text is not None else None)
        pv_text = text(PRIVACY_FILE)
        privacy = PrivacyPolicy.from_text(pv_text, str(directory / PRIVACY_FILE)) if pv_text is not None \
            else PrivacyPolicy()
        dir_text = text(DIRECTORY_FILE)
        mapping = (DirectoryMapping.from_text(dir_text, str(directory / DIRECTORY_FILE), table.roles)
                   if dir_text is not None else None)
        oidc_text = text(OIDC_FILE)
        oidc = OidcMapping.from_text(oidc_text, str(directory / OIDC_FILE), table.roles) if oidc_text is not None \
            else OidcMapping()
        return cls(directory=directory, version=table.version, table=table, breakglass=breakglass,
                   careteam=careteam, fhir=fhir, privacy=privacy, directory_groups=mapping, oidc=oidc,
                   contents=dict(contents))

    def check_seal(self) -> None:
        """PolicyError unless the bytes this set was built from are those of the folder's seal."""
        check_seal(self.directory, self.contents)

    # -- what the steps and the tools ask of the table (roles, categories, routes) -------------------
    def permits(self, roles: Iterable[str], category: str, action: str) -> bool:
        return self.table.permits(roles, category, action)

    def category(self, name: str) -> Category:
        return self.table.category(name)

    @property
    def roles(self) -> Mapping[str, str]:
        return self.table.roles

    @property
    def categories(self) -> Mapping[str, Category]:
        return self.table.categories

    @property
    def routes(self) -> RouteTable:
        return self.table.routes

    @property
    def grace_seconds(self) -> float:
        return self.careteam.grace_seconds

    def file(self, name: str) -> str:
        """The path of one policy file as shown in messages (``policies/policy.csv``)."""
        return str(self.directory / name)
