"""``dpiguard careteam ...``: unit memberships, stays and explicit assignments by hand, and ``show``."""

from __future__ import annotations

import time
from zoneinfo import ZoneInfo

import orjson

from dpiguard.cli.common import audit_admin, load, time_arg, with_config
from dpiguard.times import iso_local


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
        args.stay_id = args.stay_id or _current_stay(ct, args.patient, args.unit)
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
        print(orjson.dumps(_readable_times(info, ZoneInfo(cfg.adt.timezone)), option=orjson.OPT_INDENT_2).decode())
        return 0
    audit_admin(cfg, f"careteam_{c.replace('-', '_')}",
                **{k: getattr(args, k) for k in ("login", "unit", "patient", "stay_id") if getattr(args, k, None)})
    return 0


def _current_stay(ct, patient: str, unit: str | None) -> str:
    """The id of the patient's one open stay in ``unit`` (``stay-end PATIENT --unit U``)."""
    if not unit:
        raise ValueError("give the stay id, or --unit UNIT to end the patient's current stay in that unit "
                         f"(ids: dpiguard careteam show --patient {patient})")
    unit = unit.upper()
    stays = ct.patient_stays(patient)
    open_here = [s["id"] for s in stays if s["unit"] == unit and s["end"] is None]
    if len(open_here) == 1:
        return open_here[0]
    if not open_here:
        raise ValueError(f"{patient} has no open stay in {unit}" + (
            f" (stays: {', '.join(s['id'] + ' in ' + s['unit'] for s in stays)})" if stays else " (no stay at all)"))
    raise ValueError(f"{patient} has {len(open_here)} open stays in {unit} ({', '.join(open_here)}): give the stay id")


TIME_KEYS = ("now", "start", "end")


def _readable_times(value, tz):
    """``careteam show``: epoch seconds as ISO 8601 in the configuration's zone (adt.timezone)."""
    if isinstance(value, dict):
        return {k: (iso_local(v, tz) if k in TIME_KEYS and (v is None or isinstance(v, (int, float)))
                    and not isinstance(v, bool) else _readable_times(v, tz)) for k, v in value.items()}
    if isinstance(value, list):
        return [_readable_times(v, tz) for v in value]
    return value


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
    sp = with_config(ct.add_parser("stay-end", help="end a stay (discharge/transfer out): its id (careteam show), "
                                                  "or --unit U for the patient's current stay in U"))
    sp.add_argument("patient"); sp.add_argument("stay_id", nargs="?")
    sp.add_argument("--unit", help="end the patient's open stay in this unit (instead of a stay id)")
    sp.add_argument("--at", type=time_arg)
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
