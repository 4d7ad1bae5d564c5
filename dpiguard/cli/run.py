"""``dpiguard run | demo | config check | keys init | totp-code``: serving, and what serving needs."""

from __future__ import annotations

import sys
from pathlib import Path

import pyotp

from dpiguard.audit.chain import public_key_path
from dpiguard.auth.users import SecretBox
from dpiguard.cli.common import config_path, load, with_config
from dpiguard.signing import generate_keypair


def cmd_run(args) -> int:
    from dpiguard.edge.runner import run_proxy
    from dpiguard.edge.workers import run_workers
    from dpiguard.services import build_services

    cfg = load(args, check_files=True)
    if args.workers != 1:
        return run_workers(cfg, config_path(args), args.workers)
    services = build_services(cfg)  # every file validated before anything listens
    return run_proxy(cfg, services, services.adt_processor())


def cmd_demo(args) -> int:
    from dpiguard.demo import MISSING_EXTRA_MESSAGE, missing_extra

    missing = missing_extra()
    if missing:  # a production install (no `demo` extra): one line, no traceback
        print("dpiguard: " + MISSING_EXTRA_MESSAGE.format(missing=", ".join(missing)), file=sys.stderr)
        return 2
    from dpiguard.demo.runner import run_demo

    return run_demo(host=args.host, port=args.port, workdir=Path(args.dir), seed_value=args.seed, ldap=args.ldap)


def cmd_config_check(args) -> int:
    from dpiguard.services import load_policies

    cfg = load(args, check_files=True)
    p = load_policies(cfg)
    print(f"configuration OK; policy version {p.version}; "
          f"{len(p.roles)} roles, {len(p.categories)} categories, "
          f"{len(p.careteam.units)} transversal units; emergency access {'on' if p.breakglass.enabled else 'off'}"
          + (f"; FHIR under {p.fhir.base_path}, {len(p.fhir.types)} resource types" if p.fhir else ""))
    status = 0
    if cfg.directory.enabled:
        status = max(status, _check_directory(cfg, p))
    if cfg.oidc.enabled:
        status = max(status, _check_oidc(cfg, p))
    return status


def _check_directory(cfg, policies) -> int:
    """The LDAP / AD directory: reachable, TLS verified, service bind accepted, base readable."""
    from dpiguard.auth.directory import DirectoryUnavailable
    from dpiguard.services import ldap_directory

    try:
        report = ldap_directory(cfg).check()
    except (DirectoryUnavailable, ValueError) as exc:
        print(f"dpiguard: directory ({cfg.directory.url}): {exc}", file=sys.stderr)
        return 1
    groups = policies.directory_groups
    print(report + ("; policies/directory.yaml maps " + str(len(groups.groups)) + " groups" if groups else
                    "; WARNING: no policies/directory.yaml: no directory user has a role, none can log in"))
    return 0


def _check_oidc(cfg, policies) -> int:
    """The IdP's discovery document and keys are fetched and checked, and what is wrong is said."""
    from dpiguard.auth.oidc import OidcError
    from dpiguard.services import relying_party

    try:
        rp = relying_party(cfg, None)
        rp.check_client_key()
        doc = rp.discovery()
        keys = rp.jwks_size()
    except (OidcError, OSError, ValueError) as exc:
        print(f"dpiguard: oidc: {exc}", file=sys.stderr)
        return 1
    print(f"OpenID Connect ({cfg.oidc.profile}) OK: {cfg.oidc.issuer}, {keys} signing key(s), "
          f"{len(policies.oidc.rules)} role rule(s) in oidc.yaml"
          + ("" if doc.get("end_session_endpoint") else "; the IdP has no end_session_endpoint (no logout at the IdP)")
          + ("" if doc.get("backchannel_logout_supported") else "; the IdP does not announce back-channel logout"))
    if not policies.oidc.rules:
        print("dpiguard: oidc: warning: policies/oidc.yaml gives no role: nobody can log in through the IdP",
              file=sys.stderr)
    return 0


def cmd_keys_init(args) -> int:
    cfg = load(args, check_files=False)
    data_key = cfg.path(cfg.secrets.data_key_file)
    private = cfg.path(cfg.secrets.assertion_private_key_file)
    public = private.with_name(private.stem + ".pub.pem")
    audit_key = cfg.path(cfg.audit.signing_key_file)
    for path in (data_key, private, audit_key):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if data_key.exists():
        print(f"kept existing data key {data_key}")
    else:
        SecretBox.generate_key_file(data_key)
        print(f"created data key {data_key} (encrypts TOTP secrets; back it up, keep it out of Redis)")
    if private.exists():
        print(f"kept existing assertion key {private}")
    else:
        generate_keypair(private, public)
        print(f"created assertion signing key {private} and public key {public} (give the public key to the DPI)")
    if audit_key.exists():
        print(f"kept existing audit signing key {audit_key}")
    else:
        generate_keypair(audit_key, public_key_path(audit_key))
        print(f"created audit signing key {audit_key} and public key {public_key_path(audit_key)} "
              f"(signs audit checkpoints; keep it outside the audit folder, give the public key to auditors)")
    return 0


def cmd_totp_code(args) -> int:
    print(pyotp.TOTP(args.secret).now())
    return 0


def register(sub) -> None:
    sp = with_config(sub.add_parser("run", help="run the proxy in front of the configured DPI"))
    sp.add_argument("--workers", type=int, default=1,
                    help="N proxy processes on ports listen.port .. listen.port+N-1 (see docs/deployment.md)")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("demo", help="run a complete demo on localhost (Redis, demo DPI, proxy)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8080, help="proxy port (the demo DPI listens on port+1)")
    sp.add_argument("--dir", default=".dpiguard-demo", help="working folder for keys, data and traces")
    sp.add_argument("--seed", type=int, default=2026)
    sp.add_argument("--ldap", action="store_true",
                    help="also start an OpenLDAP directory (slapd) whose users log in with their directory password")
    sp.set_defaults(func=cmd_demo)

    cfg = sub.add_parser("config", help="configuration tools").add_subparsers(dest="config_cmd", required=True)
    with_config(cfg.add_parser("check", help="validate configuration and policy files")).set_defaults(func=cmd_config_check)

    keys = sub.add_parser("keys", help="key management").add_subparsers(dest="keys_cmd", required=True)
    with_config(keys.add_parser("init", help="create missing keys")).set_defaults(func=cmd_keys_init)

    sp = sub.add_parser("totp-code", help="print the current code of a TOTP secret (for testers)")
    sp.add_argument("secret")
    sp.set_defaults(func=cmd_totp_code)
