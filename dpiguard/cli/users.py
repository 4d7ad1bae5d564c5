"""``dpiguard users ...`` and ``dpiguard sessions revoke``: the user directory and live sessions."""

from __future__ import annotations

import getpass
import sys

import orjson

from dpiguard.auth.qr import qr_png, qr_terminal
from dpiguard.cli.common import audit_admin, load, with_config


def _read_password(args) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
        if not password:
            raise ValueError("--password-stdin: no password on standard input (one line expected)")
        return password
    if not sys.stdin.isatty():
        raise ValueError("no terminal to ask for the password: pass it on standard input with --password-stdin, "
                         "e.g. printf '%s\\n' \"$PASSWORD\" | dpiguard users add LOGIN --role R --password-stdin")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Password again: "):
        raise ValueError("the two passwords differ")
    return first


def _check_roles(cfg, roles: list[str]) -> None:
    """Every role must be declared in categories.yaml of the configured policies (policies.dir)."""
    from dpiguard.policy.snapshot import PolicySet

    directory = cfg.path(cfg.policies.dir)
    known = PolicySet.load(directory).roles
    unknown = [r for r in roles if r not in known]
    if unknown:
        raise ValueError(f"unknown role{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: the roles of "
                         f"{directory / 'categories.yaml'} are {', '.join(sorted(known))}")


def _show_enrollment(login: str, uri: str, png: str | None) -> None:
    print(f"TOTP enrollment for {login}: scan this QR code with an authenticator app")
    print(qr_terminal(uri))
    print(f"otpauth URI: {uri}")
    if png:
        qr_png(uri, png)
        print(f"QR code written to {png}")


def cmd_users(args) -> int:
    from dpiguard.services import authenticator, redis_client, session_store, user_directory

    cfg = load(args, check_files=False)
    if args.users_cmd == "add" and args.external:
        if args.role or args.password_stdin:
            raise ValueError("--external: no --role and no password (the directory checks the password and its "
                             "groups give the roles, policies/directory.yaml)")
    elif args.users_cmd in ("add", "set-roles"):
        if not args.role:
            raise ValueError("give at least one --role")
        _check_roles(cfg, args.role)  # before asking for anything
    users = user_directory(cfg)
    if args.users_cmd == "add" and args.external:
        user, uri = users.add_external(args.login, args.external, display_name=args.name or "")
        audit_admin(cfg, "user_add", user=user.login, external=user.external)
        print(f"user {user.login} created: first factor = the {user.external} directory (no local password), "
              "roles from its groups at each login; second factor = the TOTP below")
        _show_enrollment(user.login, uri, args.qr_png)
    elif args.users_cmd == "add":
        password = _read_password(args)
        user, uri = users.add(args.login, password, args.role, display_name=args.name or "")
        audit_admin(cfg, "user_add", user=user.login, roles=list(user.roles))
        print(f"user {user.login} created with roles {', '.join(user.roles)}")
        _show_enrollment(user.login, uri, args.qr_png)
    elif args.users_cmd == "list":
        rows = users.list()
        if args.json:
            print(orjson.dumps([{"login": u.login, "name": u.display_name, "roles": list(u.roles),
                                 "disabled": u.disabled, "external": u.external or None} for u in rows]).decode())
        else:
            print(f"{'LOGIN':24} {'ROLES':24} {'STATUS':9} NAME")
            for u in rows:
                roles = f"({u.external} groups)" if u.external else ",".join(u.roles)
                print(f"{u.login:24} {roles:24} {'disabled' if u.disabled else 'active':9} {u.display_name}")
    elif args.users_cmd in ("disable", "enable"):
        getattr(users, args.users_cmd)(args.login)
        revoked = 0
        if args.users_cmd == "disable":
            revoked = session_store(cfg).revoke_user(args.login)
        audit_admin(cfg, f"user_{args.users_cmd}", user=args.login)
        print(f"user {args.login} {args.users_cmd}d" + (f"; {revoked} session(s) revoked" if revoked else ""))
    elif args.users_cmd == "reset-totp":
        uri = users.reset_totp(args.login)
        session_store(cfg).revoke_user(args.login)
        audit_admin(cfg, "user_reset_totp", user=args.login)
        _show_enrollment(args.login, uri, args.qr_png)
    elif args.users_cmd == "set-roles":
        users.set_roles(args.login, args.role)
        session_store(cfg).revoke_user(args.login)  # roles live in sessions: make them log in again
        audit_admin(cfg, "user_set_roles", user=args.login, roles=args.role)
        print(f"user {args.login} now has roles {', '.join(args.role)}; sessions revoked")
    elif args.users_cmd == "passwd":
        users.set_password(args.login, _read_password(args))
        revoked = session_store(cfg).revoke_user(args.login)
        audit_admin(cfg, "user_passwd", user=args.login)
        print(f"password of {args.login} changed; {revoked} session(s) revoked")
    elif args.users_cmd == "unlock":
        authenticator(cfg, redis_client(cfg), users).unlock(args.login)
        audit_admin(cfg, "user_unlock", user=args.login)
        print(f"user {args.login} unlocked")
    return 0


def cmd_enrolment(args) -> int:
    """``users invite``, ``users reset-factors``, ``users keys``, ``users remove-key``."""
    import secrets as _secrets

    from dpiguard.services import (
        enrol_link_text,
        enrolment_links,
        recovery_codes,
        redis_client,
        security_keys,
        session_store,
        user_directory,
    )

    cfg = load(args, check_files=False)
    client = redis_client(cfg)
    users = user_directory(cfg, client)
    links = enrolment_links(cfg, client)
    if args.users_cmd == "invite" and args.external:
        if args.role:
            raise ValueError("--external: no --role (the directory's groups give the roles, policies/directory.yaml)")
        # The TOTP secret of add_external is never shown: the owner registers their own second factor
        # through the link, after typing their directory password (docs/authentication.md).
        users.add_external(args.login, args.external, display_name=args.name or "")
        users.reset_totp(args.login)  # a secret nobody saw, not even this terminal
        link = links.issue(args.login, created_by=args.by or "", ttl=args.ttl)
        audit_admin(cfg, "user_invite", user=link.login, external=args.external, by=args.by, link_expires=link.expires)
        print(f"user {link.login} created: first factor = the {args.external} directory; enrolment link for "
              f"the second factor (one use, valid {(args.ttl or cfg.enrolment.link_ttl) // 3600} h):")
        print(enrol_link_text(cfg, link.token))
    elif args.users_cmd == "invite":
        if not args.role:
            raise ValueError("--role is required (repeat it for several roles), or --external ldap")
        _check_roles(cfg, args.role)
        # A random password nobody knows, and a TOTP secret nobody sees: the account is usable only
        # after its owner chose a password and a second factor through the link.
        users.add(args.login, _secrets.token_urlsafe(32) + "aA1!", args.role, display_name=args.name or "")
        link = links.issue(args.login, created_by=args.by or "", ttl=args.ttl)
        audit_admin(cfg, "user_invite", user=link.login, roles=args.role, by=args.by, link_expires=link.expires)
        print(f"user {link.login} created with roles {', '.join(args.role)}; enrolment link (one use, valid "
              f"{(args.ttl or cfg.enrolment.link_ttl) // 3600} h):")
        print(enrol_link_text(cfg, link.token))
    elif args.users_cmd == "reset-factors":
        if users.get(args.login) is None:
            raise ValueError(f"no user {args.login!r}")
        if len(args.checked_by.strip()) < 2 or len(args.evidence.strip()) < 5:
            raise ValueError("--checked-by (who checked the identity) and --evidence (how, e.g. 'badge seen "
                             "at the desk') are required")
        users.reset_totp(args.login)  # a new secret nobody sees: the old phone's codes stop working
        keys = security_keys(cfg, client)
        removed = keys.revoke_all(args.login) if keys is not None else 0
        recovery_codes(cfg, client).revoke(args.login)
        revoked = session_store(cfg, client).revoke_user(args.login)
        link = links.issue(args.login, created_by=args.checked_by, ttl=args.ttl)
        audit_admin(cfg, "user_reset_factors", user=args.login, checked_by=args.checked_by.strip()[:100],
                    evidence=args.evidence.strip()[:300], keys_removed=removed, sessions_revoked=revoked,
                    link_expires=link.expires)
        print(f"second factors of {args.login} reset (authenticator, {removed} security key(s), recovery codes); "
              f"{revoked} session(s) revoked. New enrolment link (one use):")
        print(enrol_link_text(cfg, link.token))
    elif args.users_cmd == "keys":
        keys = security_keys(cfg, client)
        rows = keys.list(args.login) if keys is not None else []
        print(f"{'KEY ID':24} {'NAME':24} {'COUNTER':8} LAST USED")
        for k in rows:
            print(f"{k.id[:22] + '…':24} {k.name or '-':24} {k.count:<8} {k.last_used or '-'}")
    elif args.users_cmd == "remove-key":
        keys = security_keys(cfg, client)
        matches = [k.id for k in (keys.list(args.login) if keys else []) if k.id.startswith(args.key_id)]
        if len(matches) != 1:
            raise ValueError(f"{len(matches)} keys of {args.login} start with {args.key_id!r}: give more of the id")
        keys.remove(args.login, matches[0])
        revoked = session_store(cfg, client).revoke_user(args.login)
        audit_admin(cfg, "user_remove_key", user=args.login, key=matches[0][:64])
        print(f"security key {matches[0][:22]}… of {args.login} removed; {revoked} session(s) revoked")
    return 0


def cmd_sessions(args) -> int:
    from dpiguard.services import session_store

    cfg = load(args, check_files=False)
    count = session_store(cfg).revoke_user(args.login)
    audit_admin(cfg, "sessions_revoke", user=args.login, count=count)
    print(f"{count} session(s) of {args.login} revoked on every instance")
    return 0


def register(sub) -> None:
    users = sub.add_parser("users", help="user directory").add_subparsers(dest="users_cmd", required=True)
    sp = with_config(users.add_parser("add", help="create a user and enroll TOTP"))
    sp.add_argument("login")
    sp.add_argument("--role", action="append", help="repeat for several roles (required without --external)")
    sp.add_argument("--external", choices=["ldap"],
                    help="the user's password is checked by this directory (no local password, roles from its "
                         "groups); dpiguard keeps only the TOTP secret")
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
    sp = with_config(users.add_parser("invite", help="create a user with a one-time enrolment link"))
    sp.add_argument("login")
    sp.add_argument("--role", action="append", help="repeat for several roles (required without --external)")
    sp.add_argument("--external", choices=["ldap"],
                    help="a directory account: its password and roles are the directory's; the link registers "
                         "its second factor after the directory password is typed")
    sp.add_argument("--name", help="display name")
    sp.add_argument("--by", help="who creates the account (written in the trace)")
    sp.add_argument("--ttl", type=int, help="life of the link in seconds (default enrolment.link_ttl)")
    sp.set_defaults(func=cmd_enrolment)
    sp = with_config(users.add_parser("reset-factors", help="lost phone or key: revoke every second factor and "
                                      "the sessions after an identity check, issue a new enrolment link"))
    sp.add_argument("login")
    sp.add_argument("--checked-by", required=True, help="who checked the person's identity")
    sp.add_argument("--evidence", required=True, help="how (e.g. 'professional card seen at the desk')")
    sp.add_argument("--ttl", type=int)
    sp.set_defaults(func=cmd_enrolment)
    sp = with_config(users.add_parser("keys", help="list a user's security keys"))
    sp.add_argument("login")
    sp.set_defaults(func=cmd_enrolment)
    sp = with_config(users.add_parser("remove-key", help="remove one security key (revokes sessions)"))
    sp.add_argument("login")
    sp.add_argument("key_id", help="the key id, or its beginning")
    sp.set_defaults(func=cmd_enrolment)

    sess = sub.add_parser("sessions", help="sessions").add_subparsers(dest="sessions_cmd", required=True)
    sp = with_config(sess.add_parser("revoke", help="end every session of a user on every instance"))
    sp.add_argument("login")
    sp.set_defaults(func=cmd_sessions)
