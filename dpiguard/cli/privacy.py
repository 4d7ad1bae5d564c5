"""``dpiguard privacy ...``: the privacy monitor, its review queue, the staff file and the VIP list.

    dpiguard privacy monitor [--follow] [--source DIR]        read the audit chains, raise alerts
    dpiguard privacy alerts [--status S] [--detector D] ...   the review queue
    dpiguard privacy mark ID justified|abusive --comment T    review an alert
    dpiguard privacy figures                                  alerts per detector, share judged abusive
    dpiguard privacy staff import FILE.csv | remove LOGIN | link LOGIN PATIENT
    dpiguard privacy vip add|remove PATIENT | list | import FILE.csv

See docs/privacy.md. Every change writes an admin trace record (never a name or an address).
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

import orjson

from dpiguard.careteam.imports import Report, parse_csv, sort_by_line
from dpiguard.cli.common import audit_admin, emit, load, time_arg, with_config
from dpiguard.ids import ID_RE
from dpiguard.privacy.pseudonyms import Demographics
from dpiguard.privacy.rules import DETECTORS, LABELS, REVIEW_STATUSES, STATUS_LABELS
from dpiguard.privacy.store import VIP_LEVELS

STAFF_COLUMNS = (("login", "family_name"), ("given_name", "birth_date", "address", "postal_code", "patient_ids"))
VIP_COLUMNS = (("patient",), ("level",))


def _client(cfg):
    from dpiguard.services import admin_redis_client

    return admin_redis_client(cfg)


# -- monitor ------------------------------------------------------------------------------------------
def cmd_monitor(args) -> int:
    from dpiguard.services import load_policies, privacy_audit_log, privacy_monitor

    cfg = load(args, check_files=True)
    policies = _reloading(cfg, load_policies)
    audit = privacy_audit_log(cfg)
    if args.metrics_port:
        from prometheus_client import start_http_server

        from dpiguard.metrics import REGISTRY

        start_http_server(args.metrics_port, addr="127.0.0.1", registry=REGISTRY)
    monitor = privacy_monitor(cfg, _client(cfg), audit, policies, Path(args.source) if args.source else None)
    if args.follow:
        print(f"dpiguard privacy: monitoring {monitor.source} (alerts in chain {audit.chain.name})", flush=True)
    try:
        stats = monitor.run(interval=args.interval, until_idle=not args.follow)
    finally:
        audit.close()
    print(f"dpiguard privacy: {stats.records} records, {stats.accesses} accesses, {stats.alerts} new alert(s), "
          f"{stats.duplicates} already raised, {stats.days_closed} day(s) closed", file=sys.stderr)
    return 0


def _reloading(cfg, load_policies):
    """The policy set for the monitor, re-read (at most every second) when the files of policies/ change;
    an invalid edit keeps the previous set and is reported once (like the proxy's hot reload)."""
    import time

    from dpiguard.policy.reload import files_fingerprint

    directory = cfg.path(cfg.policies.dir)
    state = {"set": load_policies(cfg), "seen": files_fingerprint(directory), "checked": time.monotonic()}

    def current():
        now = time.monotonic()
        if now - state["checked"] >= 1.0:
            state["checked"] = now
            seen = files_fingerprint(directory)
            if seen != state["seen"]:
                state["seen"] = seen
                try:
                    state["set"] = load_policies(cfg)
                    print(f"dpiguard privacy: policy reloaded, version {state['set'].version}", file=sys.stderr)
                except Exception as exc:  # noqa: BLE001 - keep the running set
                    print(f"dpiguard privacy: policy edit refused, previous rules kept: {exc}", file=sys.stderr)
        return state["set"]

    return current


# -- review queue ---------------------------------------------------------------------------------------
def _queue(cfg):
    from dpiguard.privacy.alerts import AlertQueue

    return AlertQueue(_client(cfg), cfg.redis.prefix, cfg.privacy.alert_retention_days)


ALERT_COLUMNS = ("id", "time", "label", "severity", "user", "patient", "status_label", "why")


def cmd_alerts(args) -> int:
    from dpiguard.audit.query import render

    cfg = load(args, check_files=False)
    alerts = _queue(cfg).list(status=args.status, detector=args.detector, user=args.user,
                              since=time_arg(args.since) if args.since else None,
                              until=time_arg(args.until) if args.until else None, limit=args.limit)
    rows = [a.as_dict() for a in alerts]
    fmt = args.format
    emit(render(rows, ALERT_COLUMNS, fmt) if fmt != "json" else
         orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n", args.out)
    return 0


def cmd_mark(args) -> int:
    from dpiguard.audit.chain import admin_log

    cfg = load(args, check_files=False)
    log = admin_log(cfg)
    try:
        alert = _queue(cfg).mark(args.alert, args.status, args.comment, getpass.getuser(), audit=log)
    finally:
        log.close()
    print(f"alerte {alert.id} : {STATUS_LABELS[alert.status]} ({LABELS[alert.detector]})")
    return 0


def cmd_figures(args) -> int:
    from dpiguard.audit.query import render

    cfg = load(args, check_files=False)
    q = _queue(cfg)
    alerts = q.list(since=time_arg(args.since) if args.since else None,
                    until=time_arg(args.until) if args.until else None, limit=10**9)
    figures = q.figures(alerts)
    if args.format == "json":
        emit(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode() + "\n", args.out)
    else:
        text = render(figures["detectors"], ("detector", "label", "alerts", "new", "justified", "abusive",
                                             "abusive_share"), args.format)
        text += (f"\nutilisateurs avec une alerte jugée abusive : {figures['users_with_abusive_alerts']} ; "
                 f"dont avec une nouvelle alerte dans les 90 jours : {figures['reoffended_within_90_days']}\n")
        emit(text, args.out)
    return 0


# -- staff file -----------------------------------------------------------------------------------------
def read_staff(path: str) -> tuple[Report, list[tuple[str, Demographics, list[str]]]]:
    """Validate a staff CSV (errors name line and column); returns (report, rows)."""
    report = Report(path, "staff")
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except OSError as exc:
        report.errors.append(f"{path}: cannot read file ({exc.strerror or exc})")
        return report, []
    except UnicodeDecodeError:
        report.errors.append(f"{path}: not valid UTF-8 text (save the file as UTF-8)")
        return report, []
    rows = parse_csv(text, path, *STAFF_COLUMNS, report)
    out = []
    seen: dict[str, int] = {}
    for line, row in rows:
        def error(column: str, message: str) -> None:
            report.errors.append(f"{path}:{line}: column '{column}': {message}")

        login = (row.get("login") or "").strip()
        if not ID_RE.fullmatch(login):
            error("login", f"{login[:40]!r} is not a valid login")
            continue
        if login in seen:
            error("login", f"{login} is already on line {seen[login]}")
            continue
        seen[login] = line
        families = [f.strip() for f in (row.get("family_name") or "").split("|") if f.strip()]
        if not families:
            error("family_name", "a family name is required (several: separated by |)")
            continue
        d = Demographics(family_names=families, given_name=(row.get("given_name") or "").strip(),
                         birth_date=(row.get("birth_date") or "").strip())
        if d.birth_date and len("".join(c for c in d.birth_date if c.isdigit())) != 8:
            error("birth_date", "expected a date such as 1980-04-12")
            continue
        address, postal = (row.get("address") or "").strip(), (row.get("postal_code") or "").strip()
        if bool(address) != bool(postal):
            error("postal_code" if address else "address", "address and postal_code go together")
            continue
        if address:
            d.address_lines.append([address])
            d.postal_codes.append(postal)
        patients = [p.strip() for p in (row.get("patient_ids") or "").split("|") if p.strip()]
        bad = [p for p in patients if not ID_RE.fullmatch(p)]
        if bad:
            error("patient_ids", f"{bad[0][:40]!r} is not a valid patient id")
            continue
        out.append((login, d, patients))
    sort_by_line(report.errors, path)
    return report, out


def cmd_staff_import(args) -> int:
    from dpiguard.services import privacy_store, pseudonym_hasher

    cfg = load(args, check_files=False)
    report, rows = read_staff(args.file)
    report.dry_run = args.dry_run
    if report.errors or args.dry_run:
        for line in report.lines():
            print(line, file=sys.stderr if report.errors else sys.stdout)
        return 1 if report.errors else 0
    hasher, store = pseudonym_hasher(cfg), privacy_store(cfg, _client(cfg))
    for login, d, patients in rows:
        store.import_staff(login, hasher.pseudonyms(d), patients)
        report.applied += 1
    audit_admin(cfg, "privacy_staff_import", detail=f"{report.applied} staff member(s) from {Path(args.file).name}")
    for line in report.lines():
        print(line)
    return 0


def cmd_staff_remove(args) -> int:
    from dpiguard.services import privacy_store

    cfg = load(args, check_files=False)
    removed = privacy_store(cfg, _client(cfg)).remove_staff(args.login)
    audit_admin(cfg, "privacy_staff_remove", user=args.login)
    print(f"{args.login}: " + ("removed" if removed else "was not in the staff file"))
    return 0


def cmd_staff_link(args) -> int:
    from dpiguard.services import privacy_store

    cfg = load(args, check_files=False)
    if not ID_RE.fullmatch(args.login) or not ID_RE.fullmatch(args.patient):
        raise ValueError("login and patient must be valid ids")
    privacy_store(cfg, _client(cfg)).link(args.login, args.patient)
    audit_admin(cfg, "privacy_staff_link", user=args.login, patient=args.patient)
    print(f"{args.login} is patient {args.patient}")
    return 0


# -- VIP list -------------------------------------------------------------------------------------------
def cmd_vip_add(args) -> int:
    from dpiguard.services import privacy_store

    cfg = load(args, check_files=False)
    privacy_store(cfg, _client(cfg)).set_vip(args.patient, args.level)
    audit_admin(cfg, "privacy_vip_add", patient=args.patient, detail=args.level)
    print(f"{args.patient}: {args.level}")
    return 0


def cmd_vip_remove(args) -> int:
    from dpiguard.services import privacy_store

    cfg = load(args, check_files=False)
    removed = privacy_store(cfg, _client(cfg)).remove_vip(args.patient)
    audit_admin(cfg, "privacy_vip_remove", patient=args.patient)
    print(f"{args.patient}: " + ("removed from the list" if removed else "was not on the list"))
    return 0


def cmd_vip_list(args) -> int:
    from dpiguard.audit.query import render
    from dpiguard.services import privacy_store

    cfg = load(args, check_files=False)
    rows = privacy_store(cfg, _client(cfg)).vip_list()
    emit(render(rows, ("patient", "level", "source", "since"), args.format), None)
    return 0


def cmd_vip_import(args) -> int:
    from dpiguard.services import privacy_store

    cfg = load(args, check_files=False)
    report = Report(args.file, "vip", dry_run=args.dry_run)
    try:
        text = Path(args.file).read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{args.file}: cannot read a UTF-8 file ({exc})") from None
    good = []
    for line, row in parse_csv(text, args.file, *VIP_COLUMNS, report):
        patient, level = (row.get("patient") or "").strip(), (row.get("level") or "vip").strip() or "vip"
        if not ID_RE.fullmatch(patient):
            report.errors.append(f"{args.file}:{line}: column 'patient': {patient[:40]!r} is not a valid patient id")
        elif level not in VIP_LEVELS:
            report.errors.append(f"{args.file}:{line}: column 'level': expected {' or '.join(VIP_LEVELS)}")
        else:
            good.append((patient, level))
    if not report.errors and not args.dry_run:
        store = privacy_store(cfg, _client(cfg))
        for patient, level in good:
            store.set_vip(patient, level)
            report.applied += 1
        audit_admin(cfg, "privacy_vip_import", detail=f"{report.applied} patient(s) from {Path(args.file).name}")
    for line in report.lines():
        print(line, file=sys.stderr if report.errors else sys.stdout)
    return 1 if report.errors else 0


def register(sub) -> None:
    pv = sub.add_parser("privacy", help="privacy monitoring: monitor, review queue, staff file, VIP list")
    psub = pv.add_subparsers(dest="privacy_cmd", required=True)

    sp = with_config(psub.add_parser("monitor", help="read the audit chains and raise privacy alerts"))
    sp.add_argument("--follow", action="store_true", help="keep following new records (a service)")
    sp.add_argument("--source", help="audit folder to read (default: audit.path; or the central store)")
    sp.add_argument("--interval", type=float, default=1.0, help="seconds between passes once caught up")
    sp.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on 127.0.0.1:PORT")
    sp.set_defaults(func=cmd_monitor)

    sp = with_config(psub.add_parser("alerts", help="the review queue of privacy alerts"))
    sp.add_argument("--status", choices=("new",) + REVIEW_STATUSES)
    sp.add_argument("--detector", choices=DETECTORS)
    sp.add_argument("--user")
    sp.add_argument("--from", dest="since")
    sp.add_argument("--to", dest="until")
    sp.add_argument("--limit", type=int, default=200)
    sp.add_argument("--format", choices=("table", "csv", "json", "jsonl"), default="table")
    sp.add_argument("--out")
    sp.set_defaults(func=cmd_alerts)

    sp = with_config(psub.add_parser("mark", help="review an alert: justified or abusive, with a comment"))
    sp.add_argument("alert")
    sp.add_argument("status", choices=REVIEW_STATUSES)
    sp.add_argument("--comment", required=True)
    sp.set_defaults(func=cmd_mark)

    sp = with_config(psub.add_parser("figures", help="alerts per detector and the share judged abusive"))
    sp.add_argument("--from", dest="since")
    sp.add_argument("--to", dest="until")
    sp.add_argument("--format", choices=("table", "csv", "json"), default="table")
    sp.add_argument("--out")
    sp.set_defaults(func=cmd_figures)

    staff = psub.add_parser("staff", help="the staff file (hashed): who is who among patients")
    ssub = staff.add_subparsers(dest="staff_cmd", required=True)
    sp = with_config(ssub.add_parser("import", help="import login,family_name[,given_name,birth_date,address,"
                                                    "postal_code,patient_ids] (hashed at once)"))
    sp.add_argument("file")
    sp.add_argument("--dry-run", action="store_true")
    sp.set_defaults(func=cmd_staff_import)
    sp = with_config(ssub.add_parser("remove", help="forget a staff member's hashes"))
    sp.add_argument("login")
    sp.set_defaults(func=cmd_staff_remove)
    sp = with_config(ssub.add_parser("link", help="record that a patient id is this staff member"))
    sp.add_argument("login")
    sp.add_argument("patient")
    sp.set_defaults(func=cmd_staff_link)

    vip = psub.add_parser("vip", help="confidential patients and personalities")
    vsub = vip.add_subparsers(dest="vip_cmd", required=True)
    sp = with_config(vsub.add_parser("add", help="flag a patient"))
    sp.add_argument("patient")
    sp.add_argument("--level", choices=VIP_LEVELS, default="vip")
    sp.set_defaults(func=cmd_vip_add)
    sp = with_config(vsub.add_parser("remove", help="remove a patient from the list"))
    sp.add_argument("patient")
    sp.set_defaults(func=cmd_vip_remove)
    sp = with_config(vsub.add_parser("list", help="the list"))
    sp.add_argument("--format", choices=("table", "csv", "json"), default="table")
    sp.set_defaults(func=cmd_vip_list)
    sp = with_config(vsub.add_parser("import", help="import patient[,level] lines"))
    sp.add_argument("file")
    sp.add_argument("--dry-run", action="store_true")
    sp.set_defaults(func=cmd_vip_import)
