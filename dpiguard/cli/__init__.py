"""The ``dpiguard`` command line.

    dpiguard demo                         everything on localhost, in one command
    dpiguard run --config FILE            the proxy in front of a real DPI
    dpiguard config check --config FILE   validate configuration and policy files
    dpiguard keys init --config FILE      create the data key and the assertion signing key pair
    dpiguard users add|list|disable|enable|reset-totp|set-roles|passwd|unlock
    dpiguard sessions revoke USER
    dpiguard careteam unit-add|unit-remove|stay-add|stay-end|stay-remove|assign|unassign|show
    dpiguard totp-code SECRET             current code for a TOTP secret (for testers)
    dpiguard policy check|test|explain|diff   tools for policy editors (dpiguard/policycli.py)

The configuration file comes from ``--config`` or the ``DPIGUARD_CONFIG`` environment variable.
Exit codes: 0 success, 1 operation refused or failed, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import orjson

from dpiguard.config import ConfigError, load_config

#: Modules adding command groups (one line each); see register() in each.
COMMAND_MODULES: list[str] = ["dpiguard.cli.adt", "dpiguard.cli.policy", "dpiguard.cli.breakglass", "dpiguard.cli.audit"]


def _config(args, check_files: bool = True):
    path = args.config or os.environ.get("DPIGUARD_CONFIG")
    if not path:
        raise ConfigError("--config", "give --config FILE or set DPIGUARD_CONFIG")
    return load_config(path, check_files=check_files)


def parse_time(value: str | None) -> float | None:
    """ISO date/time (UTC unless an offset is given), epoch seconds, or 'now'."""
    if value is None or value == "":
        return None
    if value == "now":
        return datetime.now(timezone.utc).timestamp()
    try:
        return float(value)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date/time: {value!r} (use e.g. 2026-11-20 or 2026-11-20T14:30)")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _audit_admin(cfg, action: str, **fields) -> None:
    """User and care-team management leave a trace too."""
    from dpiguard.audit.chain import admin_log

    log = admin_log(cfg)
    try:
        log.write({"event": "admin", "action": action, "outcome": "allow", "reason": "ok",
                   "operator": getpass.getuser(), **fields})
    finally:
        log.close()


def _read_password(args) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Password again: "):
        raise ValueError("the two passwords differ")
    return first


def _show_enrollment(login: str, uri: str, png: str | None) -> None:
    from dpiguard.auth.qr import qr_png, qr_terminal

    print(f"TOTP enrollment for {login}: scan this QR code with an authenticator app")
    print(qr_terminal(uri))
    print(f"otpauth URI: {uri}")
    if png:
        qr_png(uri, png)
        print(f"QR code written to {png}")


# -- commands ---------------------------------------------------------------------------------------

def cmd_run(args) -> int:
    from dpiguard.edge.runner import run_proxy

    cfg = _config(args)
    if args.workers != 1:
        from dpiguard.edge.workers import run_workers

        return run_workers(cfg, args.config or os.environ["DPIGUARD_CONFIG"], args.workers)
    return run_proxy(cfg)


def cmd_demo(args) -> int:
    from dpiguard.demo.runner import run_demo

    return run_demo(host=args.host, port=args.port, workdir=Path(args.dir), seed_value=args.seed)


def cmd_config_check(args) -> int:
    from dpiguard.policy.table import Policy

    from dpiguard.services import careteam_policy

    cfg = _config(args)
    from dpiguard.careteam.breakglass import BreakGlassPolicy
    from dpiguard.decision.fhir import load_enforcer

    policy = Policy.load(cfg.path(cfg.policies.dir))
    ct_policy = careteam_policy(cfg, policy.categories)
    bg = BreakGlassPolicy.load(cfg.path(cfg.policies.dir), policy.roles, policy.categories)
    fhir = load_enforcer(cfg.path(cfg.policies.dir), policy, cfg.upstream.url, None)
    print(f"configuration OK; policy version {policy.version}; "
          f"{len(policy.roles)} roles, {len(policy.categories)} categories, "
          f"{len(ct_policy.units)} transversal units; emergency access {'on' if bg.enabled else 'off'}"
          + (f"; FHIR under {fhir.policy.base_path}, {len(fhir.policy.types)} resource types" if fhir else ""))
    return 0


def cmd_keys_init(args) -> int:
    from dpiguard.decision.assertion import generate_keypair
    from dpiguard.auth.users import SecretBox

    cfg = _config(args, check_files=False)
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
        from dpiguard.audit.chain import public_key_path

        generate_keypair(audit_key, public_key_path(audit_key))
        print(f"created audit signing key {audit_key} and public key {public_key_path(audit_key)} "
              f"(signs audit checkpoints; keep it outside the audit folder, give the public key to auditors)")
    return 0


def cmd_users(args) -> int:
    from dpiguard.services import user_directory, redis_client, session_store

    cfg = _config(args, check_files=False)
    users = user_directory(cfg)
    if args.users_cmd == "add":
        password = _read_password(args)
        user, uri = users.add(args.login, password, args.role, display_name=args.name or "")
        _audit_admin(cfg, "user_add", user=user.login, roles=list(user.roles))
        print(f"user {user.login} created with roles {', '.join(user.roles)}")
        _show_enrollment(user.login, uri, args.qr_png)
    elif args.users_cmd == "list":
        rows = users.list()
        if args.json:
            print(orjson.dumps([{"login": u.login, "name": u.display_name, "roles": list(u.roles),
                                 "disabled": u.disabled} for u in rows]).decode())
        else:
            print(f"{'LOGIN':24} {'ROLES':24} {'STATUS':9} NAME")
            for u in rows:
                print(f"{u.login:24} {','.join(u.roles):24} {'disabled' if u.disabled else 'active':9} {u.display_name}")
    elif args.users_cmd in ("disable", "enable"):
        getattr(users, args.users_cmd)(args.login)
        revoked = 0
        if args.users_cmd == "disable":
            revoked = session_store(cfg).revoke_user(args.login)
        _audit_admin(cfg, f"user_{args.users_cmd}", user=args.login)
        print(f"user {args.login} {args.users_cmd}d" + (f"; {revoked} session(s) revoked" if revoked else ""))
    elif args.users_cmd == "reset-totp":
        uri = users.reset_totp(args.login)
        session_store(cfg).revoke_user(args.login)
        _audit_admin(cfg, "user_reset_totp", user=args.login)
        _show_enrollment(args.login, uri, args.qr_png)
    elif args.users_cmd == "set-roles":
        users.set_roles(args.login, args.role)
        session_store(cfg).revoke_user(args.login)  # roles live in sessions: make them log in again
        _audit_admin(cfg, "user_set_roles", user=args.login, roles=args.role)
        print(f"user {args.login} now has roles {', '.join(args.role)}; sessions revoked")
    elif args.users_cmd == "passwd":
        users.set_password(args.login, _read_password(args))
        revoked = session_store(cfg).revoke_user(args.login)
        _audit_admin(cfg, "user_passwd", user=args.login)
        print(f"password of {args.login} changed; {revoked} session(s) revoked")
    elif args.users_cmd == "unlock":
        from dpiguard.auth.login import Authenticator, LoginPolicy

        Authenticator(redis_client(cfg), users, LoginPolicy(), prefix=cfg.redis.prefix).unlock(args.login)
        _audit_admin(cfg, "user_unlock", user=args.login)
        print(f"user {args.login} unlocked")
    return 0


def cmd_sessions(args) -> int:
    from dpiguard.services import session_store

    cfg = _config(args, check_files=False)
    count = session_store(cfg).revoke_user(args.login)
    _audit_admin(cfg, "sessions_revoke", user=args.login, count=count)
    print(f"{count} session(s) of {args.login} revoked on every instance")
    return 0


def cmd_careteam(args) -> int:
    from dpiguard.services import careteam_store

    cfg = _config(args, check_files=False)
    ct = careteam_store(cfg)
    c = args.ct_cmd
    if c == "unit-add":
        ct.add_unit_member(args.login, args.unit, start=args.start, end=args.end)
        print(f"{args.login} is a member of unit {args.unit}")
    elif c == "unit-remove":
        ct.remove_unit_member(args.login, args.unit)
        print(f"{args.login} removed from unit {args.unit}")
    elif c == "stay-add":
        stay_id = ct.add_stay(args.patient, args.unit, start=args.start or parse_time("now"), end=args.end,
                              stay_id=args.id)
        print(f"stay {stay_id} of {args.patient} in {args.unit} recorded")
    elif c == "stay-end":
        ct.end_stay(args.patient, args.stay_id, args.at or parse_time("now"))
        print(f"stay {args.stay_id} of {args.patient} ended")
    elif c == "stay-remove":
        ct.remove_stay(args.patient, args.stay_id)
        print(f"stay {args.stay_id} of {args.patient} removed")
    elif c == "assign":
        ct.assign(args.login, args.patient, kind=args.kind, start=args.start, end=args.end)
        print(f"{args.login} assigned to {args.patient} ({args.kind})")
    elif c == "unassign":
        ct.unassign(args.login, args.patient)
        print(f"{args.login} no longer assigned to {args.patient}")
    elif c == "show":
        if bool(args.patient) == bool(args.user):
            raise ValueError("give exactly one of --patient or --user")
        info = ct.explain_patient(args.patient) if args.patient else ct.explain_user(args.user)
        print(orjson.dumps(info, option=orjson.OPT_INDENT_2).decode())
        return 0
    _audit_admin(cfg, f"careteam_{c.replace('-', '_')}",
                 **{k: getattr(args, k) for k in ("login", "unit", "patient", "stay_id") if getattr(args, k, None)})
    return 0


def cmd_totp_code(args) -> int:
    import pyotp

    print(pyotp.TOTP(args.secret).now())
    return 0


# -- parser -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpiguard", description="Access-control proxy for hospital patient records.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_config(sp):
        sp.add_argument("--config", "-c", help="configuration file (default: $DPIGUARD_CONFIG)")
        return sp

    sp = with_config(sub.add_parser("run", help="run the proxy in front of the configured DPI"))
    sp.add_argument("--workers", type=int, default=1,
                    help="N proxy processes on ports listen.port .. listen.port+N-1 (see docs/deployment.md)")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("demo", help="run a complete demo on localhost (Redis, demo DPI, proxy)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8080, help="proxy port (the demo DPI listens on port+1)")
    sp.add_argument("--dir", default=".dpiguard-demo", help="working folder for keys, data and traces")
    sp.add_argument("--seed", type=int, default=2026)
    sp.set_defaults(func=cmd_demo)

    cfg = sub.add_parser("config", help="configuration tools").add_subparsers(dest="config_cmd", required=True)
    with_config(cfg.add_parser("check", help="validate configuration and policy files")).set_defaults(func=cmd_config_check)

    keys = sub.add_parser("keys", help="key management").add_subparsers(dest="keys_cmd", required=True)
    with_config(keys.add_parser("init", help="create missing keys")).set_defaults(func=cmd_keys_init)

    users = sub.add_parser("users", help="user directory").add_subparsers(dest="users_cmd", required=True)
    sp = with_config(users.add_parser("add", help="create a user and enroll TOTP"))
    sp.add_argument("login")
    sp.add_argument("--role", action="append", required=True, help="repeat for several roles")
    sp.add_argument("--name", help="display name")
    sp.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    sp.add_argument("--qr-png", help="also write the enrollment QR code to this PNG file")
    sp = with_config(users.add_parser("list", help="list users"))
    sp.add_argument("--json", action="store_true")
    for name in ("disable", "enable", "unlock"):
        with_config(users.add_parser(name, help=f"{name} a user")).add_argument("login")
    sp = with_config(users.add_parser("reset-totp", help="new TOTP secret (revokes sessions)"))
    sp.add_argument("login")
    sp.add_argument("--qr-png")
    sp = with_config(users.add_parser("set-roles", help="replace a user's roles (revokes sessions)"))
    sp.add_argument("login")
    sp.add_argument("--role", action="append", required=True)
    sp = with_config(users.add_parser("passwd", help="set a user's password"))
    sp.add_argument("login")
    sp.add_argument("--password-stdin", action="store_true")
    for sp in users.choices.values():
        sp.set_defaults(func=cmd_users)

    sess = sub.add_parser("sessions", help="sessions").add_subparsers(dest="sessions_cmd", required=True)
    sp = with_config(sess.add_parser("revoke", help="end every session of a user on every instance"))
    sp.add_argument("login")
    sp.set_defaults(func=cmd_sessions)

    ct = sub.add_parser("careteam", help="care-team data").add_subparsers(dest="ct_cmd", required=True)
    sp = with_config(ct.add_parser("unit-add", help="make a professional a member of a unit"))
    sp.add_argument("login"); sp.add_argument("unit")
    sp.add_argument("--from", dest="start", type=parse_time); sp.add_argument("--to", dest="end", type=parse_time)
    sp = with_config(ct.add_parser("unit-remove", help="remove a unit membership"))
    sp.add_argument("login"); sp.add_argument("unit")
    sp = with_config(ct.add_parser("stay-add", help="record a patient's stay in a unit"))
    sp.add_argument("patient"); sp.add_argument("unit")
    sp.add_argument("--start", type=parse_time); sp.add_argument("--end", type=parse_time); sp.add_argument("--id")
    sp = with_config(ct.add_parser("stay-end", help="end a stay (discharge/transfer out)"))
    sp.add_argument("patient"); sp.add_argument("stay_id"); sp.add_argument("--at", type=parse_time)
    sp = with_config(ct.add_parser("stay-remove", help="delete a stay recorded by mistake"))
    sp.add_argument("patient"); sp.add_argument("stay_id")
    sp = with_config(ct.add_parser("assign", help="assign a professional to a patient explicitly"))
    sp.add_argument("login"); sp.add_argument("patient")
    sp.add_argument("--kind", default="assigned", help="e.g. referring_physician, consultant")
    sp.add_argument("--from", dest="start", type=parse_time); sp.add_argument("--to", dest="end", type=parse_time)
    sp = with_config(ct.add_parser("unassign", help="remove an explicit assignment"))
    sp.add_argument("login"); sp.add_argument("patient")
    sp = with_config(ct.add_parser("show", help="explain a care team"))
    sp.add_argument("--patient"); sp.add_argument("--user")
    for sp in ct.choices.values():
        sp.set_defaults(func=cmd_careteam)

    sp = sub.add_parser("totp-code", help="print the current code of a TOTP secret (for testers)")
    sp.add_argument("secret")
    sp.set_defaults(func=cmd_totp_code)

    # Command groups that live in their own module: each has register(subparsers, with_config).
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub, with_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ConfigError as exc:
        print(f"dpiguard: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # clear message, no traceback for operator errors
        from dpiguard.policy.table import PolicyError

        if isinstance(exc, PolicyError):
            print(f"dpiguard: policy error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, (ValueError, KeyError)):
            print(f"dpiguard: {exc}", file=sys.stderr)
            return 1
        import redis

        if isinstance(exc, redis.RedisError):
            print(f"dpiguard: Redis error: {exc}", file=sys.stderr)
            return 1
        raise

