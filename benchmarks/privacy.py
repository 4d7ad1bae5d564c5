"""Privacy monitoring, measured: ``python -m benchmarks.privacy --profile ci|full [--seed N] [--out DIR]``.

1. a synthetic month of a hospital (:mod:`benchmarks.privacy_data`) with injected snooping cases of
   every kind (the ground truth);
2. everything the detectors need goes through the production code: care-team data through
   ``CareTeamBulkLoader``, patient demographics through the learner's parsers (HL7 PID segments for
   half the patients, FHIR Patient resources for the others, spelled the way each source spells) and
   ``PrivacyStore``, the staff file through ``dpiguard privacy staff import``'s reader, the VIP list
   through ``PrivacyStore.set_vip``; the month's access records are written with ``AuditLog`` into two
   chains (two proxies sharing the load);
3. the real :class:`~dpiguard.privacy.monitor.PrivacyMonitor` reads the chains with the shipped
   ``policies/`` (privacy.yaml as committed) against a real Redis, and its alerts (records of its own
   chain) are compared with the ground truth.

Reported per detector: precision (alerts matching an injected case, whatever its kind / all alerts of
the detector) and recall (injected cases of the detector's kind it alerted on); and false alerts per
1,000 staff per day (alerts matching no injected case). Writes ``<out>/privacy.{json,md}`` for the
``full`` profile and ``<out>/privacy-ci.{json,md}`` for ``ci``. Tuning was done with seed 7; the
committed results use seed 2026 (the default), never used while tuning.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import orjson
import redis

from dpiguard.audit.chain import AuditLog, read_records
from dpiguard.careteam.bulkload import AssignmentRow, CareTeamBulkLoader, MembershipRow, StayRow
from dpiguard.cli.privacy import read_staff
from dpiguard.config import load_config
from dpiguard.demo.runner import write_demo_config
from dpiguard.policy.snapshot import PolicySet
from dpiguard.privacy.rules import DETECTORS, LABELS
from dpiguard.privacy.sources import from_fhir_patient, from_hl7
from dpiguard.services import careteam_store, privacy_monitor, privacy_store, pseudonym_hasher
from tests.redis_server import LocalRedis

from .privacy_data import (
    DAY,
    HOUR,
    KINDS,
    Scale,
    World,
    build_world,
    inject,
    legitimate,
    written_address,
    written_family,
)

ROOT = Path(__file__).resolve().parents[1]
PROFILES = {"ci": (Scale(500, 10_000, 14), 8), "full": (Scale(5_000, 100_000, 30), 40)}
REPLAY_RECORDS = {"ci": 10**9, "full": 600_000}  # the idempotence check: a whole ci trail, a fifth of the full one
TARGET_RECALL = 0.95
TARGET_FALSE_PER_1000 = 5.0


def log(msg: str) -> None:
    print(f"[privacy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def hl7_message(pid: str, w: World, rng: random.Random, n: int) -> str:
    p = w.people[pid]
    vip = "Y" if pid in w.vip_adt else ""
    return ("MSH|^~\\&|PAS|HOP|DPIGUARD|HOP|20261001120000||ADT^A08|M%d|P|2.5|||||FRA|8859/1\r" % n
            + f"PID|||{pid}^^^HOP^PI||{written_family(p.family, rng)}^{p.given}||{p.birth.replace('-', '')}|U|||"
              f"{written_address(p, rng)}^^Ville^^{p.postal}^FRA^H\r"
            + f"PV1||I|U000|||||||||||||{vip}\r")


def fhir_patient(pid: str, w: World, rng: random.Random) -> dict:
    p = w.people[pid]
    res = {"resourceType": "Patient", "id": pid, "name": [{"family": written_family(p.family, rng), "given": [p.given]}],
           "birthDate": p.birth, "address": [{"line": [written_address(p, rng)], "postalCode": p.postal, "city": "Ville"}]}
    if pid in w.vip_adt:
        res["meta"] = {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                                     "code": "R" if w.vip[pid] == "confidential" else "V"}]}
        if w.vip[pid] == "vip":
            res["meta"]["security"] = [{"code": "VIP"}]
    return res


def load(w: World, cfg, client: redis.Redis, workdir: Path) -> dict:
    t0 = time.perf_counter()
    loader = CareTeamBulkLoader(careteam_store(cfg, client), batch_size=5000)
    members = loader.add_unit_members(MembershipRow(s.login, u, w.start - 400 * DAY, None) for s in w.staff
                                      for u in s.units)
    stays = loader.add_stays(StayRow(st.patient, st.unit, st.start, st.end, st.id) for st in w.stays)
    assigns = loader.assign_many(AssignmentRow(*a) for a in w.assignments)
    t1 = time.perf_counter()
    hasher, store = pseudonym_hasher(cfg), privacy_store(cfg, client)
    rng = random.Random(w.seed + 9)
    batch = []
    via_hl7 = 0
    for i, pid in enumerate(w.patients):
        if i % 2 == 0:
            patient, d = from_hl7(hl7_message(pid, w, rng, i))
            via_hl7 += 1
        else:
            patient, d = pid, from_fhir_patient(fhir_patient(pid, w, rng))
        batch.append((patient, hasher.pseudonyms(d)))
        if len(batch) >= 2000:
            store.learn_patients(batch)
            batch = []
    store.learn_patients(batch)
    for pid, level in w.vip.items():
        if pid not in w.vip_adt:
            store.set_vip(pid, level)
    t2 = time.perf_counter()
    csv_path = workdir / "staff.csv"
    lines = ["login,family_name,given_name,birth_date,address,postal_code,patient_ids"]
    for s in w.staff:
        p = s.person
        address = written_address(p, rng).replace(",", " ")
        lines.append(f"{s.login},{p.family},{p.given},{p.birth},{address},{p.postal},"
                     f"{s.patient if s.link == 'csv' else ''}")
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report, rows = read_staff(str(csv_path))
    if report.errors:
        raise RuntimeError("\n".join(report.errors[:5]))
    for login, d, patients in rows:
        store.import_staff(login, hasher.pseudonyms(d), patients)
    t3 = time.perf_counter()
    return {"memberships": members, "stays": stays, "assignments": assigns, "careteam_seconds": round(t1 - t0, 1),
            "patients_learnt": len(w.patients), "via_hl7": via_hl7, "via_fhir": len(w.patients) - via_hl7,
            "demographics_seconds": round(t2 - t1, 1), "staff_imported": len(rows),
            "staff_linked_by_csv": sum(1 for s in w.staff if s.link == "csv"),
            "staff_linked_by_identity": sum(1 for s in w.staff if s.link == "identity"),
            "staff_seconds": round(t3 - t2, 1), "vip": len(w.vip), "vip_from_feeds": len(w.vip_adt)}


def write_trail(w: World, audit_dir: Path, seed: int, per_kind: int) -> dict:
    rng = random.Random(seed + 3)
    injected = sorted(inject(w, random.Random(seed + 4), per_kind), key=lambda x: x[0])
    chains = [AuditLog(audit_dir, name, fsync=False, checkpoint_records=100_000).open() for name in ("px1", "px2")]
    counts = {"records": 0, "injected_records": len(injected)}
    carry: list = []
    inj = 0
    for d, day in enumerate(legitimate(w, rng)):
        cut = w.day_start(d + 1) + 7 * HOUR if d + 1 < w.scale.days else float("inf")
        while inj < len(injected) and injected[inj][0] < cut:
            day.append(injected[inj])
            inj += 1
        rows = sorted(carry + day, key=lambda x: x[0])
        carry = [x for x in rows if x[0] >= cut]
        rows = [x for x in rows if x[0] < cut]
        last = {}
        for t, rec in rows:
            rec["time"] = _iso(t)
            i = zlib.crc32(rec["user"].encode()) % 2  # sticky sessions: a user stays on one proxy
            last[i] = chains[i].submit(rec)
            counts["records"] += 1
        for future in last.values():
            future.result(120)
    for c in chains:
        c.close()
    counts["days"] = w.scale.days
    return counts


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def request_path_costs(cfg, client: redis.Redis, w: World, policies: PolicySet, samples: int = 2000) -> dict:
    """What the request path pays: the learner's note (a queue append), the FHIR hook's test, and a cold
    care-team decision (the Redis round trip) with and without decision-time privacy actions."""
    from dataclasses import replace

    from dpiguard.careteam.breakglass import BreakGlassStore
    from dpiguard.careteam.objections import ObjectionStore
    from dpiguard.decision.access import AccessDecider
    from dpiguard.policy.privacy import PrivacyPolicy
    from dpiguard.services import privacy_learner

    learner = privacy_learner(cfg, client)  # not started: notes only
    body = orjson.dumps(fhir_patient(w.patients[0], w, random.Random(1)))
    t0 = time.perf_counter_ns()
    for _ in range(samples * 10):
        if b'"Patient"' in body:
            learner.note_fhir(body)
    note_ns = (time.perf_counter_ns() - t0) / (samples * 10)
    decider = AccessDecider(careteam_store(cfg, client), ObjectionStore(client, cfg.redis.prefix),
                            BreakGlassStore(client, cfg.redis.prefix))
    strict = PrivacyPolicy.from_text("detectors:\n  vip:\n    action: require_break_glass\n"
                                     "  self_access:\n    action: refuse\n", "privacy.yaml")
    variants = {"alert_only": policies, "with_decision_time_actions": replace(policies, privacy=strict)}
    rng = random.Random(5)
    staff = [s for s in w.staff if s.units]
    pairs = [(rng.choice(staff).login, rng.choice(w.patients)) for _ in range(samples)]
    out = {"note_ns_per_answer": round(note_ns, 1)}
    for name, pol in variants.items():
        times = []
        for login, patient in pairs:
            t = time.perf_counter_ns()
            decider.decide_with_units(login, patient, "biology", "read", True, w.start + 10 * DAY, pol)
            times.append(time.perf_counter_ns() - t)
        times.sort()
        out[name] = {"p50_us": round(times[len(times) // 2] / 1000, 1), "p99_us": round(times[int(len(times) * .99)] / 1000, 1)}
    return out


def score(w: World, alerts: list[dict], staff: int, days: int) -> dict:
    pairs = {(c.user, p) for c in w.cases for p in c.patients}
    day_pairs = {(c.user, c.day) for c in w.cases if c.day}
    by_kind = {k: [c for c in w.cases if c.kind == k] for k in KINDS}
    hits: dict[str, set[tuple[str, str]]] = {d: set() for d in DETECTORS}
    per: dict[str, dict] = {d: {"alerts": 0, "true": 0} for d in DETECTORS}
    false_alerts = 0
    examples: dict[str, list] = {}
    for a in alerts:
        det = a["reason"]
        per[det]["alerts"] += 1
        if a.get("patient"):
            ok = (a["user"], a["patient"]) in pairs
            hits[det].add((a["user"], a["patient"]))
        else:
            day = a["evidence"].get("day")
            ok = (a["user"], day) in day_pairs
            hits[det].add((a["user"], day))
        if ok:
            per[det]["true"] += 1
        else:
            false_alerts += 1
            examples.setdefault(det, [])
            if len(examples[det]) < 6:
                examples[det].append({"user": a["user"], "evidence": a["evidence"], "care_team": a.get("care_team")})
    detectors = {}
    for det in DETECTORS:
        cases = by_kind.get(det, [])
        if det in ("volume", "unusual_hours"):
            missed = [c for c in cases if (c.user, c.day) not in hits[det]]
        else:
            missed = [c for c in cases if not any((c.user, p) in hits[det] for p in c.patients)]
        found = len(cases) - len(missed)
        n = per[det]["alerts"]
        detectors[det] = {"label": LABELS[det], "injected_cases": len(cases), "detected": found,
                          "recall": round(found / len(cases), 3) if cases else None,
                          "alerts": n, "true_alerts": per[det]["true"], "false_alerts": n - per[det]["true"],
                          "precision": round(per[det]["true"] / n, 3) if n else None,
                          "missed_examples": [{"user": c.user, "patients": c.patients[:3], "day": c.day, "how": c.path}
                                              for c in missed[:5]]}
    return {"detectors": detectors, "false_alerts": false_alerts,
            "false_alerts_per_1000_staff_per_day": round(false_alerts / (staff / 1000) / days, 3),
            "alerts": len(alerts), "false_alert_examples": examples}


def run(profile: str, seed: int, out: Path) -> int:
    scale, per_kind = PROFILES[profile]
    t_start = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="dpiguard-privacy-"))
    server = LocalRedis().start()
    result: dict = {"profile": profile, "seed": seed, "tuning_seed": 7, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "scale": {"staff": scale.staff, "patients": scale.patients, "days": scale.days}}
    try:
        config_path = write_demo_config(workdir, host="127.0.0.1", port=1, upstream_port=2, redis_url=server.url)
        cfg = load_config(config_path)
        client = redis.Redis.from_url(server.url)
        log(f"profile {profile}, seed {seed}: building {scale.staff} staff, {scale.patients} patients, {scale.days} days")
        w = build_world(scale, seed)
        result["load"] = load(w, cfg, client, workdir)
        log(f"loaded: {result['load']}")
        audit_dir = workdir / "audit"
        t0 = time.perf_counter()
        result["trail"] = write_trail(w, audit_dir, seed, per_kind)
        result["trail"]["seconds"] = round(time.perf_counter() - t0, 1)
        result["trail"]["legit_vip_accesses"] = w.legit_vip_accesses
        result["cases"] = {k: sum(1 for c in w.cases if c.kind == k) for k in KINDS}
        log(f"trail written: {result['trail']}; cases {result['cases']}")
        policies = PolicySet.load(ROOT / "policies")
        own = AuditLog(audit_dir, "privacy", fsync=False).open()
        monitor = privacy_monitor(cfg, client, own, lambda: policies, source=audit_dir)
        t0 = time.perf_counter()
        stats = monitor.run(until_idle=True)
        seconds = time.perf_counter() - t0
        own.close()
        result["monitor"] = {"seconds": round(seconds, 1), "records": stats.records, "accesses": stats.accesses,
                             "accesses_per_second": round(stats.accesses / max(seconds, 1e-9)),
                             "alerts": stats.alerts, "duplicates_suppressed": stats.duplicates,
                             "deferred_candidates": stats.pending, "days_closed": stats.days_closed,
                             "redis_used_memory_mib": round(client.info("memory")["used_memory"] / 2**20, 1)}
        log(f"monitor: {result['monitor']}")
        result["request_path"] = request_path_costs(cfg, client, w, policies)
        log(f"request path: {result['request_path']}")
        alerts = [r for r in read_records(audit_dir / "privacy") if r.get("event") == "privacy_alert"]
        result.update(score(w, alerts, scale.staff, scale.days))
        result["vip_every_access_extra_alerts_per_1000_staff_per_day"] = round(
            w.legit_vip_accesses / (scale.staff / 1000) / scale.days, 2)
        # idempotence: a second monitor over the same chains from position 0 raises nothing new
        client.delete(cfg.redis.prefix + ":pv:pos")
        again = AuditLog(audit_dir, "privacy-replay", fsync=False).open()
        replay = privacy_monitor(cfg, client, again, lambda: policies, source=audit_dir)
        replay.exclude.add("privacy")
        limit = REPLAY_RECORDS[profile]
        while replay.stats.records < limit and replay.step(until_idle=True):
            pass
        rs = replay.stats
        again.close()
        result["replay_from_start"] = {"records": rs.records, "alerts": rs.alerts, "duplicates_suppressed": rs.duplicates}
        log(f"replay from seq 0 of {rs.records} records: {rs.alerts} new alerts, {rs.duplicates} suppressed")
    finally:
        server.close()
        shutil.rmtree(workdir, ignore_errors=True)
    result["elapsed_seconds"] = round(time.monotonic() - t_start, 1)
    recalls = [d["recall"] for d in result["detectors"].values() if d["recall"] is not None]
    result["targets"] = {"recall_at_least_0_95_every_detector": all(r >= TARGET_RECALL for r in recalls),
                         "false_alerts_at_most_5_per_1000_staff_per_day":
                             result["false_alerts_per_1000_staff_per_day"] <= TARGET_FALSE_PER_1000}
    name = "privacy" if profile == "full" else f"privacy-{profile}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    write_markdown(result, out / f"{name}.md")
    log(f"written {out}/{name}.{{json,md}} in {result['elapsed_seconds']} s; targets {result['targets']}")
    if result["replay_from_start"]["alerts"]:  # the one gate: alerts must be idempotent
        log("FAIL: replaying the chains raised alerts again")
        return 1
    return 0


def write_markdown(r: dict, path: Path) -> None:
    findings = ""
    if path.exists() and "<!-- findings -->" in path.read_text():
        findings = path.read_text().split("<!-- findings -->", 1)[1]
    lines = [f"# dpiguard privacy monitoring benchmark — profile `{r['profile']}`", "",
             f"Run {r['started']}, {r['elapsed_seconds']} s. Seed **{r['seed']}** (the detectors were tuned with "
             f"seed {r['tuning_seed']}, never with this one). Synthetic hospital (benchmarks/privacy_data.py): "
             f"{r['scale']['staff']:,} staff, {r['scale']['patients']:,} patients, {r['scale']['days']} days; "
             f"{r['trail']['records']:,} access records in two chains, {r['trail']['injected_records']:,} of them "
             f"from injected snooping cases.", "",
             f"Loaded through production code: {r['load']['stays']:,} stays, {r['load']['assignments']:,} assignments, "
             f"{r['load']['memberships']:,} memberships; demographics of {r['load']['patients_learnt']:,} patients "
             f"({r['load']['via_hl7']:,} from HL7 PID segments, {r['load']['via_fhir']:,} from FHIR Patient resources), "
             f"{r['load']['staff_imported']:,} staff from the CSV file ({r['load']['staff_linked_by_csv']} linked to "
             f"their patient id in the file, {r['load']['staff_linked_by_identity']} left to identity matching), "
             f"{r['load']['vip']} confidential/VIP patients ({r['load']['vip_from_feeds']} flagged by the feeds).", "",
             "## Detectors", "",
             "| detector | injected cases | detected | recall | alerts | true | false | precision |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, d in r["detectors"].items():
        lines.append(f"| {name} | {d['injected_cases']} | {d['detected']} | {_f(d['recall'])} | {d['alerts']} | "
                     f"{d['true_alerts']} | {d['false_alerts']} | {_f(d['precision'])} |")
    m = r["monitor"]
    lines += ["", f"**False alerts: {r['false_alerts']} in {r['scale']['days']} days = "
                  f"{r['false_alerts_per_1000_staff_per_day']} per 1,000 staff per day** (target ≤ 5). "
                  f"Targets: recall ≥ 0.95 for every detector: "
                  f"**{'met' if r['targets']['recall_at_least_0_95_every_detector'] else 'missed'}**; false alerts: "
                  f"**{'met' if r['targets']['false_alerts_at_most_5_per_1000_staff_per_day'] else 'missed'}**.", "",
              "Precision counts an alert as true when its (user, patient) — or (user, day) for volume and hours — is "
              "one of the injected snooping accesses, whatever the kind of the case (a family case without any care "
              "event is also a broad-rule access). Recall counts the injected cases of the detector's own kind it "
              "alerted on.", "",
              f"`vip` with `every_access: true` would add about {r['vip_every_access_extra_alerts_per_1000_staff_per_day']} "
              "alerts per 1,000 staff per day (the care team's legitimate accesses to flagged patients), which is why "
              "it is off in the shipped policies/privacy.yaml.", "",
              "## The monitor", "",
              f"{m['accesses']:,} accesses ({m['records']:,} records) read from the two chains in {m['seconds']} s "
              f"({m['accesses_per_second']:,} accesses/s, one process, one Redis, on a shared 2-core machine); "
              f"{m['deferred_candidates']:,} candidates waited for their care-event window; {m['days_closed']} days closed "
              f"for the baselines; Redis {m['redis_used_memory_mib']} MiB at the end. "
              f"Replaying the chains from seq 0 with a second monitor (position lost; "
              f"{r['replay_from_start']['records']:,} records): "
              f"{r['replay_from_start']['alerts']} new alerts, {r['replay_from_start']['duplicates_suppressed']} "
              "recognised as already raised (alert ids are idempotent).", "",
              "## The request path", "",
              f"The learner's note on a FHIR answer holding a Patient (substring test + queue append): "
              f"{r['request_path']['note_ns_per_answer']} ns. A cold care-team decision "
              f"(`AccessDecider.decide_with_units`, one pipelined Redis round trip; cached afterwards, the cache hit "
              f"path is unchanged): p50 {r['request_path']['alert_only']['p50_us']} µs / p99 "
              f"{r['request_path']['alert_only']['p99_us']} µs with the shipped alert-only privacy.yaml (no extra read), "
              f"p50 {r['request_path']['with_decision_time_actions']['p50_us']} µs / p99 "
              f"{r['request_path']['with_decision_time_actions']['p99_us']} µs with decision-time actions (three more "
              "reads in the same round trip). The monitor itself runs in its own process or thread.", "",
              "## False alert examples", ""]
    for det, ex in r["false_alert_examples"].items():
        lines.append(f"- `{det}`: " + "; ".join(f"{e['user'].split('.')[0]} {orjson.dumps(e['evidence']).decode()}"
                                                 for e in ex))
    lines += ["", "## Findings", "", "<!-- findings -->"]
    path.write_text("\n".join(lines) + (findings if findings else "\n"), encoding="utf-8")


def _f(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.privacy", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="ci")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    return run(args.profile, args.seed, Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
