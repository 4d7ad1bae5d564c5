"""Command groups ``dpiguard breakglass`` and ``dpiguard objections`` (see docs/breakglass.md).

    dpiguard breakglass review [--pending] [--json]
    dpiguard breakglass review --mark ID justified|abusive --comment TEXT [--reviewer NAME]
    dpiguard breakglass review --revoke ID
    dpiguard objections add PATIENT (--user LOGIN | --unit UNIT) [--comment TEXT] [--source TEXT]
    dpiguard objections remove PATIENT (--user LOGIN | --unit UNIT)
    dpiguard objections list [--patient P] [--json]
    dpiguard objections import FILE.csv [--dry-run]
"""

from __future__ import annotations

import getpass
import sys
import time
from datetime import datetime, timezone

import orjson

from dpiguard.careteam.breakglass import BreakGlassStore
from dpiguard.careteam.objections import ObjectionStore
from dpiguard.cli.common import audit_admin, load, with_config


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _record_json(rec: dict, now: float) -> dict:
    g = rec["grant"]
    return {**g.as_dict(), "status": rec.get("status", "pending"), "active": g.start <= now < g.end
            and not rec.get("revoked_at"), "revoked_at": rec.get("revoked_at"), "revoked_by": rec.get("revoked_by"),
            "review_comment": rec.get("review_comment"), "reviewed_by": rec.get("reviewed_by"),
            "reviewed_at": rec.get("reviewed_at")}


def cmd_breakglass(args) -> int:
    try:
        return _breakglass(args)
    except KeyError as exc:  # unknown grant id: a plain message, not a repr
        raise ValueError(exc.args[0] if exc.args else "unknown emergency access") from None


def _breakglass(args) -> int:
    from dpiguard.services import redis_client

    cfg = load(args, check_files=False)
    store = BreakGlassStore(redis_client(cfg), cfg.redis.prefix)
    operator = args.reviewer or getpass.getuser()
    if args.mark and args.revoke:
        raise ValueError("give --mark or --revoke, not both")
    if args.mark:
        grant_id, status = args.mark
        store.mark(grant_id, status, args.comment or "", by=operator)
        audit_admin(cfg, "break_glass_review", break_glass_id=grant_id, review=status, comment=args.comment,
                     user=store.get(grant_id)["grant"].user)
        print(f"emergency access {grant_id} marked {status}")
        return 0
    if args.revoke:
        grant = store.revoke(args.revoke, by=operator)
        audit_admin(cfg, "break_glass_revoke", break_glass_id=grant.id, user=grant.user, patient=grant.patient)
        print(f"emergency access {grant.id} of {grant.user} to {grant.patient} revoked on every instance")
        return 0
    now = time.time()
    rows = [_record_json(rec, now) for rec in store.review_queue(pending_only=args.pending)]
    if args.json:
        print(orjson.dumps(rows).decode())
        return 0
    if not rows:
        print("no emergency access to review" if args.pending else "no emergency access recorded")
        return 0
    print(f"{'ID':18} {'START (UTC)':21} {'USER':16} {'PATIENT':10} {'REASON':22} {'STATE':9} STATUS")
    for row in rows:
        state = "revoked" if row["revoked_at"] else ("active" if row["active"] else "ended")
        print(f"{row['id']:18} {_when(row['start']):21} {row['user']:16} {row['patient']:10} "
              f"{row['reason']:22} {state:9} {row['status']}")
        print(f"{'':18} justification: {row['text']}")
        if row["review_comment"]:
            print(f"{'':18} review by {row['reviewed_by']}: {row['review_comment']}")
    return 0


def cmd_objections(args) -> int:
    from dpiguard.services import redis_client

    cfg = load(args, check_files=False)
    store = ObjectionStore(redis_client(cfg), cfg.redis.prefix)
    c = args.obj_cmd
    if c in ("add", "remove"):
        if bool(args.user) == bool(args.unit):
            raise ValueError("give exactly one of --user LOGIN or --unit UNIT")
        kind, target = ("user", args.user) if args.user else ("unit", args.unit)
        if c == "add":
            o = store.add(args.patient, kind, target, source=args.source or f"cli:{getpass.getuser()}",
                          comment=args.comment or "")
            audit_admin(cfg, "objection_add", patient=o.patient, target=o.field)
            print(f"objection recorded: patient {o.patient} refuses access by {o.kind} {o.target}")
        else:
            removed = store.remove(args.patient, kind, target)
            audit_admin(cfg, "objection_remove", patient=args.patient, target=f"{kind}:{target}")
            print("objection removed" if removed else "no such objection (nothing changed)")
            return 0 if removed else 1
        return 0
    if c == "list":
        rows = [o.as_dict() for o in store.list(args.patient)]
        if args.json:
            print(orjson.dumps(rows).decode())
        else:
            print(f"{'PATIENT':12} {'TYPE':5} {'TARGET':20} {'DATE (UTC)':21} {'SOURCE':16} COMMENT")
            for r in rows:
                print(f"{r['patient']:12} {r['type']:5} {r['target']:20} {_when(r['date']):21} "
                      f"{r['source'][:16]:16} {r['comment']}")
        return 0
    if c == "import":
        report = store.import_csv(args.file, dry_run=args.dry_run)
        if report.errors:
            for error in report.errors:
                print(error, file=sys.stderr)
            print(f"dpiguard: {len(report.errors)} error(s) in {args.file}; nothing imported", file=sys.stderr)
            return 1
        if args.dry_run:
            print(f"{args.file}: {report.rows} row(s), all valid (dry run: nothing written)")
            return 0
        audit_admin(cfg, "objection_import", file=str(args.file), count=report.added)
        print(f"{report.added} objection(s) imported from {args.file}")
        return 0
    return 2


def register(sub) -> None:
    bg = sub.add_parser("breakglass", help="emergency access (bris de glace): review queue")
    bg_sub = bg.add_subparsers(dest="bg_cmd", required=True)
    sp = with_config(bg_sub.add_parser("review", help="list emergency accesses; mark or revoke one"))
    sp.add_argument("--pending", action="store_true", help="only those not yet reviewed")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--mark", nargs=2, metavar=("ID", "VERDICT"), help="VERDICT: justified or abusive")
    sp.add_argument("--comment", help="review comment (required with --mark)")
    sp.add_argument("--reviewer", help="name recorded as reviewer (default: the system user)")
    sp.add_argument("--revoke", metavar="ID", help="end this emergency access now, on every instance")
    sp.set_defaults(func=cmd_breakglass)

    obj = sub.add_parser("objections", help="patient objections (L.1110-4)")
    obj_sub = obj.add_subparsers(dest="obj_cmd", required=True)
    for name, text in (("add", "record a patient's objection to a professional or a unit"),
                       ("remove", "remove an objection")):
        sp = with_config(obj_sub.add_parser(name, help=text))
        sp.add_argument("patient")
        sp.add_argument("--user", help="login of the professional")
        sp.add_argument("--unit", help="care unit")
        if name == "add":
            sp.add_argument("--comment")
            sp.add_argument("--source", help="where the objection comes from (default cli:OPERATOR)")
    sp = with_config(obj_sub.add_parser("list", help="list objections"))
    sp.add_argument("--patient")
    sp.add_argument("--json", action="store_true")
    sp = with_config(obj_sub.add_parser("import", help="import objections from a CSV file (all or nothing)"))
    sp.add_argument("file")
    sp.add_argument("--dry-run", action="store_true", help="validate only")
    for sp in obj_sub.choices.values():
        sp.set_defaults(func=cmd_objections)
