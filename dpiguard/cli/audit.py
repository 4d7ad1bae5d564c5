"""``dpiguard audit ...``: verify, prune, query, report, collect, export (see docs/audit.md).

Exit codes: 0 success (for ``verify``: every chain is intact), 1 a check failed or an operation was
refused, 2 usage or configuration error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

from dpiguard.config import ConfigError, load_config


def _cfg(args, check_files: bool = False):
    import os

    path = args.config or os.environ.get("DPIGUARD_CONFIG")
    if not path:
        raise ConfigError("--config", "give --config FILE or set DPIGUARD_CONFIG")
    return load_config(path, check_files=check_files)


def _store(args) -> Path:
    if getattr(args, "dir", None):
        return Path(args.dir)
    cfg = _cfg(args)
    return cfg.path(cfg.audit.path)


def _verifier(args):
    from dpiguard.audit.chain import AuditVerifier, public_key_path

    if getattr(args, "public_key", None):
        return AuditVerifier.from_pem_file(args.public_key)
    if getattr(args, "no_signatures", False):
        return None
    if getattr(args, "dir", None) and not (args.config or __import__("os").environ.get("DPIGUARD_CONFIG")):
        raise ConfigError("--public-key", "give --public-key FILE (or --config) to check signatures, "
                                          "or --no-signatures to check only the hash chain")
    cfg = _cfg(args)
    path = public_key_path(cfg.path(cfg.audit.signing_key_file))
    if not path.is_file():
        raise ConfigError("audit.signing_key_file", f"public key {path} not found (create keys with 'dpiguard keys init')")
    return AuditVerifier.from_pem_file(path)


def cmd_verify(args) -> int:
    from dpiguard.audit.verify import verify_store

    store = _store(args)
    reports = verify_store(store, _verifier(args), instance=args.instance)
    if not reports:
        print(f"dpiguard: no audit chain found in {store}", file=sys.stderr)
        return 1
    ok = all(r.ok for r in reports)
    if args.json:
        print(orjson.dumps({"ok": ok, "store": str(store), "chains": [r.as_dict() for r in reports]},
                           option=orjson.OPT_INDENT_2).decode())
    else:
        for r in reports:
            print(r.describe())
            for w in r.warnings:
                print(f"  note: {w}")
        print("audit trail OK" if ok else "AUDIT TRAIL ALTERED OR INCOMPLETE")
    return 0 if ok else 1


def cmd_prune(args) -> int:
    from dpiguard.audit.chain import AuditSigner, admin_log, list_chains
    from dpiguard.audit.verify import prune_chain
    from dpiguard.cli import parse_time

    cfg = _cfg(args)
    store = cfg.path(cfg.audit.path)
    before = parse_time(args.before)
    signer = AuditSigner.from_pem_file(cfg.path(cfg.audit.signing_key_file))
    verifier = _verifier(args)
    results = []
    for chain in list_chains(store):
        if args.instance and chain.name != args.instance:
            continue
        results.append(prune_chain(chain, before, signer, verifier, dry_run=args.dry_run))
    for res in results:
        verb = "would remove" if args.dry_run else "removed"
        if res["files"]:
            print(f"chain {res['chain']}: {verb} {len(res['files'])} segment(s), records up to seq {res['up_to_seq']}")
        else:
            print(f"chain {res['chain']}: nothing older than {args.before}")
    if not args.dry_run:
        import getpass

        log = admin_log(cfg)
        try:
            log.write({"event": "admin", "action": "audit_prune", "outcome": "allow", "reason": "ok",
                       "operator": getpass.getuser(), "detail": f"before {args.before}",
                       "pruned": [r for r in results if r["files"]]})
        finally:
            log.close()
    return 0


def cmd_unthrottle(args) -> int:
    from dpiguard.audit.ship import _client
    from dpiguard.decision.massaccess import unthrottle

    cfg = _cfg(args)
    removed = unthrottle(_client(cfg), cfg.redis.prefix, args.login)
    import getpass

    from dpiguard.audit.chain import admin_log

    log = admin_log(cfg)
    try:
        log.write({"event": "admin", "action": "mass_access_unthrottle", "outcome": "allow", "reason": "ok",
                   "operator": getpass.getuser(), "user": args.login})
    finally:
        log.close()
    print(f"{args.login}: " + ("throttle lifted (all instances within mass_access.refresh_seconds)" if removed
                               else "was not throttled; counters reset"))
    return 0


def register(sub, with_config) -> None:
    audit = sub.add_parser("audit", help="audit trail: verify, prune, query, report, collect, export")
    asub = audit.add_subparsers(dest="audit_cmd", required=True)

    sp = with_config(asub.add_parser("verify", help="prove the audit chains were not altered"))
    sp.add_argument("--dir", help="audit folder (default: audit.path of the configuration)")
    sp.add_argument("--public-key", help="Ed25519 public key (default: the .pub.pem next to audit.signing_key_file)")
    sp.add_argument("--no-signatures", action="store_true", help="check only the hash chains")
    sp.add_argument("--instance", help="only this chain")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_verify)

    sp = with_config(asub.add_parser("prune", help="remove old segments explicitly, keeping the chain verifiable"))
    sp.add_argument("--before", required=True, help="remove segments whose records are all older (date/time)")
    sp.add_argument("--instance", help="only this chain")
    sp.add_argument("--dry-run", action="store_true")
    sp.set_defaults(func=cmd_prune, dir=None, public_key=None, no_signatures=False)

    sp = with_config(asub.add_parser("unthrottle", help="lift a mass-access throttle on a user"))
    sp.add_argument("login")
    sp.set_defaults(func=cmd_unthrottle)

    from dpiguard.audit import ship as auditcollect, export as auditexport, report as auditreport

    auditreport.register(asub, with_config)
    auditcollect.register(asub, with_config)
    auditexport.register(asub, with_config)
