"""``dpiguard adt ...`` and ``dpiguard import ...``: the patient-movement feed and bulk loads.

    dpiguard adt listen [--host H] [--port N]      the MLLP listener alone (HL7 v2 ADT feed)
    dpiguard adt send FILE [--host H] --port N     send HL7 messages (one per blank-line-separated
                                                   block, or one per file) and print the ACKs
    dpiguard adt replay [--dry-run]                rebuild visits and stays from the journal
    dpiguard adt visits --patient P                the visits (ADT state) of a patient
    dpiguard import stays|members|assignments FILE [--dry-run]
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys

import orjson

from dpiguard.careteam import imports as csvimport
from dpiguard.careteam.mllp import MllpServer, frame, listener_settings
from dpiguard.cli.common import audit_admin, load, with_config
from dpiguard.policy.snapshot import PolicySet


def cmd_adt(args) -> int:
    from dpiguard.services import movement_store

    cfg = load(args, check_files=False)
    if args.adt_cmd == "listen":
        if args.host:
            cfg.adt.listen_host = args.host
        if args.port is not None:
            cfg.adt.listen_port = args.port
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        return asyncio.run(_listen(cfg))
    if args.adt_cmd == "send":
        return _send(args.file, args.host or cfg.adt.listen_host, args.port or cfg.adt.listen_port)
    store = movement_store(cfg)
    if args.adt_cmd == "replay":
        result = store.replay(dry_run=args.dry_run, progress=lambda m: print(f"warning: {m}", file=sys.stderr))
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        if not args.dry_run:
            audit_admin(cfg, "adt_replay", entries=result["entries"], changed=len(result["changed"]))
        return 0
    if args.adt_cmd == "visits":
        print(orjson.dumps(store.visits(args.patient), option=orjson.OPT_INDENT_2).decode())
        return 0
    return 2


async def _listen(cfg) -> int:
    """``dpiguard adt listen``: the MLLP listener alone, until SIGINT/SIGTERM."""
    from dpiguard.services import adt_processor, privacy_learner

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    learner = privacy_learner(cfg).start() if cfg.privacy.learn_demographics else None
    processor = adt_processor(cfg, learner=learner)
    server = await MllpServer(processor, listener_settings(cfg)).start()
    print(f"dpiguard adt: listening for HL7 MLLP on {cfg.adt.listen_host}:{server.port} (pid {os.getpid()})",
          flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()
        processor.audit.close()
        if learner is not None:
            learner.stop()
    return 0


def _send(path: str, host: str, port: int) -> int:
    """Tiny MLLP client for operators and tests of the feed."""
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    blocks = [b.strip() for b in text.replace("\r\n", "\n").split("\n\n") if b.strip()]
    worst = 0
    with socket.create_connection((host, port), timeout=30) as sock:
        for block in blocks:
            sock.sendall(frame("\r".join(line.strip() for line in block.split("\n")) + "\r"))
            data = b""
            while not data.endswith(b"\x1c\r"):
                chunk = sock.recv(65536)
                if not chunk:
                    print("connection closed by the listener", file=sys.stderr)
                    return 1
                data += chunk
            ack = data.strip(b"\x0b\x1c\r").decode("utf-8", "replace")
            print(ack.replace("\r", "\n").strip() + "\n")
            msa = [s for s in ack.split("\r") if s.startswith("MSA|")]
            if not msa or msa[0].split("|")[1] != "AA":
                worst = 1
    return worst


def cmd_import(args) -> int:
    from dpiguard.services import movement_store, redis_client

    cfg = load(args, check_files=False)
    client = redis_client(cfg)
    tz = cfg.adt.timezone
    if args.import_cmd == "stays":
        declared = PolicySet.load(cfg.path(cfg.policies.dir)).careteam.units  # transversal units
        report = csvimport.import_stays(movement_store(cfg, client), args.file, tz, dry_run=args.dry_run,
                                        known=csvimport.known_units(client, cfg.redis.prefix, declared))
    elif args.import_cmd == "members":
        report = csvimport.import_members(client, cfg.redis.prefix, args.file, tz, dry_run=args.dry_run)
    else:
        report = csvimport.import_assignments(client, cfg.redis.prefix, args.file, tz, dry_run=args.dry_run)
    lines = report.lines()
    for line in lines[:-1]:
        print(line, file=sys.stderr)
    print(lines[-1])
    if not args.dry_run and not report.errors:
        audit_admin(cfg, f"import_{args.import_cmd}", file=str(args.file), rows=report.rows,
                     applied=report.applied, refused=len(report.refused))
    return 0 if report.ok else 1


def register(sub) -> None:
    adt = sub.add_parser("adt", help="patient movements: HL7 v2 ADT feed over MLLP").add_subparsers(
        dest="adt_cmd", required=True)
    sp = with_config(adt.add_parser("listen", help="run the MLLP listener of the ADT feed"))
    sp.add_argument("--host", help="address to listen on (default: adt.listen_host)")
    sp.add_argument("--port", type=int, help="port (default: adt.listen_port)")
    sp = with_config(adt.add_parser("send", help="send HL7 messages from a file to a listener, print the ACKs"))
    sp.add_argument("file", help="file of messages separated by blank lines ('-' = standard input)")
    sp.add_argument("--host")
    sp.add_argument("--port", type=int)
    sp = with_config(adt.add_parser("replay", help="rebuild visits and stays from the movement journal"))
    sp.add_argument("--dry-run", action="store_true", help="only report the patients that would change")
    sp = with_config(adt.add_parser("visits", help="the visits (ADT state) of a patient"))
    sp.add_argument("--patient", required=True)
    for sp in adt.choices.values():
        sp.set_defaults(func=cmd_adt)

    imp = sub.add_parser("import", help="bulk loads from CSV (census, memberships, assignments)").add_subparsers(
        dest="import_cmd", required=True)
    for name, help_text in (("stays", "census of current stays: patient,unit,start[,visit]"),
                            ("members", "unit memberships: login,unit[,from,to]"),
                            ("assignments", "explicit assignments: login,patient[,kind,from,to]")):
        sp = with_config(imp.add_parser(name, help=help_text))
        sp.add_argument("file")
        sp.add_argument("--dry-run", action="store_true", help="validate only")
        sp.set_defaults(func=cmd_import)
