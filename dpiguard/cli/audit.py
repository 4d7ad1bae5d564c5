"""``dpiguard audit ...``: verify, prune, query, report, collect, export (see docs/audit.md).

Exit codes: 0 success (for ``verify``: every chain is intact), 1 a check failed or an operation was
refused, 2 usage or configuration error.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import orjson
import redis

from dpiguard.audit.chain import AuditSigner, AuditVerifier, iter_chain, list_chains, list_segments, public_key_path
from dpiguard.audit.explain import EXPLANATION_COLUMNS
from dpiguard.audit.export import TLS_PORT, SyslogError, send_syslog, tls_context, to_audit_event
from dpiguard.audit.query import (
    QUERY_COLUMNS,
    WHO_COLUMNS,
    WHO_COLUMNS_NAMED,
    Filter,
    iter_store,
    render,
    select,
    summarize,
    who_accessed,
)
from dpiguard.audit.report import html_report, who_accessed_html
from dpiguard.audit.ship import Collector, Shipper
from dpiguard.audit.verify import prune_chain, verify_store
from dpiguard.cli.common import audit_admin, config_path, emit, load, time_arg, with_config
from dpiguard.config import ConfigError
from dpiguard.decision.massaccess import unthrottle
from dpiguard.i18n import DEFAULT_LANGUAGE, DEFAULT_TIMEZONE, SUPPORTED, Localizer
from dpiguard.times import iso_ms


def _store(args) -> Path:
    if getattr(args, "dir", None):
        return Path(args.dir)
    cfg = load(args, check_files=False)
    return cfg.path(cfg.audit.path)


def _verifier(args):
    if getattr(args, "public_key", None):
        return AuditVerifier.from_pem_file(args.public_key)
    if getattr(args, "no_signatures", False):
        return None
    if getattr(args, "dir", None) and not config_path(args):
        raise ConfigError("--public-key", "give --public-key FILE (or --config) to check signatures, "
                                          "or --no-signatures to check only the hash chain")
    cfg = load(args, check_files=False)
    path = public_key_path(cfg.path(cfg.audit.signing_key_file))
    if not path.is_file():
        raise ConfigError("audit.signing_key_file", f"public key {path} not found (create keys with 'dpiguard keys init')")
    return AuditVerifier.from_pem_file(path)


def cmd_verify(args) -> int:
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
    cfg = load(args, check_files=False)
    store = cfg.path(cfg.audit.path)
    before = time_arg(args.before)
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
        audit_admin(cfg, "audit_prune", detail=f"before {args.before}", pruned=[r for r in results if r["files"]])
    return 0


def cmd_unthrottle(args) -> int:
    from dpiguard.services import admin_redis_client

    cfg = load(args, check_files=False)
    removed = unthrottle(admin_redis_client(cfg), cfg.redis.prefix, args.login)
    audit_admin(cfg, "mass_access_unthrottle", user=args.login)
    print(f"{args.login}: " + ("throttle lifted (all instances within mass_access.refresh_seconds)" if removed
                               else "was not throttled; counters reset"))
    return 0


def register(sub) -> None:
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

    register_query(asub)
    register_ship(asub)
    register_export(asub)






def _time_bounds(args) -> tuple[str | None, str | None]:
    since = time_arg(args.since) if args.since else None
    until = time_arg(args.until) if args.until else None
    return (iso_ms(since) if since is not None else None, iso_ms(until) if until is not None else None)


def _source(args) -> Path:
    return Path(args.source) if args.source else _store(args)


def cmd_query(args) -> int:
    since, until = _time_bounds(args)
    flt = Filter(patient=args.patient, user=args.user, since=since, until=until, outcome=args.outcome,
                 event=args.event, reason=args.reason, instance=args.instance)
    rows = select(iter_store(_source(args)), flt, limit=args.limit)
    emit(render(rows, QUERY_COLUMNS, args.format), args.out)
    return 0


def _display_names(args) -> dict[str, str]:
    try:
        from dpiguard.services import user_directory

        return {u.login: u.display_name for u in user_directory(load(args, check_files=False)).list()}
    except Exception as exc:  # names are a convenience; the logins are still shown
        print(f"dpiguard: display names unavailable ({exc}); showing logins only", file=sys.stderr)
        return {}


def _reader(args) -> tuple[Localizer, dict[str, str]]:
    """The reader's language and time zone (--lang, --timezone, else ui.* of the configuration, else
    French and Europe/Paris), and the descriptions of categories and roles (from the policy files)."""
    lang, tz, labels = args.lang, args.timezone, {}
    if config_path(args):
        try:
            cfg = load(args, check_files=False)
            lang, tz = lang or cfg.ui.language, tz or cfg.ui.timezone
            from dpiguard.services import load_policies

            policies = load_policies(cfg)
            labels = {**dict(policies.roles), **{n: c.description for n, c in policies.categories.items()}}
        except Exception as exc:  # labels are a convenience; the codes are still shown
            print(f"dpiguard: descriptions of categories unavailable ({exc}); showing codes", file=sys.stderr)
    return Localizer(lang or DEFAULT_LANGUAGE, tz or DEFAULT_TIMEZONE), labels


def cmd_who_accessed(args) -> int:
    since, until = _time_bounds(args)
    names = _display_names(args) if args.names else None
    rows = who_accessed(iter_store(_source(args)), args.patient, since, until, names, with_names=args.names,
                        refusals=not args.allowed_only)
    columns = WHO_COLUMNS_NAMED if args.names else WHO_COLUMNS
    if args.format == "html":
        l10n, labels = _reader(args)
        text = who_accessed_html(args.patient, rows, columns, l10n, labels)
    else:
        text = render(rows, columns, args.format)
    emit(text, args.out)
    return 0


def cmd_summary(args) -> int:
    since, until = _time_bounds(args)
    summary = summarize(iter_store(_source(args)), Filter(since=since, until=until, instance=args.instance), args.top)
    if args.format == "json":
        text = orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode() + "\n"
    else:
        fmt = "csv" if args.format == "csv" else "table"
        text = ("# refusals by reason\n" + render(summary["refusals_by_reason"], ("reason", "count"), fmt)
                + "\n# users with the most refusals\n" + render(summary["users_with_most_refusals"], ("user", "refusals"), fmt)
                + "\n# top users by distinct patients\n"
                + render(summary["top_users_by_distinct_patients"], ("user", "patients"), fmt)
                + "\n# break-glass accesses\n"
                + render(summary["break_glass"], ("time", "user", "patient", "category", "break_glass_reason",
                                                  "outcome", "request_id"), fmt)
                + "\n# explanation rate by unit (share of accesses explained by a care relationship)\n"
                + render(summary["explanation_rate"]["by_unit"], EXPLANATION_COLUMNS, fmt)
                + "\n# explanation rate by role\n"
                + render(summary["explanation_rate"]["by_role"], EXPLANATION_COLUMNS, fmt)
                + "\n# privacy alerts\n" + render(summary["privacy_alerts"], ("detector", "count"), fmt))
    emit(text, args.out)
    return 0


def cmd_report(args) -> int:
    since, until = _time_bounds(args)
    summary = summarize(iter_store(_source(args)), Filter(since=since, until=until, instance=args.instance), args.top)
    l10n, labels = _reader(args)
    emit(html_report(summary, l10n=l10n, labels=labels), args.out)
    return 0


def register_query(asub) -> None:
    def common(sp):
        with_config(sp)
        sp.add_argument("--source", help="audit folder, chain folder or JSON-lines export (default: audit.path)")
        sp.add_argument("--from", dest="since", help="start (date/time, UTC unless an offset is given)")
        sp.add_argument("--to", dest="until", help="end (exclusive)")
        sp.add_argument("--out", help="write to this file instead of standard output")
        sp.set_defaults(dir=None)
        return sp

    sp = common(asub.add_parser("query", help="search records by patient, user, period, outcome"))
    sp.add_argument("--patient"); sp.add_argument("--user"); sp.add_argument("--outcome", choices=("allow", "deny", "error"))
    sp.add_argument("--event"); sp.add_argument("--reason"); sp.add_argument("--instance")
    sp.add_argument("--limit", type=int, help="only the last N matching records")
    sp.add_argument("--format", choices=("table", "csv", "json", "jsonl"), default="table")
    sp.set_defaults(func=cmd_query)

    sp = common(asub.add_parser("who-accessed", help="accesses to a patient's record, for the patient's request"))
    sp.add_argument("patient")
    sp.add_argument("--names", action="store_true", help="also show who (login and name): only when explicitly asked")
    sp.add_argument("--allowed-only", action="store_true", help="leave out the refused requests")
    sp.add_argument("--format", choices=("table", "csv", "json", "html"), default="table")
    sp.add_argument("--lang", choices=SUPPORTED, help="language of the HTML page (default: ui.language, fr)")
    sp.add_argument("--timezone", help="time zone of the HTML page (default: ui.timezone, Europe/Paris)")
    sp.set_defaults(func=cmd_who_accessed)

    sp = common(asub.add_parser("summary", help="refusal and break-glass summaries"))
    sp.add_argument("--instance"); sp.add_argument("--top", type=int, default=10)
    sp.add_argument("--format", choices=("table", "csv", "json"), default="table")
    sp.set_defaults(func=cmd_summary)

    sp = common(asub.add_parser("report", help="self-contained HTML report with charts"))
    sp.add_argument("--instance"); sp.add_argument("--top", type=int, default=10)
    sp.add_argument("--lang", choices=SUPPORTED, help="language of the report (default: ui.language, fr)")
    sp.add_argument("--timezone", help="time zone of the report (default: ui.timezone, Europe/Paris)")
    sp.set_defaults(func=cmd_report)






def _loop(step, follow: bool, interval: float, label: str, until_idle: bool = False,
          summary: Callable[[int], str] = lambda n: f"{n} record(s)") -> int:
    """Run ``step`` (returns a count) once, until idle, or (``follow``) until SIGINT/SIGTERM, which end
    the loop between two steps (never in the middle of a write). Prints what was done."""
    stop = threading.Event()
    if follow:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(f"dpiguard audit {label}: following (SIGINT or SIGTERM stops it)", flush=True)
    total, code = 0, 0
    while not stop.is_set():
        try:
            n = step()
        except redis.RedisError as exc:
            print(f"dpiguard audit {label}: Redis unavailable ({exc}); " + ("retrying" if follow else "stopped"),
                  file=sys.stderr, flush=True)
            if not follow:
                code = 1
                break
            stop.wait(interval)
            continue
        total += n
        if not follow and (not until_idle or n == 0):
            break
        if follow and n == 0:
            stop.wait(interval)
    print(f"dpiguard audit {label}: {summary(total)}" + (" (stopped)" if follow else ""), flush=True)
    return code


def cmd_ship(args) -> int:
    from dpiguard.services import admin_redis_client

    cfg = load(args, check_files=False)
    store = cfg.path(cfg.audit.path)
    shipper = Shipper(admin_redis_client(cfg), store, cfg.redis.prefix)
    return _loop(shipper.ship_once, args.follow, args.interval, "ship", until_idle=True,
                 summary=lambda n: f"{n} record(s) shipped to Redis from {len(list_chains(store))} chain(s) of {store}")


def cmd_collect(args) -> int:
    from dpiguard.services import admin_redis_client

    cfg = load(args, check_files=False)
    store = Path(args.store)
    if store.resolve() == cfg.path(cfg.audit.path).resolve():
        raise ValueError("--store must differ from audit.path (the central store is a separate copy)")
    store.mkdir(parents=True, exist_ok=True)
    lock = os.open(store / ".collector.lock", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(f"another collector is writing {store}") from None
    collector = Collector(admin_redis_client(cfg), store, cfg.redis.prefix, cfg.audit.rotate_bytes)
    return _loop(lambda: collector.collect_once(block_ms=int(args.interval * 1000)), args.follow, args.interval,
                 "collect", until_idle=True,
                 summary=lambda n: f"{n} record(s) collected into {store} ({len(collector.chains)} chain(s))")


def register_ship(asub) -> None:
    sp = with_config(asub.add_parser("ship", help="copy this host's audit chains into Redis Streams"))
    sp.add_argument("--follow", action="store_true", help="keep shipping new records (a service)")
    sp.add_argument("--interval", type=float, default=0.5, help="seconds between passes when idle")
    sp.set_defaults(func=cmd_ship)
    sp = with_config(asub.add_parser("collect", help="gather every instance's chain into a central store"))
    sp.add_argument("--store", required=True, help="central audit folder (verifiable with audit verify --dir)")
    sp.add_argument("--follow", action="store_true", help="keep collecting (a service)")
    sp.add_argument("--interval", type=float, default=0.5)
    sp.set_defaults(func=cmd_collect)






def _records(args, state: dict[str, int]) -> list[dict[str, Any]]:
    from dpiguard.audit.query import Filter
    from dpiguard.cli.audit import _source, _time_bounds

    since, until = _time_bounds(args)
    flt = Filter(patient=args.patient, user=args.user, since=since, until=until, outcome=args.outcome,
                 event=args.event)
    source = _source(args)
    chains = [source] if list_segments(source) else list_chains(source)
    out = []
    for chain in chains:
        done = state.get(chain.name, 0)
        for _, _, r in iter_chain(chain):
            if r.get("seq", 0) <= done:
                continue
            if args.state:
                state[chain.name] = max(state.get(chain.name, 0), r.get("seq", 0))
            if flt.match(r):
                out.append(r)
    out.sort(key=lambda r: (r.get("time") or "", r.get("instance") or "", r.get("seq") or 0))
    return out


def cmd_export(args) -> int:
    state: dict[str, int] = {}
    state_path = Path(args.state) if args.state else None
    if state_path and state_path.exists():
        state = orjson.loads(state_path.read_bytes())
    if args.format == "syslog":
        target = _syslog_target(args)
        if isinstance(target, str):
            print(f"dpiguard audit export: {target}", file=sys.stderr)
            return 1
    records = _records(args, state)
    if args.format == "syslog":
        host, port, tls = target
        try:
            n = send_syslog(records, host, port, tls=tls)
        except SyslogError as exc:
            print(f"dpiguard audit export: nothing sent: {exc}", file=sys.stderr)
            return 1
        print(f"sent {n} record(s) to {args.target} ({'TLS' if tls else 'plain TCP'})", file=sys.stderr)
    else:
        if args.format == "jsonl":
            lines = (orjson.dumps(r) for r in records)
        else:
            lines = (orjson.dumps(to_audit_event(r)) for r in records)
        if args.format == "fhir-bundle":
            bundle = {"resourceType": "Bundle", "type": "collection", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "entry": [{"resource": to_audit_event(r)} for r in records]}
            data = orjson.dumps(bundle, option=orjson.OPT_INDENT_2) + b"\n"
        else:
            data = b"".join(line + b"\n" for line in lines)
        if args.out:
            Path(args.out).write_bytes(data)
        else:
            sys.stdout.buffer.write(data)
    if state_path:  # only after a successful export
        tmp = state_path.with_name(state_path.name + ".tmp")
        tmp.write_bytes(orjson.dumps(state))
        tmp.replace(state_path)
    return 0


def _syslog_target(args):
    """(host, port, TLS context or None), or a one-line refusal."""
    host, _, port = (args.target or "").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return "--format syslog needs --target HOST:PORT (e.g. siem.hopital.local:6514)"
    tls = args.tls or bool(args.ca_file or args.cert_file)
    if tls and args.plain_tcp:
        return "--plain-tcp and TLS options (--tls, --ca-file, --cert-file) exclude each other"
    if args.key_file and not args.cert_file:
        return "--key-file needs --cert-file"
    if not tls and int(port) == TLS_PORT and not args.plain_tcp:
        return (f"port {TLS_PORT} is syslog over TLS (RFC 5425): add --tls (and --ca-file CA.pem for a private "
                "CA); --plain-tcp sends clear text anyway")
    try:
        context = tls_context(args.ca_file, args.cert_file, args.key_file) if tls else None
    except SyslogError as exc:
        return str(exc)
    return host.strip("[]"), int(port), context


def register_export(asub) -> None:
    sp = with_config(asub.add_parser("export", help="export records: JSON lines, FHIR AuditEvent, syslog to a SIEM"))
    sp.add_argument("--format", choices=("jsonl", "fhir", "fhir-bundle", "syslog"), default="jsonl",
                    help="fhir: one AuditEvent per line (NDJSON); fhir-bundle: one Bundle")
    sp.add_argument("--source", help="audit folder or chain folder (default: audit.path)")
    sp.add_argument("--target", help="syslog receiver HOST:PORT")
    sp.add_argument("--tls", action="store_true", help="syslog over TLS (RFC 5425), the receiver's certificate verified")
    sp.add_argument("--ca-file", help="CA certificate(s) that sign the receiver's certificate (implies --tls)")
    sp.add_argument("--cert-file", help="client certificate, if the receiver asks for one (implies --tls)")
    sp.add_argument("--key-file", help="private key of --cert-file (if not in the same file)")
    sp.add_argument("--plain-tcp", action="store_true",
                    help=f"clear-text TCP even to port {TLS_PORT} (records name patients and users: avoid)")
    sp.add_argument("--state", help="file remembering the last seq exported per chain (send each record once)")
    sp.add_argument("--from", dest="since"); sp.add_argument("--to", dest="until")
    sp.add_argument("--patient"); sp.add_argument("--user"); sp.add_argument("--event")
    sp.add_argument("--outcome", choices=("allow", "deny", "error"))
    sp.add_argument("--out")
    sp.set_defaults(func=cmd_export, dir=None)
