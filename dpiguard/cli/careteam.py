"""``dpiguard careteam ...``: unit memberships, stays and explicit assignments by hand, and ``show``."""

from __future__ import annotations

import time

import orjson

from dpiguard.cli.common import audit_admin, load, time_arg, with_config


def cmd_careteam(args) -> int:
    from dpiguard.services import careteam_store

    cfg = load(args, check_files=False)
    ct = careteam_store(cfg)
    c = args.ct_cmd
    if c == "unit-add":
        ct.add_unit_member(args.login, args.unit, start=args.start, end=args.end)
        print(f"{args.login} is a member of unit {args.unit}")
    elif c == "unit-remove":
        ct.remove_unit_member(args.login, args.unit)
        print(f"{args.login} removed from unit {args.unit}")
    elif c == "stay-add":
        stay_id = ct.add_stay(args.patient, args.unit, start=args.start or time.time(), end=args.end,
                              stay_id=args.id)
        print(f"stay {stay_id} of {args.patient} in {args.unit} recorded")
    elif c == "stay-end":
        ct.end_stay(args.patient, args.stay_id, args.at or time.time())
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
    audit_admin(cfg, f"careteam_{c.replace('-', '_')}",
                **{k: getattr(args, k) for k in ("login", "unit", "patient", "stay_id") if getattr(args, k, None)})
    return 0


def register(sub) -> None:
    ct = sub.add_parser("careteam", help="care-team data").add_subparsers(dest="ct_cmd", required=True)
    sp = with_config(ct.add_parser("unit-add", help="make a professional a member of a unit"))
    sp.add_argument("login"); sp.add_argument("unit")
    sp.add_argument("--from", dest="start", type=time_arg); sp.add_argument("--to", dest="end", type=time_arg)
    sp = with_config(ct.add_parser("unit-remove", help="remove a unit membership"))
    sp.add_argument("login"); sp.add_argument("unit")
    sp = with_config(ct.add_parser("stay-add", help="record a patient's stay in a unit"))
    sp.add_argument("patient"); sp.add_argument("unit")
    sp.add_argument("--start", type=time_arg); sp.add_argument("--end", type=time_arg); sp.add_argument("--id")
    sp = with_config(ct.add_parser("stay-end", help="end a stay (discharge/transfer out)"))
    sp.add_argument("patient"); sp.add_argument("stay_id"); sp.add_argument("--at", type=time_arg)
    sp = with_config(ct.add_parser("stay-remove", help="delete a stay recorded by mistake"))
    sp.add_argument("patient"); sp.add_argument("stay_id")
    sp = with_config(ct.add_parser("assign", help="assign a professional to a patient explicitly"))
    sp.add_argument("login"); sp.add_argument("patient")
    sp.add_argument("--kind", default="assigned", help="e.g. referring_physician, consultant")
    sp.add_argument("--from", dest="start", type=time_arg); sp.add_argument("--to", dest="end", type=time_arg)
    sp = with_config(ct.add_parser("unassign", help="remove an explicit assignment"))
    sp.add_argument("login"); sp.add_argument("patient")
    sp = with_config(ct.add_parser("show", help="explain a care team"))
    sp.add_argument("--patient"); sp.add_argument("--user")
    for sp in ct.choices.values():
        sp.set_defaults(func=cmd_careteam)
